//! Sessions on disk: one directory per open package under the state
//! directory, a `session.json` written atomically at every phase change,
//! and `flock` locks so two processes never work on one package (or one
//! base) at once. Every step can be re-run after a crash.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::backend::SessionSpec;
use crate::roots::Place;
use crate::{Error, ErrorKind, Result};

/// Version of `session.json`.
/// Version 2 holds the backend's typed state (`backend_state`); version 1
/// kept it in files of the backend's own.
pub const SESSION_FORMAT: u32 = 2;

/// Where a session is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// `init` started but has not finished setting up.
    Starting,
    /// Open: the install may write.
    Open,
    /// `final` made the merged view unwritable and is reading the layer
    /// and writing outputs; running `final` again finishes.
    Frozen,
    /// Outputs are written; the layer is being folded into the base.
    MovingDown,
    /// The layer is being dropped.
    Discarding,
}

impl Phase {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Open => "open",
            Phase::Frozen => "frozen",
            Phase::MovingDown => "moving-down",
            Phase::Discarding => "discarding",
        }
    }
}

/// The persisted part of a session.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionFile {
    /// [`SESSION_FORMAT`].
    pub format: u32,
    /// Package name.
    pub package: String,
    /// Backend name.
    pub backend: String,
    /// Canonical base.
    #[serde(with = "crate::jsonbytes::path")]
    pub base: PathBuf,
    /// Where the install writes (empty until `begin` returned).
    #[serde(with = "crate::jsonbytes::path")]
    pub merged: PathBuf,
    /// Current phase.
    pub phase: Phase,
    /// Package version given to `init`, if any.
    #[serde(default)]
    pub version: Option<String>,
    /// Seconds since the epoch when `init` ran.
    pub created: u64,
    /// What the backend's `begin` recorded.
    #[serde(default)]
    pub backend_state: crate::backend::BackendState,
    /// Effective uid and gid of the process that ran `init` (the install
    /// runs as the same user): decides the default owner policy.
    #[serde(default)]
    pub installer: Option<(u32, u32)>,
}

/// The longest package name: it names the session directory, its lock
/// file and `<name>.changes.json` with its temporary name.
pub const MAX_PACKAGE_NAME: usize = 200;

/// Check a package name: it becomes a directory name and a file name, so
/// no `/`, no `..`, no leading `.`, and only printable ASCII that build
/// systems use (`[A-Za-z0-9._+-]`).
pub fn validate_package_name(name: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._+-".contains(c);
    if name.len() > MAX_PACKAGE_NAME {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "package name '{}…' is {} bytes; at most {MAX_PACKAGE_NAME} fit in the file names layerpack writes for it",
                name.chars().take(40).collect::<String>(),
                name.len()
            ),
        ));
    }
    if name.is_empty()
        || name.starts_with('.')
        || name.starts_with('-')
        || name.contains("..")
        || !name.chars().all(ok_char)
    {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "invalid package name '{}': use letters, digits and . _ + - (no '/', no '..', not starting with '.' or '-')",
                crate::model::escape_bytes(name.as_bytes())
            ),
        ));
    }
    Ok(())
}

/// The state directory: `sessions/<pkg>/` per open session.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

/// A held lock; released on drop.
pub struct LockGuard {
    _lock: Flock<File>,
    path: PathBuf,
    /// Remove the lock file on release unless this path exists.
    remove_unless: Option<PathBuf>,
    /// Remove the lock file on release.
    remove: bool,
}

impl LockGuard {
    /// Remove the lock file when the lock is released (safe: a process
    /// that locked the file meanwhile notices and locks the new one).
    pub fn remove_on_release(mut self) -> LockGuard {
        self.remove = true;
        self
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        // Unlinked while still locked: a waiter that gets the old inode
        // sees that the path no longer names it and starts again.
        let gone = self.remove_unless.as_ref().is_some_and(|p| !p.exists());
        if self.remove || gone {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Take an exclusive `flock` on `path` (created 0600), waiting or not. A
/// lock file that its holder removed while this process waited is not
/// kept: the lock is taken again on what the path names now.
pub fn lock_file(path: &Path, wait: bool, who: &str) -> Result<LockGuard> {
    use std::os::unix::fs::MetadataExt;
    loop {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::io(path, "cannot open lock file", e))?;
        let arg = if wait {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockExclusiveNonblock
        };
        let lock = match Flock::lock(f, arg) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("another layerpack process is working on {who}; wait for it to finish"),
                )
                .with_path(path))
            }
            Err((_, e)) => return Err(Error::io(path, "cannot lock", e.into())),
        };
        let held = lock
            .metadata()
            .map_err(|e| Error::io(path, "cannot stat lock file", e))?;
        let same = fs::metadata(path).is_ok_and(|m| m.dev() == held.dev() && m.ino() == held.ino());
        if same {
            return Ok(LockGuard {
                _lock: lock,
                path: path.to_path_buf(),
                remove_unless: None,
                remove: false,
            });
        }
    }
}

