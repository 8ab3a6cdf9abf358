//! The session steps behind `init`, `final` and `abort`, shared by the
//! command line and the tests. Output formats are the caller's business:
//! `finish` hands it the change set before anything irreversible happens.

use std::path::{Path, PathBuf};

use crate::backend::{abandon, ChangeOptions, LayerBackend};
use crate::config::Config;
use crate::model::ChangeSet;
use crate::registry::Registry;
use crate::roots::{Entry, Place, Roots};
use crate::session::{check_root, validate_package_name, Phase, SessionFile, StateDir};
use crate::{Error, ErrorKind, Result};

/// What a command needs to find backends and sessions.
pub struct Context<'a> {
    /// Where sessions live.
    pub state: StateDir,
    /// Known backends.
    pub registry: &'a Registry,
    /// The config (defaults when there is no file).
    pub config: &'a Config,
}

/// The result of `init`.
pub struct Opened {
    /// The saved session.
    pub session: SessionFile,
    /// Backends `auto` passed over, with the reason.
    pub skipped: Vec<(String, String)>,
}

/// What `final` does with the layer after the outputs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// Fold into the base and end the session (the default).
    MoveDown,
    /// Leave the layer and the session as they are.
    Keep,
    /// Drop the layer and end the session; the base is as before `init`.
    Discard,
}

/// The result of `final`.
pub struct Finished {
    /// The session as it was.
    pub session: SessionFile,
    /// The changes, unless this run only resumed an interrupted move-down.
    pub changes: Option<ChangeSet>,
}

/// The result of `abort`.
#[derive(Debug)]
pub struct Aborted {
    /// Backend name, if the session could be read.
    pub backend: Option<String>,
    /// True when the base is back to its state before `init`.
    pub restored: bool,
    /// Mounts of an unreadable session that `abort` found and unmounted.
    pub unmounted: Vec<PathBuf>,
}

