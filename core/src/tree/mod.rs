//! Shared tree primitives: a fast ordered scan of a tree, and the change
//! rules applied to two ordered streams of entries.
//!
//! The scan walks depth-first with each directory's names sorted byte-wise,
//! which is exactly [`crate::model::path_cmp`] order, so two scans (or a scan
//! and a stored index) can be merged in one pass with memory bounded by the
//! widest directory rather than the size of the tree.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Seek};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use sha2::{Digest, Sha256};

pub mod fold;
pub mod override_stat;
pub mod upper;

use crate::model::{
    split_dev, Change, ChangeKind, ChangeSet, ChangeSetBuilder, FileKind, Meta, RelPath, Xattrs,
};
use crate::{Error, ErrorKind, Result};

/// Everything a scan learns about one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Path relative to the scanned root.
    pub path: RelPath,
    /// Entry type.
    pub kind: FileKind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns.
    pub mtime_ns: i64,
    /// Status-change time, ns.
    pub ctime_ns: i64,
    /// Inode number.
    pub ino: u64,
    /// Device the entry lives on.
    pub dev: u64,
    /// Link count.
    pub nlink: u64,
    /// Device number for device nodes.
    pub rdev: u64,
    /// Extended attributes, internal ones removed.
    pub xattrs: Xattrs,
    /// Symlink target.
    pub link_target: Option<Vec<u8>>,
    /// Content hash, when known.
    pub sha256: Option<[u8; 32]>,
}

impl Record {
    /// Stat `abs` (without following a final symlink) and read its xattrs
    /// and link target.
    pub fn read(abs: &Path, path: RelPath, with_xattrs: bool) -> Result<Record> {
        let md = fs::symlink_metadata(abs).map_err(|e| Error::io(abs, "cannot stat", e))?;
        Record::from_metadata(&|| abs.to_path_buf(), path, &md, with_xattrs)
    }

    /// `abs` gives the entry's full path; it is only built when needed
    /// (symlink targets, xattrs).
    fn from_metadata(
        abs: &dyn Fn() -> PathBuf,
        path: RelPath,
        md: &fs::Metadata,
        with_xattrs: bool,
    ) -> Result<Record> {
        let kind = FileKind::from_mode(md.mode()).ok_or_else(|| {
            Error::new(ErrorKind::InvalidInput, "unknown file type").with_path(abs())
        })?;
        let link_target = if kind == FileKind::Symlink {
            let abs = abs();
            Some(
                fs::read_link(&abs)
                    .map_err(|e| Error::io(&abs, "cannot read symlink", e))?
                    .into_os_string()
                    .into_encoded_bytes(),
            )
        } else {
            None
        };
        let mut xattrs = if with_xattrs {
            read_xattrs(&abs())?
        } else {
            Xattrs::new()
        };
        let (mut kind, mut rdev) = (kind, if kind.is_device() { md.rdev() } else { 0 });
        let (mut mode, mut uid, mut gid) = (md.mode() & 0o7777, md.uid(), md.gid());
        // Ownership an unprivileged install asked for (the FUSE backend
        // records it): what the entry is, for every reader.
        if let Some(v) = xattrs.remove(override_stat::XATTR.as_bytes()) {
            match override_stat::Override::parse(&v) {
                Some(_) if !override_stat::in_effect() => {}
                Some(o) => {
                    (kind, rdev) = override_stat::effective_kind(kind, rdev, &o);
                    (mode, uid, gid) = (o.mode, o.uid, o.gid);
                }
                None => {
                    return Err(Error::new(
                        ErrorKind::Corrupt,
                        format!(
                            "{} is not a record of the form uid:gid:mode[:type]: {:?}",
                            override_stat::XATTR,
                            String::from_utf8_lossy(&v)
                        ),
                    )
                    .with_path(abs()))
                }
            }
        }
        Ok(Record {
            path,
            kind,
            mode,
            uid,
            gid,
            size: if kind == FileKind::File || kind == FileKind::Symlink || kind == FileKind::Dir {
                md.size()
            } else {
                0
            },
            mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
            ino: md.ino(),
            dev: md.dev(),
            nlink: md.nlink(),
            rdev,
            xattrs,
            link_target,
            sha256: None,
        })
    }

