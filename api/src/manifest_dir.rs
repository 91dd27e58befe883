//! A directory of manifests: the YAML files `kubectl apply -f` takes, read in a stable order.

use portcullis_crds::{Object, ObjectRef, Problem, parse_manifests};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Files that can hold manifests, with size and modification time: a change to any reloads.
pub fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(path);
            } else if is_manifest(&path) {
                out.push((path, meta.len(), meta.modified().ok()));
            }
        }
    }
    out.sort();
    out
}

fn is_manifest(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        && !path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

/// Reads every manifest file under `dir`: the objects, and the problems of unreadable files or
/// documents.
pub fn read_dir(dir: &Path) -> (Vec<Object>, Vec<Problem>) {
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    for (path, _, _) in fingerprint(dir) {
        let source = path.strip_prefix(dir).unwrap_or(&path).display().to_string();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let (o, p) = parse_manifests(&source, &text);
                objects.extend(o);
                problems.extend(p);
            }
            Err(e) => {
                problems.push(Problem::error(&ObjectRef::new("File", "", &source), "", format!("cannot read: {e}")))
            }
        }
    }
    (objects, problems)
}
