//! What `final` and `diff` write about a change set: `<pkg>.changes.json`,
//! Buildroot's `packages-file-list.txt`, and JSON Lines on stdout.

use std::io::Write;
use std::path::Path;

use anyhow::Result;
use layerpack_core::jsonbytes::to_json;
use layerpack_core::model::{Change, ChangeKind, ChangeSet};
use layerpack_core::pack::compose::Route;
use layerpack_core::session::write_atomic_with;
use layerpack_core::tree::hex;
use serde::Serialize;
use serde_json::{json, Value};

/// Version of the `changes.json` schema (`docs/changes.schema.json`).
pub const CHANGES_SCHEMA_VERSION: u32 = 1;

/// One extended attribute of a change.
#[derive(Serialize)]
struct XattrRecord {
    name: Value,
    value: Value,
}

/// One change as `changes.json` and `diff --json` write it. Byte strings
/// (path, target, xattrs) are text when UTF-8, else `{"bytes": base64}`.
#[derive(Serialize)]
pub struct ChangeRecord {
    path: Value,
    change: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_changed: Option<bool>,
    /// The entry's file type (`file`, `dir`, `symlink`, …).
    #[serde(rename = "type")]
    file_type: &'static str,
    mode: String,
    uid: u32,
    gid: u32,
    size: u64,
    mtime_ns: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rdev: Option<[u32; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    link_group: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    xattrs: Vec<XattrRecord>,
    /// How the change reached the package (`final` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<&'static str>,
}

impl ChangeRecord {
    /// The record of `c`.
    pub fn of(c: &Change) -> ChangeRecord {
        let m = &c.meta;
        ChangeRecord {
            path: to_json(c.path.as_bytes()),
            change: c.kind.as_str(),
            content_changed: match c.kind {
                ChangeKind::Modified { content_changed } => Some(content_changed),
                _ => None,
            },
            file_type: m.kind.as_str(),
            mode: format!("{:04o}", m.mode),
            uid: m.uid,
            gid: m.gid,
            size: m.size,
            mtime_ns: m.mtime_ns,
            sha256: m.sha256.as_ref().map(|h| hex(h)),
            target: m.link_target.as_deref().map(to_json),
            rdev: m.rdev.map(|(a, b)| [a, b]),
            link_group: m.link_group,
            xattrs: m
                .xattrs
                .iter()
                .map(|(k, v)| XattrRecord {
                    name: to_json(k),
                    value: to_json(v),
                })
                .collect(),
            route: None,
        }
    }
}

/// One change as a JSON object (as in `changes.json`).
pub fn change_json(c: &Change) -> Value {
    serde_json::to_value(ChangeRecord::of(c)).unwrap_or(Value::Null)
}

/// A change as a `diff --json` line: `type` is the line's (`change`), so
/// the entry's file type is `file_type`.
pub fn change_line(c: &Change) -> Value {
    let mut v = change_json(c);
    if let Some(o) = v.as_object_mut() {
        if let Some(t) = o.remove("type") {
            o.insert("file_type".into(), t);
        }
        o.insert("type".into(), json!("change"));
    }
    v
}

/// Counts of each kind of change.
pub fn summary(cs: &ChangeSet) -> Value {
    let (mut added, mut modified, mut metadata, mut deleted) = (0, 0, 0, 0);
    for c in cs {
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
    routes: &[Route],
) -> Result<std::path::PathBuf> {
    /// The changes, serialized one record at a time as they are written:
    /// the document is never in memory whole.
    struct Changes<'a>(&'a ChangeSet, &'a [Route]);
    impl Serialize for Changes<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
            s.collect_seq(self.0.iter().enumerate().map(|(i, c)| ChangeRecord {
                route: self.1.get(i).map(|r| r.as_str()),
                ..ChangeRecord::of(&c)
            }))
        }
    }
    #[derive(Serialize)]
    struct Doc<'a> {
        schema_version: u32,
        package: &'a str,
        backend: &'a str,
        root: Value,
        summary: Value,
        changes: Changes<'a>,
    }
    let doc = Doc {
        schema_version: CHANGES_SCHEMA_VERSION,
        package,
        backend,
        root: to_json(root.as_os_str().as_encoded_bytes()),
        summary: summary(cs),
        changes: Changes(cs, routes),
    };
    let path = out.join(format!("{package}.changes.json"));
    write_atomic_with(&path, |w| {
        serde_json::to_writer_pretty(&mut *w, &doc).map_err(std::io::Error::from)?;
        w.write_all(b"\n")
    })?;
    Ok(path)
}