    /// The metadata a change reports for this entry.
    pub fn to_meta(&self) -> Meta {
        Meta {
            kind: self.kind,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            size: self.size,
            mtime_ns: self.mtime_ns,
            rdev: self.kind.is_device().then(|| split_dev(self.rdev)),
            xattrs: self.xattrs.clone(),
            link_target: self.link_target.clone(),
            sha256: self.sha256,
            link_group: None,
        }
    }
}

/// True for xattrs that belong to a union filesystem, not to the content.
pub fn is_internal_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

/// All xattrs of `abs` (not following symlinks), internal ones dropped.
/// A filesystem without xattr support has none.
pub fn read_xattrs(abs: &Path) -> Result<Xattrs> {
    let mut out = Xattrs::new();
    let names = match xattr::list(abs) {
        Ok(n) => n,
        Err(e) if is_no_xattr_support(&e) => return Ok(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(abs, "cannot list xattrs", e)),
    };
    for name in names {
        let bytes = name.as_bytes();
        if is_internal_xattr(bytes) {
            continue;
        }
        match xattr::get(abs, &name) {
            Ok(Some(v)) => {
                out.insert(bytes.to_vec(), v);
            }
            Ok(None) => {}
            Err(e) if is_no_xattr_support(&e) => {}
            Err(e) => return Err(Error::io(abs, "cannot read xattr", e)),
        }
    }
    Ok(out)
}

fn is_no_xattr_support(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::ENODATA))
}

/// The data segments (offset, length) of an open regular file of `size`
/// bytes, found with `SEEK_DATA`/`SEEK_HOLE`; a filesystem without them
/// reports the whole file as data. The file offset is back at 0 after.
pub fn data_segments(f: &fs::File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let found = scan_segments(f, size);
    rustix::fs::seek(f, rustix::fs::SeekFrom::Start(0))?;
    found
}

fn scan_segments(f: &fs::File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use rustix::fs::SeekFrom;
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let data = match rustix::fs::seek(f, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL) if pos == 0 => return Ok(vec![(0, size)]),
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let hole = match rustix::fs::seek(f, SeekFrom::Hole(data)) {
            Ok(h) => h.min(size),
            Err(e) => return Err(e.into()),
        };
        if hole > data {
            out.push((data, hole - data));
        }
        pos = hole;
    }
    Ok(out)
}

pub(crate) static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// SHA-256 of a regular file's bytes, reading only its data: holes are
/// hashed as the zeros they read as. Refuses to follow a symlink.
pub fn hash_file(abs: &Path) -> Result<[u8; 32]> {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(abs)
        .map_err(|e| Error::io(abs, "cannot open for hashing", e))?;
    let size = f
        .metadata()
        .map_err(|e| Error::io(abs, "cannot stat", e))?
        .len();
    let segments = data_segments(&f, size).map_err(|e| Error::io(abs, "cannot read", e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 128 * 1024];
    let mut pos = 0u64;
    let zeros = |h: &mut Sha256, mut n: u64| {
        while n > 0 {
            let k = n.min(ZEROS.len() as u64) as usize;
            h.update(&ZEROS[..k]);
            n -= k as u64;
        }
    };
    for (off, len) in segments {
        zeros(&mut h, off - pos);
        f.seek(std::io::SeekFrom::Start(off))
            .map_err(|e| Error::io(abs, "cannot read", e))?;
        let mut left = len;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = f
                .read(&mut buf[..want])
                .map_err(|e| Error::io(abs, "cannot read", e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            left -= n as u64;
        }
        pos = off + len - left;
    }
    // What the file holds past the last segment (a hole, or bytes that
    // appeared since) reads as zeros up to the size seen.
    zeros(&mut h, size.saturating_sub(pos));
    Ok(h.finalize().into())
}

/// A path to `rel` under `root` the kernel accepts at any depth (see
/// [`crate::beneath::ShortPath`]), errors naming the full path.
pub fn reach(root: &Path, rel: &RelPath) -> Result<crate::beneath::ShortPath> {
    crate::beneath::reach(root, rel).map_err(|e| Error::io(rel.under(root), "cannot reach", e))
}

/// Lower-case hex of a hash.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Progress callback: called with the number of entries seen so far.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// How to scan.
#[derive(Clone)]
pub struct ScanOptions {
    /// Read extended attributes of every entry.
    pub xattrs: bool,
    /// Do not descend into directories on another filesystem.
    pub one_file_system: bool,
    /// Helper threads that list directories ahead of the consumer (0: the
    /// consumer lists everything itself).
    pub threads: usize,
    /// Called every few thousand entries.
    pub progress: Option<Progress>,
}

impl Default for ScanOptions {
    fn default() -> ScanOptions {
        ScanOptions {
            xattrs: true,
            one_file_system: true,
            threads: default_scan_threads(),
            progress: None,
        }
    }
}

/// One helper per core, at most 4: scanning is bound by `statx` in the
/// kernel, which scales with cores until the dentry cache contends.
pub fn default_scan_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().clamp(1, 4))
        .unwrap_or(1)
}

