//! One session per tree, across every state directory of a user.
//!
//! Every open session has an entry in a fixed per-user directory (the
//! *runtime directory*: `$LAYERPACK_RUNTIME_DIR`, else
//! `$XDG_RUNTIME_DIR/layerpack` when the user owns `$XDG_RUNTIME_DIR`,
//! else `/run/layerpack` for root, else
//! `/tmp/layerpack-<uid>`, which must be owned by the user and not
//! writable by others). An entry records where the session's root lies,
//! as a [`Place`]: the device and the path inside that filesystem (from
//! `/proc/self/mountinfo`), so a root reached through a bind mount, a
//! symlink or another path compares equal to itself, and nesting is seen
//! through aliases. `init` refuses a root that is, contains or lies
//! inside another open session's root, whatever state directory either
//! uses; the check and the new entry happen under one lock. An entry whose
//! session directory is gone is stale and dropped.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::sys::{read_mountinfo, MountInfo};
use crate::{Error, ErrorKind, Result};

/// Where a directory lies, independent of the path used to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Place {
    /// Canonical path (symlinks resolved).
    #[serde(with = "crate::jsonbytes::path")]
    pub path: PathBuf,
    /// The filesystem's device, `major:minor` as mountinfo shows it.
    pub fs_dev: (u32, u32),
    /// Path of the directory inside that filesystem.
    #[serde(with = "crate::jsonbytes::bytes")]
    pub fs_path: Vec<u8>,
    /// `st_dev` and `st_ino` of the directory.
    pub inode: (u64, u64),
}

/// `a` is `b` or lies below it, component-wise.
fn below(a: &[u8], b: &[u8]) -> bool {
    let b = b.strip_suffix(b"/").unwrap_or(b);
    a == b || (a.starts_with(b) && (b.is_empty() || a.get(b.len()) == Some(&b'/')))
}

impl Place {
    /// Where `dir` (an existing directory) lies.
    pub fn of(dir: &Path) -> Result<Place> {
        let mounts = read_mountinfo()
            .map_err(|e| Error::io("/proc/self/mountinfo", "cannot read the mount table", e))?;
        Place::with_mounts(dir, &mounts)
    }

    /// [`Place::of`] against a given mount table.
    pub fn with_mounts(dir: &Path, mounts: &[MountInfo]) -> Result<Place> {
        let path =
            fs::canonicalize(dir).map_err(|e| Error::io(dir, "cannot resolve the directory", e))?;
        let md = fs::metadata(&path).map_err(|e| Error::io(&path, "cannot stat", e))?;
        let p = path.as_os_str().as_bytes();
        // The last mount (in table order) whose mount point holds the
        // path: later mounts cover earlier ones.
        let m = mounts
            .iter()
            .filter(|m| below(p, &m.mount_point))
            .max_by_key(|m| m.mount_point.len())
            .ok_or_else(|| {
                Error::new(ErrorKind::Io, "no mount in the mount table holds it").with_path(&path)
            })?;
        let rest = &p[m.mount_point.len().min(p.len())..];
        let mut fs_path = m.root.clone();
        if fs_path.ends_with(b"/") && rest.starts_with(b"/") {
            fs_path.pop();
        }
        fs_path.extend_from_slice(rest);
        Ok(Place {
            path,
            fs_dev: m.dev,
            fs_path,
            inode: (md.dev(), md.ino()),
        })
    }

    /// `self` is `other`, or lies inside it.
    pub fn inside(&self, other: &Place) -> bool {
        self.inode == other.inode
            || (self.fs_dev == other.fs_dev && below(&self.fs_path, &other.fs_path))
            || below(
                self.path.as_os_str().as_bytes(),
                other.path.as_os_str().as_bytes(),
            )
    }

    /// The two overlap: one is, contains or lies inside the other.
    pub fn overlaps(&self, other: &Place) -> bool {
        self.inside(other) || other.inside(self)
    }
}

/// One open session, as the registry keeps it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Package name.
    pub package: String,
    /// The session's directory (in its state directory).
    #[serde(with = "crate::jsonbytes::path")]
    pub session_dir: PathBuf,
    /// Where its root lies.
    pub root: Place,
    /// Whether something was mounted right on the root when the session
    /// began (so a mount found there later was not left by it).
    #[serde(default)]
    pub root_was_mount_point: bool,
    /// Mounts left by a session whose directory is gone (its state
    /// directory was removed or moved while the session was open).
    #[serde(skip)]
    pub orphaned_mounts: Vec<PathBuf>,
}

