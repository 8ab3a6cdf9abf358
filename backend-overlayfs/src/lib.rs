//! layerpack-backend-overlayfs: capture a layer with kernel overlayfs.
//!
//! `begin` mounts `overlay` with the base as the lower layer and an
//! `upper/` + `work/` pair in the session directory (which must be on the
//! base's filesystem so move-down is a rename) on a merged directory in the
//! session directory. `changes` reads only the upper layer
//! ([`layerpack_core::tree::upper`]), `move_down` unmounts and folds it
//! ([`layerpack_core::tree::fold`]), `discard` unmounts and drops it. The
//! mount uses `index=off`, `metacopy=off` and `redirect_dir=off` (where the
//! kernel knows them) so the upper layer can be read on its own.
//!
//! Needs root, or `run` through a user namespace. Mount calls go through
//! [`layerpack_core::sys::Sys`], so tests can record them. See `docs.md`.

use std::fs;
use std::path::{Path, PathBuf};

use layerpack_core::backend::{
    Begun, Capabilities, ChangeOptions, Health, LayerBackend, Probe, SessionSpec, Unavailable,
};
use layerpack_core::config::BackendConfig;
use layerpack_core::model::ChangeSet;
use layerpack_core::registry::{Origin, Registry};
use layerpack_core::sys::{RealSys, Sys};
use layerpack_core::tree::fold::{fold, FoldOptions};
use layerpack_core::tree::upper::{read_upper, WhiteoutFormat};
use layerpack_core::union::{UnionSession, UnionState};
use layerpack_core::{Error, ErrorKind, Result};
use nix::mount::{mount, MsFlags};
use serde::Deserialize;
use std::sync::Arc;

/// The name this backend registers under.
pub const NAME: &str = "overlayfs";

/// `[backends.overlayfs]` settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverlayConfig {
    /// Mount the overlay on the root itself, so the install keeps writing
    /// to the same path (Buildroot's `TARGET_DIR`). The root stays
    /// reachable for layerpack through a private bind mount in the session.
    pub in_place: bool,
    /// Mount `volatile` where the kernel has it (5.10+): unmounting then
    /// does not write back the whole upper filesystem, so `final` does not
    /// wait for everything else the build wrote. After a reboot such a
    /// layer is not trusted (`status` says so; `abort` and capture again).
    pub volatile: bool,
}

impl Default for OverlayConfig {
    fn default() -> Self {
        OverlayConfig {
            in_place: false,
            volatile: true,
        }
    }
}

/// The overlayfs backend.
pub struct OverlayBackend {
    cfg: OverlayConfig,
    fold: FoldOptions,
    proc_root: PathBuf,
    user_namespace: bool,
    sys: Arc<dyn Sys>,
}

/// Make this process root of a new user namespace (mapped to the caller's
/// uid and gid) with a private mount namespace, so an unprivileged user
/// can mount overlayfs (with `userxattr`). Everything mounted is gone when
/// the process ends, so only `run` can use it: `init` and `final` as
/// separate processes need real root.
pub fn enter_user_namespace() -> Result<()> {
    use nix::sched::{unshare, CloneFlags};
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS).map_err(|e| {
        Error::io(
            "/proc/sys/user/max_user_namespaces",
            "cannot create a user namespace (are unprivileged user namespaces enabled?)",
            e.into(),
        )
    })?;
    for (file, text) in [
        ("/proc/self/setgroups", "deny".to_string()),
        ("/proc/self/uid_map", format!("0 {uid} 1")),
        ("/proc/self/gid_map", format!("0 {gid} 1")),
    ] {
        fs::write(file, text)
            .map_err(|e| Error::io(file, "cannot set up the user namespace", e))?;
    }
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| Error::io("/", "cannot make mounts private", e.into()))
}