/// Listings done but not yet consumed, in entries, before helpers pause:
/// bounds memory to roughly this many records (~250 bytes each with their
/// paths). A consumer that hashes what it reads (`final`) keeps the
/// buffer full, so this is part of every `final`'s peak: 4 MB. Helpers
/// are ahead by hundreds of directories even so.
const MAX_BUFFERED: usize = 16 * 1024;

struct Job {
    id: u64,
    abs: PathBuf,
    rel: RelPath,
    /// The parent directory, open, when `abs` is too long for the kernel.
    parent: Option<Arc<OwnedFd>>,
}

struct Listing {
    records: Vec<Record>,
    /// For each record, the job that lists it, if it is a directory to
    /// descend into.
    jobs: Vec<Option<u64>>,
    /// This directory, open, when its path is too long for the kernel.
    own: Option<Arc<OwnedFd>>,
}

#[derive(Default)]
struct ScanState {
    queue: std::collections::VecDeque<Job>,
    next_id: u64,
    done: HashMap<u64, Result<Listing>>,
    buffered: usize,
    running: std::collections::HashSet<u64>,
    stop: bool,
}

struct Shared {
    root: PathBuf,
    state: Mutex<ScanState>,
    work: Condvar,
    finished: Condvar,
    opts: ScanOptions,
    root_dev: u64,
}

enum Frame {
    Pending(u64),
    Listing(std::iter::Zip<std::vec::IntoIter<Record>, std::vec::IntoIter<Option<u64>>>),
}

/// An ordered scan of a tree. Yields every entry below `root` (not `root`
/// itself) in [`crate::model::path_cmp`] order, as a depth-first walk with
/// sorted directories would; helper threads list and stat directories
/// ahead of the consumer, which takes any listing it needs that no helper
/// has started yet, so the scan never waits on a full buffer. Dropping the
/// iterator stops the helpers.
pub struct TreeScan {
    shared: Arc<Shared>,
    stack: Vec<Frame>,
    seen: u64,
    failed: bool,
}

impl TreeScan {
    /// Start scanning `root`, which must be a directory.
    pub fn start(root: &Path, opts: ScanOptions) -> Result<TreeScan> {
        let md = fs::metadata(root).map_err(|e| Error::io(root, "cannot read the root", e))?;
        if !md.is_dir() {
            return Err(
                Error::new(ErrorKind::InvalidInput, "the root is not a directory").with_path(root),
            );
        }
        fs::read_dir(root).map_err(|e| Error::io(root, "cannot list the root", e))?;
        let threads = opts.threads;
        let mut state = ScanState {
            next_id: 1,
            ..ScanState::default()
        };
        state.queue.push_back(Job {
            id: 0,
            abs: root.to_path_buf(),
            rel: RelPath::root(),
            parent: None,
        });
        let shared = Arc::new(Shared {
            root: root.to_path_buf(),
            state: Mutex::new(state),
            work: Condvar::new(),
            finished: Condvar::new(),
            opts,
            root_dev: md.dev(),
        });
        for _ in 0..threads {
            let sh = shared.clone();
            std::thread::Builder::new()
                .name("layerpack-scan".into())
                .spawn(move || helper(&sh))
                .map_err(|e| Error::io(root, "cannot start a scan thread", e))?;
        }
        Ok(TreeScan {
            shared,
            stack: vec![Frame::Pending(0)],
            seen: 0,
            failed: false,
        })
    }

