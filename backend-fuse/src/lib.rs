//! layerpack-backend-fuse: our own union filesystem in userspace (FUSE).
//!
//! `begin` starts a daemon ([`daemon`]) that mounts a union of the base
//! (read-only lower) and `upper/` in the session directory, on the base
//! itself (`in_place`, the default) or on `merged/`. An unprivileged user
//! can do this (through `fusermount3`), and the layer lives from `init` to
//! `final` in separate processes. The upper layer is in the overlay format
//! ([`union`]), so `changes` reads it with
//! [`layerpack_core::tree::upper::read_upper`] and `move_down` folds it
//! with [`layerpack_core::tree::fold::fold`] after unmounting. When the
//! daemon does not run as root, ownership an install asks for is recorded
//! instead of applied (see [`layerpack_core::tree::override_stat`]).
//!
//! Session files: `upper/`, `work/` (copy-ups in progress), `merged/`
//! (not in place), `daemon` (the running daemon: pid, start time, its fd
//! of the base), `daemon.log`, `requests` (request counts, at exit).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use layerpack_core::backend::{
    BackendState, Begun, Capabilities, ChangeOptions, Health, LayerBackend, Probe, SessionSpec,
    Unavailable,
};
use layerpack_core::config::BackendConfig;
use layerpack_core::model::ChangeSet;
use layerpack_core::registry::{Origin, Registry};
use layerpack_core::tree::fold::{fold, FoldOptions};
use layerpack_core::tree::upper::{read_upper, WhiteoutFormat};
use layerpack_core::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};

pub mod daemon;
mod glue;
pub mod union;

pub use glue::Tuning;

/// The name this backend registers under.
pub const NAME: &str = "fuse";

/// The filesystem types the mount has in the mount table: `fuse` when
/// mounted directly (root), `fuse.layerpack` through `fusermount3`.
pub const FSTYPES: [&str; 2] = ["fuse", "fuse.layerpack"];

/// Where the daemon writes its request counts when it ends, besides the
/// session's `requests` file (for the benchmark, which outlives the
/// session).
pub const REQUEST_LOG_ENV: &str = "LAYERPACK_FUSE_REQUEST_LOG";

/// `[backends.fuse]` settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FuseConfig {
    /// Mount on the root itself (the install keeps its paths); else on a
    /// directory in the session.
    pub in_place: bool,
    /// Threads serving requests.
    pub threads: usize,
    /// Hand file I/O to the kernel (FUSE passthrough, Linux 6.9+, root).
    pub passthrough: bool,
    /// Let the kernel cache writes when there is no passthrough.
    pub writeback: bool,
}

impl Default for FuseConfig {
    fn default() -> Self {
        FuseConfig {
            in_place: true,
            threads: std::thread::available_parallelism()
                .map(|n| n.get().clamp(2, 8))
                .unwrap_or(2),
            passthrough: true,
            writeback: true,
        }
    }
}

/// Version of [`FuseState`].
pub const STATE_VERSION: u32 = 1;

/// What `begin` fixed about a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FuseState {
    /// Mounted on the root itself.
    pub in_place: bool,
    /// Where the union is mounted.
    pub mountpoint: PathBuf,
    /// Namespace of the overlay markers in the upper: `trusted` or `user`.
    pub marker_ns: String,
    /// Ownership is recorded, not applied (the daemon is not root).
    pub fake_owner: bool,
    /// The settings the daemon was started with.
    pub threads: usize,
    /// Passthrough asked for.
    pub passthrough: bool,
    /// Writeback cache asked for.
    pub writeback: bool,
}

/// The running daemon, as recorded in the session's `daemon` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct DaemonFile {
    pid: u32,
    start_time: u64,
    lower_fd: i32,
}

/// The FUSE backend.
pub struct FuseBackend {
    cfg: FuseConfig,
    fold: FoldOptions,
}

fn io(p: &Path, what: &str) -> impl Fn(std::io::Error) -> Error {
    let (p, what) = (p.to_path_buf(), what.to_string());
    move |e| Error::io(&p, what.clone(), e)
}

impl FuseBackend {
    /// A backend with `cfg`.
    pub fn new(cfg: FuseConfig) -> FuseBackend {
        FuseBackend {
            cfg,
            fold: FoldOptions::from_env(),
        }
    }

    /// Fold with `opts` (crash tests set a failpoint).
    pub fn with_fold(mut self, opts: FoldOptions) -> FuseBackend {
        self.fold = opts;
        self
    }

    fn state(&self, spec: &SessionSpec) -> Result<FuseState> {
        spec.state.decode(NAME, STATE_VERSION)
    }

    fn format(st: &FuseState) -> WhiteoutFormat {
        WhiteoutFormat::Overlay {
            userxattr: st.marker_ns == "user",
        }
    }

