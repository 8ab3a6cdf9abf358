//! Reading the upper directory of a union filesystem (overlayfs) as a
//! change set, by the rules every backend shares: whiteouts become
//! deletions (only when the base had the path; a deleted directory brings
//! its whole base subtree), an opaque directory deletes the base children
//! it hides, a copied-up entry is a change only if its bytes or metadata
//! differ, and internal xattrs are never content.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::beneath::Beneath;
use crate::model::{Change, ChangeKind, ChangeSet, ChangeSetBuilder, FileKind, RelPath};
use crate::tree::{
    classify_by_stat, compare_by_hash, hash_file, meta_differs, reach, LinkGroups, Record,
    ScanOptions, TreeScan, Verdict,
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
    /// aufs: whiteout = a file `.wh.<name>` next to the name it hides (a
    /// hard link of the branch's `.wh..wh.aufs`); opaque = a file
    /// `.wh..wh..opq` inside the directory. Every name starting with
    /// `.wh..wh.` is aufs's own (`.wh..wh.aufs`, `.wh..wh.plnk/`,
    /// `.wh..wh.orph/`, temporary `.wh..wh.<dir>.<hex>` directories) and
    /// never content.
    Aufs,
}

/// aufs's whiteout prefix.
pub const AUFS_WH_PREFIX: &[u8] = b".wh.";
/// aufs's prefix for its own entries (doubly whited out).
pub const AUFS_INTERNAL_PREFIX: &[u8] = b".wh..wh.";
/// aufs's opaque-directory marker.
pub const AUFS_OPAQUE: &[u8] = b".wh..wh..opq";

/// What one entry of an upper layer is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpperEntry {
    /// Content of the layer (added or changed).
    Content,
    /// A whiteout: the path it deletes.
    Whiteout(RelPath),
    /// The union filesystem's own bookkeeping (or below it): not content.
    Internal,
}

impl WhiteoutFormat {
    fn xattr(self, name: &str) -> String {
        match self {
            WhiteoutFormat::Overlay { userxattr: true } => format!("user.overlay.{name}"),
            WhiteoutFormat::Overlay { userxattr: false } | WhiteoutFormat::Aufs => {
                format!("trusted.overlay.{name}")
            }
        }
    }

    /// What `rec` (found at `abs` in the upper layer) is.
    pub fn entry(self, rec: &Record, abs: &Path) -> UpperEntry {
        match self {
            WhiteoutFormat::Overlay { .. } => {
                let whiteout = match rec.kind {
                    FileKind::CharDevice => rec.rdev == 0,
                    FileKind::File if rec.size == 0 => {
                        matches!(xattr::get(abs, self.xattr("whiteout")), Ok(Some(_)))
                    }
                    _ => false,
                };
                if whiteout {
                    UpperEntry::Whiteout(rec.path.clone())
                } else {
                    UpperEntry::Content
                }
            }
            WhiteoutFormat::Aufs => {
                let bytes = rec.path.as_bytes();
                if bytes
                    .split(|&c| c == b'/')
                    .any(|c| c.starts_with(AUFS_INTERNAL_PREFIX))
                {
                    return UpperEntry::Internal;
                }
                let name = rec.path.file_name();
                match name.strip_prefix(AUFS_WH_PREFIX) {
                    Some(hidden) if !hidden.is_empty() => {
                        let parent = rec.path.parent().unwrap_or_else(RelPath::root);
                        UpperEntry::Whiteout(parent.join(hidden))
                    }
                    _ => UpperEntry::Content,
                }
            }
        }
    }

    /// True if the upper directory at `abs` is opaque.
    pub fn is_opaque(self, abs: &Path) -> bool {
        match self {
            WhiteoutFormat::Overlay { .. } => {
                matches!(xattr::get(abs, self.xattr("opaque")), Ok(Some(v)) if v == b"y")
            }
            WhiteoutFormat::Aufs => {
                fs::symlink_metadata(abs.join(OsStr::from_bytes(AUFS_OPAQUE))).is_ok()
            }
        }
    }

    /// Remove the opaque marker of the upper directory at `abs` (and, for
    /// overlayfs, every other internal xattr on it).
    pub fn clear_opaque(self, abs: &Path) -> std::io::Result<()> {
        match self {
            WhiteoutFormat::Overlay { .. } => super::fold::strip_internal_xattrs(abs),
            WhiteoutFormat::Aufs => {
                match fs::remove_file(abs.join(OsStr::from_bytes(AUFS_OPAQUE))) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    r => r,
                }
            }
        }
    }

    /// Refuse an upper entry that only makes sense together with a lower
    /// one (renamed directories, metadata-only copy-up).
    pub fn check_supported(self, abs: &Path) -> Result<()> {
        if self == WhiteoutFormat::Aufs {
            return Ok(());
        }
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
    let at = reach(base, rel)?;
    let top = Record::read(&at, rel.clone(), true)?;
    let mut out = vec![top.clone()];
    if top.kind == FileKind::Dir {
        for r in TreeScan::start(&at, ScanOptions::default())? {
            let mut r = r?;
            r.path = RelPath::from_normalized([rel.as_bytes(), b"/", r.path.as_bytes()].concat());
            out.push(r);
        }
    }
    Ok(out)
}