impl OverlayBackend {
    /// A backend reading `/proc` and `/sys` under `proc_root` (`/` normally;
    /// tests point it at a fake tree).
    pub fn new(cfg: OverlayConfig, proc_root: &Path) -> OverlayBackend {
        OverlayBackend {
            cfg,
            fold: FoldOptions::from_env(),
            proc_root: proc_root.to_path_buf(),
            user_namespace: false,
            sys: Arc::new(RealSys),
        }
    }

    /// Fold with `opts` (crash tests set a failpoint).
    pub fn with_fold(mut self, opts: FoldOptions) -> OverlayBackend {
        self.fold = opts;
        self
    }

    /// Make the privileged calls through `sys` (a recording fake in tests).
    pub fn with_sys(mut self, sys: Arc<dyn Sys>) -> OverlayBackend {
        self.sys = sys;
        self
    }

    /// This process is in a user namespace made by
    /// [`enter_user_namespace`]: mount with `userxattr`.
    pub fn in_user_namespace(mut self, yes: bool) -> OverlayBackend {
        self.user_namespace = yes;
        self
    }

    /// The session's mounts and files.
    fn session<'a>(&'a self, spec: &'a SessionSpec) -> UnionSession<'a> {
        UnionSession {
            sys: &*self.sys,
            spec,
            fstype: "overlay",
        }
    }

    /// How the session's upper layer marks whiteouts and opaque
    /// directories (recorded at `begin`).
    fn format(&self, spec: &SessionSpec) -> Result<WhiteoutFormat> {
        Ok(WhiteoutFormat::Overlay {
            userxattr: self.session(spec).has_flag("userxattr")?,
        })
    }

    /// Options the running kernel's overlay knows, from its module
    /// parameters.
    fn mount_options(&self, base: &Path, upper: &Path, work: &Path) -> Result<String> {
        for p in [base, upper, work] {
            let s = p.to_string_lossy();
            if s.contains([',', ':', '\\', '\n']) || p.to_str().is_none() {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "overlayfs cannot take a path with ',', ':', '\\', a newline or non-UTF-8 bytes in its mount options",
                )
                .with_path(p));
            }
        }
        let mut o = format!(
            "lowerdir={},upperdir={},workdir={}",
            base.display(),
            upper.display(),
            work.display()
        );
        if self.user_namespace {
            o.push_str(",userxattr");
        }
        let params = self.proc_root.join("sys/module/overlay/parameters");
        // With userxattr the kernel refuses redirect_dir=off (it means
        // "follow"); nofollow neither creates nor follows redirects.
        let redirect = if self.user_namespace {
            "redirect_dir=nofollow"
        } else {
            "redirect_dir=off"
        };
        for (param, opt) in [
            ("index", "index=off"),
            ("metacopy", "metacopy=off"),
            ("redirect_dir", redirect),
        ] {
            if params.join(param).exists() {
                o.push(',');
                o.push_str(opt);
            }
        }
        let release = std::fs::read_to_string(self.proc_root.join("proc/sys/kernel/osrelease"))
            .unwrap_or_default();
        if self.cfg.volatile && layerpack_core::union::kernel_has_volatile(&release) {
            o.push_str(",volatile");
        }
        Ok(o)
    }
}

/// Register the overlayfs backend with `registry`.
pub fn register(registry: &mut Registry) -> Result<()> {
    register_in_user_namespace(registry, false)
}

/// Register; `userns` when this process entered [`enter_user_namespace`].
pub fn register_in_user_namespace(registry: &mut Registry, userns: bool) -> Result<()> {
    registry.register(
        NAME,
        Origin::BuiltIn,
        Box::new(move |cfg: &BackendConfig| {
            let c: OverlayConfig = cfg.parse()?;
            Ok(Box::new(
                OverlayBackend::new(c, Path::new("/")).in_user_namespace(userns),
            ))
        }),
    )
}

