//! What the union-filesystem backends (overlayfs, aufs) share: the layout
//! of their session directory, their typed session state, the in-place
//! bind mount of the root, freezing (unmounting before the layer is read),
//! the same-filesystem check, cleanup and health.
//!
//! Session layout: `upper/` (the layer), `merged/` (where the install
//! writes) or, in place, `lower/` (a private bind mount of the root, so
//! the root stays readable once the union covers it, from any later
//! process). How the session was mounted is fixed at `begin` in a
//! [`UnionState`] that core keeps in `session.json`: a later config cannot
//! change it, and a missing or unreadable state is an error, never a guess.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::{BackendState, Health, SessionSpec};
use crate::sys::{MountFlags, Sys};
use crate::{Error, ErrorKind, Result};

/// Version of [`UnionState`].
pub const UNION_STATE_VERSION: u32 = 1;

/// How a union session was mounted, recorded by `begin`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnionState {
    /// Mounted on the root itself (else on `merged/`).
    pub in_place: bool,
    /// Mount flags the layer depends on (e.g. `userxattr`).
    pub flags: Vec<String>,
    /// The option string of the union mount, to mount it again (`thaw`).
    pub options: String,
    /// Set when mounted `volatile` (no sync of the upper filesystem, at
    /// umount either): the boot it was mounted in. After a reboot the
    /// upper layer may have lost writes and is not trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volatile_boot: Option<String>,
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Whether the kernel's overlayfs takes `volatile` (Linux 5.10 and later).
pub fn kernel_has_volatile(release: &str) -> bool {
    kernel_at_least(release, (5, 10))
}

/// Whether kernel release `release` (`6.18.0-…`, as in
/// `/proc/sys/kernel/osrelease`) is at least `want` (major, minor).
pub fn kernel_at_least(release: &str, want: (u32, u32)) -> bool {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0)) >= want
}