impl Context<'_> {
    /// Build the named backend with its settings from the config.
    pub fn backend(&self, name: &str) -> Result<Box<dyn LayerBackend>> {
        self.registry
            .create(name, &self.config.backend_config(name))
    }

    /// The per-user registry of open sessions' roots.
    pub fn roots(&self) -> Result<Roots> {
        Roots::open_default()
    }

    /// Open a session for `pkg` on `root`.
    pub fn init(
        &self,
        pkg: &str,
        root: &Path,
        choice: Option<&str>,
        version: Option<&str>,
    ) -> Result<Opened> {
        self.init_for(pkg, root, choice, version, &[])
    }

    /// [`Context::init`] for a capture whose package `formats` are known
    /// already (`run --format`); empty: the configured ones.
    pub fn init_for(
        &self,
        pkg: &str,
        root: &Path,
        choice: Option<&str>,
        version: Option<&str>,
        formats: &[String],
    ) -> Result<Opened> {
        validate_package_name(pkg)?;
        // What the package file will be called must fit before anything
        // is captured (the arch and version the config knows of, too).
        let fields = self
            .config
            .packages
            .get(pkg)
            .cloned()
            .unwrap_or_default()
            .or(&self.config.package_defaults);
        let version = version.or(fields.version.as_deref());
        crate::pack::check_file_name_fields(pkg, version, fields.architecture.as_deref())?;
        // The name must suit the package's format: the given or configured
        // ones, or the default (ipk) once a version says a package will be
        // written.
        match &self.config.formats {
            _ if !formats.is_empty() => crate::pack::check_name_for_formats(pkg, formats)?,
            Some(f) => crate::pack::check_name_for_formats(pkg, f)?,
            None if version.is_some() => crate::pack::check_name_for_formats(pkg, &["ipk"])?,
            None => {}
        }
        let base = check_root(root)?;
        // One read of the mount table for every check of where things lie.
        let mounts = crate::sys::read_mountinfo()
            .map_err(|e| Error::io("/proc/self/mountinfo", "cannot read the mount table", e))?;
        let place = Place::with_mounts(&base, &mounts)?;
        self.state.check_outside(&place, &mounts)?;
        let choice = choice
            .or(self.config.backend.as_deref())
            .unwrap_or("snapshot");
        let (backend, skipped) = if choice == "auto" {
            self.registry.auto(&|n| self.config.backend_config(n))?
        } else {
            (self.backend(choice)?, Vec::new())
        };
        if let Some(why) = backend.probe().reason() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("backend '{}' cannot run here: {why}", backend.name()),
            ));
        }

        let _pkg_lock = self.state.lock_package(pkg)?;
        let _all = self.state.lock_all()?;
        if self.state.exists(pkg) {
            self.clear_unfinished_init(pkg)?;
        }
        let roots = self.roots()?;
        let held = roots.lock()?;
        let session_dir = self.state.session_dir(pkg);
        roots.register(
            &held,
            &Entry {
                package: pkg.to_string(),
                session_dir: session_dir.clone(),
                root_was_mount_point: crate::roots::mount_point_in(&mounts, &place.path),
                root: place,
                orphaned_mounts: Vec::new(),
            },
        )?;

        let mut session = SessionFile {
            format: crate::session::SESSION_FORMAT,
            package: pkg.to_string(),
            backend: backend.name().to_string(),
            base,
            merged: PathBuf::new(),
            phase: Phase::Starting,
            version: version.map(str::to_string),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            backend_state: Default::default(),
            installer: Some((
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )),
        };
        let started = self.state.create_dir(pkg).and_then(|()| {
            self.state.save(&session)?;
            backend.begin(&self.state.spec(&session))
        });
        let begun = match started {
            Ok(b) => b,
            Err(e) => {
                // begin undid its own work; drop the session we started.
                let cleanup = self
                    .state
                    .remove(pkg)
                    .and_then(|()| roots.unregister(&session_dir));
                return Err(with_cleanup(e, cleanup));
            }
        };
        session.merged = begun.merged;
        session.backend_state = begun.state;
        session.phase = Phase::Open;
        if let Err(e) = self.state.save(&session) {
            let undo = abandon(&*backend, &self.state.spec(&session))
                .map(|_| ())
                .and_then(|()| self.state.remove(pkg))
                .and_then(|()| roots.unregister(&session_dir));
            return Err(with_cleanup(e, undo));
        }
        Ok(Opened { session, skipped })
    }

    /// A session directory exists at `init`: if it is an open session,
    /// refuse; if it is the remains of an `init` that died, clean it up.
    fn clear_unfinished_init(&self, pkg: &str) -> Result<()> {
        match self.state.load(pkg) {
            Ok(s) if s.phase == Phase::Starting => {
                // `begin` never returned, so no state was saved: whatever it
                // mounted is found the way an unreadable session's is.
                self.unmount_leftovers(pkg)?;
                self.state.remove(pkg)
            }
            Ok(s) => Err(Error::new(
                ErrorKind::AlreadyOpen,
                format!(
                    "package '{pkg}' already has an open session (backend {}, phase {}, root {}); run `layerpack final {pkg}` or `layerpack abort {pkg}`",
                    s.backend,
                    s.phase.as_str(),
                    s.base.display()
                ),
            )),
            Err(e) if e.kind() == ErrorKind::NotFound => self.state.remove(pkg),
            Err(e) => Err(Error::new(
                ErrorKind::AlreadyOpen,
                format!("package '{pkg}' has a broken session ({e})"),
            )),
        }
    }

    /// Load an open session and its backend.
    pub fn open(&self, pkg: &str) -> Result<(SessionFile, Box<dyn LayerBackend>)> {
        validate_package_name(pkg)?;
        let s = self.state.load(pkg)?;
        if s.phase == Phase::Starting {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "`layerpack init {pkg}` did not finish; run it again or `layerpack abort {pkg}`"
                ),
            ));
        }
        let b = self.backend(&s.backend)?;
        Ok((s, b))
    }

    /// Read the layer of an open session without ending it.
    pub fn changes(&self, pkg: &str, opts: &ChangeOptions) -> Result<(SessionFile, ChangeSet)> {
        let _lock = self.state.lock_package(pkg)?;
        let (s, b) = self.open(pkg)?;
        let spec = self.state.spec(&s);
        let cs = b.changes(&spec, opts)?;
        Ok((s, cs))
    }

    /// `final`: make the merged view unwritable, read the layer, let
    /// `write_outputs` write packages and manifests (it gets the change set
    /// and the directory its entries are read from), then move down, keep
    /// or discard. A `final` that was killed is finished by running it
    /// again: after the freeze it reads the same frozen layer; during
    /// move-down or discard it finishes that step only.
    pub fn finish(
        &self,
        pkg: &str,
        how: Finish,
        opts: &ChangeOptions,
        write_outputs: impl FnOnce(&SessionFile, &ChangeSet, &Path) -> Result<()>,
    ) -> Result<Finished> {
        let _lock = self.state.lock_package(pkg)?;
        let (mut s, backend) = self.open(pkg)?;
        let spec = self.state.spec(&s);
        let resumed = s.phase;
        if how == Finish::Discard || resumed == Phase::Discarding {
            crate::backend::require(
                &*backend,
                backend.capabilities().can_discard,
                "discard a layer",
            )?;
        }
        let changes = if matches!(resumed, Phase::Open | Phase::Frozen) {
            // Nothing is written before the view is frozen: a busy mount
            // fails here and the session stays open.
            backend.freeze(&spec)?;
            if s.phase == Phase::Open {
                s.phase = Phase::Frozen;
                self.state.save(&s)?;
            }
            let cs = backend.changes(&spec, opts)?;
            write_outputs(&s, &cs, &backend.content_root(&spec)?)?;
            if how == Finish::Keep {
                backend.thaw(&spec)?;
                s.phase = Phase::Open;
                self.state.save(&s)?;
                return Ok(Finished {
                    session: s,
                    changes: Some(cs),
                });
            }
            s.phase = if how == Finish::Discard {
                Phase::Discarding
            } else {
                Phase::MovingDown
            };
            self.state.save(&s)?;
            Some(cs)
        } else {
            None
        };
        if s.phase == Phase::Discarding {
            backend.discard(&spec)?;
        } else {
            backend.move_down(&spec)?;
        }
        self.end_session(pkg)?;
        Ok(Finished {
            session: s,
            changes,
        })
    }

    /// Remove a finished session and its entry in the roots registry.
    fn end_session(&self, pkg: &str) -> Result<()> {
        self.state.remove(pkg)?;
        self.roots()?.unregister(&self.state.session_dir(pkg))
    }

    /// Unmount whatever is mounted inside `pkg`'s session directory or
    /// refers to it (an overlay whose upper layer is there, a FUSE mount
    /// named after it), innermost first. Used when the session's own
    /// record cannot be read; fails, naming the command, if one stays.
    fn unmount_leftovers(&self, pkg: &str) -> Result<Vec<PathBuf>> {
        use std::os::unix::ffi::OsStrExt;
        let dir = self.state.session_dir(pkg);
        let mounts = crate::sys::mounts_referring_to(&dir)
            .map_err(|e| Error::io("/proc/self/mountinfo", "cannot read the mount table", e))?;
        let mut done = Vec::new();
        for m in mounts {
            let at = PathBuf::from(std::ffi::OsStr::from_bytes(&m.mount_point));
            nix::mount::umount2(&at, nix::mount::MntFlags::empty()).map_err(|e| {
                Error::io(
                    &at,
                    format!(
                        "the session of '{pkg}' cannot be read and left this mount, which cannot be unmounted; run `umount {}` as root, then `layerpack abort {pkg}`",
                        at.display()
                    ),
                    e.into(),
                )
                .with_kind(ErrorKind::Busy)
            })?;
            done.push(at);
        }
        Ok(done)
    }

    /// Drop a session: discard the layer where the backend can, otherwise
    /// release it and leave the base as the install left it. A session
    /// whose file cannot be read is never deleted blindly: its mounts are
    /// found and unmounted first, and the session directory is removed
    /// without crossing a mount point.
    pub fn abort(&self, pkg: &str) -> Result<Aborted> {
        validate_package_name(pkg)?;
        let _lock = self.state.lock_package(pkg)?;
        if !self.state.exists(pkg) {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no session for package '{pkg}'"),
            ));
        }
        let s = match self.state.load(pkg) {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::Corrupt || e.kind() == ErrorKind::NotFound => {
                let unmounted = self.unmount_leftovers(pkg)?;
                self.end_session(pkg)?;
                return Ok(Aborted {
                    backend: None,
                    restored: false,
                    unmounted,
                });
            }
            Err(e) => return Err(e),
        };
        if s.phase == Phase::MovingDown {
            // Part of the layer may already be in the base: discarding the
            // rest would leave a tree that is neither before nor after.
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "the move-down of '{pkg}' was interrupted and part of the layer is already in the base; run `layerpack final {pkg}` to finish it"
                ),
            ));
        }
        let backend = self.backend(&s.backend)?;
        let restored = abandon(&*backend, &self.state.spec(&s))?;
        self.end_session(pkg)?;
        Ok(Aborted {
            backend: Some(s.backend),
            restored,
            unmounted: Vec::new(),
        })
    }
}

/// `e`, with the failure of the cleanup that followed it (if any) added.
pub fn with_cleanup(e: Error, cleanup: Result<()>) -> Error {
    match cleanup {
        Ok(()) => e,
        Err(c) => e.also(c),
    }
}

/// `result`, or its error with the failure of the cleanup that followed
/// it added; a cleanup failure alone is the error.
pub fn with_cleanup_result<T>(result: Result<T>, cleanup: Result<()>) -> Result<T> {
    match (result, cleanup) {
        (Ok(v), Ok(())) => Ok(v),
        (Ok(_), Err(c)) => Err(c),
        (Err(e), c) => Err(with_cleanup(e, c)),
    }
}
