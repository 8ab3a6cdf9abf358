//! The union filesystem itself, free of any FUSE library: a read-only
//! lower directory (the base) under a writable upper directory stored in
//! the overlay format, so [`layerpack_core::tree::upper`] reads it and
//! [`layerpack_core::tree::fold`] folds it unchanged.
//!
//! - Every backing access is relative to directory fds opened before the
//!   mount (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//!   RESOLVE_NO_MAGICLINKS` for each directory, one name at a time): the
//!   mount may cover the base itself.
//! - Whiteouts are 0/0 character devices, opaque directories carry
//!   `overlay.opaque=y` (`trusted.` as root, `user.` otherwise), a copied-up
//!   entry carries `overlay.layerpack.origin` (the lower inode number, so
//!   the inode number the mount shows does not change at copy-up). These
//!   are internal xattrs for every reader of the layer.
//! - Copy-up goes through a work directory beside the upper one and ends
//!   with one rename, so a daemon killed mid-copy leaves no half file in
//!   the layer.
//! - Inode numbers are the backing ones (lower for anything that came from
//!   the lower layer), so they are stable, equal in `readdir` and `stat`,
//!   and hard links of the lower layer are one inode here too.
//! - When the caller is not root (`fake_owner`), `chown`, setuid/setgid
//!   `chmod` and device `mknod` succeed and are recorded in
//!   `user.containers.override_stat` ([`layerpack_core::tree::override_stat`]).

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use layerpack_core::model::{make_dev, split_dev, FileKind};
use layerpack_core::tree::override_stat::{effective_kind, Override, XATTR as OVERRIDE_XATTR};
use rustix::fs::{
    AtFlags, FileType as RFileType, Mode, OFlags, RenameFlags as RRename, ResolveFlags, Stat,
    Timespec, Timestamps, XattrFlags,
};

/// An errno.
pub type Errno = i32;
/// What every operation returns.
pub type R<T> = std::result::Result<T, Errno>;

fn en(e: rustix::io::Errno) -> Errno {
    e.raw_os_error()
}

fn eio(e: std::io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// The root's inode number, as FUSE has it.
pub const ROOT: u64 = 1;

/// What `stat` shows for one entry.
#[derive(Clone, Copy, Debug)]
pub struct Attr {
    /// Inode number (also the FUSE node id).
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    /// Access time.
    pub atime: SystemTime,
    /// Modification time.
    pub mtime: SystemTime,
    /// Status-change time.
    pub ctime: SystemTime,
    /// Type.
    pub kind: FileKind,
    /// Permission bits (`0o7777`).
    pub perm: u16,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number.
    pub rdev: u32,
    /// Preferred I/O size.
    pub blksize: u32,
}

/// One entry of a directory listing.
#[derive(Clone, Debug)]
pub struct DirEntry {
    /// Inode number.
    pub ino: u64,
    /// Type, `None` when it has to be looked up.
    pub kind: Option<FileKind>,
    /// Name.
    pub name: Box<[u8]>,
}

/// How the filesystem behaves.
#[derive(Clone, Debug)]
pub struct Options {
    /// Record ownership instead of changing it (the daemon is not root).
    pub fake_owner: bool,
    /// The xattr namespace of the overlay markers: `trusted` or `user`.
    pub marker_ns: &'static str,
    /// The kernel caches writes (so files are opened read-write).
    pub writeback: bool,
}

/// Requests served, by operation, for the benchmark.
#[derive(Default)]
pub struct Counters {
    counts: [AtomicU64; OPS.len()],
}

/// The operations counted, in [`Counters`] order.
pub const OPS: [&str; 32] = [
    "lookup",
    "forget",
    "getattr",
    "setattr",
    "readlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "symlink",
    "rename",
    "link",
    "open",
    "read",
    "write",
    "flush",
    "release",
    "fsync",
    "opendir",
    "readdir",
    "readdirplus",
    "releasedir",
    "statfs",
    "setxattr",
    "getxattr",
    "listxattr",
    "removexattr",
    "access",
    "create",
    "fallocate",
    "lseek",
    "copy_file_range",
];

impl Counters {
    /// Count one request of `op` (a name of [`OPS`]).
    pub fn count(&self, op: &str) {
        if let Some(i) = OPS.iter().position(|o| *o == op) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `(op, count)` for every operation seen.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        OPS.iter()
            .zip(&self.counts)
            .map(|(o, c)| (*o, c.load(Ordering::Relaxed)))
            .filter(|(_, c)| *c > 0)
            .collect()
    }
}

struct Inode {
    nlookup: u64,
    /// (parent, name) for every known path; one for a directory.
    aliases: Vec<(u64, Box<[u8]>)>,
    /// Type as stored in the backing layer.
    stored: FileKind,
    /// The entry lives in the upper layer.
    upper: bool,
    /// A directory whose lower counterpart shows through (merged).
    lower: bool,
    /// Directory fds (`O_PATH`), opened on first use.
    ufd: Option<Arc<OwnedFd>>,
    lfd: Option<Arc<OwnedFd>>,
    /// Recorded ownership (fake_owner only).
    ovr: Option<Override>,
    /// Made by this mount and given no xattr since: `getxattr` needs no
    /// call (the kernel asks for security.capability before writes).
    no_xattrs: bool,
}

#[derive(Default)]
struct Table {
    inodes: HashMap<u64, Inode>,
    /// (parent, name) -> inode, for every alias in `inodes`.
    names: HashMap<(u64, Box<[u8]>), u64>,
}

impl Table {
    fn add_alias(&mut self, ino: u64, alias: (u64, Box<[u8]>)) {
        if let Some(old) = self.names.insert(alias.clone(), ino) {
            if old != ino {
                if let Some(n) = self.inodes.get_mut(&old) {
                    n.aliases.retain(|a| *a != alias);
                }
            }
        }
        if let Some(n) = self.inodes.get_mut(&ino) {
            if !n.aliases.contains(&alias) {
                n.aliases.push(alias);
            }
        }
    }

    fn remove_alias(&mut self, parent: u64, name: &[u8]) -> Option<u64> {
        let key = (parent, Box::<[u8]>::from(name));
        let ino = self.names.remove(&key)?;
        if let Some(n) = self.inodes.get_mut(&ino) {
            n.aliases.retain(|a| *a != key);
        }
        Some(ino)
    }

    fn remove_inode(&mut self, ino: u64) {
        if let Some(n) = self.inodes.remove(&ino) {
            for a in n.aliases {
                if self.names.get(&a) == Some(&ino) {
                    self.names.remove(&a);
                }
            }
        }
    }
}

enum Handle {
    File(Arc<OwnedFd>),
    Dir(Vec<DirEntry>),
}

/// A directory's fds in the upper and lower layer, where it has them.
type DirFds = (Option<Arc<OwnedFd>>, Option<Arc<OwnedFd>>);

/// Where one entry is in the backing layers.
struct Loc {
    /// The directory holding it and its name there (`.` for the root).
    dir: Arc<OwnedFd>,
    name: Box<[u8]>,
    upper: bool,
}

/// The union filesystem.
pub struct Union {
    work: OwnedFd,
    opts: Options,
    table: Mutex<Table>,
    copy_lock: Mutex<()>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    next_tmp: AtomicU64,
    /// The daemon's own uid and gid.
    ids: (u32, u32),
    /// Lower paths of every inode with several names, found on first need.
    links: std::sync::OnceLock<HashMap<u64, Vec<Vec<u8>>>>,
    /// Requests served.
    pub counters: Counters,
}

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Open directory `name` below `dir` as an `O_PATH` fd, never following a
/// link and never leaving `dir`.
fn open_dir(dir: BorrowedFd<'_>, name: &[u8]) -> R<OwnedFd> {
    rustix::fs::openat2(
        dir,
        name,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        RESOLVE,
    )
    .map_err(en)
}

/// A listing of directory fd `dir` (which may be `O_PATH`).
fn read_dir(dir: BorrowedFd<'_>) -> R<rustix::fs::Dir> {
    let fd = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(en)?;
    rustix::fs::Dir::new(fd).map_err(en)
}

/// Make an empty regular file `name` in `dir` (a placeholder, or a copy
/// whose bytes are not needed).
fn create_empty(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> R<()> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )
    .map(drop)
    .map_err(en)
}

/// Record `o` on entry `name` of `dir`.
fn write_override(dir: BorrowedFd<'_>, name: &[u8], o: &Override) -> R<()> {
    rustix::fs::lsetxattr(
        proc_path(dir, name),
        OVERRIDE_XATTR,
        o.format().as_bytes(),
        XattrFlags::empty(),
    )
    .map_err(en)
}

