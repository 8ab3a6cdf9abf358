//! layerpack-backend-aufs: capture a layer with aufs, and move it down
//! while still mounted with `AUFS_CTL_MVDOWN`.
//!
//! `begin` mounts `aufs` with two branches, an `upper/` directory in the
//! session directory (`rw`) over the base (`ro`, so aufs never creates
//! anything in it), with `udba=reval,noplink,xino=<session>/xino`, on a
//! merged directory in the session or (with `in_place`) on the base
//! itself. `freeze` unmounts it before `changes` reads the upper branch by
//! aufs's rules ([`WhiteoutFormat::Aufs`]). `move_down` mounts aufs again,
//! privately on the session's `merged/`, asks it to move every new regular
//! file with one link down into the base through that mount (the ioctl,
//! see [`mvdown`]), then unmounts and folds what the ioctl may
//! not move (rewrites, symlinks, special files, hard links, whiteouts,
//! opaque directories, directory metadata) with the shared fold, leaving an
//! empty upper. `offline = true` skips the ioctl.
//!
//! Every privileged call goes through [`Sys`], so the exact calls are
//! tested here with a recording fake; the live behaviour suite runs
//! wherever `aufs` is in `/proc/filesystems` (`layerpack selftest --backend
//! aufs`). See `docs.md` and AUFS-NOTES.md.

pub mod mvdown;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use layerpack_core::backend::{
    Begun, Capabilities, ChangeOptions, Health, LayerBackend, Probe, SessionSpec, Unavailable,
};
use layerpack_core::config::BackendConfig;
use layerpack_core::model::{ChangeSet, FileKind, RelPath};
use layerpack_core::registry::{Origin, Registry};
use layerpack_core::sys::{RealSys, Sys};
use layerpack_core::tree::fold::{fold, FoldOptions};
use layerpack_core::tree::upper::{read_upper, UpperEntry, WhiteoutFormat, AUFS_WH_PREFIX};
use layerpack_core::tree::{ScanOptions, TreeScan};
use layerpack_core::union::{UnionSession, UnionState};
use layerpack_core::{Error, ErrorKind, Result};
use serde::Deserialize;

/// The name this backend registers under.
pub const NAME: &str = "aufs";

/// `statfs` magic of aufs.
const AUFS_SUPER_MAGIC: i64 = 0x6175_6673;

/// `[backends.aufs]` settings.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AufsConfig {
    /// Mount on the root itself, so the install keeps writing to the same
    /// path; the root stays reachable through a private bind mount in the
    /// session.
    pub in_place: bool,
    /// Do not use the move-down ioctl: unmount, then fold everything from
    /// userspace.
    pub offline: bool,
}

/// The aufs backend.
pub struct AufsBackend {
    cfg: AufsConfig,
    fold: FoldOptions,
    proc_root: PathBuf,
    sys: Arc<dyn Sys>,
}

/// What one move-down did, for tests and reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MoveDownReport {
    /// Files moved by the ioctl.
    pub moved_online: Vec<RelPath>,
    /// Files the ioctl declined, with its reason (the fold moved them).
    pub declined: Vec<(RelPath, String)>,
    /// Why the ioctl was given up on for the rest, if it was.
    pub stopped: Option<String>,
}

/// A name below a root that aufs cannot hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unholdable {
    /// It starts with `.wh.` (aufs would take it for a whiteout).
    WhName(PathBuf),
    /// It is longer than `AUFS_MAX_NAMELEN` (the length is given).
    TooLong(PathBuf, usize),
}