impl LayerBackend for OverlayBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            can_discard: true,
            needs_root: true,
            online_move_down: false,
            rootless: false,
            in_place: self.cfg.in_place,
            records_ownership: false,
            reserves_wh_names: false,
            max_name_len: None,
        }
    }

    fn probe(&self) -> Probe {
        let fs_list =
            fs::read_to_string(self.proc_root.join("proc/filesystems")).unwrap_or_default();
        if !fs_list
            .lines()
            .any(|l| l.split_whitespace().last() == Some("overlay"))
        {
            return Probe::Unavailable(Unavailable::NoFilesystem {
                fs: "overlay".into(),
                hint: "modprobe overlay".into(),
            });
        }
        if !nix::unistd::geteuid().is_root() {
            return Probe::Unavailable(Unavailable::NeedsRoot {
                hint: "init and final as separate processes need root; as an unprivileged user, `layerpack run --backend overlayfs` works through a user namespace".into(),
            });
        }
        Probe::Available
    }

    fn begin(&self, spec: &SessionSpec) -> Result<Begun> {
        let session = self.session(spec);
        let (upper, work) = (session.upper(), spec.dir.join("work"));
        let in_place = self.cfg.in_place;
        session.create_dirs(in_place, &["work"])?;
        let result = (|| -> Result<Begun> {
            const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
            session.refuse_root_on(
                OVERLAYFS_SUPER_MAGIC,
                "overlayfs",
                "nested overlays cannot hold the upper layer's whiteouts. Use the snapshot backend here",
            )?;
            let probe_name = if self.user_namespace {
                "user.overlay.layerpack-probe"
            } else {
                "trusted.overlay.layerpack-probe"
            };
            if let Err(e) = xattr::set(&upper, probe_name, b"1") {
                return Err(Error::io(
                    &upper,
                    format!(
                        "the state directory's filesystem does not take {} xattrs, which overlayfs needs for its upper layer (tmpfs as an unprivileged user, some network filesystems); put state_dir on ext4, xfs or btrfs",
                        probe_name.trim_end_matches("layerpack-probe")
                    ),
                    e,
                )
                .with_kind(ErrorKind::Unsupported));
            }
            let _ = xattr::remove(&upper, probe_name);
            session.check_same_filesystem()?;
            let (lowerdir, target) = if in_place {
                (session.bind_root()?, spec.base.clone())
            } else {
                (spec.base.clone(), session.merged_dir())
            };
            let options = self.mount_options(&lowerdir, &upper, &work)?;
            session.mount_union("overlay", &target, &options)?;
            let state = UnionState {
                in_place,
                flags: if self.user_namespace {
                    vec!["userxattr".into()]
                } else {
                    Vec::new()
                },
                volatile_boot: options
                    .split(',')
                    .any(|o| o == "volatile")
                    .then(layerpack_core::union::boot_id)
                    .flatten(),
                options,
            };
            Ok(Begun {
                merged: target,
                state: state.encode()?,
            })
        })();
        if let Err(e) = result {
            return Err(layerpack_core::ops::with_cleanup(
                e,
                session.undo_begin(&["work"], &[]),
            ));
        }
        result
    }

    /// Unmount the overlay (and the bind mount of the root): the upper
    /// layer can no longer change, and a busy mount fails here.
    fn freeze(&self, spec: &SessionSpec) -> Result<()> {
        let session = self.session(spec);
        session.check_trusted()?;
        session.unmount_all()
    }

    fn thaw(&self, spec: &SessionSpec) -> Result<()> {
        self.session(spec).remount("overlay")
    }

    fn content_root(&self, spec: &SessionSpec) -> Result<PathBuf> {
        Ok(self.session(spec).upper())
    }

    fn changes(&self, spec: &SessionSpec, _opts: &ChangeOptions) -> Result<ChangeSet> {
        let session = self.session(spec);
        read_upper(&session.upper(), &session.places()?.1, self.format(spec)?)
    }

    fn move_down(&self, spec: &SessionSpec) -> Result<()> {
        let session = self.session(spec);
        let upper = session.upper();
        // Unmount first (a no-op after freeze): the fold writes into the
        // base itself.
        session.unmount_all()?;
        if upper.exists() {
            fold(&upper, &spec.base, self.format(spec)?, self.fold)?;
        }
        session.remove_files(&["work"], &[])
    }

    fn discard(&self, spec: &SessionSpec) -> Result<()> {
        let session = self.session(spec);
        session.unmount_all()?;
        session.remove_files(&["work"], &[])
    }

    fn release(&self, spec: &SessionSpec) -> Result<()> {
        self.discard(spec)
    }

    fn health(&self, spec: &SessionSpec) -> Health {
        self.session(spec).health()
    }
}

