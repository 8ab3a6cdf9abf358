//! Filesystem calls confined beneath one directory.
//!
//! Everything layerpack writes, chmods, chowns or removes under a root it
//! was given goes through here: the root is opened once as a directory
//! descriptor and every path below it is resolved by the kernel with
//! `openat2` (`RESOLVE_BENEATH` or `RESOLVE_IN_ROOT`, always with
//! `RESOLVE_NO_MAGICLINKS`), so a symlink, a `..` or a race can never lead
//! outside. The last component of a path is never followed: operations
//! act on the entry itself (`AT_SYMLINK_NOFOLLOW`, `unlinkat`). Removal
//! works from directory descriptors, so depth and `PATH_MAX` do not
//! matter, and it never crosses a mount point (`RESOLVE_NO_XDEV`): a live
//! bind mount of a base inside a session directory is refused, not emptied.
//!
//! Built on `rustix` (safe wrappers over the `*at` calls and `openat2`,
//! already in the tree through `xattr`), rather than `cap-std`, whose own
//! userspace resolution has no equivalent of `RESOLVE_NO_XDEV` and which
//! would give a second way of opening files next to the one the scans use.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{openat2, AtFlags, FileType, Mode, OFlags, ResolveFlags};

use crate::model::RelPath;
use crate::{Error, ErrorKind, Result};

/// Paths longer than this are resolved one component at a time (the
/// kernel refuses a path argument of `PATH_MAX` bytes or more).
pub(crate) const LONG_PATH: usize = 3072;

const DIR_OPEN: OFlags = OFlags::DIRECTORY
    .union(OFlags::RDONLY)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOFOLLOW);

/// How a path beneath the root may be resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Follow {
    /// Follow no symlink at all (reading a layer or a base, folding,
    /// removing).
    Nothing,
    /// Follow symlinks in directories on the way while they stay beneath
    /// the root (`lib -> usr/lib`); one that is absolute or climbs out is
    /// an error (`EXDEV`), never followed (installing a package).
    Beneath,
}

fn resolve_flags(follow: Follow, cross_mounts: bool) -> ResolveFlags {
    let mut r = ResolveFlags::NO_MAGICLINKS;
    r |= match follow {
        Follow::Nothing => ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
        Follow::Beneath => ResolveFlags::BENEATH,
    };
    if !cross_mounts {
        r |= ResolveFlags::NO_XDEV;
    }
    r
}

fn os(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}

/// Open the directory `name` inside `dir` without following a symlink.
pub fn open_child_dir(dir: BorrowedFd<'_>, name: &[u8], cross_mounts: bool) -> io::Result<OwnedFd> {
    Ok(openat2(
        dir,
        os(name),
        DIR_OPEN,
        Mode::empty(),
        resolve_flags(Follow::Nothing, cross_mounts),
    )?)
}

/// A directory opened once, under which every later call stays.
#[derive(Debug)]
pub struct Beneath {
    fd: OwnedFd,
    path: PathBuf,
}

