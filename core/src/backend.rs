//! The contract between layerpack and a way of capturing a layer.
//!
//! A backend is created from its config table and is stateless between
//! calls: everything a session needs lives in the session directory that
//! layerpack gives it ([`SessionSpec::dir`]), so `begin` and `changes` can
//! run in different processes, hours apart, after a crash.

use std::path::{Path, PathBuf};

use crate::model::ChangeSet;
use crate::Result;

/// What a backend can do. Checked in one place ([`require`]) which returns a
/// uniform `Unsupported` error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// `discard` restores the base exactly as it was before `begin`.
    pub can_discard: bool,
    /// `begin` needs root (or `CAP_SYS_ADMIN`).
    pub needs_root: bool,
    /// Move-down happens while the layer stays mounted.
    pub online_move_down: bool,
    /// Works for an unprivileged user (possibly only under `run`).
    pub rootless: bool,
    /// The install writes into the base itself (the merged path is the base).
    pub in_place: bool,
    /// Can record ownership changes an unprivileged install asks for.
    pub records_ownership: bool,
    /// Names starting with `.wh.` are the filesystem's whiteouts (aufs):
    /// a root holding such a name is refused at `begin`.
    pub reserves_wh_names: bool,
}

impl Capabilities {
    /// `(name, value)` pairs, for listing.
    pub fn list(&self) -> [(&'static str, bool); 7] {
        [
            ("can_discard", self.can_discard),
            ("needs_root", self.needs_root),
            ("online_move_down", self.online_move_down),
            ("rootless", self.rootless),
            ("in_place", self.in_place),
            ("records_ownership", self.records_ownership),
            ("reserves_wh_names", self.reserves_wh_names),
        ]
    }
}

/// Whether a backend can run on this machine now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Ready to use.
    Available,
    /// Cannot run here; the reason says what is missing, in words a person
    /// can act on.
    Unavailable(String),
}

impl Probe {
    /// True when available.
    pub fn is_available(&self) -> bool {
        matches!(self, Probe::Available)
    }

    /// The reason, when unavailable.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Probe::Available => None,
            Probe::Unavailable(r) => Some(r),
        }
    }
}

/// Where one session lives.
#[derive(Clone, Debug)]
pub struct SessionSpec {
    /// Package being captured.
    pub package: String,
    /// The tree installed into, canonical.
    pub base: PathBuf,
    /// A directory private to this session, outside the base, that exists
    /// from `begin` until the session ends. Backends keep all their state
    /// here.
    pub dir: PathBuf,
}

/// How thoroughly to compare content when reading the layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChangeOptions {
    /// Hash every file that might have changed instead of trusting stat data.
    pub hash_all: bool,
}

/// Mount or process state of an open session, for `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Everything the session needs is in place.
    Ok,
    /// Something is missing or stale (e.g. the mount is gone after a
    /// reboot); the text says what and what to run.
    Stale(String),
}

/// One way to capture a layer.
pub trait LayerBackend: Send + Sync {
    /// The name it is registered under (`snapshot`, `overlayfs`, …).
    fn name(&self) -> &str;

    /// What this backend can do.
    ///
    /// # Behavior
    /// - Constant for the lifetime of the backend object.
    fn capabilities(&self) -> Capabilities;

    /// Whether it can run here.
    ///
    /// # Behavior
    /// - Never changes the system; cheap enough to call for every command.
    /// - `Unavailable` carries a reason a person can act on.
    fn probe(&self) -> Probe;

    /// Open a capture on `spec.base`; return the merged path the install
    /// must write into.
    ///
    /// # Behavior
    /// - `spec.dir` exists and is empty; the base is a directory.
    /// - On error, everything this call set up is undone (mounts, files in
    ///   `spec.dir`), and the base is unchanged.
    /// - The base is never modified.
    fn begin(&self, spec: &SessionSpec) -> Result<PathBuf>;

    /// The merged path of an open session (same as `begin` returned).
    fn merged_path(&self, spec: &SessionSpec) -> Result<PathBuf>;

    /// Read the layer as a change set.
    ///
    /// # Behavior
    /// - Follows the change rules of DESIGN.md: sorted, opaque directories
    ///   expanded, internal markers never reported, parents of additions
    ///   not reported unless they changed themselves.
    /// - Regular files that are added or modified carry their sha256.
    /// - Read-only: may be called any number of times until move-down.
    fn changes(&self, spec: &SessionSpec, opts: &ChangeOptions) -> Result<ChangeSet>;

    /// Fold the layer into the base and leave nothing of it behind.
    ///
    /// # Behavior
    /// - Idempotent: if killed at any point, calling it again finishes the
    ///   job and gives the same base.
    /// - After it returns, the base holds exactly the merged view and the
    ///   session may be removed.
    fn move_down(&self, spec: &SessionSpec) -> Result<()>;

    /// Drop the layer; the base is as it was before `begin`.
    ///
    /// # Behavior
    /// - Only called when `capabilities().can_discard`; others return
    ///   `Unsupported`.
    /// - Idempotent, like `move_down`.
    fn discard(&self, spec: &SessionSpec) -> Result<()>;

    /// Release what a session holds without folding or discarding (used by
    /// `abort` when the backend cannot discard). Default: nothing to do.
    fn release(&self, _spec: &SessionSpec) -> Result<()> {
        Ok(())
    }

    /// Whether an open session is still intact.
    fn health(&self, _spec: &SessionSpec) -> Health {
        Health::Ok
    }
}

/// Return `Unsupported` naming the backend and the missing capability
/// unless `have` is true.
pub fn require(backend: &dyn LayerBackend, have: bool, what: &str) -> Result<()> {
    if have {
        Ok(())
    } else {
        Err(crate::Error::new(
            crate::ErrorKind::Unsupported,
            format!("backend '{}' cannot {what}", backend.name()),
        ))
    }
}

/// A backend that exists as a crate but is not built yet: probes
/// unavailable and refuses every operation.
pub struct NotImplemented {
    name: &'static str,
}

impl NotImplemented {
    /// A placeholder registered under `name`.
    pub fn new(name: &'static str) -> NotImplemented {
        NotImplemented { name }
    }

    fn refuse<T>(&self) -> Result<T> {
        Err(crate::Error::new(
            crate::ErrorKind::Unsupported,
            format!(
                "backend '{}' is not implemented yet; use --backend snapshot",
                self.name
            ),
        ))
    }
}

impl LayerBackend for NotImplemented {
    fn name(&self) -> &str {
        self.name
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    fn probe(&self) -> Probe {
        Probe::Unavailable(format!("the {} backend is not implemented yet", self.name))
    }
    fn begin(&self, _: &SessionSpec) -> Result<PathBuf> {
        self.refuse()
    }
    fn merged_path(&self, _: &SessionSpec) -> Result<PathBuf> {
        self.refuse()
    }
    fn changes(&self, _: &SessionSpec, _: &ChangeOptions) -> Result<ChangeSet> {
        self.refuse()
    }
    fn move_down(&self, _: &SessionSpec) -> Result<()> {
        self.refuse()
    }
    fn discard(&self, _: &SessionSpec) -> Result<()> {
        self.refuse()
    }
}

/// True if `inner` is `outer` or below it (both should be canonical).
pub fn is_within(inner: &Path, outer: &Path) -> bool {
    inner.starts_with(outer)
}