impl StateDir {
    /// The state directory at `root`. Nothing is created until a session
    /// needs it, so a state directory that `init` then refuses (inside the
    /// root) never touches the root.
    pub fn open(root: &Path) -> Result<StateDir> {
        Ok(StateDir {
            root: resolve_lexically(root)?,
        })
    }

    /// Create the directory (mode 0700) if it does not exist yet.
    pub fn ensure(&self) -> Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.root.join("sessions"))
            .map_err(|e| Error::io(&self.root, "cannot create the state directory", e))
    }

    /// The default location: `$LAYERPACK_STATE_DIR`, else
    /// `$XDG_STATE_HOME/layerpack`, else `~/.local/state/layerpack`, else
    /// `/tmp/layerpack-<uid>`.
    pub fn default_location() -> PathBuf {
        let env = env_path;
        if let Some(p) = env("LAYERPACK_STATE_DIR") {
            return p;
        }
        if let Some(p) = env("XDG_STATE_HOME") {
            return p.join("layerpack");
        }
        if let Some(p) = env("HOME") {
            return p.join(".local/state/layerpack");
        }
        PathBuf::from(format!("/tmp/layerpack-{}", nix::unistd::getuid()))
    }

    /// The canonical path of the state directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Refuse a base that contains the state directory (the install and the
    /// scan would see our own files) or lies inside it, compared by where
    /// they lie ([`Place`]), so a bind mount or another path to the same
    /// directory is caught too.
    pub fn check_outside(&self, base: &Place, mounts: &[crate::sys::MountInfo]) -> Result<()> {
        let mut existing = self.root.as_path();
        while !existing.exists() {
            match existing.parent() {
                Some(p) => existing = p,
                None => return Ok(()),
            }
        }
        // A state directory not made yet lies where its nearest existing
        // ancestor lies.
        let state = Place::with_mounts(existing, mounts)?;
        if state.inside(base) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "the state directory {} is inside the root {}; set --state-dir, LAYERPACK_STATE_DIR or state_dir in layerpack.toml to a directory outside the root",
                    self.root.display(),
                    base.path.display()
                ),
            ));
        }
        if existing == self.root && base.inside(&state) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "the root {} is inside the state directory {}",
                    base.path.display(),
                    self.root.display()
                ),
            ));
        }
        Ok(())
    }

    /// Directory of `pkg`'s session.
    pub fn session_dir(&self, pkg: &str) -> PathBuf {
        self.root.join("sessions").join(pkg)
    }

    fn session_file(&self, pkg: &str) -> PathBuf {
        self.session_dir(pkg).join("session.json")
    }

    /// The spec a backend sees for `s`.
    pub fn spec(&self, s: &SessionFile) -> SessionSpec {
        SessionSpec {
            package: s.package.clone(),
            base: s.base.clone(),
            dir: self.session_dir(&s.package).join("backend"),
            state: s.backend_state.clone(),
        }
    }

    fn lock(&self, path: PathBuf, wait: bool, who: &str) -> Result<LockGuard> {
        self.ensure()?;
        lock_file(&path, wait, who)
    }

    /// Lock one package for the duration of a command. The lock file goes
    /// when the lock is released while the package has no session (a
    /// refused `init`, a finished `final`), so none pile up.
    pub fn lock_package(&self, pkg: &str) -> Result<LockGuard> {
        let mut g = self.lock(
            self.root.join("sessions").join(format!("{pkg}.lock")),
            false,
            &format!("package '{pkg}'"),
        )?;
        g.remove_unless = Some(self.session_dir(pkg));
        Ok(g)
    }

    /// Short global lock around checks that span sessions.
    pub fn lock_all(&self) -> Result<LockGuard> {
        self.lock(self.root.join("state.lock"), true, "the state directory")
    }

    /// Read `pkg`'s session.
    pub fn load(&self, pkg: &str) -> Result<SessionFile> {
        let path = self.session_file(pkg);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "no open session for package '{pkg}'; run `layerpack init {pkg} --root DIR` first"
                    ),
                ))
            }
            Err(e) => return Err(Error::io(&path, "cannot read session file", e)),
        };
        let s: SessionFile = serde_json::from_slice(&text).map_err(|e| {
            Error::new(
                ErrorKind::Corrupt,
                format!(
                    "session file is corrupt or truncated ({e}); run `layerpack abort {pkg}` to drop the session"
                ),
            )
            .with_path(&path)
        })?;
        if s.format != SESSION_FORMAT || s.package != pkg {
            if s.format < SESSION_FORMAT {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "session file has format {}, written by an older layerpack; finish it with that version, or run `layerpack abort {pkg}`",
                        s.format
                    ),
                )
                .with_path(&path));
            }
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "session file has format {} for package '{}', expected format {SESSION_FORMAT} for '{pkg}'; run `layerpack abort {pkg}`",
                    s.format, s.package
                ),
            )
            .with_path(&path));
        }
        Ok(s)
    }

    /// True if a session directory exists for `pkg` (even a broken one).
    pub fn exists(&self, pkg: &str) -> bool {
        self.session_dir(pkg).exists()
    }

    /// Write `s` atomically (temp file, fsync, rename, fsync directory).
    pub fn save(&self, s: &SessionFile) -> Result<()> {
        let dir = self.session_dir(&s.package);
        let json = serde_json::to_vec_pretty(s)
            .map_err(|e| Error::new(ErrorKind::Io, format!("cannot encode session: {e}")))?;
        write_atomic(&dir.join("session.json"), &json)
    }

    /// Create `pkg`'s session directory (and the backend's private one).
    pub fn create_dir(&self, pkg: &str) -> Result<()> {
        let dir = self.session_dir(pkg);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Error::io(&dir, "cannot create session directory", e))?;
        let b = dir.join("backend");
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&b)
            .map_err(|e| Error::io(&b, "cannot create session directory", e))
    }

    /// Remove `pkg`'s session entirely. Never crosses a mount point: a
    /// mount left inside the session (a bind mount of the base) makes this
    /// an error, and nothing below that mount is touched.
    pub fn remove(&self, pkg: &str) -> Result<()> {
        let sessions = self.root.join("sessions");
        let b = match crate::beneath::Beneath::open(&sessions) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let rel = crate::model::RelPath::parse_for(pkg.as_bytes(), "package")?;
        b.remove(&rel, crate::beneath::Follow::Nothing)
            .map(|_| ())
            .map_err(|e| e.context(format!("cannot remove the session of '{pkg}'")))
    }

    /// Every session directory: its package name and what loading it gave.
    pub fn list(&self) -> Result<Vec<(String, Result<SessionFile>)>> {
        let dir = self.root.join("sessions");
        let mut out = Vec::new();
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io(&dir, "cannot list sessions", e)),
        };
        for ent in rd {
            let ent = ent.map_err(|e| Error::io(&dir, "cannot list sessions", e))?;
            if !ent.path().is_dir() {
                continue;
            }
            let Some(name) = ent.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let loaded = self.load(&name);
            out.push((name, loaded));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

/// The path in environment variable `k`, if it is set and not empty.
pub(crate) fn env_path(k: &str) -> Option<PathBuf> {
    std::env::var_os(k)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// An absolute path with symlinks resolved for the part that exists: the
/// longest existing ancestor is canonicalized and the rest appended.
fn resolve_lexically(path: &Path) -> Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io(path, "cannot resolve the current directory", e))?
            .join(path)
    };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        match fs::canonicalize(cur) {
            Ok(mut c) => {
                for comp in rest.iter().rev() {
                    c.push(comp);
                }
                return Ok(c);
            }
            Err(_) => match (cur.parent(), cur.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_os_string());
                    cur = parent;
                }
                _ => return Ok(abs),
            },
        }
    }
}

