//! Shared tree primitives: a fast ordered scan of a tree, and the change
//! rules applied to two ordered streams of entries.
//!
//! The scan walks depth-first with each directory's names sorted byte-wise,
//! which is exactly [`crate::model::path_cmp`] order, so two scans (or a scan
//! and a stored index) can be merged in one pass with memory bounded by the
//! widest directory rather than the size of the tree.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::model::{split_dev, Change, ChangeKind, ChangeSet, FileKind, Meta, RelPath, Xattrs};
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
        Record::from_metadata(abs, path, &md, with_xattrs)
    }

    fn from_metadata(
        abs: &Path,
        path: RelPath,
        md: &fs::Metadata,
        with_xattrs: bool,
    ) -> Result<Record> {
        let kind = FileKind::from_mode(md.mode()).ok_or_else(|| {
            Error::new(ErrorKind::InvalidInput, "unknown file type").with_path(abs)
        })?;
        let link_target = if kind == FileKind::Symlink {
            Some(
                fs::read_link(abs)
                    .map_err(|e| Error::io(abs, "cannot read symlink", e))?
                    .into_os_string()
                    .into_encoded_bytes(),
            )
        } else {
            None
        };
        let xattrs = if with_xattrs {
            read_xattrs(abs)?
        } else {
            Xattrs::new()
        };
        Ok(Record {
            path,
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            size: md.size(),
            mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
            ino: md.ino(),
            dev: md.dev(),
            nlink: md.nlink(),
            rdev: if kind.is_device() { md.rdev() } else { 0 },
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

/// SHA-256 of a regular file's bytes. Refuses to follow a symlink.
pub fn hash_file(abs: &Path) -> Result<[u8; 32]> {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(abs)
        .map_err(|e| Error::io(abs, "cannot open for hashing", e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::io(abs, "cannot read", e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
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
    /// Called every few thousand entries.
    pub progress: Option<Progress>,
}

impl Default for ScanOptions {
    fn default() -> ScanOptions {
        ScanOptions {
            xattrs: true,
            one_file_system: true,
            progress: None,
        }
    }
}

const BATCH: usize = 512;

/// An ordered scan of a tree, run on a helper thread so that reading the
/// tree and consuming its entries overlap. Yields every entry below `root`
/// (not `root` itself) in [`crate::model::path_cmp`] order. Dropping the
/// iterator stops the walk.
pub struct TreeScan {
    rx: Receiver<Result<Vec<Record>>>,
    batch: std::vec::IntoIter<Record>,
    done: bool,
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
        let (tx, rx) = sync_channel(8);
        let root = root.to_path_buf();
        std::thread::Builder::new()
            .name("layerpack-scan".into())
            .spawn(move || {
                let mut w = Walker {
                    opts,
                    root_dev: md.dev(),
                    batch: Vec::with_capacity(BATCH),
                    seen: 0,
                    tx,
                };
                let res = w.walk(&root, &RelPath::root());
                let res = res.and_then(|()| w.flush());
                if let Err(e) = res {
                    let _ = w.tx.send(Err(e));
                }
            })
            .map_err(|e| Error::io(std::path::Path::new("."), "cannot start scan thread", e))?;
        Ok(TreeScan {
            rx,
            batch: Vec::new().into_iter(),
            done: false,
        })
    }
}

impl Iterator for TreeScan {
    type Item = Result<Record>;
    fn next(&mut self) -> Option<Result<Record>> {
        loop {
            if let Some(r) = self.batch.next() {
                return Some(Ok(r));
            }
            if self.done {
                return None;
            }
            match self.rx.recv() {
                Ok(Ok(b)) => self.batch = b.into_iter(),
                Ok(Err(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Err(_) => self.done = true,
            }
        }
    }
}

/// Marker error meaning "the consumer went away"; never shown.
struct Stopped;

struct Walker {
    opts: ScanOptions,
    root_dev: u64,
    batch: Vec<Record>,
    seen: u64,
    tx: std::sync::mpsc::SyncSender<Result<Vec<Record>>>,
}

impl Walker {
    fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let b = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
        self.tx
            .send(Ok(b))
            .map_err(|_| Error::new(ErrorKind::Io, "scan consumer stopped"))
    }

    fn emit(&mut self, r: Record) -> std::result::Result<(), Stopped> {
        self.batch.push(r);
        self.seen += 1;
        if self.batch.len() >= BATCH {
            if let Some(p) = &self.opts.progress {
                p(self.seen);
            }
            self.flush().map_err(|_| Stopped)?;
        }
        Ok(())
    }

    fn walk(&mut self, dir: &Path, rel: &RelPath) -> Result<()> {
        let rd = fs::read_dir(dir).map_err(|e| Error::io(dir, "cannot list directory", e))?;
        let mut entries: Vec<fs::DirEntry> = Vec::new();
        for ent in rd {
            entries.push(ent.map_err(|e| Error::io(dir, "cannot list directory", e))?);
        }
        entries.sort_by(|a, b| a.file_name().as_bytes().cmp(b.file_name().as_bytes()));
        for ent in entries {
            let abs = ent.path();
            let md = match ent.metadata() {
                Ok(m) => m,
                // Removed while we were looking: it is simply not there.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&abs, "cannot stat", e)),
            };
            let path = rel.join(ent.file_name().as_bytes());
            let rec = Record::from_metadata(&abs, path, &md, self.opts.xattrs)?;
            let descend = rec.kind == FileKind::Dir
                && !(self.opts.one_file_system && rec.dev != self.root_dev);
            let child_rel = descend.then(|| rec.path.clone());
            if self.emit(rec).is_err() {
                return Err(Error::new(ErrorKind::Io, "scan consumer stopped"));
            }
            if let Some(child_rel) = child_rel {
                self.walk(&abs, &child_rel)?;
            }
        }
        Ok(())
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

/// Merge two ordered entry streams into a change set.
///
/// `decide` is asked about every path present in both; `new_root` is where
/// the new entries live, for hashing files that are reported.
pub fn diff_streams(
    old: impl Iterator<Item = Result<Record>>,
    new: impl Iterator<Item = Result<Record>>,
    new_root: &Path,
    mut decide: impl FnMut(&Record, &mut Record) -> Result<Verdict>,
) -> Result<ChangeSet> {
    let mut old = old.peekable();
    let mut new = new.peekable();
    let mut changes: Vec<Change> = Vec::new();
    // (dev, ino) of reported multi-link files, to group hard links.
    let mut links: HashMap<(u64, u64), u32> = HashMap::new();
    let mut link_members: HashMap<u32, u32> = HashMap::new();
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
                let Some(Ok(n)) = new.next() else {
                    unreachable!()
                };
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
            n.sha256 = Some(hash_file(&n.path.under(new_root))?);
        }
        let mut meta = n.to_meta();
        if n.kind == FileKind::File && n.nlink > 1 {
            let next = links.len() as u32;
            let g = *links.entry((n.dev, n.ino)).or_insert(next);
            *link_members.entry(g).or_insert(0) += 1;
            meta.link_group = Some(g);
        }
        changes.push(Change {
            path: n.path,
            kind,
            meta,
        });
    }
    // A group of one is a link to something outside the layer: not a group.
    for c in &mut changes {
        if let Some(g) = c.meta.link_group {
            if link_members.get(&g).copied().unwrap_or(0) < 2 {
                c.meta.link_group = None;
            }
        }
    }
    Ok(ChangeSet::from_unsorted(changes))
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
    diff_streams(old, new, after, |o, n| {
        if let Some(v) = classify_by_stat(o, n) {
            return Ok(v);
        }
        let old_hash = hash_file(&o.path.under(&before))?;
        let new_hash = hash_file(&n.path.under(after))?;
        n.sha256 = Some(new_hash);
        Ok(if old_hash != new_hash {
            Verdict::Content
        } else if meta_differs(o, n) {
            Verdict::Metadata
        } else {
            Verdict::Same
        })
    })
}
