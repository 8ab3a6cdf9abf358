//! The session steps behind `init`, `final` and `abort`, shared by the
//! command line and the tests. Output formats are the caller's business:
//! `finish` hands it the change set before anything irreversible happens.

use std::path::{Path, PathBuf};

use crate::backend::{ChangeOptions, LayerBackend};
use crate::config::Config;
use crate::model::ChangeSet;
use crate::registry::Registry;
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
}

impl Context<'_> {
    /// Build the named backend with its settings from the config.
    pub fn backend(&self, name: &str) -> Result<Box<dyn LayerBackend>> {
        self.registry
            .create(name, &self.config.backend_config(name))
    }

    /// Open a session for `pkg` on `root`.
    pub fn init(
        &self,
        pkg: &str,
        root: &Path,
        choice: Option<&str>,
        version: Option<&str>,
    ) -> Result<Opened> {
        validate_package_name(pkg)?;
        let base = check_root(root)?;
        self.state.check_outside(&base)?;
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
        for (other, s) in self.state.list()? {
            if let Ok(s) = s {
                if s.base == base && other != pkg {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "package '{other}' already has an open session on {}; run `layerpack final {other}` or `layerpack abort {other}` first",
                            base.display()
                        ),
                    ));
                }
            }
        }

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
        };
        self.state.create_dir(pkg)?;
        let started = self.state.save(&session).and_then(|()| {
            let spec = self.state.spec(&session);
            backend.begin(&spec)
        });
        let merged = match started {
            Ok(m) => m,
            Err(e) => {
                // begin undid its own work; drop the session we started.
                let _ = self.state.remove(pkg);
                return Err(e);
            }
        };
        session.merged = merged;
        session.phase = Phase::Open;
        if let Err(e) = self.state.save(&session) {
            let spec = self.state.spec(&session);
            let undo = if backend.capabilities().can_discard {
                backend.discard(&spec)
            } else {
                backend.release(&spec)
            };
            let _ = self.state.remove(pkg);
            return Err(match undo {
                Ok(()) => e,
                Err(u) => e.context(format!("and undoing the session failed too ({u})")),
            });
        }
        Ok(Opened { session, skipped })
    }

    /// A session directory exists at `init`: if it is an open session,
    /// refuse; if it is the remains of an `init` that died, clean it up.
    fn clear_unfinished_init(&self, pkg: &str) -> Result<()> {
        match self.state.load(pkg) {
            Ok(s) if s.phase == Phase::Starting => {
                let backend = self.backend(&s.backend)?;
                let spec = self.state.spec(&s);
                if backend.capabilities().can_discard {
                    backend.discard(&spec)?;
                } else {
                    backend.release(&spec)?;
                }
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

    /// `final`: read the layer, let `write_outputs` write packages and
    /// manifests, then move down, keep or discard. If a previous `final` was
    /// killed during move-down or discard, this finishes that step only.
    pub fn finish(
        &self,
        pkg: &str,
        how: Finish,
        opts: &ChangeOptions,
        write_outputs: impl FnOnce(&SessionFile, &ChangeSet) -> Result<()>,
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
        let changes = if resumed == Phase::Open {
            let cs = backend.changes(&spec, opts)?;
            write_outputs(&s, &cs)?;
            if how == Finish::Keep {
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
            // One move-down per state directory at a time; sessions on one
            // base share a state directory, so this serialises them.
            let _fold = self.state.lock_all()?;
            backend.move_down(&spec)?;
        }
        self.state.remove(pkg)?;
        Ok(Finished {
            session: s,
            changes,
        })
    }

    /// Drop a session: discard the layer where the backend can, otherwise
    /// release it and leave the base as the install left it.
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
                self.state.remove(pkg)?;
                return Ok(Aborted {
                    backend: None,
                    restored: false,
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
        let spec = self.state.spec(&s);
        let restored = if backend.capabilities().can_discard {
            backend.discard(&spec)?;
            true
        } else {
            backend.release(&spec)?;
            false
        };
        self.state.remove(pkg)?;
        Ok(Aborted {
            backend: Some(s.backend),
            restored,
        })
    }
}
