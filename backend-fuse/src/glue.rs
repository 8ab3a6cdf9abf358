//! The one file that knows the FUSE library (fuser 0.18): it turns its
//! requests into calls of [`crate::union::Union`] and the results into its
//! replies. A new fuser API is a change here only.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackingId, BsdFileFlags, Config, CopyFileRangeFlags, Errno, FileAttr, FileHandle,
    FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner,
    MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, Session, TimeOrNow, WriteFlags,
};
use layerpack_core::model::FileKind;

use crate::union::{Attr, SetAttr, SetTime, Union};

/// How long the kernel may trust entries and attributes: the base is
/// frozen during a session and every change passes through the daemon.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// Largest write the kernel sends.
const MAX_WRITE: u32 = 1 << 20;

/// What the mount asks of the kernel.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Request threads.
    pub threads: usize,
    /// Ask for FUSE passthrough (root only).
    pub passthrough: bool,
    /// Ask for the writeback cache (when there is no passthrough).
    pub writeback: bool,
    /// The daemon is root (device files and setuid bits work for real).
    pub root: bool,
}

struct Fs {
    u: Arc<Union>,
    tuning: Tuning,
    passthrough: AtomicBool,
    backing: Mutex<HashMap<u64, BackingId>>,
}

fn err(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn ftype(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
    }
}

fn fattr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: ftype(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(t),
    })
}