    /// The listing of job `id`: done by a helper, or listed here.
    fn listing(&self, id: u64) -> Result<Listing> {
        let sh = &self.shared;
        let mut st = lock(&sh.state);
        loop {
            if let Some(l) = st.done.remove(&id) {
                if let Ok(l) = &l {
                    st.buffered -= l.records.len();
                }
                sh.work.notify_all();
                return l;
            }
            if let Some(pos) = st.queue.iter().position(|j| j.id == id) {
                let job = st.queue.remove(pos).expect("position is in range");
                st.running.insert(id);
                drop(st);
                let listing = list_dir(sh, &job);
                st = lock(&sh.state);
                st.running.remove(&id);
                return listing.map(|l| register(&mut st, sh, &job, l));
            }
            if !st.running.contains(&id) {
                return Err(Error::new(ErrorKind::Io, "directory listing lost"));
            }
            st = sh.finished.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

fn lock(m: &Mutex<ScanState>) -> std::sync::MutexGuard<'_, ScanState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Queue the subdirectories of a finished listing right at the front, so
/// helpers work in the order the consumer will ask.
fn register(st: &mut ScanState, sh: &Shared, job: &Job, mut l: Listing) -> Listing {
    let mut sub = Vec::new();
    for (i, r) in l.records.iter().enumerate() {
        let descend = r.kind == FileKind::Dir && !(sh.opts.one_file_system && r.dev != sh.root_dev);
        if descend {
            let id = st.next_id;
            st.next_id += 1;
            l.jobs[i] = Some(id);
            let abs = job.abs.join(OsStr::from_bytes(r.path.file_name()));
            let parent = if abs.as_os_str().len() >= crate::beneath::LONG_PATH {
                l.own.clone()
            } else {
                None
            };
            sub.push(Job {
                id,
                abs,
                rel: r.path.clone(),
                parent,
            });
        }
    }
    for j in sub.into_iter().rev() {
        st.queue.push_front(j);
    }
    if !l.jobs.iter().all(Option::is_none) {
        sh.work.notify_all();
    }
    l
}

fn helper(sh: &Shared) {
    let mut st = lock(&sh.state);
    loop {
        if st.stop {
            return;
        }
        if st.buffered < MAX_BUFFERED {
            if let Some(job) = st.queue.pop_front() {
                st.running.insert(job.id);
                drop(st);
                let listing = list_dir(sh, &job);
                st = lock(&sh.state);
                st.running.remove(&job.id);
                let listing = listing.map(|l| register(&mut st, sh, &job, l));
                if let Ok(l) = &listing {
                    st.buffered += l.records.len();
                }
                st.done.insert(job.id, listing);
                sh.finished.notify_all();
                continue;
            }
        }
        st = sh.work.wait(st).unwrap_or_else(|p| p.into_inner());
    }
}

/// List and stat one directory, sorted by name. A directory whose path is
/// too long for the kernel is opened from its parent's descriptor and
/// read through `/proc/self/fd`, so depth is unlimited.
fn list_dir(sh: &Shared, job: &Job) -> Result<Listing> {
    let (dir_path, own) = if job.abs.as_os_str().len() < crate::beneath::LONG_PATH {
        (job.abs.clone(), None)
    } else {
        let opened = match &job.parent {
            Some(p) => {
                crate::beneath::open_child_dir(p.as_fd(), job.rel.file_name(), true).map(Arc::new)
            }
            None => crate::beneath::walk_to(&sh.root, &job.rel),
        };
        let fd = opened.map_err(|e| Error::io(&job.abs, "cannot open directory", e))?;
        (
            PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
            Some(fd),
        )
    };
    let rd = match fs::read_dir(&dir_path) {
        Ok(rd) => rd,
        // Removed while we were looking: it is simply not there.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !job.rel.is_root() => {
            return Ok(Listing {
                records: Vec::new(),
                jobs: Vec::new(),
                own: None,
            })
        }
        Err(e) => return Err(Error::io(&job.abs, "cannot list directory", e)),
    };
    let mut entries: Vec<(Vec<u8>, fs::DirEntry)> = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(&job.abs, "cannot list directory", e))?;
        entries.push((ent.file_name().into_encoded_bytes(), ent));
    }
    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut records = Vec::with_capacity(entries.len());
    for (name, ent) in entries {
        let md = match ent.metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(ent.path(), "cannot stat", e)),
        };
        let path = job.rel.join(&name);
        records.push(Record::from_metadata(
            &|| ent.path(),
            path,
            &md,
            sh.opts.xattrs,
        )?);
    }
    let jobs = vec![None; records.len()];
    Ok(Listing { records, jobs, own })
}

