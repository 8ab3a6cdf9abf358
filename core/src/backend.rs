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
    /// The longest file name (bytes) the merged view can hold, when it is
    /// shorter than the usual 255 (aufs: 242). An install that creates a
    /// longer one gets `ENAMETOOLONG`; a root that holds one is refused at
    /// `begin`, naming the path and the limit.
    pub max_name_len: Option<u16>,
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

/// Why a backend cannot run here. Each variant says what is missing in
/// words a person can act on ([`std::fmt::Display`]); callers and tests
/// match on the variant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// The kernel lacks the filesystem (`overlay`, `aufs`, `fuse`).
    NoFilesystem {
        /// Name as in `/proc/filesystems`.
        fs: String,
        /// What to do about it.
        hint: String,
    },
    /// Needs root (or a capability) that this process lacks.
    NeedsRoot {
        /// What works instead.
        hint: String,
    },
    /// A program or device the backend uses is missing.
    Missing {
        /// What is missing (`/dev/fuse`, `fusermount3`).
        what: String,
        /// What to do about it.
        hint: String,
    },
    /// The backend exists as a name but is not built.
    NotImplemented,
    /// Anything else, in the backend's words.
    Other(String),
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unavailable::NoFilesystem { fs, hint } => {
                write!(f, "{fs} not in /proc/filesystems")?;
                if !hint.is_empty() {
                    write!(f, " ({hint})")?;
                }
                Ok(())
            }
            Unavailable::NeedsRoot { hint } => write!(f, "needs root; {hint}"),
            Unavailable::Missing { what, hint } => write!(f, "{what} is missing; {hint}"),
            Unavailable::NotImplemented => f.write_str("not implemented yet"),
            Unavailable::Other(s) => f.write_str(s),
        }
    }
}

impl Unavailable {
    /// A stable code, for the plugin ABI and `--json`.
    pub fn code(&self) -> u32 {
        match self {
            Unavailable::NoFilesystem { .. } => 1,
            Unavailable::NeedsRoot { .. } => 2,
            Unavailable::Missing { .. } => 3,
            Unavailable::NotImplemented => 4,
            Unavailable::Other(_) => 5,
        }
    }
}

/// Whether a backend can run on this machine now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Ready to use.
    Available,
    /// Cannot run here, and why.
    Unavailable(Unavailable),
}

impl Probe {
    /// True when available.
    pub fn is_available(&self) -> bool {
        matches!(self, Probe::Available)
    }

    /// The reason as a sentence, when unavailable.
    pub fn reason(&self) -> Option<String> {
        match self {
            Probe::Available => None,
            Probe::Unavailable(r) => Some(r.to_string()),
        }
    }
}

/// What a backend keeps about one open session, saved by core inside
/// `session.json` (atomically, at every phase change) and handed back on
/// every later call, in whichever process. `version` is the backend's own
/// format number: a backend refuses a state it does not know
/// ([`BackendState::decode`]) instead of guessing.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendState {
    /// The backend's format number for `data`.
    pub version: u32,
    /// The backend's own typed state, as JSON.
    #[serde(default)]
    pub data: serde_json::Value,
}

impl BackendState {
    /// Encode `value` as version `version` of a backend's state.
    pub fn encode<T: serde::Serialize>(version: u32, value: &T) -> Result<BackendState> {
        Ok(BackendState {
            version,
            data: serde_json::to_value(value).map_err(|e| {
                crate::Error::new(
                    crate::ErrorKind::Io,
                    format!("cannot encode backend state: {e}"),
                )
            })?,
        })
    }

    /// Decode the state of `backend`, which must be version `version`.
    pub fn decode<T: serde::de::DeserializeOwned>(&self, backend: &str, version: u32) -> Result<T> {
        if self.version != version {
            return Err(crate::Error::new(
                crate::ErrorKind::Corrupt,
                format!(
                    "the session's {backend} state has version {}, this layerpack reads version {version}; finish or abort the session with the layerpack that opened it",
                    self.version
                ),
            ));
        }
        serde_json::from_value(self.data.clone()).map_err(|e| {
            crate::Error::new(
                crate::ErrorKind::Corrupt,
                format!("the session's {backend} state is not readable: {e}"),
            )
        })
    }
}

