//! Move-down: fold an upper layer into the base after unmounting, so the
//! base holds exactly what the merged view showed and the upper is empty.
//!
//! Idempotent by construction: every step either leaves the upper as it
//! was (and is simply done again) or consumes its entry from the upper
//! (renamed into the base, whiteout removed, opaque marker cleared after
//! the base directory was emptied), so running the fold again after a
//! crash at any point gives the same final tree. A failpoint
//! ([`FoldOptions::fail_after`]) proves it in tests.

use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::upper::{UpperEntry, WhiteoutFormat, AUFS_OPAQUE, AUFS_WH_PREFIX};
use super::{is_internal_xattr, reach, Record};
use crate::model::{FileKind, RelPath};
use crate::{Error, ErrorKind, Result};

/// How to fold.
#[derive(Clone, Copy, Debug, Default)]
pub struct FoldOptions {
    /// Stop with an error after this many operations (crash testing).
    pub fail_after: Option<usize>,
}

/// The environment variable behind [`FoldOptions::from_env`].
pub const FOLD_FAIL_AFTER_ENV: &str = "LAYERPACK_TEST_FOLD_FAIL_AFTER";

impl FoldOptions {
    /// Options for a real fold: a failpoint only when the test-only
    /// variable `LAYERPACK_TEST_FOLD_FAIL_AFTER` is set (crash tests kill
    /// a real `final` mid-fold with it). Not a user setting, so it is not
    /// in the config.
    pub fn from_env() -> FoldOptions {
        FoldOptions {
            fail_after: std::env::var(FOLD_FAIL_AFTER_ENV)
                .ok()
                .and_then(|v| v.parse().ok()),
        }
    }
}

struct Folder<'a> {
    upper: &'a Path,
    base: &'a Path,
    format: WhiteoutFormat,
    ops: usize,
    fail_after: Option<usize>,
    progress: crate::progress::Step,
}

fn rm_rf(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

pub(crate) fn strip_internal_xattrs(p: &Path) -> io::Result<()> {
    let names = match xattr::list(p) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(()),
        Err(e) => return Err(e),
    };
    for n in names {
        if is_internal_xattr(n.as_bytes()) {
            xattr::remove(p, &n)?;
        }
    }
    Ok(())
}

