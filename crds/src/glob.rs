//! Precompiled glob lists and allow/deny policies over names.
//!
//! Globs support `*`, `?`, `[abc]` and `{a,b}`; `*` also matches `.` and `/`, so `warehouse.*`
//! covers every tool of the `warehouse` connection. A list serialises as its patterns and is
//! recompiled when read back, so snapshots stay plain data.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Parses one glob, returning a message a user can act on when it is invalid.
pub fn parse_glob(pattern: &str) -> Result<Glob, String> {
    if pattern.is_empty() {
        return Err("a glob must not be empty".to_string());
    }
    GlobBuilder::new(pattern)
        .literal_separator(false)
        .backslash_escape(true)
        .build()
        .map_err(|e| format!("invalid glob {pattern:?}: {}", e.kind()))
}

/// A compiled list of globs; matches a name when any glob matches it.
#[derive(Clone, Debug)]
pub struct GlobList {
    patterns: Vec<String>,
    set: GlobSet,
}

impl GlobList {
    /// Compiles patterns; the error names the first invalid one and why.
    pub fn new(patterns: &[String]) -> Result<Self, (usize, String)> {
        let mut builder = GlobSetBuilder::new();
        for (index, pattern) in patterns.iter().enumerate() {
            builder.add(parse_glob(pattern).map_err(|e| (index, e))?);
        }
        let set = builder.build().map_err(|e| (0, e.to_string()))?;
        Ok(Self { patterns: patterns.to_vec(), set })
    }

    /// A list that matches nothing.
    pub fn empty() -> Self {
        Self { patterns: Vec::new(), set: GlobSet::empty() }
    }

    /// Whether any glob matches `name`.
    pub fn is_match(&self, name: &str) -> bool {
        self.set.is_match(name)
    }

    /// Indexes of the globs that match `name`.
    pub fn matching_indexes(&self, name: &str) -> Vec<usize> {
        self.set.matches(name)
    }

    /// The source patterns.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}

impl PartialEq for GlobList {
    fn eq(&self, other: &Self) -> bool {
        self.patterns == other.patterns
    }
}

impl Serialize for GlobList {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.patterns.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for GlobList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let patterns = Vec::<String>::deserialize(deserializer)?;
        GlobList::new(&patterns).map_err(|(_, e)| serde::de::Error::custom(e))
    }
}

/// Allow and deny lists: a name is permitted when an allow glob matches and no deny glob does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Names permitted unless denied.
    pub allow: GlobList,
    /// Names refused even when allowed.
    pub deny: GlobList,
}

impl Policy {
    /// Whether `name` is permitted.
    pub fn permits(&self, name: &str) -> bool {
        self.allow.is_match(name) && !self.deny.is_match(name)
    }

    /// A policy that permits nothing.
    pub fn nothing() -> Self {
        Self { allow: GlobList::empty(), deny: GlobList::empty() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn list(p: &[&str]) -> GlobList {
        GlobList::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("valid globs")
    }

    #[test]
    fn star_crosses_dots_and_slashes() {
        let l = list(&["warehouse.*"]);
        assert!(l.is_match("warehouse.query"));
        assert!(l.is_match("warehouse.a.b/c"));
        assert!(!l.is_match("warehouses.query"));
        assert!(!l.is_match("github.query"));
    }

    #[test]
    fn deny_wins_over_allow() {
        let p = Policy { allow: list(&["notes.*"]), deny: list(&["notes.delete_*"]) };
        assert!(p.permits("notes.search"));
        assert!(!p.permits("notes.delete_note"));
        assert!(!p.permits("other.search"));
        assert!(!Policy::nothing().permits("notes.search"));
    }

    #[test]
    fn invalid_globs_are_named() {
        let err = GlobList::new(&["ok.*".into(), "bad[".into()]).unwrap_err();
        assert_eq!(err.0, 1);
        assert!(err.1.contains("bad["), "{}", err.1);
        assert!(GlobList::new(&["".into()]).is_err());
    }

    #[test]
    fn round_trips_through_json() {
        let l = list(&["a.*", "b.{x,y}"]);
        let back: GlobList = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(back, l);
        assert!(back.is_match("b.y"));
    }

    proptest! {
        #[test]
        fn literal_names_match_themselves(name in "[a-z][a-z0-9_]{0,10}\\.[a-z][a-z0-9_]{0,10}") {
            prop_assert!(list(&[&name]).is_match(&name));
            let prefix = name.split('.').next().unwrap().to_string();
            let prefix_glob = format!("{prefix}.*");
            prop_assert!(list(&[&prefix_glob]).is_match(&name));
        }

        #[test]
        fn deny_star_denies_everything(name in "[ -~]{1,30}") {
            let p = Policy { allow: list(&["*"]), deny: list(&["*"]) };
            prop_assert!(!p.permits(&name));
        }

        #[test]
        fn arbitrary_patterns_never_panic(pattern in "[ -~]{0,20}", name in "[ -~]{0,20}") {
            if let Ok(l) = GlobList::new(&[pattern]) { let _ = l.is_match(&name); }
        }
    }
}