/// Where one session lives, and what its backend recorded.
#[derive(Clone, Debug)]
pub struct SessionSpec {
    /// Package being captured.
    pub package: String,
    /// The tree installed into, canonical.
    pub base: PathBuf,
    /// A directory private to this session, outside the base, that exists
    /// from `begin` until the session ends. Backends keep their files here.
    pub dir: PathBuf,
    /// What [`LayerBackend::begin`] returned (empty during `begin`).
    pub state: BackendState,
}

/// What `begin` gives back.
#[derive(Clone, Debug)]
pub struct Begun {
    /// Where the install must write.
    pub merged: PathBuf,
    /// The backend's state, saved by core with the session.
    pub state: BackendState,
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
    /// The merged view is gone while the session is open (a reboot, a
    /// killed daemon): the layer is still there and `final` reads it
    /// directly.
    MountLost(String),
    /// Something the session needs is missing; the text says what and
    /// what to run.
    Broken(String),
}

impl Health {
    /// The state as a sentence, `ok` when healthy.
    pub fn describe(&self) -> String {
        match self {
            Health::Ok => "ok".into(),
            Health::MountLost(s) => format!("mount lost: {s}"),
            Health::Broken(s) => format!("broken: {s}"),
        }
    }
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
    /// - `Unavailable` says what is missing and what to do.
    fn probe(&self) -> Probe;

    /// Open a capture on `spec.base`; return the merged path the install
    /// must write into and the state to keep.
    ///
    /// # Behavior
    /// - `spec.dir` exists and is empty; the base is a directory;
    ///   `spec.state` is empty.
    /// - On error, everything this call set up is undone (mounts, files in
    ///   `spec.dir`), and the base is unchanged.
    /// - The base is never modified.
    fn begin(&self, spec: &SessionSpec) -> Result<Begun>;

    /// Make the merged view unwritable before the layer is read, so the
    /// package and the base can never differ (union backends unmount).
    ///
    /// # Behavior
    /// - Idempotent; succeeds when the view is already gone (after a
    ///   reboot, or a `final` that was interrupted after it).
    /// - Fails (e.g. `Busy`) before anything is changed when the view is
    ///   in use; the session stays open and usable.
    /// - Default: nothing to do (the install wrote into the base itself).
    fn freeze(&self, _spec: &SessionSpec) -> Result<()> {
        Ok(())
    }

    /// Undo [`LayerBackend::freeze`] so the install can write again
    /// (`final --keep`). Default: nothing to do.
    fn thaw(&self, _spec: &SessionSpec) -> Result<()> {
        Ok(())
    }

    /// Where the entries of the change set can be read once frozen (the
    /// upper layer of a union backend, the base otherwise).
    fn content_root(&self, spec: &SessionSpec) -> Result<PathBuf> {
        Ok(spec.base.clone())
    }

    /// Read the layer as a change set.
    ///
    /// # Behavior
    /// - Follows the change rules of DESIGN.md: sorted, opaque directories
    ///   expanded, internal markers never reported, parents of additions
    ///   not reported unless they changed themselves.
    /// - Regular files that are added or modified carry their sha256.
    /// - Read-only: may be called any number of times until move-down,
    ///   frozen or not.
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
    /// - Only called when `capabilities().can_discard`.
    /// - Idempotent, like `move_down`.
    /// - Default: `Unsupported`.
    fn discard(&self, _spec: &SessionSpec) -> Result<()> {
        Err(crate::Error::new(
            crate::ErrorKind::Unsupported,
            format!("backend '{}' cannot discard a layer", self.name()),
        ))
    }

    /// Release what a session holds without folding or discarding (for a
    /// backend that cannot discard). Default: nothing to do.
    fn release(&self, _spec: &SessionSpec) -> Result<()> {
        Ok(())
    }

    /// Whether an open session is still intact.
    fn health(&self, _spec: &SessionSpec) -> Health {
        Health::Ok
    }

    /// How the backend works on this machine, as (topic, text) pairs for
    /// `layerpack backends` (the layer's format, what the kernel gives
    /// it). Default: nothing to say.
    fn details(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// End a session without folding it: discard the layer where the backend
/// can (returns true: the base is as before), release it otherwise
/// (false: what the install wrote stays in the base).
pub fn abandon(backend: &dyn LayerBackend, spec: &SessionSpec) -> Result<bool> {
    if backend.capabilities().can_discard {
        backend.discard(spec)?;
        Ok(true)
    } else {
        backend.release(spec)?;
        Ok(false)
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

/// True if `inner` is `outer` or below it (both should be canonical).
pub fn is_within(inner: &Path, outer: &Path) -> bool {
    inner.starts_with(outer)
}