impl Folder<'_> {
    /// Count an operation; fail when the failpoint is reached.
    fn step(&mut self) -> Result<()> {
        if self.fail_after == Some(self.ops) {
            return Err(Error::new(
                ErrorKind::Io,
                format!("fold failpoint reached after {} operations", self.ops),
            ));
        }
        self.ops += 1;
        Ok(())
    }

    fn io(&self, p: &Path, what: &str) -> impl Fn(io::Error) -> Error {
        let (p, what) = (p.to_path_buf(), what.to_string());
        move |e| Error::io(&p, what.clone(), e)
    }

    /// Move `rel` (not a whiteout) from the upper into the base.
    fn move_entry(&mut self, rel: &RelPath) -> Result<()> {
        let (u, b) = (reach(self.upper, rel)?, reach(self.base, rel)?);
        // Strip markers first, so the rename is the step that consumes it.
        // Below a directory the base lacks, whiteouts and opaque markers
        // hide nothing: they go.
        if fs::symlink_metadata(&u)
            .map(|m| m.is_dir())
            .unwrap_or(false)
        {
            let mut markers = Vec::new();
            for r in super::TreeScan::start(
                &u,
                super::ScanOptions {
                    xattrs: false,
                    ..Default::default()
                },
            )? {
                let r = r?;
                let abs = reach(&u, &r.path)?;
                if self.format.entry(&r, &abs) != UpperEntry::Content {
                    markers.push(abs);
                } else {
                    // Symlinks too (a copied-up link carries them after
                    // `touch -h`); the calls never follow the link.
                    strip_internal_xattrs(&abs)
                        .map_err(self.io(&abs, "cannot clear overlay xattrs"))?;
                }
            }
            for m in markers {
                self.step()?;
                rm_rf(&m).map_err(self.io(&m, "cannot remove a marker"))?;
            }
        }
        if fs::symlink_metadata(&u).is_ok() {
            strip_internal_xattrs(&u).map_err(self.io(&u, "cannot clear overlay xattrs"))?;
        }
        self.step()?;
        match fs::rename(&u, &b) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => Err(Error::new(
                ErrorKind::Unsupported,
                "the upper layer is on another filesystem than the base; keep the state directory on the base's filesystem",
            )
            .with_path(&u)),
            Err(e) => Err(Error::io(&b, "cannot move into the base", e)),
        }
    }

    fn fold_dir(&mut self, rel: &RelPath) -> Result<()> {
        let udir = reach(self.upper, rel)?;
        let mut names: Vec<Vec<u8>> = fs::read_dir(&udir)
            .map_err(self.io(&udir, "cannot list upper directory"))?
            .map(|e| e.map(|e| e.file_name().into_encoded_bytes()))
            .collect::<io::Result<_>>()
            .map_err(self.io(&udir, "cannot list upper directory"))?;
        // Whiteouts first: with aufs a whiteout names its sibling, which
        // must be gone from the base before anything is moved in.
        names.sort_by(|a, b| {
            (!a.starts_with(AUFS_WH_PREFIX), a).cmp(&(!b.starts_with(AUFS_WH_PREFIX), b))
        });
        for name in names {
            let child = rel.join(&name);
            let (u, b) = (reach(self.upper, &child)?, reach(self.base, &child)?);
            let ur = Record::read(&u, child.clone(), false)?;
            self.progress.add(1);
            match self.format.entry(&ur, &u) {
                UpperEntry::Content => {}
                UpperEntry::Whiteout(target) => {
                    // A name present in the upper layer wins over its
                    // whiteout: it is folded on its own.
                    let shadowed = target != child
                        && fs::symlink_metadata(&*reach(self.upper, &target)?).is_ok();
                    if !shadowed {
                        let tb = reach(self.base, &target)?;
                        self.step()?;
                        rm_rf(&tb).map_err(self.io(&tb, "cannot delete"))?;
                    }
                    self.step()?;
                    fs::remove_file(&u).map_err(self.io(&u, "cannot remove whiteout"))?;
                    continue;
                }
                UpperEntry::Internal => {
                    // The opaque marker is consumed with its directory;
                    // aufs's own files and directories are dropped.
                    if name != AUFS_OPAQUE {
                        self.step()?;
                        rm_rf(&u).map_err(self.io(&u, "cannot remove"))?;
                    }
                    continue;
                }
            }
            let base_md = fs::symlink_metadata(&b).ok();
            let base_is_dir = base_md.as_ref().is_some_and(|m| m.is_dir());
            if ur.kind == FileKind::Dir && base_is_dir {
                if self.format.is_opaque(&u) {
                    // Empty the base directory, then clear the marker: a rerun
                    // after this point must not empty it again.
                    for e in fs::read_dir(&b).map_err(self.io(&b, "cannot list"))? {
                        let e = e.map_err(self.io(&b, "cannot list"))?;
                        self.step()?;
                        rm_rf(&e.path()).map_err(self.io(&e.path(), "cannot delete"))?;
                    }
                    self.step()?;
                    self.format
                        .clear_opaque(&u)
                        .map_err(self.io(&u, "cannot clear opaque marker"))?;
                }
                self.fold_dir(&child)?;
                // Directory metadata after its children.
                self.step()?;
                let md = fs::symlink_metadata(&u).map_err(self.io(&u, "cannot stat"))?;
                std::os::unix::fs::lchown(&b, Some(md.uid()), Some(md.gid()))
                    .map_err(self.io(&b, "cannot set owner"))?;
                fs::set_permissions(&b, fs::Permissions::from_mode(md.mode() & 0o7777))
                    .map_err(self.io(&b, "cannot set mode"))?;
                let want = super::read_xattrs(&u)?;
                let have = super::read_xattrs(&b)?;
                for (k, v) in &want {
                    if have.get(k) != Some(v) {
                        xattr::set(&b, std::ffi::OsStr::from_bytes(k), v)
                            .map_err(self.io(&b, "cannot set xattr"))?;
                    }
                }
                for k in have.keys().filter(|k| !want.contains_key(*k)) {
                    xattr::remove(&b, std::ffi::OsStr::from_bytes(k))
                        .map_err(self.io(&b, "cannot remove xattr"))?;
                }
                set_times(&b, &md).map_err(self.io(&b, "cannot set times"))?;
                self.step()?;
                fs::remove_dir(&u).map_err(self.io(&u, "cannot remove upper directory"))?;
            } else {
                if base_md.is_some() && (base_is_dir || ur.kind == FileKind::Dir) {
                    // A type change: the old entry goes first.
                    self.step()?;
                    rm_rf(&b).map_err(self.io(&b, "cannot delete"))?;
                }
                self.move_entry(&child)?;
            }
        }
        Ok(())
    }
}

fn set_times(p: &Path, md: &fs::Metadata) -> io::Result<()> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let a = TimeSpec::new(md.atime(), md.atime_nsec());
    let m = TimeSpec::new(md.mtime(), md.mtime_nsec());
    utimensat(None, p, &a, &m, UtimensatFlags::NoFollowSymlink).map_err(io::Error::from)
}

/// Stack for the fold, which recurses once per directory level: enough
/// for trees tens of thousands of levels deep. Only the pages a fold
/// touches are ever used.
const FOLD_STACK: usize = 512 << 20;

/// Fold `upper` into `base`; afterwards `upper` is an empty directory.
pub fn fold(upper: &Path, base: &Path, format: WhiteoutFormat, opts: FoldOptions) -> Result<()> {
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("layerpack-fold".into())
            .stack_size(FOLD_STACK)
            .spawn_scoped(scope, || {
                let mut f = Folder {
                    upper,
                    base,
                    format,
                    ops: 0,
                    fail_after: opts.fail_after,
                    progress: crate::progress::step(
                        format!("folding the layer into {}", base.display()),
                        crate::progress::Unit::Entries,
                    ),
                };
                f.fold_dir(&RelPath::root())
            })
            .map_err(|e| Error::io(upper, "cannot start the fold", e))?;
        worker.join().unwrap_or_else(|p| {
            std::panic::resume_unwind(p);
        })
    })
}