impl Iterator for TreeScan {
    type Item = Result<Record>;
    fn next(&mut self) -> Option<Result<Record>> {
        if self.failed {
            return None;
        }
        loop {
            match self.stack.last_mut()? {
                Frame::Pending(id) => {
                    let id = *id;
                    self.stack.pop();
                    match self.listing(id) {
                        Ok(l) => self
                            .stack
                            .push(Frame::Listing(l.records.into_iter().zip(l.jobs))),
                        Err(e) => {
                            self.failed = true;
                            return Some(Err(e));
                        }
                    }
                }
                Frame::Listing(it) => match it.next() {
                    Some((rec, job)) => {
                        if let Some(id) = job {
                            self.stack.push(Frame::Pending(id));
                        }
                        self.seen += 1;
                        if self.seen.is_multiple_of(4096) {
                            if let Some(p) = &self.shared.opts.progress {
                                p(self.seen);
                            }
                        }
                        return Some(Ok(rec));
                    }
                    None => {
                        self.stack.pop();
                    }
                },
            }
        }
    }
}

impl Drop for TreeScan {
    fn drop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.work.notify_all();
    }
}

/// How two versions of an entry compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No change worth reporting.
    Same,
    /// Only mode, owner, device number or xattrs differ.
    Metadata,
    /// Type, size, target, mtime or bytes differ.
    Content,
}

/// Mode, owner, device number or xattrs differ.
pub fn meta_differs(old: &Record, new: &Record) -> bool {
    old.mode != new.mode
        || old.uid != new.uid
        || old.gid != new.gid
        || old.rdev != new.rdev
        || old.xattrs != new.xattrs
}

/// The change rules that stat data alone can decide. `None` means "regular
/// file with equal size and mtime": only the bytes (or proof that the file
/// was not touched) can tell.
pub fn classify_by_stat(old: &Record, new: &Record) -> Option<Verdict> {
    let meta = if meta_differs(old, new) {
        Verdict::Metadata
    } else {
        Verdict::Same
    };
    if old.kind != new.kind {
        return Some(Verdict::Content);
    }
    match new.kind {
        // mtime of a directory changes whenever a child does: noise.
        FileKind::Dir => Some(meta),
        FileKind::Symlink => Some(
            if old.link_target != new.link_target || old.mtime_ns != new.mtime_ns {
                Verdict::Content
            } else {
                meta
            },
        ),
        FileKind::CharDevice | FileKind::BlockDevice => Some(meta),
        FileKind::Fifo | FileKind::Socket => Some(meta),
        FileKind::File => {
            if old.size != new.size || old.mtime_ns != new.mtime_ns {
                Some(Verdict::Content)
            } else {
                None
            }
        }
    }
}