/// Record `o` on entry `name` of `dir`, or drop the record when `o` says
/// nothing the entry itself (`st`) does not: a chown to the owner a file
/// already has (as `sed -i` and `cp -p` do for the file they replace)
/// leaves no record to go stale.
fn store_override(
    dir: BorrowedFd<'_>,
    name: &[u8],
    o: &Override,
    st: &Stat,
) -> R<Option<Override>> {
    let says_nothing = o.kind.is_none()
        && o.uid == st.st_uid
        && o.gid == st.st_gid
        && o.mode == st.st_mode & 0o7777;
    if !says_nothing {
        write_override(dir, name, o)?;
        return Ok(Some(*o));
    }
    match rustix::fs::lremovexattr(proc_path(dir, name), OVERRIDE_XATTR) {
        Ok(()) | Err(rustix::io::Errno::NODATA) => Ok(None),
        Err(e) => Err(en(e)),
    }
}

/// The permission bits a POSIX access ACL (`system.posix_acl_access`,
/// the kernel's xattr form) stands for, when it holds nothing but the
/// owner, group and other entries: the ACL `chmod` would make, which
/// `cp -p` and `sed -i` set through gnulib's `qset_acl`.
fn trivial_acl_mode(value: &[u8]) -> Option<u32> {
    const VERSION: u32 = 2;
    let (head, entries) = value.split_first_chunk::<4>()?;
    if u32::from_le_bytes(*head) != VERSION || entries.len() != 24 {
        return None;
    }
    let mut mode = 0;
    let mut seen = 0u8;
    for e in entries.chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u32::from(u16::from_le_bytes([e[2], e[3]]) & 0o7);
        let (bit, shift) = match tag {
            0x01 => (1, 6), // ACL_USER_OBJ
            0x04 => (2, 3), // ACL_GROUP_OBJ
            0x20 => (4, 0), // ACL_OTHER
            _ => return None,
        };
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
        mode |= perm << shift;
    }
    (seen == 7).then_some(mode)
}

fn kind_of(st: &Stat) -> FileKind {
    FileKind::from_mode(st.st_mode).unwrap_or(FileKind::File)
}

fn is_whiteout(st: &Stat) -> bool {
    kind_of(st) == FileKind::CharDevice && st.st_rdev == 0
}

/// `/proc/self/fd/N/name`: the path of `name` in directory fd `dir`, for
/// the calls that take no fd (xattrs of any type, times of a directory fd
/// opened `O_PATH`). The magic link is our own fd; the last name is never
/// followed by the `l*` calls.
fn proc_path(dir: BorrowedFd<'_>, name: &[u8]) -> CString {
    let mut p = format!("/proc/self/fd/{}", dir.as_raw_fd()).into_bytes();
    if name != b"." {
        p.push(b'/');
        p.extend_from_slice(name);
    }
    CString::new(p).unwrap_or_default()
}

/// The access and modification times of `st`, to set on another entry.
fn stat_times(st: &Stat) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: st.st_atime as _,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: Timespec {
            tv_sec: st.st_mtime as _,
            tv_nsec: st.st_mtime_nsec as _,
        },
    }
}

fn ts(t: SystemTime) -> Timespec {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timespec {
        tv_sec: d.as_secs() as _,
        tv_nsec: d.subsec_nanos() as _,
    }
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn rtype(kind: FileKind) -> RFileType {
    match kind {
        FileKind::File => RFileType::RegularFile,
        FileKind::Dir => RFileType::Directory,
        FileKind::Symlink => RFileType::Symlink,
        FileKind::CharDevice => RFileType::CharacterDevice,
        FileKind::BlockDevice => RFileType::BlockDevice,
        FileKind::Fifo => RFileType::Fifo,
        FileKind::Socket => RFileType::Socket,
    }
}

fn kind_from_dt(t: RFileType) -> Option<FileKind> {
    Some(match t {
        RFileType::RegularFile => FileKind::File,
        RFileType::Directory => FileKind::Dir,
        RFileType::Symlink => FileKind::Symlink,
        RFileType::CharacterDevice => FileKind::CharDevice,
        RFileType::BlockDevice => FileKind::BlockDevice,
        RFileType::Fifo => FileKind::Fifo,
        RFileType::Socket => FileKind::Socket,
        _ => return None,
    })
}

/// What the xattrs of one backing entry say about it.
#[derive(Default)]
struct Marks {
    origin: Option<u64>,
    opaque: bool,
    ovr: Option<Override>,
}

/// A time to set (`setattr`).
#[derive(Clone, Copy, Debug)]
pub enum SetTime {
    /// This time.
    At(SystemTime),
    /// The current time.
    Now,
}

/// What `setattr` changes.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    /// New permission bits (and type bits, ignored).
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size.
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<SetTime>,
    /// New modification time.
    pub mtime: Option<SetTime>,
}

/// What `open` and `create` give back.
pub struct Opened {
    /// The handle.
    pub fh: u64,
    /// The backing file (for passthrough).
    pub fd: Arc<OwnedFd>,
}