/// Write a file so that readers see the old or the new content, never a
/// mix, even after a crash.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(data))
}

/// [`write_atomic`], the content written by `write` into a buffered
/// writer (so it never has to be in memory whole).
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let res = (|| {
        let f = File::create(&tmp).map_err(|e| Error::io(&tmp, "cannot create", e))?;
        let mut w = std::io::BufWriter::new(f);
        write(&mut w)
            .and_then(|()| w.into_inner().map_err(|e| e.into_error()))
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&tmp, "cannot write", e))?;
        fs::rename(&tmp, path).map_err(|e| Error::io(path, "cannot replace", e))?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Resolve and check a root given on the command line: it must exist, be a
/// directory and be listable. Returns the canonical path.
pub fn check_root(root: &Path) -> Result<PathBuf> {
    let canon = fs::canonicalize(root)
        .map_err(|e| Error::io(root, "the root does not exist or cannot be resolved", e))?;
    let md = fs::metadata(&canon).map_err(|e| Error::io(root, "cannot read the root", e))?;
    if !md.is_dir() {
        return Err(
            Error::new(ErrorKind::InvalidInput, "the root is not a directory").with_path(root),
        );
    }
    fs::read_dir(&canon).map_err(|e| Error::io(root, "cannot list the root", e))?;
    Ok(canon)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names() {
        for ok in [
            "hello",
            "linux-firmware",
            "host_foo",
            "Qt5Base",
            "gtk+3",
            "a.b",
        ] {
            validate_package_name(ok).unwrap();
        }
        for bad in [
            "", "a/b", "..", "../x", "a..b", ".hidden", "-x", "a b", "a\nb",
        ] {
            let e = validate_package_name(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad:?}");
        }
    }
}
