//! What the union-filesystem backends (overlayfs, aufs) share: the layout
//! of their session directory, the in-place bind mount of the root,
//! unmounting, the same-filesystem check, cleanup and health.
//!
//! Session layout: `upper/` (the layer), `merged/` (where the install
//! writes) or, in place, `lower/` (a private bind mount of the root, so
//! the root stays readable once the union covers it, from any later
//! process), and `mode`, fixed at `begin`: first line `in-place` or
//! `merged`, then one flag per line (e.g. `userxattr`). A later config
//! cannot change how an open session was mounted.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::backend::{Health, SessionSpec};
use crate::sys::{MountFlags, Sys};
use crate::{Error, ErrorKind, Result};

/// One union session, seen through the syscalls in `sys`.
pub struct UnionSession<'a> {
    /// The privileged calls.
    pub sys: &'a dyn Sys,
    /// The session.
    pub spec: &'a SessionSpec,
    /// Filesystem type as mounted (`overlay`, `aufs`).
    pub fstype: &'static str,
}

impl UnionSession<'_> {
    /// The layer.
    pub fn upper(&self) -> PathBuf {
        self.spec.dir.join("upper")
    }

    /// The merged directory (not in place).
    pub fn merged_dir(&self) -> PathBuf {
        self.spec.dir.join("merged")
    }

    /// The bind mount of the root (in place).
    pub fn lower_bind(&self) -> PathBuf {
        self.spec.dir.join("lower")
    }

    fn mode(&self) -> String {
        fs::read_to_string(self.spec.dir.join("mode")).unwrap_or_default()
    }

    /// The session was mounted on the root itself.
    pub fn in_place(&self) -> bool {
        self.mode()
            .lines()
            .next()
            .is_some_and(|l| l.trim() == "in-place")
    }

    /// The session was mounted with `flag` (recorded by [`Self::write_mode`]).
    pub fn has_flag(&self, flag: &str) -> bool {
        self.mode().lines().skip(1).any(|l| l.trim() == flag)
    }

    /// Record how this session is mounted.
    pub fn write_mode(&self, in_place: bool, flags: &[&str]) -> Result<()> {
        let mut text = if in_place { "in-place\n" } else { "merged\n" }.to_string();
        for f in flags {
            text.push_str(f);
            text.push('\n');
        }
        fs::write(self.spec.dir.join("mode"), text)
            .map_err(|e| Error::io(&self.spec.dir, "cannot write session mode", e))
    }

    /// Create the directories `begin` needs: `upper/` and `lower/` or
    /// `merged/`, plus `extra` (e.g. overlayfs's `work/`).
    pub fn create_dirs(&self, in_place: bool, extra: &[&str]) -> Result<()> {
        let mut dirs = vec![self.upper()];
        dirs.extend(extra.iter().map(|d| self.spec.dir.join(d)));
        dirs.push(if in_place {
            self.lower_bind()
        } else {
            self.merged_dir()
        });
        for d in &dirs {
            fs::create_dir(d).map_err(|e| Error::io(d, "cannot create", e))?;
        }
        Ok(())
    }

    /// Where the install writes, and where the untouched root is read.
    pub fn places(&self) -> (PathBuf, PathBuf) {
        if self.in_place() {
            let lower = self.lower_bind();
            let readable = if self.sys.is_mounted(&lower, None) {
                lower
            } else {
                self.spec.base.clone()
            };
            (self.spec.base.clone(), readable)
        } else {
            (self.merged_dir(), self.spec.base.clone())
        }
    }

    /// Bind-mount the root privately at `lower/`; returns that path.
    pub fn bind_root(&self) -> Result<PathBuf> {
        let lower = self.lower_bind();
        let bind = MountFlags {
            bind: true,
            ..MountFlags::default()
        };
        let private = MountFlags {
            private: true,
            ..MountFlags::default()
        };
        self.sys
            .mount(Some(&self.spec.base), &lower, None, bind, None)
            .map_err(|e| Error::io(&lower, "cannot bind-mount the root", e))?;
        self.sys
            .mount(None, &lower, None, private, None)
            .map_err(|e| Error::io(&lower, "cannot make the bind mount private", e))?;
        Ok(lower)
    }

    /// Unmount `at` if something (of `fstype`) is mounted there.
    pub fn unmount(&self, at: &Path, fstype: Option<&str>) -> Result<()> {
        if self.sys.is_mounted(at, fstype) {
            self.sys
                .umount(at)
                .map_err(|e| Error::io(at, "cannot unmount (is a process still using it?)", e))?;
        }
        Ok(())
    }

    /// Unmount everything the session mounted.
    pub fn unmount_all(&self) -> Result<()> {
        if self.in_place() {
            self.unmount(&self.spec.base, Some(self.fstype))?;
            self.unmount(&self.lower_bind(), None)
        } else {
            self.unmount(&self.merged_dir(), Some(self.fstype))
        }
    }

    /// Remove the session's directories (and `extra` ones), `mode` and
    /// `files`.
    pub fn remove_files(&self, extra_dirs: &[&str], files: &[&str]) -> Result<()> {
        let mut dirs = vec![self.upper(), self.merged_dir(), self.lower_bind()];
        dirs.extend(extra_dirs.iter().map(|d| self.spec.dir.join(d)));
        for d in dirs {
            if d.exists() {
                fs::remove_dir_all(&d).map_err(|e| Error::io(&d, "cannot remove", e))?;
            }
        }
        for f in files.iter().chain(&["mode"]) {
            let _ = fs::remove_file(self.spec.dir.join(f));
        }
        Ok(())
    }

    /// Undo a failed `begin`: unmount what may be mounted, remove the files.
    pub fn undo_begin(&self, extra_dirs: &[&str], files: &[&str]) {
        let _ = self.unmount(&self.spec.base, Some(self.fstype));
        let _ = self.unmount(&self.lower_bind(), None);
        let _ = self.remove_files(extra_dirs, files);
    }

    /// Refuse a root that is itself on the union filesystem (`statfs`
    /// magic `magic`, called `fs_name` in the message, with `why`).
    pub fn refuse_root_on(&self, magic: i64, fs_name: &str, why: &str) -> Result<()> {
        let base = &self.spec.base;
        let fs_type = nix::sys::statfs::statfs(base)
            .map_err(|e| Error::io(base, "cannot statfs", e.into()))?
            .filesystem_type()
            .0 as i64;
        if fs_type == magic {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("the root {} is itself on {fs_name}; {why}", base.display()),
            ));
        }
        Ok(())
    }

    /// Refuse a state directory on another filesystem than the root: the
    /// fold is a series of renames.
    pub fn check_same_filesystem(&self) -> Result<()> {
        let dev = |p: &Path| {
            fs::metadata(p)
                .map(|m| m.dev())
                .map_err(|e| Error::io(p, "cannot stat", e))
        };
        if dev(&self.spec.base)? != dev(&self.upper())? {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "the state directory is on another filesystem than the root {}; move-down would have to copy. Set state_dir (or --state-dir) to a directory on the root's filesystem",
                    self.spec.base.display()
                ),
            ));
        }
        Ok(())
    }

    /// Whether the layer and the mount are still there.
    pub fn health(&self) -> Health {
        let upper = self.upper();
        let pkg = &self.spec.package;
        if !upper.is_dir() {
            return Health::Stale(format!(
                "the upper layer {} is missing; run `layerpack abort {pkg}`",
                upper.display()
            ));
        }
        if !self.sys.is_mounted(&self.places().0, Some(self.fstype)) {
            return Health::Stale(format!(
                "{} is not mounted (reboot?); `layerpack final {pkg}` still folds the upper layer, `layerpack abort {pkg}` drops it",
                self.fstype
            ));
        }
        Health::Ok
    }
}
