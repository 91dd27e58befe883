//! Problems found while reading or compiling objects, in words a user can act on.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Which object a problem is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectRef {
    /// Kind, such as `Persona`.
    pub kind: String,
    /// Namespace (the tenant).
    pub namespace: String,
    /// Object name.
    pub name: String,
}

impl ObjectRef {
    /// A reference to `kind` `namespace/name`.
    pub fn new(kind: &str, namespace: &str, name: &str) -> Self {
        Self { kind: kind.to_string(), namespace: namespace.to_string(), name: name.to_string() }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Whether a problem stops a snapshot from being built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The configuration is refused; the last good snapshot keeps serving.
    Error,
    /// The configuration is used; the named part is left out or may not do what was meant.
    Warning,
}

/// One problem: which object, which field, what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Problem {
    /// Error or warning.
    pub severity: Severity,
    /// The object the problem is about.
    pub object: ObjectRef,
    /// Path of the field, such as `spec.tools.allow[1]`.
    pub field: String,
    /// What is wrong and, where it helps, what to do.
    pub message: String,
}

impl Problem {
    /// An error about `field` of `object`.
    pub fn error(object: &ObjectRef, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { severity: Severity::Error, object: object.clone(), field: field.into(), message: message.into() }
    }

    /// A warning about `field` of `object`.
    pub fn warning(object: &ObjectRef, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { severity: Severity::Warning, object: object.clone(), field: field.into(), message: message.into() }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        if self.field.is_empty() {
            write!(f, "{severity}: {}: {}", self.object, self.message)
        } else {
            write!(f, "{severity}: {}: {}: {}", self.object, self.field, self.message)
        }
    }
}