/// The first path below `root` whose name aufs cannot hold. Reads names
/// only.
pub fn find_unholdable_name(root: &Path) -> Result<Option<Unholdable>> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = fs::read_dir(&dir).map_err(|e| Error::io(&dir, "cannot list", e))?;
        for e in rd {
            let e = e.map_err(|e| Error::io(&dir, "cannot list", e))?;
            let name = e.file_name();
            let name = name.as_encoded_bytes();
            if name.starts_with(AUFS_WH_PREFIX) {
                return Ok(Some(Unholdable::WhName(e.path())));
            }
            if name.len() > usize::from(mvdown::AUFS_MAX_NAMELEN) {
                return Ok(Some(Unholdable::TooLong(e.path(), name.len())));
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    Ok(None)
}

impl AufsBackend {
    /// A backend reading `/proc` under `proc_root` (`/` normally; tests
    /// point it at a fake tree).
    pub fn new(cfg: AufsConfig, proc_root: &Path) -> AufsBackend {
        AufsBackend {
            cfg,
            fold: FoldOptions::from_env(),
            proc_root: proc_root.to_path_buf(),
            sys: Arc::new(RealSys),
        }
    }

    /// Fold with `opts` (crash tests set a failpoint).
    pub fn with_fold(mut self, opts: FoldOptions) -> AufsBackend {
        self.fold = opts;
        self
    }

    /// Make the privileged calls through `sys` (a recording fake in tests).
    pub fn with_sys(mut self, sys: Arc<dyn Sys>) -> AufsBackend {
        self.sys = sys;
        self
    }

    /// The session's mounts and files.
    fn session<'a>(&'a self, spec: &'a SessionSpec) -> UnionSession<'a> {
        UnionSession {
            sys: &*self.sys,
            spec,
            fstype: "aufs",
        }
    }

    /// The mount option string.
    pub fn mount_options(upper: &Path, lower: &Path, xino: &Path) -> Result<String> {
        for p in [upper, lower, xino] {
            let s = p.to_string_lossy();
            if s.contains([',', ':', '=', '\n']) || p.to_str().is_none() {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "aufs cannot take a path with ',', ':', '=', a newline or non-UTF-8 bytes in its branch options",
                )
                .with_path(p));
            }
        }
        Ok(format!(
            "br={}=rw:{}=ro,udba=reval,noplink,xino={}",
            upper.display(),
            lower.display(),
            xino.display()
        ))
    }

    /// Checks on the base and the state directory before anything is
    /// mounted.
    fn check_base(session: &UnionSession) -> Result<()> {
        let spec = session.spec;
        session.refuse_root_on(
            AUFS_SUPER_MAGIC,
            "aufs",
            "aufs cannot use an aufs directory as a branch here",
        )?;
        session.check_same_filesystem()?;
        match find_unholdable_name(&spec.base)? {
            Some(Unholdable::WhName(p)) => Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{} starts with .wh., which aufs takes for a whiteout, so it cannot hold this root; use the overlayfs or snapshot backend",
                    p.display()
                ),
            )),
            Some(Unholdable::TooLong(p, len)) => Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{}: its name is {len} bytes, and aufs holds names of at most {} bytes (AUFS_MAX_NAMELEN), so it cannot hold this root; use the overlayfs or snapshot backend",
                    p.display(),
                    mvdown::AUFS_MAX_NAMELEN
                ),
            )),
            None => Ok(()),
        }
    }

    /// Move every new single-link regular file down with the ioctl, through
    /// the mount at `merged`. `base` is where the untouched base is read.
    pub fn move_down_online(
        &self,
        upper: &Path,
        merged: &Path,
        base: &Path,
    ) -> Result<MoveDownReport> {
        let fmt = WhiteoutFormat::Aufs;
        let mut report = MoveDownReport::default();
        let scan = TreeScan::start(
            upper,
            ScanOptions {
                xattrs: false,
                ..ScanOptions::default()
            },
        )?;
        // Opaque upper directories enclosing the current entry: the scan
        // yields a directory before everything below it, so one check per
        // directory and a prefix test per entry suffice.
        let mut opaque: Vec<RelPath> = Vec::new();
        for r in scan {
            let r = r?;
            while opaque.last().is_some_and(|d| !r.path.starts_with(d)) {
                opaque.pop();
            }
            let abs = r.path.under(upper);
            if r.kind == FileKind::Dir && fmt.is_opaque(&abs) {
                opaque.push(r.path.clone());
            }
            // Only new single-link regular files below no opaque directory.
            if r.kind != FileKind::File
                || r.nlink != 1
                || !opaque.is_empty()
                || fmt.entry(&r, &abs) != UpperEntry::Content
            {
                continue;
            }
            // Absent from the base (and no ancestor there is a non-directory).
            match fs::symlink_metadata(r.path.under(base)) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                _ => continue,
            }
            let target = r.path.under(merged);
            let mut arg = mvdown::encode();
            let result = self.sys.ioctl(&target, mvdown::AUFS_CTL_MVDOWN, &mut arg);
            match mvdown::outcome(&target, result, &arg) {
                mvdown::Outcome::Moved => report.moved_online.push(r.path.clone()),
                mvdown::Outcome::FoldLater(why) => report.declined.push((r.path.clone(), why)),
                mvdown::Outcome::StopOnline(why) => {
                    report.stopped = Some(format!("{}: {why}", target.display()));
                    break;
                }
                mvdown::Outcome::Fatal(e) => return Err(e),
            }
        }
        Ok(report)
    }

    /// Move-down, returning what the ioctl did. The session's own mount
    /// is gone by now (`freeze`); for the ioctl, aufs is mounted again on
    /// the session's private `merged/` with the base as its read-only
    /// branch, where nothing else writes.
    pub fn move_down_report(&self, spec: &SessionSpec) -> Result<MoveDownReport> {
        let session = self.session(spec);
        let upper = session.upper();
        session.unmount_all()?;
        let mut report = MoveDownReport::default();
        let has_entries = fs::read_dir(&upper).is_ok_and(|mut d| d.next().is_some());
        if !self.cfg.offline && has_entries {
            let merged = session.merged_dir();
            if !merged.is_dir() {
                fs::create_dir(&merged).map_err(|e| Error::io(&merged, "cannot create", e))?;
            }
            let opts = Self::mount_options(&upper, &spec.base, &spec.dir.join("xino"))?;
            session.mount_union("none", &merged, &opts)?;
            let online = self.move_down_online(&upper, &merged, &spec.base);
            let unmounted = session.unmount(&merged, Some("aufs"));
            report = layerpack_core::ops::with_cleanup_result(online, unmounted)?;
            if let Some(why) = &report.stopped {
                // Not an error (the fold does the rest), but a user on an
                // aufs host wants to know the online step is not working.
                eprintln!("layerpack: aufs move-down ioctl given up ({why}); folding the rest after unmounting");
            }
        }
        // The rest is folded from userspace.
        if upper.exists() {
            fold(&upper, &spec.base, WhiteoutFormat::Aufs, self.fold)?;
        }
        session.remove_files(&[], &["xino"])?;
        Ok(report)
    }
}