    fn plan(&self, spec: &SessionSpec, st: &FuseState) -> daemon::Plan {
        let root = rustix::process::geteuid().is_root();
        daemon::Plan {
            lower: spec.base.clone(),
            upper: spec.dir.join("upper"),
            work: spec.dir.join("work"),
            mountpoint: st.mountpoint.clone(),
            log: spec.dir.join("daemon.log"),
            counters: std::env::var_os(REQUEST_LOG_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| spec.dir.join("requests")),
            options: union::Options {
                fake_owner: st.fake_owner,
                marker_ns: if st.marker_ns == "user" {
                    "user"
                } else {
                    "trusted"
                },
                writeback: st.writeback && !(st.passthrough && root),
            },
            tuning: Tuning {
                threads: st.threads,
                passthrough: st.passthrough && root,
                writeback: st.writeback,
                root,
            },
        }
    }

    fn daemon(spec: &SessionSpec) -> Option<daemon::Started> {
        let text = fs::read(spec.dir.join("daemon")).ok()?;
        let d: DaemonFile = serde_json::from_slice(&text).ok()?;
        Some(daemon::Started {
            pid: d.pid,
            start_time: d.start_time,
            lower_fd: d.lower_fd,
        })
    }

    fn launch(&self, spec: &SessionSpec, st: &FuseState) -> Result<()> {
        let started = daemon::start(&self.plan(spec, st))?;
        let file = spec.dir.join("daemon");
        let text = serde_json::to_vec(&DaemonFile {
            pid: started.pid,
            start_time: started.start_time,
            lower_fd: started.lower_fd,
        })
        .map_err(|e| Error::new(ErrorKind::Io, e.to_string()))?;
        let tmp = spec.dir.join("daemon.tmp");
        fs::write(&tmp, text).map_err(io(&tmp, "cannot write"))?;
        fs::rename(&tmp, &file).map_err(io(&file, "cannot write"))
    }

    fn mounted(at: &Path) -> Result<bool> {
        use layerpack_core::sys::Sys;
        for t in FSTYPES {
            if layerpack_core::sys::RealSys
                .is_mounted(at, Some(t))
                .map_err(io(
                    Path::new("/proc/self/mountinfo"),
                    "cannot read the mount table",
                ))?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Unmount and wait for the daemon to end. A dead daemon's mount is
    /// detached.
    fn stop(&self, spec: &SessionSpec) -> Result<()> {
        let st = self.state(spec)?;
        let d = Self::daemon(spec);
        let live = d.as_ref().is_some_and(daemon::alive);
        if Self::mounted(&st.mountpoint)? {
            // A process forked at this moment holds our fds for an
            // instant (until it closes or execs them): a short EBUSY is
            // tried again; a lasting one is a process that uses the mount.
            let mut result = daemon::unmount(&st.mountpoint, !live);
            for _ in 0..40 {
                match &result {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(Duration::from_millis(50));
                        result = daemon::unmount(&st.mountpoint, !live);
                    }
                    _ => break,
                }
            }
            match result {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    return Err(Error::io(
                        &st.mountpoint,
                        format!(
                            "cannot unmount: a process still uses it (an open file or a working directory there); end it and run `layerpack final {}` again",
                            spec.package
                        ),
                        e,
                    )
                    .with_kind(ErrorKind::Busy))
                }
                Err(e) => return Err(Error::io(&st.mountpoint, "cannot unmount", e)),
            }
        }
        if let Some(d) = d {
            if live && !daemon::wait_gone(&d, Duration::from_secs(30)) {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "the FUSE daemon (pid {}) did not end within 30 s of the unmount",
                        d.pid
                    ),
                ));
            }
        }
        let _ = fs::remove_file(spec.dir.join("daemon"));
        Ok(())
    }

    /// Where the untouched base can be read now.
    fn readable_base(&self, spec: &SessionSpec, st: &FuseState) -> Result<PathBuf> {
        if st.in_place && Self::mounted(&st.mountpoint)? {
            if let Some(d) = Self::daemon(spec).filter(daemon::alive) {
                return Ok(PathBuf::from(format!("/proc/{}/fd/{}", d.pid, d.lower_fd)));
            }
            return Err(Error::new(
                ErrorKind::Busy,
                "the base is covered by a FUSE mount whose daemon is gone; run `layerpack final` (it detaches the mount first) or `layerpack abort`",
            )
            .with_path(&spec.base));
        }
        Ok(spec.base.clone())
    }

    /// The session layout the union backends share (`upper/`, `merged/`),
    /// for its file removal and same-filesystem check.
    fn union_session(spec: &SessionSpec) -> layerpack_core::union::UnionSession<'_> {
        layerpack_core::union::UnionSession {
            sys: &layerpack_core::sys::RealSys,
            spec,
            fstype: FSTYPES[0],
        }
    }

    fn remove_files(spec: &SessionSpec) -> Result<()> {
        Self::union_session(spec).remove_files(
            &["work"],
            &["daemon", "daemon.tmp", "daemon.log", "requests"],
        )
    }

    fn check_layer_dirs(&self, spec: &SessionSpec, upper: &Path) -> Result<String> {
        // The fold is a series of renames.
        Self::union_session(spec).check_same_filesystem()?;
        // Whiteouts are 0/0 character devices (any user may make one since
        // Linux 5.8); overlay markers are xattrs.
        let probe = upper.join(".layerpack-whiteout-probe");
        nix::sys::stat::mknod(
            &probe,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .map_err(|e| {
            Error::io(
                upper,
                "cannot make a whiteout (a 0/0 character device) in the state directory; needs Linux 5.8 or later and a filesystem that allows it",
                e.into(),
            )
            .with_kind(ErrorKind::Unsupported)
        })?;
        let _ = fs::remove_file(&probe);
        let ns = if rustix::process::geteuid().is_root() {
            "trusted"
        } else {
            "user"
        };
        let name = format!("{ns}.overlay.layerpack-probe");
        xattr::set(upper, &name, b"1").map_err(|e| {
            Error::io(
                upper,
                format!(
                    "the state directory's filesystem does not take {ns}.* xattrs, which the FUSE layer uses for its markers; put state_dir on ext4, xfs or btrfs"
                ),
                e,
            )
            .with_kind(ErrorKind::Unsupported)
        })?;
        let _ = xattr::remove(upper, &name);
        Ok(ns.to_string())
    }
}

