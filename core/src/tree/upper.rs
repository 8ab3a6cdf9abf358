//! Reading the upper directory of a union filesystem (overlayfs) as a
//! change set, by the rules every backend shares: whiteouts become
//! deletions (only when the base had the path; a deleted directory brings
//! its whole base subtree), an opaque directory deletes the base children
//! it hides, a copied-up entry is a change only if its bytes or metadata
//! differ, and internal xattrs are never content.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use crate::model::{Change, ChangeKind, ChangeSet, FileKind, RelPath};
use crate::tree::{
    classify_by_stat, compare_by_hash, hash_file, meta_differs, LinkGroups, Record, ScanOptions,
    TreeScan, Verdict,
};
use crate::{Error, ErrorKind, Result};

/// How the upper layer marks deletions and opaque directories.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhiteoutFormat {
    /// Kernel overlayfs: whiteout = character device 0/0 (or a zero-size
    /// file with `overlay.whiteout`); opaque = `overlay.opaque=y`, in the
    /// `trusted.` namespace or, with `userxattr`, the `user.` one.
    Overlay {
        /// Mounted with `userxattr` (unprivileged).
        userxattr: bool,
    },
}

impl WhiteoutFormat {
    fn xattr(self, name: &str) -> String {
        match self {
            WhiteoutFormat::Overlay { userxattr: true } => format!("user.overlay.{name}"),
            WhiteoutFormat::Overlay { userxattr: false } => format!("trusted.overlay.{name}"),
        }
    }

    /// True if `rec` (found at `abs` in the upper layer) is a whiteout.
    pub fn is_whiteout(self, rec: &Record, abs: &Path) -> bool {
        match rec.kind {
            FileKind::CharDevice => rec.rdev == 0,
            FileKind::File if rec.size == 0 => {
                matches!(xattr::get(abs, self.xattr("whiteout")), Ok(Some(_)))
            }
            _ => false,
        }
    }

    /// True if the upper directory at `abs` is opaque.
    pub fn is_opaque(self, abs: &Path) -> bool {
        matches!(xattr::get(abs, self.xattr("opaque")), Ok(Some(v)) if v == b"y")
    }

    /// Refuse an upper entry that only makes sense together with a lower
    /// one (renamed directories, metadata-only copy-up).
    pub fn check_supported(self, abs: &Path) -> Result<()> {
        for name in ["redirect", "metacopy"] {
            if let Ok(Some(_)) = xattr::get(abs, self.xattr(name)) {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "the upper layer uses overlayfs {name} (mount with {name}=off); this layer cannot be read on its own"
                    ),
                )
                .with_path(abs));
            }
        }
        Ok(())
    }
}

/// Every entry of the base at and below `rel` (records with full paths).
pub fn scan_below(base: &Path, rel: &RelPath) -> Result<Vec<Record>> {
    let top = Record::read(&rel.under(base), rel.clone(), true)?;
    let mut out = vec![top.clone()];
    if top.kind == FileKind::Dir {
        for r in TreeScan::start(&rel.under(base), ScanOptions::default())? {
            let mut r = r?;
            r.path = RelPath::from_normalized([rel.as_bytes(), b"/", r.path.as_bytes()].concat());
            out.push(r);
        }
    }
    Ok(out)
}

fn base_record(base: &Path, rel: &RelPath) -> Result<Option<Record>> {
    let abs = rel.under(base);
    match std::fs::symlink_metadata(&abs) {
        Ok(_) => Record::read(&abs, rel.clone(), true).map(Some),
        // Absent, or a parent is not a directory in the base.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Ok(None),
        Err(e) => Err(Error::io(&abs, "cannot stat in the base", e)),
    }
}

/// Read `upper` (in `format`) against `base` as a change set.
pub fn read_upper(upper: &Path, base: &Path, format: WhiteoutFormat) -> Result<ChangeSet> {
    let mut changes: BTreeMap<RelPath, Change> = BTreeMap::new();
    let mut present: HashSet<RelPath> = HashSet::new();
    let mut hidden: Vec<RelPath> = Vec::new();
    let mut links = LinkGroups::default();
    let deleted = |changes: &mut BTreeMap<RelPath, Change>, r: &Record| {
        changes.insert(
            r.path.clone(),
            Change {
                path: r.path.clone(),
                kind: ChangeKind::Deleted,
                meta: r.to_meta(),
            },
        );
    };
    for rec in TreeScan::start(upper, ScanOptions::default())? {
        let mut r = rec?;
        let abs = r.path.under(upper);
        format.check_supported(&abs)?;
        let old = base_record(base, &r.path)?;
        if format.is_whiteout(&r, &abs) {
            if let Some(old) = old {
                for b in scan_below(base, &old.path)? {
                    deleted(&mut changes, &b);
                }
            }
            continue;
        }
        present.insert(r.path.clone());
        let verdict = match &old {
            None => Some(ChangeKind::Added),
            Some(o) if o.kind == FileKind::Dir && r.kind == FileKind::Dir => {
                if format.is_opaque(&abs) {
                    hidden.push(r.path.clone());
                }
                meta_differs(o, &r).then_some(ChangeKind::Modified {
                    content_changed: false,
                })
            }
            Some(o) => {
                if o.kind == FileKind::Dir {
                    // A non-directory replaced a directory: its subtree is gone.
                    for b in scan_below(base, &o.path)?.into_iter().skip(1) {
                        deleted(&mut changes, &b);
                    }
                }
                let v = match classify_by_stat(o, &r) {
                    Some(v) => v,
                    None => {
                        let old_hash = hash_file(&o.path.under(base))?;
                        compare_by_hash(o, old_hash, &mut r, &abs)?
                    }
                };
                match v {
                    Verdict::Same => None,
                    Verdict::Metadata => Some(ChangeKind::Modified {
                        content_changed: false,
                    }),
                    Verdict::Content => Some(ChangeKind::Modified {
                        content_changed: true,
                    }),
                }
            }
        };
        let Some(kind) = verdict else { continue };
        if r.kind == FileKind::File && r.sha256.is_none() {
            r.sha256 = Some(hash_file(&abs)?);
        }
        let mut meta = r.to_meta();
        meta.link_group = links.assign(&r);
        changes.insert(
            r.path.clone(),
            Change {
                path: r.path.clone(),
                kind,
                meta,
            },
        );
    }
    // Opaque directories hide every base child the upper layer lacks.
    for dir in hidden {
        for b in scan_below(base, &dir)?.into_iter().skip(1) {
            let shadowed = !present.contains(&b.path);
            if shadowed && !changes.contains_key(&b.path) {
                deleted(&mut changes, &b);
            }
        }
    }
    let mut out: Vec<Change> = changes.into_values().collect();
    links.finish(&mut out);
    Ok(ChangeSet::from_unsorted(out))
}