impl layerpack_core::plugin::PluginBackend for OverlayBackend {
    const NAME: &'static str = NAME;

    fn create(cfg: &BackendConfig) -> Result<Self> {
        let c: OverlayConfig = cfg.parse()?;
        Ok(OverlayBackend::new(c, Path::new("/")))
    }
}

// Built as a plugin with `cargo rustc -p layerpack-backend-overlayfs --release
// --features plugin --crate-type cdylib` (see CONTRIBUTING.md). Only in
// that build: two plugins' entry symbols linked into one binary would clash.
#[cfg(feature = "plugin")]
layerpack_core::export_backend!(OverlayBackend);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reads_proc_filesystems_from_the_given_root() {
        let root = std::env::temp_dir().join(format!("lp-ovl-probe-{}", std::process::id()));
        fs::create_dir_all(root.join("proc")).unwrap();
        fs::write(root.join("proc/filesystems"), "nodev\tproc\n\text4\n").unwrap();
        let b = OverlayBackend::new(OverlayConfig::default(), &root);
        assert!(matches!(
            b.probe(),
            Probe::Unavailable(Unavailable::NoFilesystem { ref fs, .. }) if fs == "overlay"
        ));
        fs::remove_dir_all(&root).unwrap();
    }

    use layerpack_core::sys::{Call, FakeSys, MountFlags};

    /// A fake /proc and /sys where overlay exists with all three options,
    /// a base, and a session directory.
    fn fake_setup(tag: &str) -> (PathBuf, SessionSpec) {
        let root = std::env::temp_dir().join(format!("lp-ovl-fake-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("proc")).unwrap();
        fs::write(root.join("proc/filesystems"), "nodev\toverlay\n").unwrap();
        let params = root.join("sys/module/overlay/parameters");
        fs::create_dir_all(&params).unwrap();
        for p in ["index", "metacopy", "redirect_dir"] {
            fs::write(params.join(p), "N\n").unwrap();
        }
        fs::create_dir_all(root.join("base")).unwrap();
        fs::create_dir_all(root.join("session")).unwrap();
        let spec = SessionSpec {
            package: "fake".into(),
            base: fs::canonicalize(root.join("base")).unwrap(),
            dir: fs::canonicalize(root.join("session")).unwrap(),
            state: Default::default(),
        };
        (root, spec)
    }

    /// An in-place backend over `fake` (user-namespace mode, so the xattr
    /// probe on the upper needs no root).
    fn in_place_over(root: &Path, fake: &Arc<FakeSys>) -> OverlayBackend {
        OverlayBackend::new(
            OverlayConfig {
                in_place: true,
                ..OverlayConfig::default()
            },
            root,
        )
        .in_user_namespace(true)
        .with_sys(fake.clone())
    }

    /// volatile where the kernel has it (5.10+) and the config allows it,
    /// with the boot recorded; nothing else changes.
    #[test]
    fn volatile_follows_the_kernel_and_the_config() {
        let (root, spec) = fake_setup("volatile");
        fs::create_dir_all(root.join("proc/sys/kernel")).unwrap();
        for (release, volatile, want) in [
            ("6.18.0-1-amd64\n", true, true),
            ("5.10.0\n", true, true),
            ("5.4.0-150-generic\n", true, false),
            ("6.18.0\n", false, false),
        ] {
            fs::write(root.join("proc/sys/kernel/osrelease"), release).unwrap();
            let fake = Arc::new(FakeSys::new());
            let b = OverlayBackend::new(
                OverlayConfig {
                    in_place: true,
                    volatile,
                },
                &root,
            )
            .in_user_namespace(true)
            .with_sys(fake.clone());
            let _ = fs::remove_dir_all(&spec.dir);
            fs::create_dir_all(&spec.dir).unwrap();
            let begun = b.begin(&spec).unwrap();
            let st: UnionState = begun
                .state
                .decode("overlayfs", layerpack_core::union::UNION_STATE_VERSION)
                .unwrap();
            assert_eq!(
                st.options.ends_with(",volatile"),
                want,
                "{release}: {}",
                st.options
            );
            assert_eq!(st.volatile_boot.is_some(), want, "{release}");
        }
        fs::remove_dir_all(&root).unwrap();
    }

    /// The exact calls of an in-place session, through the fake (user
    /// namespace mode, so the xattr probe on the upper needs no root).
    #[test]
    fn in_place_session_makes_exactly_these_calls() {
        let (root, spec) = fake_setup("calls");
        let fake = Arc::new(FakeSys::new());
        let b = in_place_over(&root, &fake);
        let begun = b.begin(&spec).unwrap();
        assert_eq!(begun.merged, spec.base);
        let spec = SessionSpec {
            state: begun.state,
            ..spec
        };
        let lower = spec.dir.join("lower");
        let opts = format!(
            "lowerdir={},upperdir={},workdir={},userxattr,index=off,metacopy=off,redirect_dir=nofollow",
            lower.display(),
            spec.dir.join("upper").display(),
            spec.dir.join("work").display()
        );
        assert_eq!(
            fake.calls(),
            vec![
                Call::bind(&spec.base, &lower),
                Call::make_private(&lower),
                Call::Mount {
                    source: Some(PathBuf::from("overlay")),
                    target: spec.base.clone(),
                    fstype: Some("overlay".into()),
                    flags: MountFlags::default(),
                    data: Some(opts)
                },
            ]
        );
        assert_eq!(b.health(&spec), Health::Ok);
        b.discard(&spec).unwrap();
        let calls = fake.calls();
        assert_eq!(
            calls[3..],
            [
                Call::Umount {
                    target: spec.base.clone()
                },
                Call::Umount { target: lower }
            ]
        );
        assert!(!spec.dir.join("upper").exists());
        fs::remove_dir_all(&root).unwrap();
    }

    /// Finding: a missing `mode` file used to make an in-place session
    /// look like a merged one. A session without its recorded state is
    /// now an error, never a guess.
    #[test]
    fn a_session_without_its_recorded_state_is_an_error_not_a_guess() {
        let (root, spec) = fake_setup("nostate");
        let fake = Arc::new(FakeSys::new());
        let b = in_place_over(&root, &fake);
        let begun = b.begin(&spec).unwrap();
        assert_eq!(begun.merged, spec.base);
        // The state as begin returned it is not handed back.
        let e = b.changes(&spec, &ChangeOptions::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(matches!(b.health(&spec), Health::Broken(_)));
        assert_eq!(b.freeze(&spec).unwrap_err().kind(), ErrorKind::Corrupt);
        let spec = SessionSpec {
            state: begun.state,
            ..spec
        };
        b.discard(&spec).unwrap();
        fs::remove_dir_all(&root).unwrap();
    }

    /// A failing overlay mount undoes the bind mount and the directories.
    #[test]
    fn failed_mount_undoes_everything() {
        let (root, spec) = fake_setup("fail");
        let fake = Arc::new(FakeSys::new());
        fake.fail_at(2, nix::errno::Errno::EINVAL as i32);
        let b = in_place_over(&root, &fake);
        let err = b.begin(&spec).unwrap_err();
        assert!(err.to_string().contains("cannot mount overlay"), "{err}");
        let calls = fake.calls();
        assert_eq!(calls.len(), 4, "{calls:?}");
        assert_eq!(
            calls[3],
            Call::Umount {
                target: spec.dir.join("lower")
            }
        );
        assert_eq!(fs::read_dir(&spec.dir).unwrap().count(), 0);
        fs::remove_dir_all(&root).unwrap();
    }
}