impl Union {
    /// A union of `lower` and `upper` (directory fds), copying up through
    /// `work` (a directory on the upper's filesystem).
    pub fn new(lower: OwnedFd, upper: OwnedFd, work: OwnedFd, opts: Options) -> Union {
        let mut table = Table::default();
        table.inodes.insert(
            ROOT,
            Inode {
                nlookup: 1,
                aliases: Vec::new(),
                stored: FileKind::Dir,
                upper: true,
                lower: true,
                ufd: Some(Arc::new(upper)),
                lfd: Some(Arc::new(lower)),
                ovr: None,
                no_xattrs: false,
            },
        );
        Union {
            work,
            opts,
            table: Mutex::new(table),
            copy_lock: Mutex::new(()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            next_tmp: AtomicU64::new(0),
            links: std::sync::OnceLock::new(),
            ids: (
                rustix::process::geteuid().as_raw(),
                rustix::process::getegid().as_raw(),
            ),
            counters: Counters::default(),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn marker(&self, name: &str) -> String {
        format!("{}.overlay.{name}", self.opts.marker_ns)
    }

    /// Mark directory `name` of `dir` opaque: nothing below shows through.
    fn mark_opaque(&self, dir: BorrowedFd<'_>, name: &[u8]) -> R<()> {
        rustix::fs::lsetxattr(
            proc_path(dir, name),
            self.marker("opaque").as_bytes(),
            b"y",
            XattrFlags::empty(),
        )
        .map_err(en)
    }

    fn origin_xattr(&self) -> String {
        self.marker("layerpack.origin")
    }

    /// Internal names a caller may neither see nor set.
    fn internal_xattr(&self, name: &[u8]) -> bool {
        name.starts_with(b"trusted.overlay.")
            || name.starts_with(b"user.overlay.")
            || (self.opts.fake_owner && name == OVERRIDE_XATTR.as_bytes())
    }

    fn marks(&self, dir: BorrowedFd<'_>, name: &[u8], kind: FileKind) -> R<Marks> {
        let m = Marks::default();
        // user.* xattrs exist only on files and directories.
        if self.opts.marker_ns == "user" && !matches!(kind, FileKind::File | FileKind::Dir) {
            return Ok(m);
        }
        let path = proc_path(dir, name);
        let mut buf = [0u8; 1024];
        let n = match rustix::fs::llistxattr(&path, &mut buf[..]) {
            Ok(n) => n,
            Err(rustix::io::Errno::NOTSUP) | Err(rustix::io::Errno::PERM) => return Ok(m),
            Err(rustix::io::Errno::RANGE) => {
                let size = rustix::fs::llistxattr(&path, &mut [0u8; 0][..]).map_err(en)?;
                let mut big = vec![0u8; size];
                let n = rustix::fs::llistxattr(&path, &mut big[..]).map_err(en)?;
                return self.marks_from(&path, &big[..n], m);
            }
            Err(e) => return Err(en(e)),
        };
        if n == 0 {
            return Ok(m);
        }
        self.marks_from(&path, &buf[..n], m)
    }

    fn marks_from(&self, path: &CString, list: &[u8], mut m: Marks) -> R<Marks> {
        let origin = self.origin_xattr();
        let opaque = self.marker("opaque");
        for x in list.split(|b| *b == 0).filter(|x| !x.is_empty()) {
            let mut val = [0u8; 64];
            if x == origin.as_bytes() {
                if let Ok(n) = rustix::fs::lgetxattr(path, x, &mut val[..]) {
                    if n == 8 {
                        m.origin = Some(u64::from_le_bytes(val[..8].try_into().unwrap_or([0; 8])));
                    }
                }
            } else if x == opaque.as_bytes() {
                if let Ok(n) = rustix::fs::lgetxattr(path, x, &mut val[..]) {
                    m.opaque = &val[..n] == b"y";
                }
            } else if self.opts.fake_owner && x == OVERRIDE_XATTR.as_bytes() {
                if let Ok(n) = rustix::fs::lgetxattr(path, x, &mut val[..]) {
                    m.ovr = Override::parse(&val[..n]);
                }
            }
        }
        Ok(m)
    }

    fn attr_of(&self, ino: u64, st: &Stat, ovr: Option<&Override>) -> Attr {
        let stored = kind_of(st);
        let mut kind = stored;
        let (mut perm, mut uid, mut gid) = (st.st_mode & 0o7777, st.st_uid, st.st_gid);
        let mut rdev = st.st_rdev;
        if let Some(o) = ovr {
            let (k, r) = effective_kind(stored, rdev, o);
            kind = k;
            rdev = r;
            perm = o.mode;
            uid = o.uid;
            gid = o.gid;
        }
        let (major, minor) = split_dev(rdev);
        Attr {
            ino,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: time(st.st_atime, st.st_atime_nsec as i64),
            mtime: time(st.st_mtime, st.st_mtime_nsec as i64),
            ctime: time(st.st_ctime, st.st_ctime_nsec as i64),
            kind,
            perm: perm as u16,
            nlink: st.st_nlink as u32,
            uid,
            gid,
            rdev: ((major & 0xfff) << 8) | (minor & 0xff) | ((minor & !0xff) << 12),
            blksize: st.st_blksize as u32,
        }
    }

    /// A backing inode number as the mount shows it (never the root's).
    fn fuse_ino(backing: u64) -> u64 {
        if backing == ROOT || backing == 0 {
            u64::MAX - 1
        } else {
            backing
        }
    }

    /// The directory fds of directory `ino`: (upper, lower), each when the
    /// directory has that layer.
    fn dir_fds(&self, ino: u64) -> R<DirFds> {
        let (parent, name, need_u, need_l) = {
            let t = self.table();
            let n = t.inodes.get(&ino).ok_or(libc::ESTALE)?;
            if n.stored != FileKind::Dir {
                return Err(libc::ENOTDIR);
            }
            let need_u = n.upper && n.ufd.is_none();
            let need_l = n.lower && n.lfd.is_none();
            if !need_u && !need_l {
                return Ok((n.ufd.clone(), n.lfd.clone()));
            }
            let (p, name) = n.aliases.first().cloned().ok_or(libc::ESTALE)?;
            (p, name, need_u, need_l)
        };
        let (pu, pl) = self.dir_fds(parent)?;
        let ufd = match (need_u, &pu) {
            (true, Some(pu)) => Some(Arc::new(open_dir(pu.as_fd(), &name)?)),
            _ => None,
        };
        let lfd = match (need_l, &pl) {
            (true, Some(pl)) => open_dir(pl.as_fd(), &name).ok().map(Arc::new),
            _ => None,
        };
        let mut t = self.table();
        let n = t.inodes.get_mut(&ino).ok_or(libc::ESTALE)?;
        if n.ufd.is_none() {
            n.ufd = ufd;
        }
        if n.lfd.is_none() {
            n.lfd = lfd;
            if n.lfd.is_none() {
                n.lower = false;
            }
        }
        Ok((n.ufd.clone(), n.lfd.clone()))
    }

    /// Where entry `ino` is: its directory's fd in the layer holding it.
    fn loc(&self, ino: u64) -> R<Loc> {
        if ino == ROOT {
            let (u, _) = self.dir_fds(ROOT)?;
            return Ok(Loc {
                dir: u.ok_or(libc::EIO)?,
                name: Box::from(&b"."[..]),
                upper: true,
            });
        }
        let (parent, name, upper) = {
            let t = self.table();
            let n = t.inodes.get(&ino).ok_or(libc::ESTALE)?;
            let (p, name) = n.aliases.first().cloned().ok_or(libc::ENOENT)?;
            (p, name, n.upper)
        };
        let (pu, pl) = self.dir_fds(parent)?;
        let dir = if upper { pu } else { pl }.ok_or(libc::EIO)?;
        Ok(Loc { dir, name, upper })
    }

    /// Look `name` up in directory `parent` without counting a lookup.
    fn resolve(&self, parent: u64, name: &[u8]) -> R<(u64, Stat, Inode)> {
        if name == b"." || name == b".." || name.contains(&b'/') {
            return Err(libc::EINVAL);
        }
        let (pu, pl) = self.dir_fds(parent)?;
        if let Some(pu) = &pu {
            match rustix::fs::statat(pu.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => {
                    if is_whiteout(&st) {
                        return Err(libc::ENOENT);
                    }
                    let kind = kind_of(&st);
                    let m = self.marks(pu.as_fd(), name, kind)?;
                    let ino = Self::fuse_ino(m.origin.unwrap_or(st.st_ino));
                    let lower =
                        kind == FileKind::Dir && m.origin.is_some() && !m.opaque && pl.is_some();
                    return Ok((
                        ino,
                        st,
                        Inode {
                            nlookup: 0,
                            aliases: Vec::new(),
                            stored: kind,
                            upper: true,
                            lower,
                            ufd: None,
                            lfd: None,
                            ovr: m.ovr,
                            no_xattrs: false,
                        },
                    ));
                }
                Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(en(e)),
            }
        }
        let pl = pl.ok_or(libc::ENOENT)?;
        let st = rustix::fs::statat(pl.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW).map_err(en)?;
        let kind = kind_of(&st);
        let ovr = if self.opts.fake_owner {
            self.marks(pl.as_fd(), name, kind)?.ovr
        } else {
            None
        };
        Ok((
            Self::fuse_ino(st.st_ino as u64),
            st,
            Inode {
                nlookup: 0,
                aliases: Vec::new(),
                stored: kind,
                upper: false,
                lower: kind == FileKind::Dir,
                ufd: None,
                lfd: None,
                ovr,
                no_xattrs: false,
            },
        ))
    }

    /// Record a lookup of `name` in `parent` that found `found` as `ino`.
    /// Returns the attributes to report.
    fn remember(&self, parent: u64, name: &[u8], ino: u64, st: &Stat, found: Inode) -> R<Attr> {
        let alias = (parent, Box::<[u8]>::from(name));
        let mut link_up = false;
        let attr;
        {
            let mut t = self.table();
            match t.inodes.get_mut(&ino) {
                Some(n) if n.stored == found.stored => {
                    n.nlookup += 1;
                    // A lower hard link of an inode copied up through
                    // another path: it gets the upper inode too.
                    link_up = n.upper && !found.upper && n.stored == FileKind::File;
                    if found.upper {
                        n.upper = true;
                    }
                    attr = self.attr_of(ino, st, n.ovr.as_ref());
                }
                _ => {
                    // New, or a recycled inode number of a type change.
                    t.remove_inode(ino);
                    attr = self.attr_of(ino, st, found.ovr.as_ref());
                    let mut n = found;
                    n.nlookup = 1;
                    t.inodes.insert(ino, n);
                }
            }
            t.add_alias(ino, alias.clone());
        }
        if link_up {
            self.link_alias(ino, &alias)?;
            return self.getattr(ino, None);
        }
        Ok(attr)
    }

    /// `lookup`: counts one lookup of the entry.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> R<Attr> {
        let (ino, st, found) = self.resolve(parent, name)?;
        self.remember(parent, name, ino, &st, found)
    }

    /// `forget`: the kernel dropped `n` lookups of `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let mut t = self.table();
        if let Some(node) = t.inodes.get_mut(&ino) {
            node.nlookup = node.nlookup.saturating_sub(n);
            if node.nlookup == 0 {
                t.remove_inode(ino);
            }
        }
    }

    fn stat_loc(&self, l: &Loc) -> R<Stat> {
        rustix::fs::statat(l.dir.as_fd(), &*l.name, AtFlags::SYMLINK_NOFOLLOW).map_err(en)
    }

    /// The type inode `ino` has in its backing layer.
    fn stored_kind(&self, ino: u64) -> R<FileKind> {
        self.table()
            .inodes
            .get(&ino)
            .map(|n| n.stored)
            .ok_or(libc::ESTALE)
    }

    fn ovr_of(&self, ino: u64) -> Option<Override> {
        self.table().inodes.get(&ino).and_then(|n| n.ovr)
    }

    /// `getattr`, through the open file `fh` when given.
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> R<Attr> {
        let st = match fh.and_then(|fh| self.file(fh)).as_deref() {
            Some(Handle::File(fd)) => rustix::fs::fstat(&**fd).map_err(en)?,
            _ => self.stat_loc(&self.loc(ino)?)?,
        };
        Ok(self.attr_of(ino, &st, self.ovr_of(ino).as_ref()))
    }

    fn file(&self, fh: u64) -> Option<Arc<Handle>> {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
            .cloned()
    }

    fn tmp_name(&self) -> Vec<u8> {
        format!("copy-{}", self.next_tmp.fetch_add(1, Ordering::Relaxed)).into_bytes()
    }

    /// Copy the metadata of lower entry `st` onto `tmp` in the work dir.
    fn copy_meta(
        &self,
        src_dir: BorrowedFd<'_>,
        name: &[u8],
        st: &Stat,
        tmp: &[u8],
        origin: u64,
    ) -> R<()> {
        let work = self.work.as_fd();
        let kind = kind_of(st);
        if !self.opts.fake_owner {
            rustix::fs::chownat(
                work,
                tmp,
                Some(rustix::fs::Uid::from_raw(st.st_uid)),
                Some(rustix::fs::Gid::from_raw(st.st_gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(en)?;
        }
        if kind != FileKind::Symlink {
            rustix::fs::chmodat(
                work,
                tmp,
                Mode::from_raw_mode(st.st_mode & 0o7777),
                AtFlags::empty(),
            )
            .map_err(en)?;
        }
        // Xattrs (the recorded ownership among them), not the markers.
        let (sp, dp) = (proc_path(src_dir, name), proc_path(work, tmp));
        let user_ok = matches!(kind, FileKind::File | FileKind::Dir);
        if user_ok || !self.opts.fake_owner {
            let size = rustix::fs::llistxattr(&sp, &mut [0u8; 0][..]).unwrap_or(0);
            if size > 0 {
                let mut list = vec![0u8; size];
                let n = rustix::fs::llistxattr(&sp, &mut list[..]).map_err(en)?;
                for x in list[..n].split(|b| *b == 0).filter(|x| !x.is_empty()) {
                    if x.starts_with(b"trusted.overlay.") || x.starts_with(b"user.overlay.") {
                        continue;
                    }
                    let vs = rustix::fs::lgetxattr(&sp, x, &mut [0u8; 0][..]).map_err(en)?;
                    let mut v = vec![0u8; vs];
                    let vn = rustix::fs::lgetxattr(&sp, x, &mut v[..]).map_err(en)?;
                    match rustix::fs::lsetxattr(&dp, x, &v[..vn], XattrFlags::empty()) {
                        Ok(()) => {}
                        // security.* or trusted.* an unprivileged user cannot set.
                        Err(rustix::io::Errno::PERM) if self.opts.fake_owner => {}
                        Err(e) => return Err(en(e)),
                    }
                }
            }
            if user_ok || self.opts.marker_ns == "trusted" {
                let _ = rustix::fs::lsetxattr(
                    &dp,
                    self.origin_xattr().as_bytes(),
                    &origin.to_le_bytes(),
                    XattrFlags::empty(),
                );
            }
        }
        let times = stat_times(st);
        rustix::fs::utimensat(work, tmp, &times, AtFlags::SYMLINK_NOFOLLOW).map_err(en)?;
        Ok(())
    }

    /// Put `tmp` (in the work dir) in place as `name` in upper dir `pu`,
    /// keeping `pu`'s times as they were (copy-up is no change of it).
    fn install(&self, tmp: &[u8], pu: &OwnedFd, name: &[u8]) -> R<()> {
        let before = rustix::fs::fstat(pu).map_err(en)?;
        rustix::fs::renameat_with(self.work.as_fd(), tmp, pu.as_fd(), name, RRename::NOREPLACE)
            .map_err(en)?;
        self.restore_times(pu, &before);
        Ok(())
    }

    fn restore_times(&self, dir: &OwnedFd, st: &Stat) {
        let times = stat_times(st);
        let _ = rustix::fs::utimensat(
            rustix::fs::CWD,
            proc_path(dir.as_fd(), b"."),
            &times,
            AtFlags::empty(),
        );
    }

    /// The upper directory fd of directory `ino`, copying it (not its
    /// children) and its parents up first.
    fn upper_dir(&self, ino: u64) -> R<Arc<OwnedFd>> {
        if let (Some(u), _) = self.dir_fds(ino)? {
            return Ok(u);
        }
        let _g = self.copy_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.upper_dir_locked(ino)
    }

    fn upper_dir_locked(&self, ino: u64) -> R<Arc<OwnedFd>> {
        let (upper, parent, name) = {
            let t = self.table();
            let n = t.inodes.get(&ino).ok_or(libc::ESTALE)?;
            let (p, name) = n
                .aliases
                .first()
                .cloned()
                .unwrap_or((0, Box::from(&b"."[..])));
            (n.upper, p, name)
        };
        if upper {
            return self.dir_fds(ino)?.0.ok_or(libc::EIO);
        }
        let pu = self.upper_dir_locked(parent)?;
        let (_, pl) = self.dir_fds(parent)?;
        let pl = pl.ok_or(libc::EIO)?;
        let st = rustix::fs::statat(pl.as_fd(), &*name, AtFlags::SYMLINK_NOFOLLOW).map_err(en)?;
        let tmp = self.tmp_name();
        rustix::fs::mkdirat(self.work.as_fd(), &*tmp, Mode::from_raw_mode(0o700)).map_err(en)?;
        let done = self
            .copy_meta(pl.as_fd(), &name, &st, &tmp, ino)
            .and_then(|()| self.install(&tmp, &pu, &name));
        if let Err(e) = done {
            let _ = rustix::fs::unlinkat(self.work.as_fd(), &*tmp, AtFlags::REMOVEDIR);
            return Err(e);
        }
        let fd = Arc::new(open_dir(pu.as_fd(), &name)?);
        let mut t = self.table();
        let n = t.inodes.get_mut(&ino).ok_or(libc::ESTALE)?;
        n.upper = true;
        n.ufd = Some(fd.clone());
        Ok(fd)
    }

    /// Copy entry `ino` up (a directory without its children), with every
    /// known path of a hard-linked file.
    pub fn copy_up(&self, ino: u64) -> R<()> {
        self.copy_up_with(ino, true)
    }

    /// [`Union::copy_up`]; a regular file's bytes are copied only when
    /// `data` (an open with `O_TRUNC` drops them anyway).
    fn copy_up_with(&self, ino: u64, data: bool) -> R<()> {
        let (upper, kind) = {
            let t = self.table();
            let n = t.inodes.get(&ino).ok_or(libc::ESTALE)?;
            (n.upper, n.stored)
        };
        if upper {
            return Ok(());
        }
        if kind == FileKind::Dir {
            return self.upper_dir(ino).map(|_| ());
        }
        let _g = self.copy_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (upper, aliases) = {
            let t = self.table();
            let n = t.inodes.get(&ino).ok_or(libc::ESTALE)?;
            (n.upper, n.aliases.clone())
        };
        if upper {
            return Ok(());
        }
        let (parent, name) = aliases.first().cloned().ok_or(libc::ENOENT)?;
        let pu = self.upper_dir_locked(parent)?;
        let (_, pl) = self.dir_fds(parent)?;
        let pl = pl.ok_or(libc::EIO)?;
        let st = rustix::fs::statat(pl.as_fd(), &*name, AtFlags::SYMLINK_NOFOLLOW).map_err(en)?;
        let mut aliases = aliases;
        if kind == FileKind::File && st.st_nlink > 1 {
            // Every name of the inode, looked up or not, gets the copy:
            // a hard link stays one file.
            for (p, n) in self.other_names(ino, st.st_ino)? {
                if !aliases.iter().any(|(ap, an)| *ap == p && *an == n) {
                    aliases.push((p, n));
                }
            }
        }
        let tmp = self.tmp_name();
        let work = self.work.as_fd();
        let made = match kind {
            FileKind::File if data => self.copy_data(pl.as_fd(), &name, &tmp, st.st_size as u64),
            FileKind::File => create_empty(work, &tmp, 0o600),
            FileKind::Symlink => {
                let target = rustix::fs::readlinkat(pl.as_fd(), &*name, Vec::new()).map_err(en)?;
                rustix::fs::symlinkat(target.as_bytes(), work, &*tmp).map_err(en)
            }
            k if k.is_device() && self.opts.fake_owner => {
                // A real device an unprivileged copy cannot make: a
                // placeholder that records what it is.
                create_empty(work, &tmp, 0o600)?;
                let o = Override {
                    uid: st.st_uid,
                    gid: st.st_gid,
                    mode: st.st_mode as u32 & 0o7777,
                    kind: Some((k, st.st_rdev)),
                };
                write_override(work, &tmp, &o)?;
                let mut t = self.table();
                if let Some(n) = t.inodes.get_mut(&ino) {
                    n.ovr = Some(o);
                }
                Ok(())
            }
            k => rustix::fs::mknodat(
                work,
                &*tmp,
                rtype(k),
                Mode::from_raw_mode(st.st_mode as u32 & 0o7777),
                st.st_rdev,
            )
            .map_err(en),
        };
        let done = made
            .and_then(|()| self.copy_meta(pl.as_fd(), &name, &st, &tmp, ino))
            .and_then(|()| self.install(&tmp, &pu, &name));
        if let Err(e) = done {
            let _ = rustix::fs::unlinkat(work, &*tmp, AtFlags::empty());
            return Err(e);
        }
        {
            let mut t = self.table();
            if let Some(n) = t.inodes.get_mut(&ino) {
                n.upper = true;
            }
        }
        for alias in aliases.iter().skip(1) {
            self.link_alias_locked(ino, alias, &pu, &name)?;
        }
        Ok(())
    }

    /// Copy a regular file's bytes into a new `tmp`: a clone where the
    /// filesystem shares extents, else the data segments only (holes stay
    /// holes) with `copy_file_range`, else read and write.
    fn copy_data(&self, dir: BorrowedFd<'_>, name: &[u8], tmp: &[u8], size: u64) -> R<()> {
        let src = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(en)?;
        let dst = rustix::fs::openat(
            self.work.as_fd(),
            tmp,
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(en)?;
        if rustix::fs::ioctl_ficlone(&dst, &src).is_ok() {
            return Ok(());
        }
        let file = std::fs::File::from(src);
        let segments = layerpack_core::tree::data_segments(&file, size).map_err(eio)?;
        for (mut off, len) in segments {
            let end = off + len;
            while off < end {
                let (mut i, mut o) = (off, off);
                match rustix::fs::copy_file_range(
                    &file,
                    Some(&mut i),
                    &dst,
                    Some(&mut o),
                    (end - off) as usize,
                ) {
                    Ok(0) => break,
                    Ok(n) => off += n as u64,
                    Err(rustix::io::Errno::XDEV)
                    | Err(rustix::io::Errno::NOSYS)
                    | Err(rustix::io::Errno::INVAL) => {
                        let mut buf = vec![0u8; 1 << 20];
                        while off < end {
                            let want = ((end - off) as usize).min(buf.len());
                            let n = rustix::io::pread(&file, &mut buf[..want], off).map_err(en)?;
                            if n == 0 {
                                break;
                            }
                            let mut w = 0;
                            while w < n {
                                w += rustix::io::pwrite(&dst, &buf[w..n], off + w as u64)
                                    .map_err(en)?;
                            }
                            off += n as u64;
                        }
                    }
                    Err(e) => return Err(en(e)),
                }
            }
        }
        rustix::fs::ftruncate(&dst, size).map_err(en)?;
        Ok(())
    }

    /// The (parent, name) of every other lower path of backing inode
    /// `backing` that still shows it through the union.
    fn other_names(&self, ino: u64, backing: u64) -> R<Vec<(u64, Box<[u8]>)>> {
        let links = self.links.get_or_init(|| self.find_lower_links());
        let mut out = Vec::new();
        for path in links.get(&backing).into_iter().flatten() {
            let mut parent = ROOT;
            let mut comps = path.split(|b| *b == b'/').peekable();
            while let Some(c) = comps.next() {
                let child = match self.child(parent, c) {
                    Ok(i) => i,
                    Err(_) => break,
                };
                if comps.peek().is_none() {
                    if child == ino {
                        out.push((parent, Box::from(c)));
                    }
                } else {
                    parent = child;
                }
            }
        }
        Ok(out)
    }

    /// Scan the lower layer for files with several names.
    fn find_lower_links(&self) -> HashMap<u64, Vec<Vec<u8>>> {
        let mut map: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
        let Ok((_, Some(lower))) = self.dir_fds(ROOT) else {
            return map;
        };
        let root = std::path::PathBuf::from(format!("/proc/self/fd/{}", lower.as_raw_fd()));
        let opts = layerpack_core::tree::ScanOptions {
            xattrs: false,
            ..Default::default()
        };
        if let Ok(scan) = layerpack_core::tree::TreeScan::start(&root, opts) {
            for r in scan.flatten() {
                if r.kind == FileKind::File && r.nlink > 1 {
                    map.entry(r.ino)
                        .or_default()
                        .push(r.path.as_bytes().to_vec());
                }
            }
        }
        map
    }

    fn link_alias(&self, ino: u64, alias: &(u64, Box<[u8]>)) -> R<()> {
        let _g = self.copy_lock.lock().unwrap_or_else(|p| p.into_inner());
        let l = self.loc(ino)?;
        if !l.upper {
            return Ok(());
        }
        self.link_alias_locked(ino, alias, &l.dir, &l.name)
    }

    /// Make `alias` a hard link of upper entry (`dir`, `name`).
    fn link_alias_locked(
        &self,
        _ino: u64,
        alias: &(u64, Box<[u8]>),
        dir: &OwnedFd,
        name: &[u8],
    ) -> R<()> {
        let pu = self.upper_dir_locked(alias.0)?;
        match rustix::fs::statat(pu.as_fd(), &*alias.1, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if is_whiteout(&st) => return Ok(()),
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(en(e)),
        }
        let before = rustix::fs::fstat(&pu).map_err(en)?;
        rustix::fs::linkat(dir.as_fd(), name, pu.as_fd(), &*alias.1, AtFlags::empty())
            .map_err(en)?;
        self.restore_times(&pu, &before);
        Ok(())
    }

    /// The upper entry at `name` in upper dir `pu`, if any: whiteout or not.
    fn upper_entry(pu: &OwnedFd, name: &[u8]) -> R<Option<Stat>> {
        match rustix::fs::statat(pu.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(en(e)),
        }
    }

    fn lower_has(&self, parent: u64, name: &[u8]) -> R<Option<Stat>> {
        let (_, pl) = self.dir_fds(parent)?;
        match pl {
            Some(pl) => match rustix::fs::statat(pl.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => Ok(Some(st)),
                Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::NOTDIR) => Ok(None),
                Err(e) => Err(en(e)),
            },
            None => Ok(None),
        }
    }

    /// Get ready to create `name` in `parent`: the upper directory, with
    /// a whiteout at the name removed. Returns the directory and whether
    /// the new entry must be opaque (a directory replacing a lower one).
    fn prepare_create(&self, parent: u64, name: &[u8]) -> R<(Arc<OwnedFd>, bool)> {
        if name.len() > 255 {
            return Err(libc::ENAMETOOLONG);
        }
        let pu = self.upper_dir(parent)?;
        let mut opaque = false;
        if let Some(st) = Self::upper_entry(&pu, name)? {
            if !is_whiteout(&st) {
                return Err(libc::EEXIST);
            }
            rustix::fs::unlinkat(pu.as_fd(), name, AtFlags::empty()).map_err(en)?;
            opaque = self
                .lower_has(parent, name)?
                .is_some_and(|s| kind_of(&s) == FileKind::Dir);
        } else if self.lower_has(parent, name)?.is_some() {
            return Err(libc::EEXIST);
        }
        Ok((pu, opaque))
    }

    /// After creating `name` in `pu` for caller (`uid`, `gid`): owner,
    /// opaque marker, then the lookup it counts as.
    fn finish_create(
        &self,
        parent: u64,
        pu: &OwnedFd,
        name: &[u8],
        caller: (u32, u32),
        opaque: bool,
        ovr: Option<Override>,
    ) -> R<Attr> {
        // Made by the daemon: already its owner's (and the parent's group
        // where the parent is setgid), which is right for a caller with
        // the same ids.
        let own = caller == self.ids;
        if !self.opts.fake_owner && !own {
            let st = rustix::fs::fstat(pu).map_err(en)?;
            let gid = if st.st_mode as u32 & libc::S_ISGID != 0 {
                None
            } else {
                Some(rustix::fs::Gid::from_raw(caller.1))
            };
            rustix::fs::chownat(
                pu.as_fd(),
                name,
                Some(rustix::fs::Uid::from_raw(caller.0)),
                gid,
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(en)?;
        }
        if opaque {
            self.mark_opaque(pu.as_fd(), name)?;
        }
        if let Some(o) = &ovr {
            write_override(pu.as_fd(), name, o)?;
        }
        let st = rustix::fs::statat(pu.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW).map_err(en)?;
        let kind = kind_of(&st);
        let fd = if kind == FileKind::Dir {
            Some(Arc::new(open_dir(pu.as_fd(), name)?))
        } else {
            None
        };
        let ino = Self::fuse_ino(st.st_ino as u64);
        {
            // A recycled inode number: the old entry is gone.
            let mut t = self.table();
            if t.inodes.get(&ino).is_some_and(|old| old.aliases.is_empty()) {
                t.remove_inode(ino);
            }
        }
        self.remember(
            parent,
            name,
            ino,
            &st,
            Inode {
                nlookup: 0,
                aliases: Vec::new(),
                stored: kind,
                upper: true,
                lower: false,
                ufd: fd,
                lfd: None,
                no_xattrs: ovr.is_none() && !opaque,
                ovr,
            },
        )
    }

    /// `mkdir`.
    pub fn mkdir(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        caller: (u32, u32),
    ) -> R<Attr> {
        let (pu, opaque) = self.prepare_create(parent, name)?;
        rustix::fs::mkdirat(
            pu.as_fd(),
            name,
            Mode::from_raw_mode(mode & !umask & 0o7777),
        )
        .map_err(en)?;
        self.finish_create(parent, &pu, name, caller, opaque, None)
    }

    /// `mknod`: a device is recorded when the caller cannot make one.
    pub fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
        caller: (u32, u32),
    ) -> R<Attr> {
        let (pu, opaque) = self.prepare_create(parent, name)?;
        let kind = FileKind::from_mode(mode).unwrap_or(FileKind::File);
        let perm = mode & !umask & 0o7777;
        let dev = make_dev(
            (rdev >> 8) & 0xfff,
            (rdev & 0xff) | ((rdev >> 12) & 0xfff00),
        );
        let mut ovr = None;
        if kind.is_device() && self.opts.fake_owner {
            create_empty(pu.as_fd(), name, 0o600)?;
            ovr = Some(Override {
                uid: caller.0,
                gid: caller.1,
                mode: perm,
                kind: Some((kind, dev)),
            });
        } else if kind == FileKind::File {
            create_empty(pu.as_fd(), name, perm)?;
        } else {
            rustix::fs::mknodat(
                pu.as_fd(),
                name,
                rtype(kind),
                Mode::from_raw_mode(perm),
                dev,
            )
            .map_err(en)?;
        }
        self.finish_create(parent, &pu, name, caller, opaque, ovr)
    }

    /// `symlink`.
    pub fn symlink(&self, parent: u64, name: &[u8], target: &[u8], caller: (u32, u32)) -> R<Attr> {
        let (pu, opaque) = self.prepare_create(parent, name)?;
        rustix::fs::symlinkat(target, pu.as_fd(), name).map_err(en)?;
        self.finish_create(parent, &pu, name, caller, opaque, None)
    }

    /// `create`: make and open a regular file.
    pub fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        flags: i32,
        caller: (u32, u32),
    ) -> R<(Attr, Opened)> {
        let (pu, opaque) = self.prepare_create(parent, name)?;
        let fd = rustix::fs::openat(
            pu.as_fd(),
            name,
            self.open_flags(flags) | OFlags::CREATE | OFlags::EXCL,
            Mode::from_raw_mode(mode & !umask & 0o7777),
        )
        .map_err(en)?;
        let attr = self.finish_create(parent, &pu, name, caller, opaque, None)?;
        Ok((attr, self.new_handle(fd)))
    }

    fn open_flags(&self, flags: i32) -> OFlags {
        let mut f = OFlags::from_bits_retain(flags as u32)
            & !(OFlags::CREATE | OFlags::EXCL | OFlags::NOCTTY | OFlags::TRUNC);
        if self.opts.writeback {
            // The kernel reads pages of files opened write-only and keeps
            // appends itself.
            if f & OFlags::RWMODE == OFlags::WRONLY {
                f = (f & !OFlags::RWMODE) | OFlags::RDWR;
            }
            f &= !OFlags::APPEND;
        }
        f | OFlags::CLOEXEC | OFlags::NOFOLLOW
    }

    fn new_handle(&self, fd: OwnedFd) -> Opened {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let fd = Arc::new(fd);
        let h = Arc::new(Handle::File(fd.clone()));
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, h);
        Opened { fh, fd }
    }

    /// `open`: copy up first when the file is opened for writing.
    pub fn open(&self, ino: u64, flags: i32) -> R<Opened> {
        let acc = flags & libc::O_ACCMODE;
        if acc != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            self.copy_up_with(ino, flags & libc::O_TRUNC == 0)?;
        }
        let l = self.loc(ino)?;
        let fd = rustix::fs::openat(
            l.dir.as_fd(),
            &*l.name,
            self.open_flags(flags),
            Mode::empty(),
        )
        .map_err(en)?;
        if flags & libc::O_TRUNC != 0 {
            rustix::fs::ftruncate(&fd, 0).map_err(en)?;
        }
        Ok(self.new_handle(fd))
    }

    fn fd(&self, fh: u64) -> R<Arc<Handle>> {
        self.file(fh).ok_or(libc::EBADF)
    }

    /// `read` into `buf`; returns the bytes read.
    pub fn read(&self, fh: u64, offset: u64, buf: &mut [u8]) -> R<usize> {
        match &*self.fd(fh)? {
            Handle::File(fd) => {
                let mut got = 0;
                while got < buf.len() {
                    let n =
                        rustix::io::pread(fd, &mut buf[got..], offset + got as u64).map_err(en)?;
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                Ok(got)
            }
            Handle::Dir(_) => Err(libc::EISDIR),
        }
    }

    /// `write`; returns the bytes written.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> R<usize> {
        match &*self.fd(fh)? {
            Handle::File(fd) => {
                let mut done = 0;
                while done < data.len() {
                    done +=
                        rustix::io::pwrite(fd, &data[done..], offset + done as u64).map_err(en)?;
                }
                Ok(done)
            }
            Handle::Dir(_) => Err(libc::EISDIR),
        }
    }

    /// `release` / `releasedir`.
    pub fn release(&self, fh: u64) {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh);
    }

