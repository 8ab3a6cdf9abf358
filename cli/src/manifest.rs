//! What `final` and `diff` write about a change set: `<pkg>.changes.json`,
//! Buildroot's `packages-file-list.txt`, and JSON Lines on stdout.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use layerpack_core::jsonbytes::to_json;
use layerpack_core::model::{Change, ChangeKind, ChangeSet};
use layerpack_core::session::write_atomic;
use layerpack_core::tree::hex;
use serde_json::{json, Map, Value};

/// One change as a JSON object.
pub fn change_json(c: &Change) -> Value {
    let m = &c.meta;
    let mut o = Map::new();
    o.insert("path".into(), to_json(c.path.as_bytes()));
    o.insert("change".into(), c.kind.as_str().into());
    if let ChangeKind::Modified { content_changed } = c.kind {
        o.insert("content_changed".into(), content_changed.into());
    }
    o.insert("type".into(), m.kind.as_str().into());
    o.insert("mode".into(), format!("{:04o}", m.mode).into());
    o.insert("uid".into(), m.uid.into());
    o.insert("gid".into(), m.gid.into());
    o.insert("size".into(), m.size.into());
    o.insert("mtime_ns".into(), m.mtime_ns.into());
    if let Some(h) = &m.sha256 {
        o.insert("sha256".into(), hex(h).into());
    }
    if let Some(t) = &m.link_target {
        o.insert("target".into(), to_json(t));
    }
    if let Some((major, minor)) = m.rdev {
        o.insert("rdev".into(), json!([major, minor]));
    }
    if let Some(g) = m.link_group {
        o.insert("link_group".into(), g.into());
    }
    if !m.xattrs.is_empty() {
        let x: Vec<Value> = m
            .xattrs
            .iter()
            .map(|(k, v)| json!({"name": to_json(k), "value": to_json(v)}))
            .collect();
        o.insert("xattrs".into(), x.into());
    }
    Value::Object(o)
}

/// Counts of each kind of change.
pub fn summary(cs: &ChangeSet) -> Value {
    let (mut added, mut modified, mut metadata, mut deleted) = (0, 0, 0, 0);
    for c in cs.changes() {
        match c.kind {
            ChangeKind::Added => added += 1,
            ChangeKind::Modified {
                content_changed: true,
            } => modified += 1,
            ChangeKind::Modified {
                content_changed: false,
            } => metadata += 1,
            ChangeKind::Deleted => deleted += 1,
        }
    }
    json!({"added": added, "modified": modified, "metadata_only": metadata, "deleted": deleted})
}

/// Write `<out>/<pkg>.changes.json` atomically.
pub fn write_changes_json(
    out: &Path,
    package: &str,
    backend: &str,
    root: &Path,
    cs: &ChangeSet,
) -> Result<std::path::PathBuf> {
    let doc = json!({
        "package": package,
        "backend": backend,
        "root": to_json(root.as_os_str().as_encoded_bytes()),
        "summary": summary(cs),
        "changes": cs.changes().iter().map(change_json).collect::<Vec<_>>(),
    });
    let path = out.join(format!("{package}.changes.json"));
    let mut text = serde_json::to_vec_pretty(&doc)?;
    text.push(b'\n');
    write_atomic(&path, &text)?;
    Ok(path)
}

/// Replace `package`'s lines in `<out>/packages-file-list.txt` with one
/// `package,./path` line per file, symlink or special file it installed
/// (Buildroot's format; directories and deletions are not listed). Returns
/// the paths that cannot be written in a line-based format.
pub fn update_file_list(out: &Path, package: &str, cs: &ChangeSet) -> Result<Vec<String>> {
    let path = out.join("packages-file-list.txt");
    // Finals of different packages may share an output directory and run
    // at once (parallel builds): serialise the read-modify-write.
    // The lock file goes when released: none is left in the feed.
    let lock_path = out.join(".packages-file-list.lock");
    let _lock =
        layerpack_core::session::lock_file(&lock_path, true, "the file list")?.remove_on_release();
    let old = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let prefix = format!("{package},");
    let mut text = Vec::with_capacity(old.len() + cs.len() * 32);
    for line in old.split_inclusive(|b| *b == b'\n') {
        if !line.starts_with(prefix.as_bytes()) {
            text.extend_from_slice(line);
            if !line.ends_with(b"\n") {
                text.push(b'\n');
            }
        }
    }
    let mut unlisted = Vec::new();
    for c in cs.present() {
        if c.meta.kind == layerpack_core::model::FileKind::Dir {
            continue;
        }
        if c.path.as_bytes().contains(&b'\n') {
            unlisted.push(c.path.display());
            continue;
        }
        text.write_all(prefix.as_bytes())?;
        text.write_all(b"./")?;
        text.write_all(c.path.as_bytes())?;
        text.push(b'\n');
    }
    write_atomic(&path, &text)?;
    Ok(unlisted)
}