/// Decide between two regular files with equal size and mtime by their
/// bytes: hashes `new` (keeping the hash in it) and compares with
/// `old_hash`; equal bytes leave metadata to decide.
pub fn compare_by_hash(
    old: &Record,
    old_hash: [u8; 32],
    new: &mut Record,
    new_abs: &Path,
) -> Result<Verdict> {
    let new_hash = hash_file(new_abs)?;
    new.sha256 = Some(new_hash);
    Ok(if old_hash != new_hash {
        Verdict::Content
    } else if meta_differs(old, new) {
        Verdict::Metadata
    } else {
        Verdict::Same
    })
}

/// Numbers the hard-link groups of reported files by (device, inode); a
/// group of one (a link to something outside the layer) is dropped by
/// [`crate::model::ChangeSetBuilder::finish`].
#[derive(Default)]
pub struct LinkGroups {
    by_inode: HashMap<(u64, u64), u32>,
}

impl LinkGroups {
    /// The group of `r`, if it is a regular file with other links.
    pub fn assign(&mut self, r: &Record) -> Option<u32> {
        if r.kind != FileKind::File || r.nlink < 2 {
            return None;
        }
        let next = self.by_inode.len() as u32;
        Some(*self.by_inode.entry((r.dev, r.ino)).or_insert(next))
    }
}

/// Merge two ordered entry streams into a change set.
///
/// `decide` is asked about every path present in both; `added` completes
/// each record that is new (e.g. reads its xattrs); `new_root` is where the
/// new entries live, for hashing files that are reported.
pub fn diff_streams(
    old: impl Iterator<Item = Result<Record>>,
    new: impl Iterator<Item = Result<Record>>,
    new_root: &Path,
    mut decide: impl FnMut(&Record, &mut Record) -> Result<Verdict>,
    mut added: impl FnMut(&mut Record) -> Result<()>,
) -> Result<ChangeSet> {
    let mut old = old.peekable();
    let mut new = new.peekable();
    let mut changes = ChangeSetBuilder::new();
    let mut links = LinkGroups::default();
    loop {
        let ord = match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some(Err(_)), _) => return Err(take_err(&mut old)),
            (_, Some(Err(_))) => return Err(take_err(&mut new)),
            (Some(Ok(_)), None) => std::cmp::Ordering::Less,
            (None, Some(Ok(_))) => std::cmp::Ordering::Greater,
            (Some(Ok(o)), Some(Ok(n))) => o.path.cmp(&n.path),
        };
        let kind = match ord {
            std::cmp::Ordering::Less => {
                let Some(Ok(o)) = old.next() else {
                    unreachable!()
                };
                changes.push(Change {
                    path: o.path.clone(),
                    kind: ChangeKind::Deleted,
                    meta: o.to_meta(),
                });
                continue;
            }
            std::cmp::Ordering::Greater => {
                let Some(Ok(mut n)) = new.next() else {
                    unreachable!()
                };
                added(&mut n)?;
                (ChangeKind::Added, n)
            }
            std::cmp::Ordering::Equal => {
                let Some(Ok(o)) = old.next() else {
                    unreachable!()
                };
                let Some(Ok(mut n)) = new.next() else {
                    unreachable!()
                };
                match decide(&o, &mut n)? {
                    Verdict::Same => continue,
                    Verdict::Metadata => (
                        ChangeKind::Modified {
                            content_changed: false,
                        },
                        n,
                    ),
                    Verdict::Content => (
                        ChangeKind::Modified {
                            content_changed: true,
                        },
                        n,
                    ),
                }
            }
        };
        let (kind, mut n) = kind;
        if n.kind == FileKind::File && n.sha256.is_none() {
            n.sha256 = Some(hash_file(&reach(new_root, &n.path)?)?);
        }
        let mut meta = n.to_meta();
        meta.link_group = links.assign(&n);
        changes.push(Change {
            path: n.path,
            kind,
            meta,
        });
    }
    Ok(changes.finish())
}