    /// `fsync`.
    pub fn fsync(&self, fh: u64, datasync: bool) -> R<()> {
        match &*self.fd(fh)? {
            Handle::File(fd) if datasync => rustix::fs::fdatasync(fd).map_err(en),
            Handle::File(fd) => rustix::fs::fsync(fd).map_err(en),
            Handle::Dir(_) => Ok(()),
        }
    }

    /// `fallocate`.
    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> R<()> {
        match &*self.fd(fh)? {
            Handle::File(fd) => rustix::fs::fallocate(
                fd,
                rustix::fs::FallocateFlags::from_bits_retain(mode as u32),
                offset,
                len,
            )
            .map_err(en),
            Handle::Dir(_) => Err(libc::EISDIR),
        }
    }

    /// `lseek` (`SEEK_DATA`, `SEEK_HOLE`; the kernel does the others).
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> R<i64> {
        let Handle::File(fd) = &*self.fd(fh)? else {
            return Err(libc::EISDIR);
        };
        let pos = match whence {
            libc::SEEK_DATA => rustix::fs::SeekFrom::Data(offset as u64),
            libc::SEEK_HOLE => rustix::fs::SeekFrom::Hole(offset as u64),
            libc::SEEK_SET => rustix::fs::SeekFrom::Start(offset as u64),
            libc::SEEK_END => rustix::fs::SeekFrom::End(offset),
            _ => return Err(libc::EINVAL),
        };
        rustix::fs::seek(fd, pos).map(|p| p as i64).map_err(en)
    }