/// Looks entries up in the base as the union saw it: a path below a
/// symlink of the base (`lib -> usr/lib`, then `lib/foo`) does not exist
/// there, whatever the link points at, so no symlink is followed. Whether
/// a directory is reachable without one is checked once per directory
/// (the base does not change while the layer is read).
struct BaseLookup<'a> {
    dir: Beneath,
    base: &'a Path,
    /// The last parent checked, and whether it is a real directory chain.
    last: Option<(RelPath, bool)>,
}

impl BaseLookup<'_> {
    fn record(&mut self, rel: &RelPath) -> Result<Option<Record>> {
        let abs = rel.under(self.base);
        let parent = rel.parent().unwrap_or_default();
        let parent_ok = match &self.last {
            Some((p, ok)) if *p == parent => *ok,
            _ => {
                let ok = self
                    .dir
                    .dir(&parent, crate::beneath::Follow::Nothing)
                    .map_err(|e| Error::io(&abs, "cannot stat in the base", e))?
                    .is_some();
                self.last = Some((parent, ok));
                ok
            }
        };
        if !parent_ok {
            return Ok(None);
        }
        let at = reach(self.base, rel)?;
        match fs::symlink_metadata(&*at) {
            Ok(md) => Record::from_metadata(&|| at.to_path_buf(), rel.clone(), &md, true).map(Some),
            Err(e) if crate::beneath::absent(&e) => Ok(None),
            Err(e) => Err(Error::io(&abs, "cannot stat in the base", e)),
        }
    }
}