/// Is something mounted right at `path`?
pub fn is_mount_point(path: &Path) -> Result<bool> {
    let mounts = read_mountinfo()
        .map_err(|e| Error::io("/proc/self/mountinfo", "cannot read the mount table", e))?;
    Ok(mount_point_in(&mounts, path))
}

/// Is something mounted right at `path`, per `mounts`?
pub fn mount_point_in(mounts: &[MountInfo], path: &Path) -> bool {
    mounts
        .iter()
        .any(|m| m.mount_point == path.as_os_str().as_bytes())
}

/// The per-user registry of open sessions' roots.
pub struct Roots {
    dir: PathBuf,
}

/// The registry lock, held while checking and registering.
pub struct RootsLock {
    _lock: Flock<File>,
}

impl Roots {
    /// The registry in the default per-user runtime directory.
    pub fn open_default() -> Result<Roots> {
        Roots::open(&default_runtime_dir())
    }

    /// The registry under `runtime` (created 0700 if missing; refused if
    /// another user owns it or others can write to it).
    pub fn open(runtime: &Path) -> Result<Roots> {
        let dir = runtime.join("roots");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Error::io(&dir, "cannot create the runtime directory", e))?;
        for d in [runtime, dir.as_path()] {
            let md = fs::symlink_metadata(d).map_err(|e| Error::io(d, "cannot stat", e))?;
            let me = nix::unistd::geteuid().as_raw();
            if !md.is_dir() || md.uid() != me || md.permissions().mode() & 0o022 != 0 {
                return Err(Error::new(
                    ErrorKind::Permission,
                    format!(
                        "the runtime directory must be a directory owned by uid {me} and writable only by it; set LAYERPACK_RUNTIME_DIR to one"
                    ),
                )
                .with_path(d));
            }
        }
        Ok(Roots { dir })
    }

    /// Take the registry lock (waits).
    pub fn lock(&self) -> Result<RootsLock> {
        let path = self.dir.join(".lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io(&path, "cannot open lock file", e))?;
        let lock = Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| Error::io(&path, "cannot lock", e.into()))?;
        Ok(RootsLock { _lock: lock })
    }

    fn entry_path(&self, session_dir: &Path) -> PathBuf {
        let h = Sha256::digest(session_dir.as_os_str().as_bytes());
        self.dir
            .join(format!("{}.json", crate::tree::hex(&h[..12])))
    }

    /// Every live entry; stale ones (session directory gone) are removed.
    pub fn entries(&self, _held: &RootsLock) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let rd = fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, "cannot list", e))?;
        for ent in rd {
            let ent = ent.map_err(|e| Error::io(&self.dir, "cannot list", e))?;
            let p = ent.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let text = match fs::read(&p) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&p, "cannot read", e)),
            };
            let e: Entry = serde_json::from_slice(&text).map_err(|e| {
                Error::new(
                    ErrorKind::Corrupt,
                    format!("registry entry is not readable ({e}); remove it if no session uses that root"),
                )
                .with_path(&p)
            })?;
            let mut e = e;
            if !e.session_dir.exists() {
                // Gone for good, unless something it mounted is still
                // there: a mount naming the session, or one on the root
                // that was not there when the session began.
                let left = crate::sys::mounts_referring_to(&e.session_dir).map_err(|err| {
                    Error::io("/proc/self/mountinfo", "cannot read the mount table", err)
                })?;
                e.orphaned_mounts = left
                    .iter()
                    .map(|m| PathBuf::from(std::ffi::OsStr::from_bytes(&m.mount_point)))
                    .collect();
                if !e.root_was_mount_point
                    && is_mount_point(&e.root.path)?
                    && !e.orphaned_mounts.contains(&e.root.path)
                {
                    e.orphaned_mounts.push(e.root.path.clone());
                }
                if e.orphaned_mounts.is_empty() {
                    let _ = fs::remove_file(&p);
                    continue;
                }
            }
            out.push(e);
        }
        Ok(out)
    }

    /// Refuse `root` if it overlaps an open session's root (other than
    /// `session_dir`'s own), then record it.
    pub fn register(&self, held: &RootsLock, entry: &Entry) -> Result<()> {
        for other in self.entries(held)? {
            if other.session_dir == entry.session_dir {
                continue;
            }
            if entry.root.overlaps(&other.root) && !other.orphaned_mounts.is_empty() {
                let list: Vec<String> = other
                    .orphaned_mounts
                    .iter()
                    .map(|m| m.display().to_string())
                    .collect();
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "the session of package '{}' on {} lost its state directory ({} is gone) but its mounts remain: {}; run `umount` on each (as root), then init again",
                        other.package,
                        other.root.path.display(),
                        other.session_dir.display(),
                        list.join(", ")
                    ),
                ));
            }
            if entry.root.overlaps(&other.root) {
                let how = if entry.root.inode == other.root.inode {
                    "is the same tree as"
                } else if entry.root.inside(&other.root) {
                    "lies inside"
                } else {
                    "contains"
                };
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "the root {} {how} the root {} of package '{}', which has an open session in {}; run `layerpack final {}` or `layerpack abort {}` (with that state directory) first",
                        entry.root.path.display(),
                        other.root.path.display(),
                        other.package,
                        other.session_dir.display(),
                        other.package,
                        other.package,
                    ),
                ));
            }
        }
        let path = self.entry_path(&entry.session_dir);
        let json = serde_json::to_vec_pretty(entry)
            .map_err(|e| Error::new(ErrorKind::Io, format!("cannot encode: {e}")))?;
        let tmp = path.with_extension("tmp");
        let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, "cannot create", e))?;
        f.write_all(&json)
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io(&tmp, "cannot write", e))?;
        fs::rename(&tmp, &path).map_err(|e| Error::io(&path, "cannot write", e))
    }

    /// Forget the session at `session_dir`.
    pub fn unregister(&self, session_dir: &Path) -> Result<()> {
        let path = self.entry_path(session_dir);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&path, "cannot remove", e)),
        }
    }
}