impl UnionState {
    /// As a [`BackendState`].
    pub fn encode(&self) -> Result<BackendState> {
        BackendState::encode(UNION_STATE_VERSION, self)
    }
}

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

    /// The state `begin` recorded.
    pub fn state(&self) -> Result<UnionState> {
        self.spec.state.decode(self.fstype, UNION_STATE_VERSION)
    }

    /// The session was mounted with `flag`.
    pub fn has_flag(&self, flag: &str) -> Result<bool> {
        Ok(self.state()?.flags.iter().any(|f| f == flag))
    }

    fn mounted(&self, at: &Path, fstype: Option<&str>) -> Result<bool> {
        self.sys
            .is_mounted(at, fstype)
            .map_err(|e| Error::io("/proc/self/mountinfo", "cannot read the mount table", e))
    }

    /// Where the install writes, and where the untouched root is read.
    pub fn places(&self) -> Result<(PathBuf, PathBuf)> {
        if self.state()?.in_place {
            let lower = self.lower_bind();
            let readable = if self.mounted(&lower, None)? {
                lower
            } else {
                self.spec.base.clone()
            };
            Ok((self.spec.base.clone(), readable))
        } else {
            Ok((self.merged_dir(), self.spec.base.clone()))
        }
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

    /// Mount the union (`options` as recorded) on `target`.
    pub fn mount_union(&self, source: &str, target: &Path, options: &str) -> Result<()> {
        self.sys
            .mount(
                Some(Path::new(source)),
                target,
                Some(self.fstype),
                MountFlags::default(),
                Some(options),
            )
            .map_err(|e| {
                Error::io(
                    target,
                    format!("cannot mount {} ({options})", self.fstype),
                    e,
                )
            })
    }

    /// Unmount `at` if something (of `fstype`) is mounted there. A busy
    /// mount is a `Busy` error that says what to do.
    pub fn unmount(&self, at: &Path, fstype: Option<&str>) -> Result<()> {
        if self.mounted(at, fstype)? {
            self.sys.umount(at).map_err(|e| {
                let busy = e.raw_os_error() == Some(libc::EBUSY);
                let err = Error::io(
                    at,
                    if busy {
                        format!(
                            "cannot unmount: a process still uses it (an open file or a working directory there); end it and run `layerpack final {}` again",
                            self.spec.package
                        )
                    } else {
                        "cannot unmount".to_string()
                    },
                    e,
                );
                if busy {
                    err.with_kind(ErrorKind::Busy)
                } else {
                    err
                }
            })?;
        }
        Ok(())
    }

    /// Unmount everything the session mounted: the union first, then the
    /// bind mount of the root. Afterwards the upper layer is quiescent and
    /// the root is reachable by its own path.
    pub fn unmount_all(&self) -> Result<()> {
        if self.state()?.in_place {
            self.unmount(&self.spec.base, Some(self.fstype))?;
            self.unmount(&self.lower_bind(), None)?;
        }
        // In place too: a move-down may mount the union privately here.
        self.unmount(&self.merged_dir(), Some(self.fstype))
    }

    /// Mount the union again as `begin` did (for `final --keep`): the
    /// bind mount of the root first when in place, then the recorded
    /// options.
    pub fn remount(&self, source: &str) -> Result<()> {
        let st = self.state()?;
        let (merged, _) = self.places()?;
        if self.mounted(&merged, Some(self.fstype))? {
            return Ok(());
        }
        if st.in_place && !self.mounted(&self.lower_bind(), None)? {
            self.bind_root()?;
        }
        if st.volatile_boot.is_some() {
            // A volatile overlay leaves work/work/incompat/volatile behind
            // and refuses to mount over it; this unmount was clean (same
            // boot, checked by the caller), so the upper layer is whole.
            self.check_trusted()?;
            let marker = self.spec.dir.join("work/work/incompat");
            match fs::remove_dir_all(&marker) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&marker, "cannot remove the volatile marker", e)),
            }
        }
        self.mount_union(source, &merged, &st.options)
    }

    /// Remove the session's directories (and `extra` ones) and `files`,
    /// never crossing a mount point.
    pub fn remove_files(&self, extra_dirs: &[&str], files: &[&str]) -> Result<()> {
        let dir = crate::beneath::Beneath::open(&self.spec.dir)?;
        let mut names: Vec<&str> = vec!["upper", "merged", "lower"];
        names.extend_from_slice(extra_dirs);
        names.extend_from_slice(files);
        for n in names {
            dir.remove(
                &crate::model::RelPath::from(n),
                crate::beneath::Follow::Nothing,
            )?;
        }
        Ok(())
    }

    /// Undo a failed `begin`: unmount what may be mounted, remove the files.
    pub fn undo_begin(&self, extra_dirs: &[&str], files: &[&str]) -> Result<()> {
        let base = self.unmount(&self.spec.base, Some(self.fstype));
        let merged = self.unmount(&self.merged_dir(), Some(self.fstype));
        let lower = self.unmount(&self.lower_bind(), None);
        base.and(merged).and(lower)?;
        self.remove_files(extra_dirs, files)
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

    /// An error when the layer was mounted `volatile` in an earlier boot:
    /// what the install wrote may not have reached the disk.
    pub fn check_trusted(&self) -> Result<()> {
        let st = self.state()?;
        match (&st.volatile_boot, boot_id()) {
            (Some(then), Some(now)) if *then != now => Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "the layer of {pkg} was mounted volatile (no writeback at unmount) and the machine has rebooted since: it may have lost writes and is not packaged; run `layerpack abort {pkg}` and run the install again",
                    pkg = self.spec.package
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Whether the layer and the mount are still there (and trusted).
    pub fn health(&self) -> Health {
        if let Err(e) = self.check_trusted() {
            return Health::Broken(e.message().to_string());
        }
        let upper = self.upper();
        let pkg = &self.spec.package;
        if !upper.is_dir() {
            return Health::Broken(format!(
                "the upper layer {} is missing; run `layerpack abort {pkg}`",
                upper.display()
            ));
        }
        let merged = match self.places() {
            Ok((m, _)) => m,
            Err(e) => return Health::Broken(format!("{e}; run `layerpack abort {pkg}`")),
        };
        match self.mounted(&merged, Some(self.fstype)) {
            Ok(true) => Health::Ok,
            Ok(false) => Health::MountLost(format!(
                "{} is no longer mounted on {} (reboot?); `layerpack final {pkg}` reads the upper layer directly, packages it and folds it, `layerpack abort {pkg}` drops it",
                self.fstype,
                merged.display()
            )),
            Err(e) => Health::Broken(e.to_string()),
        }
    }
}