    /// `copy_file_range` between two open files.
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> R<usize> {
        let (a, b) = (self.fd(fh_in)?, self.fd(fh_out)?);
        let (Handle::File(a), Handle::File(b)) = (&*a, &*b) else {
            return Err(libc::EISDIR);
        };
        let (mut i, mut o) = (off_in, off_out);
        rustix::fs::copy_file_range(a, Some(&mut i), b, Some(&mut o), len as usize).map_err(en)
    }

    /// `readlink`.
    pub fn readlink(&self, ino: u64) -> R<Vec<u8>> {
        let l = self.loc(ino)?;
        rustix::fs::readlinkat(l.dir.as_fd(), &*l.name, Vec::new())
            .map(|c| c.into_bytes())
            .map_err(en)
    }

    /// `setattr`: copy-up first; ownership recorded when faked.
    pub fn setattr(&self, ino: u64, fh: Option<u64>, set: &SetAttr) -> R<Attr> {
        self.copy_up(ino)?;
        let l = self.loc(ino)?;
        let kind = self.stored_kind(ino)?;
        if let Some(size) = set.size {
            match fh.and_then(|fh| self.file(fh)).as_deref() {
                Some(Handle::File(fd)) => rustix::fs::ftruncate(&**fd, size).map_err(en)?,
                Some(Handle::Dir(_)) => return Err(libc::EISDIR),
                None => {
                    let fd = rustix::fs::openat(
                        l.dir.as_fd(),
                        &*l.name,
                        OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(en)?;
                    rustix::fs::ftruncate(&fd, size).map_err(en)?;
                }
            }
        }
        let st = self.stat_loc(&l)?;
        let recordable = matches!(kind, FileKind::File | FileKind::Dir);
        let mut ovr = self.ovr_of(ino);
        if self.opts.fake_owner && (set.uid.is_some() || set.gid.is_some()) && recordable {
            let cur = ovr.unwrap_or(Override {
                uid: st.st_uid,
                gid: st.st_gid,
                mode: st.st_mode & 0o7777,
                kind: None,
            });
            let mut mode = cur.mode;
            // chown drops setuid, and setgid of a group-executable file.
            if kind != FileKind::Dir {
                mode &= !libc::S_ISUID;
                if mode & 0o010 != 0 {
                    mode &= !libc::S_ISGID;
                }
            }
            ovr = Some(Override {
                uid: set.uid.unwrap_or(cur.uid),
                gid: set.gid.unwrap_or(cur.gid),
                mode,
                kind: cur.kind,
            });
        } else if !self.opts.fake_owner && (set.uid.is_some() || set.gid.is_some()) {
            rustix::fs::chownat(
                l.dir.as_fd(),
                &*l.name,
                set.uid.map(rustix::fs::Uid::from_raw),
                set.gid.map(rustix::fs::Gid::from_raw),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(en)?;
        }
        if let Some(mode) = set.mode {
            let perm = mode & 0o7777;
            if kind != FileKind::Symlink {
                match &mut ovr {
                    Some(o) if self.opts.fake_owner => {
                        o.mode = perm;
                        // The real file stays usable by its real owner.
                        rustix::fs::chmodat(
                            l.dir.as_fd(),
                            &*l.name,
                            Mode::from_raw_mode((perm & 0o777) | 0o600),
                            AtFlags::empty(),
                        )
                        .map_err(en)?;
                    }
                    _ if self.opts.fake_owner && perm & 0o6000 != 0 && recordable => {
                        ovr = Some(Override {
                            uid: st.st_uid,
                            gid: st.st_gid,
                            mode: perm,
                            kind: None,
                        });
                        rustix::fs::chmodat(
                            l.dir.as_fd(),
                            &*l.name,
                            Mode::from_raw_mode(perm & 0o1777),
                            AtFlags::empty(),
                        )
                        .map_err(en)?;
                    }
                    _ => rustix::fs::chmodat(
                        l.dir.as_fd(),
                        &*l.name,
                        Mode::from_raw_mode(perm),
                        AtFlags::empty(),
                    )
                    .map_err(en)?,
                }
            }
        }
        if self.opts.fake_owner && ovr != self.ovr_of(ino) {
            if let Some(o) = &ovr {
                ovr = store_override(l.dir.as_fd(), &l.name, o, &self.stat_loc(&l)?)?;
            }
            let mut t = self.table();
            if let Some(n) = t.inodes.get_mut(&ino) {
                n.ovr = ovr;
            }
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let conv = |t: Option<SetTime>| match t {
                None => Timespec {
                    tv_sec: 0,
                    tv_nsec: rustix::fs::UTIME_OMIT,
                },
                Some(SetTime::Now) => Timespec {
                    tv_sec: 0,
                    tv_nsec: rustix::fs::UTIME_NOW,
                },
                Some(SetTime::At(t)) => ts(t),
            };
            let times = Timestamps {
                last_access: conv(set.atime),
                last_modification: conv(set.mtime),
            };
            if &*l.name == b"." {
                rustix::fs::utimensat(
                    rustix::fs::CWD,
                    proc_path(l.dir.as_fd(), b"."),
                    &times,
                    AtFlags::empty(),
                )
                .map_err(en)?;
            } else {
                rustix::fs::utimensat(l.dir.as_fd(), &*l.name, &times, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(en)?;
            }
        }
        self.getattr(ino, fh)
    }

    /// The entries of directory `ino` as the union shows them.
    fn list(&self, ino: u64) -> R<Vec<DirEntry>> {
        let (pu, pl) = self.dir_fds(ino)?;
        let parent = {
            let t = self.table();
            t.inodes
                .get(&ino)
                .and_then(|n| n.aliases.first().map(|a| a.0))
                .unwrap_or(ROOT)
        };
        let mut out = vec![
            DirEntry {
                ino,
                kind: Some(FileKind::Dir),
                name: Box::from(&b"."[..]),
            },
            DirEntry {
                ino: parent,
                kind: Some(FileKind::Dir),
                name: Box::from(&b".."[..]),
            },
        ];
        let mut hidden: HashSet<Box<[u8]>> = HashSet::new();
        let merged = pl.is_some();
        if let Some(pu) = &pu {
            let dir = read_dir(pu.as_fd())?;
            for e in dir {
                let e = e.map_err(en)?;
                let name = e.file_name().to_bytes();
                if name == b"." || name == b".." {
                    continue;
                }
                let mut kind = kind_from_dt(e.file_type());
                if kind == Some(FileKind::CharDevice) || kind.is_none() {
                    let st = rustix::fs::statat(pu.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(en)?;
                    if is_whiteout(&st) {
                        hidden.insert(Box::from(name));
                        continue;
                    }
                    kind = Some(kind_of(&st));
                }
                let mut d_ino = Self::fuse_ino(e.ino());
                if merged || self.opts.fake_owner {
                    let m = self.marks(pu.as_fd(), name, kind.unwrap_or(FileKind::File))?;
                    if let Some(o) = m.origin {
                        d_ino = Self::fuse_ino(o);
                    }
                    if let (Some(o), Some(k)) = (m.ovr, kind) {
                        kind = Some(effective_kind(k, 0, &o).0);
                    }
                }
                hidden.insert(Box::from(name));
                out.push(DirEntry {
                    ino: d_ino,
                    kind,
                    name: Box::from(name),
                });
            }
        }
        if let Some(pl) = &pl {
            let dir = read_dir(pl.as_fd())?;
            for e in dir {
                let e = e.map_err(en)?;
                let name = e.file_name().to_bytes();
                if name == b"." || name == b".." || hidden.contains(name) {
                    continue;
                }
                let mut kind = kind_from_dt(e.file_type());
                if self.opts.fake_owner && kind == Some(FileKind::File) {
                    // A placeholder says in its xattr what it stands for.
                    if let Some(o) = self.marks(pl.as_fd(), name, FileKind::File)?.ovr {
                        kind = Some(effective_kind(FileKind::File, 0, &o).0);
                    }
                }
                out.push(DirEntry {
                    ino: Self::fuse_ino(e.ino()),
                    kind,
                    name: Box::from(name),
                });
            }
        }
        Ok(out)
    }

    /// `opendir`: the listing is taken now.
    pub fn opendir(&self, ino: u64) -> R<u64> {
        let entries = self.list(ino)?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, Arc::new(Handle::Dir(entries)));
        Ok(fh)
    }

    /// Entries of an open directory from `offset` on (offset of entry i
    /// is i + 1).
    pub fn readdir(
        &self,
        fh: u64,
        offset: u64,
        mut each: impl FnMut(u64, &DirEntry) -> bool,
    ) -> R<()> {
        let h = self.fd(fh)?;
        let Handle::Dir(entries) = &*h else {
            return Err(libc::ENOTDIR);
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if each(i as u64 + 1, e) {
                break;
            }
        }
        Ok(())
    }

    /// Is directory `ino` empty as the union shows it?
    fn is_empty_dir(&self, ino: u64) -> R<bool> {
        Ok(self.list(ino)?.len() <= 2)
    }

    /// Remove the whiteouts left in upper directory (`pu`, `name`) so it
    /// can be removed or replaced.
    fn clear_whiteouts(pu: &OwnedFd, name: &[u8]) -> R<()> {
        let d = match open_dir(pu.as_fd(), name) {
            Ok(d) => d,
            Err(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
        let names: Vec<Vec<u8>> = read_dir(d.as_fd())?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_bytes().to_vec())
            .filter(|n| n != b"." && n != b"..")
            .collect();
        for n in names {
            rustix::fs::unlinkat(d.as_fd(), &*n, AtFlags::empty()).map_err(en)?;
        }
        Ok(())
    }

    fn whiteout(&self, pu: &OwnedFd, name: &[u8]) -> R<()> {
        rustix::fs::mknodat(
            pu.as_fd(),
            name,
            RFileType::CharacterDevice,
            Mode::empty(),
            0,
        )
        .map_err(en)
    }

    fn drop_alias(&self, parent: u64, name: &[u8]) {
        self.table().remove_alias(parent, name);
    }

    /// The inode at `name` in `parent`, resolved (not counted as a
    /// lookup) if the table lacks it.
    fn child(&self, parent: u64, name: &[u8]) -> R<u64> {
        if let Some(i) = self.table().names.get(&(parent, Box::from(name))) {
            return Ok(*i);
        }
        let (ino, _st, found) = self.resolve(parent, name)?;
        let mut t = self.table();
        if t.inodes.get(&ino).is_none_or(|n| n.stored != found.stored) {
            t.remove_inode(ino);
            t.inodes.insert(ino, found);
        }
        t.add_alias(ino, (parent, Box::from(name)));
        Ok(ino)
    }

    /// `unlink` and `rmdir`.
    pub fn remove(&self, parent: u64, name: &[u8], dir: bool) -> R<()> {
        let ino = self.child(parent, name)?;
        let kind = self.stored_kind(ino)?;
        if dir && kind != FileKind::Dir {
            return Err(libc::ENOTDIR);
        }
        if !dir && kind == FileKind::Dir {
            return Err(libc::EISDIR);
        }
        if dir && !self.is_empty_dir(ino)? {
            return Err(libc::ENOTEMPTY);
        }
        let pu = self.upper_dir(parent)?;
        let lower = self.lower_has(parent, name)?.is_some();
        if let Some(st) = Self::upper_entry(&pu, name)? {
            if !is_whiteout(&st) {
                if dir {
                    Self::clear_whiteouts(&pu, name)?;
                    rustix::fs::unlinkat(pu.as_fd(), name, AtFlags::REMOVEDIR).map_err(en)?;
                } else {
                    rustix::fs::unlinkat(pu.as_fd(), name, AtFlags::empty()).map_err(en)?;
                }
            }
        }
        if lower {
            self.whiteout(&pu, name)?;
        }
        self.drop_alias(parent, name);
        Ok(())
    }

    /// `rename`; a directory with lower content is `EXDEV` (the caller
    /// copies), as with kernel overlayfs without `redirect_dir`.
    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> R<()> {
        if flags & !(libc::RENAME_NOREPLACE) != 0 {
            return Err(libc::EINVAL);
        }
        if newname.len() > 255 {
            return Err(libc::ENAMETOOLONG);
        }
        let ino = self.child(parent, name)?;
        let (kind, has_lower) = {
            let t = self.table();
            let n = t.inodes.get(&ino).ok_or(libc::ESTALE)?;
            (n.stored, n.lower || !n.upper)
        };
        if kind == FileKind::Dir && has_lower {
            return Err(libc::EXDEV);
        }
        // What the target is now.
        let target = match self.child(newparent, newname) {
            Ok(t) => Some(t),
            Err(libc::ENOENT) => None,
            Err(e) => return Err(e),
        };
        if let Some(t) = target {
            if t == ino {
                return Ok(());
            }
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(libc::EEXIST);
            }
            let tkind = self.stored_kind(t)?;
            match (kind == FileKind::Dir, tkind == FileKind::Dir) {
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (true, true) if !self.is_empty_dir(t)? => return Err(libc::ENOTEMPTY),
                _ => {}
            }
        }
        self.copy_up(ino)?;
        let npu = self.upper_dir(newparent)?;
        let pu = self.upper_dir(parent)?;
        let target_lower = self.lower_has(newparent, newname)?;
        match Self::upper_entry(&npu, newname)? {
            Some(st) if is_whiteout(&st) => {
                rustix::fs::unlinkat(npu.as_fd(), newname, AtFlags::empty()).map_err(en)?;
            }
            Some(st) if kind_of(&st) == FileKind::Dir => {
                Self::clear_whiteouts(&npu, newname)?;
            }
            _ => {}
        }
        rustix::fs::renameat_with(pu.as_fd(), name, npu.as_fd(), newname, RRename::empty())
            .map_err(en)?;
        if kind == FileKind::Dir
            && target_lower
                .as_ref()
                .is_some_and(|s| kind_of(s) == FileKind::Dir)
        {
            self.mark_opaque(npu.as_fd(), newname)?;
        }
        if self.lower_has(parent, name)?.is_some() {
            self.whiteout(&pu, name)?;
        }
        let mut t = self.table();
        t.remove_alias(newparent, newname);
        t.remove_alias(parent, name);
        t.add_alias(ino, (newparent, Box::from(newname)));
        if let Some(n) = t.inodes.get_mut(&ino) {
            // The new path first: it is the one the entry is reached by.
            n.aliases.rotate_right(1);
            if kind == FileKind::Dir {
                // Its fd follows the directory.
                n.lower = false;
                n.lfd = None;
            }
        }
        Ok(())
    }

    /// `link`: the source is copied up, then linked in the upper layer.
    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> R<Attr> {
        let kind = self.stored_kind(ino)?;
        if kind == FileKind::Dir {
            return Err(libc::EPERM);
        }
        self.copy_up(ino)?;
        let (npu, _) = self.prepare_create(newparent, newname)?;
        let l = self.loc(ino)?;
        rustix::fs::linkat(
            l.dir.as_fd(),
            &*l.name,
            npu.as_fd(),
            newname,
            AtFlags::empty(),
        )
        .map_err(en)?;
        let st = self.stat_loc(&l)?;
        {
            let mut t = self.table();
            if let Some(n) = t.inodes.get_mut(&ino) {
                n.nlookup += 1;
            }
            t.add_alias(ino, (newparent, Box::from(newname)));
        }
        Ok(self.attr_of(ino, &st, self.ovr_of(ino).as_ref()))
    }

    /// `statfs` of the upper layer's filesystem.
    pub fn statfs(&self) -> R<rustix::fs::StatVfs> {
        let (u, _) = self.dir_fds(ROOT)?;
        let u = u.ok_or(libc::EIO)?;
        let fd = rustix::fs::openat(
            u.as_fd(),
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(en)?;
        rustix::fs::fstatvfs(&fd).map_err(en)
    }

    /// `getxattr` (`size` 0: the length only).
    pub fn getxattr(&self, ino: u64, name: &[u8], size: usize) -> R<Vec<u8>> {
        if self.internal_xattr(name) || self.table().inodes.get(&ino).is_some_and(|n| n.no_xattrs) {
            return Err(libc::ENODATA);
        }
        let l = self.loc(ino)?;
        let p = proc_path(l.dir.as_fd(), &l.name);
        let len = rustix::fs::lgetxattr(&p, name, &mut [0u8; 0][..]).map_err(en)?;
        if size == 0 {
            return Ok(vec![0; len]);
        }
        let mut v = vec![0u8; len];
        let n = rustix::fs::lgetxattr(&p, name, &mut v[..]).map_err(en)?;
        v.truncate(n);
        Ok(v)
    }

    /// `listxattr`: the names, NUL-terminated, without the internal ones.
    pub fn listxattr(&self, ino: u64) -> R<Vec<u8>> {
        let l = self.loc(ino)?;
        let p = proc_path(l.dir.as_fd(), &l.name);
        let len = match rustix::fs::llistxattr(&p, &mut [0u8; 0][..]) {
            Ok(n) => n,
            Err(rustix::io::Errno::NOTSUP) => 0,
            Err(e) => return Err(en(e)),
        };
        let mut v = vec![0u8; len];
        let n = if len > 0 {
            rustix::fs::llistxattr(&p, &mut v[..]).map_err(en)?
        } else {
            0
        };
        let mut out = Vec::with_capacity(n);
        for x in v[..n].split(|b| *b == 0).filter(|x| !x.is_empty()) {
            if !self.internal_xattr(x) {
                out.extend_from_slice(x);
                out.push(0);
            }
        }
        Ok(out)
    }

    /// `setxattr` (copy-up first). With recorded ownership, setting
    /// `user.containers.override_stat` records what it says (the way to
    /// make a device unprivileged: the kernel refuses `mknod` of one
    /// before the filesystem is asked).
    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> R<()> {
        if self.opts.fake_owner && name == OVERRIDE_XATTR.as_bytes() {
            let o = Override::parse(value).ok_or(libc::EINVAL)?;
            self.copy_up(ino)?;
            let l = self.loc(ino)?;
            let stored = self.stored_kind(ino)?;
            if o.kind.is_some_and(|(k, _)| k != stored)
                && (stored != FileKind::File || self.stat_loc(&l)?.st_size != 0)
            {
                // Only an empty regular file can stand for another type.
                return Err(libc::EINVAL);
            }
            write_override(l.dir.as_fd(), &l.name, &o)?;
            if let Some(n) = self.table().inodes.get_mut(&ino) {
                n.ovr = Some(o);
                n.no_xattrs = false;
            }
            return Ok(());
        }
        if self.internal_xattr(name) {
            return Err(libc::EPERM);
        }
        if name == b"system.posix_acl_access" {
            if let Some(bits) = trivial_acl_mode(value) {
                // What a filesystem does with an ACL a mode can say: set
                // the mode, keep no ACL. Through setattr, so a recorded
                // mode (fake ownership) follows too.
                let perm = self.getattr(ino, None)?.perm as u32;
                let set = SetAttr {
                    mode: Some((perm & 0o7000) | bits),
                    ..SetAttr::default()
                };
                return self.setattr(ino, None, &set).map(drop);
            }
        }
        self.copy_up(ino)?;
        let l = self.loc(ino)?;
        if let Some(n) = self.table().inodes.get_mut(&ino) {
            n.no_xattrs = false;
        }
        rustix::fs::lsetxattr(
            proc_path(l.dir.as_fd(), &l.name),
            name,
            value,
            XattrFlags::from_bits_retain(flags as u32),
        )
        .map_err(en)
    }

    /// `removexattr` (copy-up first).
    pub fn removexattr(&self, ino: u64, name: &[u8]) -> R<()> {
        if self.internal_xattr(name) {
            return Err(libc::ENODATA);
        }
        self.copy_up(ino)?;
        let l = self.loc(ino)?;
        rustix::fs::lremovexattr(proc_path(l.dir.as_fd(), &l.name), name).map_err(en)
    }
}

/// A name as bytes.
pub fn bytes(name: &OsStr) -> &[u8] {
    name.as_bytes()
}

#[cfg(test)]
mod tests {
    use super::trivial_acl_mode;

    #[test]
    fn an_acl_a_mode_can_say_is_read_as_that_mode() {
        // What sed -i sets on its temporary file for a 0644 original.
        let acl = b"\x02\0\0\0\x01\0\x06\0\xff\xff\xff\xff\x04\0\x04\0\xff\xff\xff\xff\x20\0\x04\0\xff\xff\xff\xff";
        assert_eq!(trivial_acl_mode(acl), Some(0o644));
        // A named user entry (and the mask it needs) is a real ACL.
        let mut named = acl.to_vec();
        named.extend_from_slice(b"\x02\0\x07\0\xe8\x03\0\0\x10\0\x07\0\xff\xff\xff\xff");
        assert_eq!(trivial_acl_mode(&named), None);
        assert_eq!(trivial_acl_mode(&acl[..20]), None);
        let mut twice = acl.to_vec();
        twice[12..14].copy_from_slice(b"\x01\0");
        assert_eq!(trivial_acl_mode(&twice), None);
    }
}