/// Register the aufs backend with `registry`.
pub fn register(registry: &mut Registry) -> Result<()> {
    registry.register(
        NAME,
        Origin::BuiltIn,
        Box::new(|cfg: &BackendConfig| {
            let c: AufsConfig = cfg.parse()?;
            Ok(Box::new(AufsBackend::new(c, Path::new("/"))))
        }),
    )
}

impl LayerBackend for AufsBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            can_discard: true,
            needs_root: true,
            online_move_down: !self.cfg.offline,
            rootless: false,
            in_place: self.cfg.in_place,
            records_ownership: false,
            reserves_wh_names: true,
            max_name_len: Some(mvdown::AUFS_MAX_NAMELEN),
        }
    }

    fn probe(&self) -> Probe {
        let list = fs::read_to_string(self.proc_root.join("proc/filesystems")).unwrap_or_default();
        if !list
            .lines()
            .any(|l| l.split_whitespace().last() == Some("aufs"))
        {
            return Probe::Unavailable(Unavailable::NoFilesystem {
                fs: "aufs".into(),
                hint: String::new(),
            });
        }
        if !nix::unistd::geteuid().is_root() {
            return Probe::Unavailable(Unavailable::NeedsRoot {
                hint: "aufs mounts are privileged".into(),
            });
        }
        Probe::Available
    }

    fn begin(&self, spec: &SessionSpec) -> Result<Begun> {
        let session = self.session(spec);
        let in_place = self.cfg.in_place;
        session.create_dirs(in_place, &[])?;
        let result = (|| -> Result<Begun> {
            Self::check_base(&session)?;
            let (branch, target) = if in_place {
                (session.bind_root()?, spec.base.clone())
            } else {
                (spec.base.clone(), session.merged_dir())
            };
            let options = Self::mount_options(&session.upper(), &branch, &spec.dir.join("xino"))?;
            session.mount_union("none", &target, &options)?;
            let state = UnionState {
                in_place,
                flags: Vec::new(),
                options,
                volatile_boot: None,
            };
            Ok(Begun {
                merged: target,
                state: state.encode()?,
            })
        })();
        if let Err(e) = result {
            return Err(layerpack_core::ops::with_cleanup(
                e,
                session.undo_begin(&[], &["xino"]),
            ));
        }
        result
    }

    /// Unmount: the upper branch can no longer change.
    fn freeze(&self, spec: &SessionSpec) -> Result<()> {
        self.session(spec).unmount_all()
    }

    fn thaw(&self, spec: &SessionSpec) -> Result<()> {
        self.session(spec).remount("none")
    }

    fn content_root(&self, spec: &SessionSpec) -> Result<PathBuf> {
        Ok(self.session(spec).upper())
    }

    fn changes(&self, spec: &SessionSpec, _opts: &ChangeOptions) -> Result<ChangeSet> {
        let session = self.session(spec);
        read_upper(&session.upper(), &session.places()?.1, WhiteoutFormat::Aufs)
    }

    fn move_down(&self, spec: &SessionSpec) -> Result<()> {
        self.move_down_report(spec).map(|_| ())
    }

    fn discard(&self, spec: &SessionSpec) -> Result<()> {
        let session = self.session(spec);
        session.unmount_all()?;
        session.remove_files(&[], &["xino"])
    }

    fn release(&self, spec: &SessionSpec) -> Result<()> {
        self.discard(spec)
    }

    fn health(&self, spec: &SessionSpec) -> Health {
        self.session(spec).health()
    }
}

impl layerpack_core::plugin::PluginBackend for AufsBackend {
    const NAME: &'static str = NAME;

    fn create(cfg: &BackendConfig) -> Result<Self> {
        let c: AufsConfig = cfg.parse()?;
        Ok(AufsBackend::new(c, Path::new("/")))
    }
}

// Built as a plugin with `cargo rustc -p layerpack-backend-aufs --release
// --features plugin --crate-type cdylib` (see CONTRIBUTING.md). Only in
// that build: two plugins' entry symbols linked into one binary would clash.
#[cfg(feature = "plugin")]
layerpack_core::export_backend!(AufsBackend);