/// Read `upper` (in `format`) against `base` as a change set.
pub fn read_upper(upper: &Path, base: &Path, format: WhiteoutFormat) -> Result<ChangeSet> {
    let mut base_lookup = BaseLookup {
        dir: Beneath::open(base)?,
        base,
        last: None,
    };
    // In the scan's order, which is path order but for deletions below a
    // whiteout or a replaced directory: the builder merges those in.
    let mut changes = ChangeSetBuilder::new();
    // Upper entries below an opaque directory (only those: the final pass
    // needs nothing else), and the opaque directories enclosing the
    // current entry of the depth-first scan.
    let mut present: HashSet<RelPath> = HashSet::new();
    let mut hidden: Vec<RelPath> = Vec::new();
    let mut enclosing: Vec<RelPath> = Vec::new();
    let mut links = LinkGroups::default();
    let deleted = |changes: &mut ChangeSetBuilder, r: &Record| {
        changes.push(Change {
            path: r.path.clone(),
            kind: ChangeKind::Deleted,
            meta: r.to_meta(),
        });
    };
    let progress = crate::progress::step(
        format!("reading the layer {}", upper.display()),
        crate::progress::Unit::Entries,
    );
    for rec in TreeScan::start(upper, ScanOptions::default())? {
        let mut r = rec?;
        progress.add(1);
        let abs = reach(upper, &r.path)?;
        format.check_supported(&abs)?;
        match format.entry(&r, &abs) {
            UpperEntry::Internal => continue,
            UpperEntry::Whiteout(target) => {
                // A name present in the upper layer wins over its whiteout.
                let shadowed =
                    target != r.path && fs::symlink_metadata(&*reach(upper, &target)?).is_ok();
                if !shadowed {
                    if let Some(old) = base_lookup.record(&target)? {
                        for b in scan_below(base, &old.path)? {
                            deleted(&mut changes, &b);
                        }
                    }
                }
                continue;
            }
            UpperEntry::Content => {}
        }
        let old = base_lookup.record(&r.path)?;
        while enclosing.last().is_some_and(|h| !r.path.starts_with(h)) {
            enclosing.pop();
        }
        if !enclosing.is_empty() {
            present.insert(r.path.clone());
        }
        let verdict = match &old {
            None => Some(ChangeKind::Added),
            Some(o) if o.kind == FileKind::Dir && r.kind == FileKind::Dir => {
                if format.is_opaque(&abs) {
                    hidden.push(r.path.clone());
                    enclosing.push(r.path.clone());
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
                        let old_hash = hash_file(&reach(base, &o.path)?)?;
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
        changes.push(Change {
            path: r.path,
            kind,
            meta,
        });
    }
    // Opaque directories hide every base child the upper layer lacks (a
    // path already reported keeps its first change).
    for dir in hidden {
        for b in scan_below(base, &dir)?.into_iter().skip(1) {
            if !present.contains(&b.path) {
                deleted(&mut changes, &b);
            }
        }
    }
    Ok(changes.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ChangeKind;
    use crate::tree::fold::{fold, FoldOptions};
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;

    fn aufs_fixture(tag: &str) -> (PathBuf, PathBuf, PathBuf) {
        let root = std::env::temp_dir().join(format!("lp-aufs-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let (base, upper) = crate::scenarios::aufs_branch_fixture(&root).unwrap();
        (root, base, upper)
    }

    #[test]
    fn aufs_branch_is_read_by_its_own_rules() {
        let (root, base, upper) = aufs_fixture("read");
        let cs = read_upper(&upper, &base, WhiteoutFormat::Aufs).unwrap();
        let got: Vec<(String, char)> = cs
            .iter()
            .filter(|c| {
                !matches!(
                    c.kind,
                    ChangeKind::Modified {
                        content_changed: false
                    }
                )
            })
            .map(|c| (c.path.display(), c.kind.symbol()))
            .collect();
        let want: Vec<(String, char)> = [
            ("bin", '+'),
            ("bin/hl1", '+'),
            ("bin/hl2", '+'),
            ("etc/a.conf", '~'),
            ("etc/gone", '-'),
            ("etc/new", '+'),
            ("opt/app/sub", '-'),
            ("opt/app/sub/y", '-'),
            ("opt/app/x", '-'),
            ("opt/app/z", '+'),
            ("srv", '+'),
            ("srv/new", '+'),
            ("srv/new/f", '+'),
            ("usr/fifo", '+'),
            ("usr/lib", '+'),
            ("usr/lib/new.so", '+'),
            ("usr/link", '+'),
            ("var/olddir", '-'),
            ("var/olddir/f", '-'),
        ]
        .iter()
        .map(|(p, k)| (p.to_string(), *k))
        .collect();
        let mut got_sorted = got.clone();
        got_sorted.sort();
        assert_eq!(got_sorted, want);
        assert!(cs.iter().all(|c| !c.path.display().contains(".wh.")));
        // The content hard link is one group; the whiteouts (links of
        // .wh..wh.aufs) are not content links.
        let group = |p: &str| cs.get(&RelPath::from(p)).unwrap().meta.link_group;
        assert!(group("bin/hl1").is_some());
        assert_eq!(group("bin/hl1"), group("bin/hl2"));
        assert_eq!(group("etc/new"), None);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn aufs_branch_folds_to_the_merged_view_and_an_empty_upper() {
        let (root, base, upper) = aufs_fixture("fold");
        fold(&upper, &base, WhiteoutFormat::Aufs, FoldOptions::default()).unwrap();
        assert_eq!(fs::read_dir(&upper).unwrap().count(), 0);
        let mut files = Vec::new();
        for r in TreeScan::start(&base, ScanOptions::default()).unwrap() {
            let r = r.unwrap();
            if r.kind == FileKind::File {
                files.push(r.path.display());
            }
        }
        assert_eq!(
            files,
            [
                "bin/hl1",
                "bin/hl2",
                "etc/a.conf",
                "etc/new",
                "opt/app/z",
                "srv/new/f",
                "usr/keep",
                "usr/lib/new.so"
            ]
        );
        assert_eq!(fs::read(base.join("etc/a.conf")).unwrap(), b"new contents");
        let ino = |p: &str| fs::metadata(base.join(p)).unwrap().ino();
        assert_eq!(ino("bin/hl1"), ino("bin/hl2"));
        assert!(base.join("var").is_dir() && !base.join("var/olddir").exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn aufs_fold_killed_at_every_step_then_rerun_gives_the_same_tree() {
        let (root, want_base, want_upper) = aufs_fixture("fold-ref");
        fold(
            &want_upper,
            &want_base,
            WhiteoutFormat::Aufs,
            FoldOptions::default(),
        )
        .unwrap();
        for n in 0.. {
            let (r, base, upper) = aufs_fixture(&format!("fold-kill{n}"));
            let first = fold(
                &upper,
                &base,
                WhiteoutFormat::Aufs,
                FoldOptions {
                    fail_after: Some(n),
                },
            );
            fold(&upper, &base, WhiteoutFormat::Aufs, FoldOptions::default()).unwrap();
            crate::scenarios::compare_trees(&want_base, &base).unwrap();
            assert_eq!(fs::read_dir(&upper).unwrap().count(), 0);
            fs::remove_dir_all(&r).unwrap();
            if first.is_ok() {
                assert!(n > 10, "only {n} steps");
                break;
            }
        }
        fs::remove_dir_all(&root).unwrap();
    }
}