fn take_err<I: Iterator<Item = Result<Record>>>(it: &mut I) -> Error {
    match it.next() {
        Some(Err(e)) => e,
        _ => Error::new(ErrorKind::Io, "scan failed"),
    }
}

/// The change rules applied to two independent trees (`layerpack diff`):
/// with no inode or ctime to trust, equal-looking files are compared by
/// their bytes.
pub fn diff_trees(before: &Path, after: &Path, opts: &ScanOptions) -> Result<ChangeSet> {
    let old = TreeScan::start(before, opts.clone())?;
    let new = TreeScan::start(after, opts.clone())?;
    let before: PathBuf = before.to_path_buf();
    diff_streams(
        old,
        new,
        after,
        |o, n| {
            if let Some(v) = classify_by_stat(o, n) {
                return Ok(v);
            }
            let old_hash = hash_file(&reach(&before, &o.path)?)?;
            compare_by_hash(o, old_hash, n, &reach(after, &n.path)?)
        },
        |_| Ok(()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(tag: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("lp-tree-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for d in ["a", "a.b", "a-c", "a/x", "a/x/y", "b", "b/deep/er/est"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        for i in 0..300 {
            fs::write(root.join(format!("b/deep/f{i:03}")), b"x").unwrap();
        }
        fs::write(root.join("a/x/y/file"), b"y").unwrap();
        std::os::unix::fs::symlink("../b", root.join("a/link")).unwrap();
        root
    }

    #[test]
    fn scan_order_is_depth_first_and_the_same_for_any_thread_count() {
        let root = tree("order");
        let mut expected: Option<Vec<RelPath>> = None;
        for threads in [0, 1, 2, 4] {
            let opts = ScanOptions {
                threads,
                ..ScanOptions::default()
            };
            let got: Vec<RelPath> = TreeScan::start(&root, opts)
                .unwrap()
                .map(|r| r.unwrap().path)
                .collect();
            let mut sorted = got.clone();
            sorted.sort();
            assert_eq!(got, sorted, "threads={threads}");
            assert_eq!(got.len(), 9 + 300 + 2, "threads={threads}");
            if let Some(e) = &expected {
                assert_eq!(&got, e);
            }
            expected = Some(got);
        }
        let link = TreeScan::start(&root, ScanOptions::default())
            .unwrap()
            .map(|r| r.unwrap())
            .find(|r| r.path.as_bytes() == b"a/link")
            .unwrap();
        assert_eq!(link.link_target.as_deref(), Some(&b"../b"[..]));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn dropping_a_scan_early_stops_it() {
        let root = tree("drop");
        let mut scan = TreeScan::start(&root, ScanOptions::default()).unwrap();
        assert!(scan.next().is_some());
        drop(scan);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn diff_of_two_trees_follows_the_change_rules() {
        let a = tree("diff-a");
        let b = tree("diff-b");
        crate::scenarios::backdate(&a).unwrap();
        crate::scenarios::backdate(&b).unwrap();
        fs::write(b.join("a/x/y/file"), b"z").unwrap(); // same size, other bytes
        let t = fs::metadata(a.join("a/x/y/file"))
            .unwrap()
            .modified()
            .unwrap();
        fs::File::options()
            .write(true)
            .open(b.join("a/x/y/file"))
            .unwrap()
            .set_modified(t)
            .unwrap();
        fs::remove_file(b.join("b/deep/f000")).unwrap();
        fs::create_dir(b.join("new")).unwrap();
        let cs = diff_trees(&a, &b, &ScanOptions::default()).unwrap();
        let got: Vec<(String, char)> = cs
            .iter()
            .map(|c| (c.path.display(), c.kind.symbol()))
            .collect();
        assert_eq!(
            got,
            [
                ("a/x/y/file".to_string(), '~'),
                ("b/deep/f000".to_string(), '-'),
                ("new".to_string(), '+')
            ]
        );
        fs::remove_dir_all(&a).unwrap();
        fs::remove_dir_all(&b).unwrap();
    }
}