/// Register the FUSE backend with `registry`.
pub fn register(registry: &mut Registry) -> Result<()> {
    registry.register(
        NAME,
        Origin::BuiltIn,
        Box::new(|cfg: &BackendConfig| {
            let c: FuseConfig = cfg.parse()?;
            Ok(Box::new(FuseBackend::new(c)))
        }),
    )
}

impl LayerBackend for FuseBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            can_discard: true,
            needs_root: false,
            online_move_down: false,
            rootless: true,
            in_place: self.cfg.in_place,
            records_ownership: !rustix::process::geteuid().is_root(),
            reserves_wh_names: false,
            max_name_len: None,
        }
    }

    fn probe(&self) -> Probe {
        let fs_list = fs::read_to_string("/proc/filesystems").unwrap_or_default();
        if !fs_list
            .lines()
            .any(|l| l.split_whitespace().last() == Some("fuse"))
        {
            return Probe::Unavailable(Unavailable::NoFilesystem {
                fs: "fuse".into(),
                hint: "modprobe fuse".into(),
            });
        }
        if rustix::fs::access(
            "/dev/fuse",
            rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK,
        )
        .is_err()
        {
            return Probe::Unavailable(Unavailable::Missing {
                what: "/dev/fuse (readable and writable)".into(),
                hint: "a stock system has it mode 0666; `chmod 0666 /dev/fuse` or run as root"
                    .into(),
            });
        }
        if !rustix::process::geteuid().is_root() && which("fusermount3").is_none() {
            return Probe::Unavailable(Unavailable::Missing {
                what: "fusermount3".into(),
                hint: "install fuse3 (Debian: apt-get install fuse3)".into(),
            });
        }
        Probe::Available
    }

    fn begin(&self, spec: &SessionSpec) -> Result<Begun> {
        let upper = spec.dir.join("upper");
        let work = spec.dir.join("work");
        let in_place = self.cfg.in_place;
        let mountpoint = if in_place {
            spec.base.clone()
        } else {
            spec.dir.join("merged")
        };
        let result = (|| -> Result<Begun> {
            for d in [&upper, &work] {
                fs::create_dir(d).map_err(io(d, "cannot create"))?;
            }
            if !in_place {
                fs::create_dir(&mountpoint).map_err(io(&mountpoint, "cannot create"))?;
            }
            if Self::mounted(&spec.base)? {
                return Err(Error::new(
                    ErrorKind::Busy,
                    "the root is already covered by a layerpack FUSE mount (another session?)",
                )
                .with_path(&spec.base));
            }
            let marker_ns = self.check_layer_dirs(spec, &upper)?;
            let st = FuseState {
                in_place,
                mountpoint: mountpoint.clone(),
                fake_owner: marker_ns == "user",
                marker_ns,
                threads: self.cfg.threads.max(1),
                passthrough: self.cfg.passthrough,
                writeback: self.cfg.writeback,
            };
            self.launch(spec, &st)?;
            Ok(Begun {
                merged: mountpoint.clone(),
                state: BackendState::encode(STATE_VERSION, &st)?,
            })
        })();
        if let Err(e) = result {
            let cleanup = (|| -> Result<()> {
                if Self::mounted(&mountpoint)? {
                    daemon::unmount(&mountpoint, true)
                        .map_err(io(&mountpoint, "cannot unmount"))?;
                }
                Self::remove_files(spec)
            })();
            return Err(layerpack_core::ops::with_cleanup(e, cleanup));
        }
        result
    }

    fn freeze(&self, spec: &SessionSpec) -> Result<()> {
        self.stop(spec)
    }

    fn thaw(&self, spec: &SessionSpec) -> Result<()> {
        let st = self.state(spec)?;
        if Self::mounted(&st.mountpoint)? && Self::daemon(spec).is_some_and(|d| daemon::alive(&d)) {
            return Ok(());
        }
        self.launch(spec, &st)
    }

    fn content_root(&self, spec: &SessionSpec) -> Result<PathBuf> {
        Ok(spec.dir.join("upper"))
    }

    fn changes(&self, spec: &SessionSpec, _opts: &ChangeOptions) -> Result<ChangeSet> {
        let st = self.state(spec)?;
        read_upper(
            &spec.dir.join("upper"),
            &self.readable_base(spec, &st)?,
            Self::format(&st),
        )
    }

    fn move_down(&self, spec: &SessionSpec) -> Result<()> {
        let st = self.state(spec)?;
        self.stop(spec)?;
        let upper = spec.dir.join("upper");
        if upper.exists() {
            fold(&upper, &spec.base, Self::format(&st), self.fold)?;
        }
        Self::remove_files(spec)
    }

    fn discard(&self, spec: &SessionSpec) -> Result<()> {
        self.stop(spec)?;
        Self::remove_files(spec)
    }

    fn release(&self, spec: &SessionSpec) -> Result<()> {
        self.discard(spec)
    }

    fn details(&self) -> Vec<(String, String)> {
        let root = rustix::process::geteuid().is_root();
        let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let passthrough = self.cfg.passthrough
            && root
            && layerpack_core::union::kernel_at_least(&release, (6, 9));
        vec![
            (
                "layer".into(),
                format!(
                    "overlay format: whiteouts are 0/0 character devices, markers are {}.overlay.* xattrs",
                    if root { "trusted" } else { "user" }
                ),
            ),
            (
                "ownership".into(),
                if root {
                    "applied for real (the daemon is root)".into()
                } else {
                    "chown and setuid/setgid chmod are recorded in user.containers.override_stat; a device is an empty file with such a record (the kernel refuses mknod of devices to ordinary users)".into()
                },
            ),
            (
                "file I/O".into(),
                if passthrough {
                    "FUSE passthrough (the kernel reads and writes the layer's files directly)".into()
                } else if self.cfg.writeback {
                    "through the daemon, with the kernel's writeback cache".into()
                } else {
                    "through the daemon".into()
                },
            ),
        ]
    }

    fn health(&self, spec: &SessionSpec) -> Health {
        let st = match self.state(spec) {
            Ok(s) => s,
            Err(e) => return Health::Broken(e.to_string()),
        };
        let pkg = &spec.package;
        if !spec.dir.join("upper").is_dir() {
            return Health::Broken(format!(
                "the upper layer {} is missing; run `layerpack abort {pkg}`",
                spec.dir.join("upper").display()
            ));
        }
        let live = Self::daemon(spec).filter(daemon::alive);
        match (live, Self::mounted(&st.mountpoint)) {
            (Some(_), Ok(true)) => Health::Ok,
            (_, Err(e)) => Health::Broken(e.to_string()),
            (None, Ok(mounted)) => Health::MountLost(format!(
                "the FUSE daemon of {} is gone{} (killed, or a reboot); `layerpack final {pkg}` reads what reached the upper layer, packages it and folds it, `layerpack abort {pkg}` drops it",
                st.mountpoint.display(),
                if mounted {
                    " and its mount answers ENOTCONN"
                } else {
                    ""
                }
            )),
            (Some(d), Ok(false)) => Health::MountLost(format!(
                "the FUSE daemon (pid {}) runs but nothing is mounted on {}; `layerpack final {pkg}` reads the upper layer directly",
                d.pid,
                st.mountpoint.display()
            )),
        }
    }
}

fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
    })
}

impl layerpack_core::plugin::PluginBackend for FuseBackend {
    const NAME: &'static str = NAME;

    fn create(cfg: &BackendConfig) -> Result<Self> {
        let c: FuseConfig = cfg.parse()?;
        Ok(FuseBackend::new(c))
    }
}

#[cfg(feature = "plugin")]
layerpack_core::export_backend!(FuseBackend);