/// The default per-user runtime directory (see the module docs).
pub fn default_runtime_dir() -> PathBuf {
    let env = crate::session::env_path;
    if let Some(p) = env("LAYERPACK_RUNTIME_DIR") {
        return p;
    }
    let uid = nix::unistd::geteuid();
    // Only the user's own runtime directory: a process that changed uid
    // may have inherited another user's.
    if let Some(p) = env("XDG_RUNTIME_DIR") {
        if fs::metadata(&p).is_ok_and(|m| m.uid() == uid.as_raw()) {
            return p.join("layerpack");
        }
    }
    if uid.is_root() {
        return PathBuf::from("/run/layerpack");
    }
    PathBuf::from(format!("/tmp/layerpack-{uid}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::parse_mountinfo;

    #[test]
    fn bind_mounts_and_nesting_are_seen_through_the_mount_table() {
        let d = std::env::temp_dir().join(format!("lp-roots-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("r/sub")).unwrap();
        fs::create_dir_all(d.join("alias")).unwrap();
        let r = fs::canonicalize(d.join("r")).unwrap();
        let alias = fs::canonicalize(d.join("alias")).unwrap();
        // A fake table: the tree on 8:1 at /, and r/sub bind-mounted at alias.
        let text = format!(
            "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n2 1 8:1 {}/sub {} rw - ext4 /dev/sda1 rw\n",
            r.display(),
            alias.display()
        );
        let m = parse_mountinfo(text.as_bytes()).unwrap();
        let root = Place::with_mounts(&r, &m).unwrap();
        let via_alias = Place::with_mounts(&alias, &m).unwrap();
        assert_eq!(
            via_alias.fs_path,
            format!("{}/sub", r.display()).into_bytes()
        );
        assert!(via_alias.inside(&root) && !root.inside(&via_alias));
        assert!(root.overlaps(&via_alias));
        let sibling = Place::with_mounts(&d, &m).unwrap();
        assert!(root.inside(&sibling));
        fs::create_dir_all(d.join("other")).unwrap();
        let other = Place::with_mounts(&d.join("other"), &m).unwrap();
        assert!(!other.overlaps(&root));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn component_prefixes_only() {
        assert!(below(b"/a/b", b"/a"));
        assert!(below(b"/a", b"/a"));
        assert!(below(b"/a", b"/"));
        assert!(!below(b"/ab", b"/a"));
    }
}