impl Fs {
    fn entry(&self, reply: ReplyEntry, r: crate::union::R<Attr>) {
        match r {
            Ok(a) => reply.entry(&TTL, &fattr(&a), Generation(0)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn open_reply(&self, reply: ReplyOpen, o: crate::union::Opened) {
        if self.passthrough.load(Ordering::Relaxed) {
            if let Ok(id) = reply.open_backing(&*o.fd) {
                // The kernel writes the backing file itself: no dirty
                // pages of ours to flush at close.
                reply.opened_passthrough(FileHandle(o.fh), FopenFlags::FOPEN_NOFLUSH, &id);
                self.backing
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(o.fh, id);
                return;
            }
        }
        reply.opened(FileHandle(o.fh), FopenFlags::FOPEN_KEEP_CACHE);
    }
}

thread_local! {
    static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for f in [
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_HANDLE_KILLPRIV,
            // The kernel then stops asking for security.capability before
            // every write.
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
            InitFlags::FUSE_DONT_MASK,
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_MAX_PAGES,
        ] {
            let _ = config.add_capabilities(f);
        }
        let mut passthrough = false;
        if self.tuning.passthrough
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            passthrough = true;
        }
        if !passthrough && self.tuning.writeback {
            let _ = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE);
        }
        self.passthrough.store(passthrough, Ordering::Relaxed);
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.u.counters.count("lookup");
        match self.u.lookup(parent.0, name.as_bytes()) {
            Ok(a) => reply.entry(&TTL, &fattr(&a), Generation(0)),
            // A negative entry the kernel may keep: nothing below a frozen
            // base appears except through us.
            Err(libc::ENOENT) => {
                let mut a = fattr(&Attr {
                    ino: 0,
                    size: 0,
                    blocks: 0,
                    atime: SystemTime::UNIX_EPOCH,
                    mtime: SystemTime::UNIX_EPOCH,
                    ctime: SystemTime::UNIX_EPOCH,
                    kind: FileKind::File,
                    perm: 0,
                    nlink: 0,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    blksize: 0,
                });
                a.ino = INodeNo(0);
                reply.entry(&TTL, &a, Generation(0))
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.u.counters.count("forget");
        self.u.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        self.u.counters.count("getattr");
        match self.u.getattr(ino.0, fh.map(|f| f.0)) {
            Ok(a) => reply.attr(&TTL, &fattr(&a)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.u.counters.count("setattr");
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        match self.u.setattr(ino.0, fh.map(|f| f.0), &set) {
            Ok(a) => reply.attr(&TTL, &fattr(&a)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.u.counters.count("readlink");
        match self.u.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(err(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.u.counters.count("mknod");
        let r = self.u.mknod(
            parent.0,
            name.as_bytes(),
            mode,
            umask,
            rdev,
            (req.uid(), req.gid()),
        );
        self.entry(reply, r)
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.u.counters.count("mkdir");
        let r = self.u.mkdir(
            parent.0,
            name.as_bytes(),
            mode,
            umask,
            (req.uid(), req.gid()),
        );
        self.entry(reply, r)
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.u.counters.count("unlink");
        match self.u.remove(parent.0, name.as_bytes(), false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.u.counters.count("rmdir");
        match self.u.remove(parent.0, name.as_bytes(), true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.u.counters.count("symlink");
        let r = self.u.symlink(
            parent.0,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
            (req.uid(), req.gid()),
        );
        self.entry(reply, r)
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.u.counters.count("rename");
        match self.u.rename(
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            flags.bits(),
        ) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.u.counters.count("link");
        let r = self.u.link(ino.0, newparent.0, newname.as_bytes());
        self.entry(reply, r)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.u.counters.count("open");
        match self.u.open(ino.0, flags.0) {
            Ok(o) => self.open_reply(reply, o),
            Err(e) => reply.error(err(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.u.counters.count("read");
        BUF.with(|b| {
            let mut b = b.borrow_mut();
            if b.len() < size as usize {
                b.resize(size as usize, 0);
            }
            match self.u.read(fh.0, offset, &mut b[..size as usize]) {
                Ok(n) => reply.data(&b[..n]),
                Err(e) => reply.error(err(e)),
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.u.counters.count("write");
        match self.u.write(fh.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(err(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to do: writes reach the layer before they are answered,
        // and the kernel writes its cached pages back before it would send
        // this. ENOSYS makes it stop sending FLUSH at every close.
        self.u.counters.count("flush");
        reply.error(err(libc::ENOSYS))
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.u.counters.count("release");
        self.backing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        self.u.release(fh.0);
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.u.counters.count("fsync");
        match self.u.fsync(fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.u.counters.count("opendir");
        match self.u.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.u.counters.count("readdir");
        let r = self.u.readdir(fh.0, offset, |off, e| {
            reply.add(
                INodeNo(e.ino),
                off,
                ftype(e.kind.unwrap_or(FileKind::File)),
                OsStr::from_bytes(&e.name),
            )
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.u.counters.count("readdirplus");
        let r = self.u.readdir(fh.0, offset, |off, e| {
            let name = OsStr::from_bytes(&e.name);
            if &*e.name == b"." || &*e.name == b".." {
                // The kernel takes no entry for these: no lookup is counted.
                let a = match self
                    .u
                    .getattr(if &*e.name == b"." { ino.0 } else { e.ino }, None)
                {
                    Ok(a) => a,
                    Err(_) => return false,
                };
                return reply.add(INodeNo(e.ino), off, name, &TTL, &fattr(&a), Generation(0));
            }
            match self.u.lookup(ino.0, &e.name) {
                Ok(a) => {
                    let full =
                        reply.add(INodeNo(a.ino), off, name, &TTL, &fattr(&a), Generation(0));
                    if full {
                        // Not sent: not a lookup the kernel knows of.
                        self.u.forget(a.ino, 1);
                    }
                    full
                }
                // Gone since the listing was taken.
                Err(_) => false,
            }
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.u.counters.count("releasedir");
        self.u.release(fh.0);
        reply.ok()
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.u.counters.count("statfs");
        match self.u.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.u.counters.count("setxattr");
        match self.u.setxattr(ino.0, name.as_bytes(), value, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.u.counters.count("getxattr");
        match self.u.getxattr(ino.0, name.as_bytes(), size as usize) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(err(libc::ERANGE)),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(err(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.u.counters.count("listxattr");
        match self.u.listxattr(ino.0) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(err(libc::ERANGE)),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(err(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.u.counters.count("removexattr");
        match self.u.removexattr(ino.0, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The mount is the caller's own (no allow_other): like fakeroot,
        // the install may do what the daemon may.
        self.u.counters.count("access");
        match self.u.getattr(ino.0, None) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.u.counters.count("create");
        match self.u.create(
            parent.0,
            name.as_bytes(),
            mode,
            umask,
            flags,
            (req.uid(), req.gid()),
        ) {
            Ok((a, o)) => {
                if self.passthrough.load(Ordering::Relaxed) {
                    if let Ok(id) = reply.open_backing(&*o.fd) {
                        reply.created_passthrough(
                            &TTL,
                            &fattr(&a),
                            Generation(0),
                            FileHandle(o.fh),
                            FopenFlags::FOPEN_NOFLUSH,
                            &id,
                        );
                        self.backing
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(o.fh, id);
                        return;
                    }
                }
                reply.created(
                    &TTL,
                    &fattr(&a),
                    Generation(0),
                    FileHandle(o.fh),
                    FopenFlags::FOPEN_KEEP_CACHE,
                )
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.u.counters.count("fallocate");
        match self.u.fallocate(fh.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        self.u.counters.count("lseek");
        match self.u.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(err(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.u.counters.count("copy_file_range");
        match self
            .u
            .copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len)
        {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(err(e)),
        }
    }
}

/// Mount `u` on `mountpoint` and return a function that serves it until
/// it is unmounted. The mount exists (and answers) once this returns.
pub fn mount(
    u: Arc<Union>,
    mountpoint: &Path,
    tuning: Tuning,
    fsname: &str,
) -> std::io::Result<impl FnOnce() -> std::io::Result<()>> {
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName(fsname.to_string()),
        MountOption::Subtype("layerpack".into()),
        MountOption::RW,
        MountOption::Exec,
    ];
    if tuning.root {
        cfg.mount_options
            .extend([MountOption::Dev, MountOption::Suid]);
    }
    cfg.n_threads = Some(tuning.threads.max(1));
    cfg.clone_fd = tuning.threads > 1;
    let fs = Fs {
        u,
        tuning,
        passthrough: AtomicBool::new(false),
        backing: Mutex::new(HashMap::new()),
    };
    let session = Session::new(fs, mountpoint, &cfg)?;
    Ok(move || session.run())
}