impl Beneath {
    /// Open `path` (which may itself be reached through symlinks: the
    /// caller named it) as the root of later calls.
    pub fn open(path: &Path) -> Result<Beneath> {
        let fd = rustix::fs::open(
            path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(path, "cannot open the directory", e.into()))?;
        Ok(Beneath {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The descriptor of the root.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The path the root was opened by (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `rel` under the root's path, for messages.
    pub fn show(&self, rel: &RelPath) -> PathBuf {
        rel.under(&self.path)
    }

    /// Open directory `rel` (the root itself when empty). `Ok(None)` when
    /// it does not exist, or when something on the way is not a directory
    /// or (with [`Follow::Nothing`]) is a symlink: then nothing of that
    /// name exists for a caller that never follows links.
    pub fn dir(&self, rel: &RelPath, follow: Follow) -> io::Result<Option<OwnedFd>> {
        match self.open_dir(rel, follow) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if absent(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn open_dir(&self, rel: &RelPath, follow: Follow) -> io::Result<OwnedFd> {
        let bytes = rel.as_bytes();
        if bytes.is_empty() {
            return Ok(rustix::io::fcntl_dupfd_cloexec(&self.fd, 0)?);
        }
        if bytes.len() < LONG_PATH {
            // With `Follow::Beneath` the directory itself may be a link too
            // (`lib -> usr/lib` when opening `lib` to write `lib/x`).
            let flags = match follow {
                Follow::Nothing => DIR_OPEN,
                Follow::Beneath => DIR_OPEN.difference(OFlags::NOFOLLOW),
            };
            return Ok(openat2(
                &self.fd,
                os(bytes),
                flags,
                Mode::empty(),
                resolve_flags(follow, true),
            )?);
        }
        // Too long for one call: one component at a time, following
        // nothing (a symlink this deep is left alone).
        let mut cur = rustix::io::fcntl_dupfd_cloexec(&self.fd, 0)?;
        for comp in bytes.split(|b| *b == b'/') {
            cur = open_child_dir(cur.as_fd(), comp, true)?;
        }
        Ok(cur)
    }

    /// Open directory `rel`, creating what is missing (mode 0755, before
    /// any metadata is applied). Errors name nothing; callers add the path.
    pub fn dir_create(&self, rel: &RelPath, follow: Follow) -> io::Result<OwnedFd> {
        match self.open_dir(rel, follow) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let parent = rel.parent().unwrap_or_default();
        let pfd = self.dir_create(&parent, follow)?;
        match rustix::fs::mkdirat(&pfd, os(rel.file_name()), Mode::from_raw_mode(0o755)) {
            Ok(()) => {}
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        open_child_dir(pfd.as_fd(), rel.file_name(), true)
    }

    /// Replace the regular file `rel` with `data` (written under a
    /// temporary name, then renamed; directories created as needed, no
    /// symlink followed on the way).
    pub fn write_file(&self, rel: &RelPath, data: &[u8], mode: u32) -> io::Result<()> {
        use std::io::Write;
        let dir = self.dir_create(&rel.parent().unwrap_or_default(), Follow::Nothing)?;
        let tmp = format!(".layerpack-write-{}", std::process::id());
        let fd = rustix::fs::openat(
            &dir,
            tmp.as_str(),
            OFlags::CREATE | OFlags::TRUNC | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )?;
        let mut f = std::fs::File::from(fd);
        let done = f
            .write_all(data)
            .and_then(|()| rustix::fs::fchmod(&f, Mode::from_raw_mode(mode)).map_err(Into::into))
            .and_then(|()| {
                rustix::fs::renameat(&dir, tmp.as_str(), &dir, os(rel.file_name()))
                    .map_err(Into::into)
            });
        if done.is_err() {
            let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
        }
        done
    }

    /// The parent directory of `rel` and its last component.
    /// `Ok(None)` when the parent does not exist (see [`Beneath::dir`]).
    pub fn parent<'p>(
        &self,
        rel: &'p RelPath,
        follow: Follow,
    ) -> io::Result<Option<(OwnedFd, &'p [u8])>> {
        let parent = rel.parent().unwrap_or_default();
        Ok(self.dir(&parent, follow)?.map(|fd| (fd, rel.file_name())))
    }

    /// `lstat` of `rel`; `None` when it does not exist.
    pub fn stat(&self, rel: &RelPath) -> io::Result<Option<rustix::fs::Stat>> {
        if rel.is_root() {
            return Ok(Some(rustix::fs::fstat(&self.fd)?));
        }
        let Some((dir, name)) = self.parent(rel, Follow::Nothing)? else {
            return Ok(None);
        };
        match rustix::fs::statat(&dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Remove `rel` and everything below it, following nothing and
    /// crossing no mount point. Returns whether something was there.
    pub fn remove(&self, rel: &RelPath, follow_parents: Follow) -> Result<bool> {
        if rel.is_root() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "refusing to remove the root itself",
            )
            .with_path(&self.path));
        }
        let found = self
            .parent(rel, follow_parents)
            .map_err(|e| Error::io(self.show(rel), "cannot open the parent directory", e))?;
        let Some((dir, name)) = found else {
            return Ok(false);
        };
        remove_at(dir.as_fd(), name).map_err(|e| removal_error(&self.show(rel), e))
    }
}

/// A path the kernel accepts for an entry at any depth: the path itself
/// when it is short, else `/proc/self/fd/N/<name>`, N being a descriptor
/// of its directory opened one component at a time (without following
/// links) and kept open as long as this value lives. Tree walks, hashing,
/// packing and the fold reach entries through it, so `PATH_MAX` does not
/// limit how deep a tree may be.
#[derive(Debug)]
pub struct ShortPath {
    path: PathBuf,
    _dir: Option<std::sync::Arc<OwnedFd>>,
}

impl std::ops::Deref for ShortPath {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for ShortPath {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

/// Open directory `rel` below `root` one component at a time, following
/// no link. No descriptor is cached across calls: the fold renames
/// directories between calls, and a cached one could then stand for
/// another path.
pub(crate) fn walk_to(root: &Path, rel: &RelPath) -> io::Result<std::sync::Arc<OwnedFd>> {
    let mut fd = rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for comp in rel
        .as_bytes()
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
    {
        fd = open_child_dir(fd.as_fd(), comp, true)?;
    }
    Ok(std::sync::Arc::new(fd))
}

/// A [`ShortPath`] for `rel` under `root`.
pub fn reach(root: &Path, rel: &RelPath) -> io::Result<ShortPath> {
    reach_from(root, rel, None)
}

/// [`reach`], given the descriptor of `rel`'s directory when the caller
/// has it open already (a tree walk), which saves the walk.
pub fn reach_from(
    root: &Path,
    rel: &RelPath,
    dir: Option<&std::sync::Arc<OwnedFd>>,
) -> io::Result<ShortPath> {
    let full = rel.under(root);
    if full.as_os_str().len() < LONG_PATH || rel.is_root() {
        return Ok(ShortPath {
            path: full,
            _dir: None,
        });
    }
    let parent = rel.parent().unwrap_or_default();
    let fd = match dir {
        Some(fd) => fd.clone(),
        None => walk_to(root, &parent)?,
    };
    let mut path = PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&*fd)
    ));
    path.push(os(rel.file_name()));
    Ok(ShortPath {
        path,
        _dir: Some(fd),
    })
}

/// Error of a removal, with the mount-point case spelled out.
pub fn removal_error(path: &Path, e: io::Error) -> Error {
    if e.raw_os_error() == Some(libc::EXDEV) {
        Error::new(
            ErrorKind::Busy,
            "a mount point lies below it; unmount it first (nothing was removed across it)",
        )
        .with_path(path)
    } else {
        Error::io(path, "cannot remove", e)
    }
}

/// True for the errors that mean "no such entry for a caller that follows
/// no links": missing, a non-directory on the way, a symlink refused.
pub fn absent(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP)
    )
}

/// Remove entry `name` of `dir`, a whole tree if it is a directory,
/// following no symlink and refusing (`EXDEV`) to enter a mount point.
/// Returns whether it existed.
pub fn remove_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<bool> {
    let st = match rustix::fs::statat(dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        let child = open_child_dir(dir, name, false)?;
        empty_dir(child.as_fd())?;
        drop(child);
        rustix::fs::unlinkat(dir, os(name), AtFlags::REMOVEDIR)?;
    } else {
        rustix::fs::unlinkat(dir, os(name), AtFlags::empty())?;
    }
    Ok(true)
}

/// Remove everything inside the directory `dir` (not `dir` itself), with
/// the guarantees of [`remove_at`]. Iterative, so depth costs no stack.
pub fn empty_dir(dir: BorrowedFd<'_>) -> io::Result<()> {
    struct Frame {
        fd: OwnedFd,
        names: std::vec::IntoIter<Vec<u8>>,
        /// Its own name in the frame below, removed once it is empty.
        name: Option<Vec<u8>>,
    }
    let fd = rustix::io::fcntl_dupfd_cloexec(dir, 0)?;
    let names = list_names(fd.as_fd())?.into_iter();
    let mut stack = vec![Frame {
        fd,
        names,
        name: None,
    }];
    while let Some(top) = stack.last_mut() {
        let Some(name) = top.names.next() else {
            let done = stack.pop().expect("the stack is not empty");
            if let (Some(name), Some(parent)) = (done.name, stack.last()) {
                drop(done.fd);
                rustix::fs::unlinkat(&parent.fd, os(&name), AtFlags::REMOVEDIR)?;
            }
            continue;
        };
        let st = match rustix::fs::statat(&top.fd, os(&name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            let fd = open_child_dir(top.fd.as_fd(), &name, false)?;
            let names = list_names(fd.as_fd())?.into_iter();
            stack.push(Frame {
                fd,
                names,
                name: Some(name),
            });
        } else {
            match rustix::fs::unlinkat(&top.fd, os(&name), AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// The names in directory `dir` (without `.` and `..`), unsorted.
pub fn list_names(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let fd = rustix::fs::openat(
        dir,
        c".",
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut d = rustix::fs::Dir::new(fd)?;
    let mut out = Vec::new();
    while let Some(ent) = d.read() {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(n.to_vec());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lp-beneath-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn removal_never_follows_a_symlink_out() {
        let d = scratch("symlink");
        let (root, outside) = (d.join("root"), d.join("outside"));
        fs::create_dir_all(root.join("a")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("keep"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("a/link")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("l")).unwrap();
        let b = Beneath::open(&root).unwrap();
        // Through a symlinked parent: nothing of that name exists.
        assert!(!b.remove(&"l/keep".into(), Follow::Nothing).unwrap());
        // The link itself goes, not what it points at.
        assert!(b.remove(&"a".into(), Follow::Nothing).unwrap());
        assert!(outside.join("keep").exists());
        assert!(!root.join("a").exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn symlinks_are_followed_only_while_they_stay_beneath() {
        let d = scratch("beneath");
        let root = d.join("root");
        fs::create_dir_all(root.join("usr/lib")).unwrap();
        fs::create_dir_all(d.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink("/usr/lib", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../..", root.join("up")).unwrap();
        let b = Beneath::open(&root).unwrap();
        let fd = b.dir(&"lib".into(), Follow::Beneath).unwrap().unwrap();
        let st = rustix::fs::fstat(&fd).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(st.st_ino, fs::metadata(root.join("usr/lib")).unwrap().ino());
        for out in ["abs", "up"] {
            let e = b.dir(&out.into(), Follow::Beneath).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EXDEV), "{out}");
        }
        assert!(b.dir(&"lib".into(), Follow::Nothing).unwrap().is_none());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn entries_beyond_path_max_are_reached() {
        let d = scratch("reach");
        let b = Beneath::open(&d).unwrap();
        let mut rel = RelPath::root();
        for i in 0..300 {
            rel = rel.join(format!("dir-{i:04}-xxxxxxxxxx").as_bytes());
        }
        b.dir_create(&rel, Follow::Nothing).unwrap();
        let file = rel.join(b"f");
        let p = reach(&d, &file).unwrap();
        assert!(p.as_os_str().len() < 100, "{}", p.display());
        fs::write(&*p, b"deep").unwrap();
        assert_eq!(fs::read(&*reach(&d, &file).unwrap()).unwrap(), b"deep");
        let mid = RelPath::from("dir-0000-xxxxxxxxxx");
        assert!(fs::metadata(&*reach(&d, &mid).unwrap()).unwrap().is_dir());
        assert!(b.remove(&mid, Follow::Nothing).unwrap());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn deep_trees_beyond_path_max_are_created_and_removed() {
        let d = scratch("deep");
        let b = Beneath::open(&d).unwrap();
        let mut rel = RelPath::root();
        for i in 0..300 {
            rel = rel.join(format!("dir-{i:04}-xxxxxxxxxx").as_bytes());
        }
        assert!(rel.as_bytes().len() > 4096);
        b.dir_create(&rel, Follow::Nothing).unwrap();
        assert!(b.stat(&rel).unwrap().is_some());
        assert!(b
            .remove(&"dir-0000-xxxxxxxxxx".into(), Follow::Nothing)
            .unwrap());
        assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
        fs::remove_dir_all(&d).unwrap();
    }
}
