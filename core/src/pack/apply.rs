//! `apply`: install a package into a tree, deletions included — ipk (ar or
//! OpenWrt's gzip'd tar), a data tarball, or an OCI layer. The installer for
//! targets without opkg, and our round-trip check.
//!
//! Nothing is ever written, chmod'ed or removed outside the root: every
//! member name, deletion entry and whiteout target goes through
//! [`RelPath::parse`], and every filesystem call is made relative to a
//! directory descriptor resolved by [`crate::beneath`] (symlinks on the way
//! are followed only while they stay beneath the root; the entry itself is
//! never followed, an existing symlink at its name is replaced, and the
//! late directory-metadata pass opens each directory again without
//! following a link). Every refusal is reported.
//!
//! The archive is streamed: memory stays bounded whatever the package
//! expands to. A regular file is written under a temporary name and
//! renamed into place only once the stream delivered exactly the size its
//! header claimed, so a truncated or lying archive leaves nothing behind.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, BufReader, Read, Seek};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use flate2::read::GzDecoder;
use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};

use crate::beneath::{self, Beneath, Follow};
use crate::model::{escape_bytes, RelPath};
use crate::{Error, ErrorKind, Result};

/// A control archive (compressed or not) larger than this is refused: it
/// holds a few small text files.
const CONTROL_LIMIT: u64 = 16 << 20;

/// What `apply` did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Entries written (each once).
    pub installed: usize,
    /// Paths removed.
    pub deleted: usize,
    /// Entries refused, with the reason.
    pub refused: Vec<String>,
    /// The package format found.
    pub format: &'static str,
}

fn bad(path: &Path, what: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidInput, what.into()).with_path(path)
}

/// What the first bytes of a file say it is.
fn sniff(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"!<arch>\n") {
        Some("ipk")
    } else if head.starts_with(&[0x1f, 0x8b]) {
        Some("gzip")
    } else if head.len() >= 263 && &head[257..262] == b"ustar" {
        Some("oci")
    } else {
        None
    }
}

/// Install `package` into `root`.
pub fn apply(package: &Path, root: &Path) -> Result<Applied> {
    let root_path =
        fs::canonicalize(root).map_err(|e| Error::io(root, "cannot resolve the root", e))?;
    let root = Beneath::open(&root_path)?;
    let mut file =
        fs::File::open(package).map_err(|e| Error::io(package, "cannot open package", e))?;
    let mut head = Vec::with_capacity(512);
    (&mut file)
        .take(512)
        .read_to_end(&mut head)
        .map_err(|e| Error::io(package, "cannot read package", e))?;
    file.rewind()
        .map_err(|e| Error::io(package, "cannot read package", e))?;
    let format = sniff(&head).ok_or_else(|| {
        bad(
            package,
            "not a package layerpack knows: expected an ipk (ar or gzip'd tar), a .tar.gz data archive or an OCI layer tar",
        )
    })?;
    let mut x = Extractor {
        root: &root,
        package,
        oci: false,
        is_root: nix::unistd::geteuid().is_root(),
        dirs: Vec::new(),
        seen: HashSet::new(),
        tmp_counter: 0,
        out: Applied::default(),
        progress: crate::progress::step(
            format!("applying {}", package.display()),
            crate::progress::Unit::Entries,
        ),
    };
    let input = BufReader::new(file);
    let done = match format {
        "ipk" => apply_ar(input, &mut x),
        "gzip" => apply_gzip(input, &mut x),
        _ => {
            x.out.format = "oci";
            x.oci = true;
            x.extract(tar::Archive::new(input))
        }
    };
    // Directories made so far get their modes even when the archive
    // broke off (they were created 0700 until then).
    x.finish_dirs();
    done.map(|()| x.out)
}

/// The ar form: `debian-binary`, `control.tar.gz`, `data.tar.gz`, in that
/// order (as dpkg and opkg require), streamed member by member.
fn apply_ar(mut input: impl Read, x: &mut Extractor<'_>) -> Result<()> {
    x.out.format = "ipk";
    let package = x.package;
    let mut magic = [0u8; 8];
    input
        .read_exact(&mut magic)
        .map_err(|_| bad(package, "truncated ar archive"))?;
    let mut deletions = None;
    loop {
        let mut h = [0u8; 60];
        match read_full(&mut input, &mut h) {
            Ok(0) => break,
            Ok(60) => {}
            Ok(_) => return Err(bad(package, "truncated ar member header")),
            Err(e) => return Err(Error::io(package, "cannot read package", e)),
        }
        let name = String::from_utf8_lossy(&h[..16])
            .trim_end()
            .trim_end_matches('/')
            .to_string();
        let size: u64 = std::str::from_utf8(&h[48..58])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| bad(package, format!("ar member '{name}' has no valid size")))?;
        let mut body = (&mut input).take(size);
        match name.as_str() {
            "control.tar.gz" => deletions = Some(read_deletions(&mut body, package)?),
            "data.tar.gz" => {
                let Some(del) = deletions.take() else {
                    return Err(bad(
                        package,
                        "data.tar.gz comes before control.tar.gz, or there is no control.tar.gz",
                    ));
                };
                x.delete_all(&del);
                x.extract(tar::Archive::new(GzDecoder::new(&mut body)))?;
                // Drain what the tar reader left (the end-of-archive blocks).
                io::copy(&mut body, &mut io::sink())
                    .map_err(|e| Error::io(package, "cannot read data.tar.gz", e))?;
                if body.limit() > 0 {
                    return Err(bad(
                        package,
                        "data.tar.gz is shorter than its ar header says",
                    ));
                }
                return Ok(());
            }
            _ => {
                let n = io::copy(&mut body, &mut io::sink())
                    .map_err(|e| Error::io(package, "cannot read package", e))?;
                if n != size {
                    return Err(bad(package, format!("ar member '{name}' is truncated")));
                }
            }
        }
        if size % 2 == 1 {
            let mut pad = [0u8; 1];
            let _ = input.read(&mut pad);
        }
    }
    Err(bad(package, "no data.tar.gz member"))
}

/// Read as much as `buf` holds unless the stream ends first.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A gzip'd tar: OpenWrt's ipk (first member `./debian-binary`, then
/// `./data.tar.gz` before `./control.tar.gz`), or a plain data tarball.
fn apply_gzip(input: impl Read, x: &mut Extractor<'_>) -> Result<()> {
    let package = x.package;
    let mut outer = tar::Archive::new(GzDecoder::new(input));
    let mut entries = outer
        .entries()
        .map_err(|e| bad(package, format!("not a tar archive: {e}")))?;
    let Some(first) = entries.next() else {
        return Err(bad(package, "empty archive"));
    };
    let first = first.map_err(|e| bad(package, format!("broken tar archive: {e}")))?;
    let first_name = first.path_bytes().to_vec();
    if first_name != b"./debian-binary" && first_name != b"debian-binary" {
        x.out.format = "tar";
        x.entry(first)?;
        for e in entries {
            let e = e.map_err(|e| bad(package, format!("broken tar archive: {e}")))?;
            x.entry(e)?;
        }
        return Ok(());
    }
    x.out.format = "ipk-openwrt";
    drop(first);
    // data.tar.gz comes first here, but deletions (in control.tar.gz) go
    // before it: spool it to an unnamed temporary file, never to memory.
    let mut data: Option<fs::File> = None;
    let mut deletions = None;
    for e in entries {
        let mut e = e.map_err(|e| bad(package, format!("broken tar archive: {e}")))?;
        let name = e.path_bytes().to_vec();
        let name = name.strip_prefix(b"./").unwrap_or(&name).to_vec();
        match &name[..] {
            b"control.tar.gz" => deletions = Some(read_deletions(&mut e, package)?),
            b"data.tar.gz" => {
                let mut f = spool_file(package)?;
                let want = e.size();
                let n = io::copy(&mut e, &mut f)
                    .map_err(|err| Error::io(package, "cannot spool data.tar.gz", err))?;
                if n != want {
                    return Err(bad(package, "data.tar.gz is shorter than its header says"));
                }
                f.rewind()
                    .map_err(|err| Error::io(package, "cannot spool data.tar.gz", err))?;
                data = Some(f);
            }
            _ => {}
        }
    }
    let deletions = deletions.ok_or_else(|| bad(package, "no control.tar.gz member"))?;
    let data = data.ok_or_else(|| bad(package, "no data.tar.gz member"))?;
    x.delete_all(&deletions);
    x.extract(tar::Archive::new(GzDecoder::new(BufReader::new(data))))
}

/// An unnamed file in the temporary directory, gone when closed.
fn spool_file(package: &Path) -> Result<fs::File> {
    let dir = std::env::temp_dir();
    let fd = rustix::fs::open(
        &dir,
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| Error::io(&dir, "cannot create a temporary file", e.into()))
    .map_err(|e| e.context(format!("unpacking {}", package.display())))?;
    Ok(fs::File::from(fd))
}

/// The deletion list of a `control.tar.gz` stream (bounded in size).
fn read_deletions(control: &mut impl Read, package: &Path) -> Result<Vec<Vec<u8>>> {
    let limited = control.take(CONTROL_LIMIT);
    let mut a = tar::Archive::new(GzDecoder::new(limited).take(CONTROL_LIMIT));
    let mut found = Vec::new();
    for e in a
        .entries()
        .map_err(|e| bad(package, format!("control.tar.gz is not a tar archive: {e}")))?
    {
        let mut e = e.map_err(|e| bad(package, format!("broken control.tar.gz: {e}")))?;
        let name = e.path_bytes().to_vec();
        if name == b"./layerpack.deletions" || name == b"layerpack.deletions" {
            found.clear();
            e.read_to_end(&mut found)
                .map_err(|err| bad(package, format!("broken control.tar.gz: {err}")))?;
        }
    }
    // Whatever is left of the member (end blocks, padding).
    io::copy(control, &mut io::sink()).map_err(|e| Error::io(package, "cannot read package", e))?;
    Ok(found
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

/// Directory metadata applied after the children (creating children bumps
/// a directory's mtime).
struct DirMeta {
    path: RelPath,
    mode: u32,
    mtime: i64,
    uid: u32,
    gid: u32,
}

struct Extractor<'a> {
    root: &'a Beneath,
    package: &'a Path,
    oci: bool,
    is_root: bool,
    dirs: Vec<DirMeta>,
    /// Entries of this archive so far (an OCI opaque marker keeps them).
    seen: HashSet<RelPath>,
    tmp_counter: u64,
    out: Applied,
    progress: crate::progress::Step,
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

fn ts(secs: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

impl Extractor<'_> {
    fn refuse(&mut self, raw: &[u8], why: impl std::fmt::Display) {
        self.out
            .refused
            .push(format!("{}: {why}", escape_bytes(raw)));
    }

    /// Remove what the package's deletion list names, children first as
    /// written.
    fn delete_all(&mut self, list: &[Vec<u8>]) {
        for raw in list {
            match RelPath::parse(raw) {
                Ok(p) => self.delete(raw, &p),
                Err(why) => self.refuse(raw, format!("deletion refused: the path {why}")),
            }
        }
    }

    fn delete(&mut self, raw: &[u8], path: &RelPath) {
        match self.root.remove(path, Follow::Beneath) {
            Ok(true) => self.out.deleted += 1,
            Ok(false) => {}
            Err(e) => self.refuse(raw, format!("cannot delete: {e}")),
        }
    }

    fn extract<R: Read>(&mut self, mut a: tar::Archive<R>) -> Result<()> {
        let package = self.package;
        for e in a
            .entries()
            .map_err(|e| bad(package, format!("not a tar archive: {e}")))?
        {
            let e = e.map_err(|e| bad(package, format!("broken tar archive: {e}")))?;
            self.entry(e)?;
        }
        Ok(())
    }

    /// One archive member.
    fn entry<R: Read>(&mut self, mut e: tar::Entry<'_, R>) -> Result<()> {
        self.progress.add(1);
        let raw = e.path_bytes().to_vec();
        let path = match RelPath::parse(&raw) {
            Ok(p) => p,
            Err(crate::model::BadPath::Empty) => return Ok(()),
            Err(why) => {
                self.refuse(&raw, format!("the path {why}"));
                return Ok(());
            }
        };
        let parent = path.parent().unwrap_or_default();
        let dir = match self.root.dir_create(&parent, Follow::Beneath) {
            Ok(d) => d,
            Err(err) if err.raw_os_error() == Some(libc::EXDEV) => {
                self.refuse(&raw, "a symlink on the way leads out of the root");
                return Ok(());
            }
            Err(err) => {
                self.refuse(&raw, format!("cannot open its directory: {err}"));
                return Ok(());
            }
        };
        let name = path.file_name().to_vec();
        if self.oci && name.starts_with(b".wh.") {
            self.whiteout(&raw, &parent, dir.as_fd(), &name);
            return Ok(());
        }
        match self.write_entry(&mut e, dir.as_fd(), &name, &path) {
            Ok(()) => {
                self.out.installed += 1;
                self.seen.insert(path);
            }
            Err(err)
                if err.kind() == io::ErrorKind::PermissionDenied
                    || err.raw_os_error() == Some(libc::EPERM) =>
            {
                self.refuse(&raw, format!("{err} (device nodes and owners need root)"))
            }
            Err(err) if err.raw_os_error() == Some(libc::EXDEV) => self.refuse(
                &raw,
                "a mount point or a symlink out of the root is in the way",
            ),
            Err(err) => self.refuse(&raw, err),
        }
        Ok(())
    }

    /// An OCI whiteout: `.wh.NAME` deletes NAME, `.wh..wh..opq` empties
    /// the directory of what earlier layers had.
    fn whiteout(&mut self, raw: &[u8], parent: &RelPath, dir: BorrowedFd<'_>, name: &[u8]) {
        if name == b".wh..wh..opq" {
            let names = match beneath::list_names(dir) {
                Ok(n) => n,
                Err(e) => return self.refuse(raw, format!("cannot list: {e}")),
            };
            for n in names {
                let rel = parent.join(&n);
                if !self.seen.contains(&rel) {
                    self.delete(raw, &rel);
                }
            }
            return;
        }
        let target = &name[4..];
        if target.is_empty() || target == b"." || target == b".." {
            return self.refuse(raw, "the whiteout names no entry of its directory");
        }
        self.delete(raw, &parent.join(target));
    }

    fn write_entry<R: Read>(
        &mut self,
        e: &mut tar::Entry<'_, R>,
        dir: BorrowedFd<'_>,
        name: &[u8],
        path: &RelPath,
    ) -> io::Result<()> {
        let h = e.header().clone();
        let mode = h.mode().unwrap_or(0o644) & 0o7777;
        let mtime = h.mtime().unwrap_or(0) as i64;
        let (uid, gid) = (h.uid().unwrap_or(0) as u32, h.gid().unwrap_or(0) as u32);
        let kind = h.entry_type();
        // Never write through what is there: replace it (a directory stays
        // a directory when the entry is one).
        let existing = match rustix::fs::statat(dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Some(rustix::fs::FileType::from_raw_mode(st.st_mode)),
            Err(rustix::io::Errno::NOENT) => None,
            Err(err) => return Err(err.into()),
        };
        let is_dir_there = existing == Some(rustix::fs::FileType::Directory);
        if kind.is_dir() {
            if !is_dir_there {
                if existing.is_some() {
                    beneath::remove_at(dir, name)?;
                }
                rustix::fs::mkdirat(dir, os(name), Mode::from_raw_mode(0o700))?;
            }
            self.dirs.push(DirMeta {
                path: path.clone(),
                mode,
                mtime,
                uid,
                gid,
            });
            return Ok(());
        }
        if kind.is_file() || kind == tar::EntryType::Continuous || kind == tar::EntryType::GNUSparse
        {
            return self.write_file(e, dir, name, mode, mtime, (uid, gid));
        }
        if existing.is_some() {
            beneath::remove_at(dir, name)?;
        }
        if kind.is_symlink() {
            let link = e.link_name_bytes().map(|l| l.to_vec()).unwrap_or_default();
            rustix::fs::symlinkat(os(&link), dir, os(name))?;
        } else if kind.is_hard_link() {
            let link = e.link_name_bytes().map(|l| l.to_vec()).unwrap_or_default();
            let src = RelPath::parse(&link).map_err(|why| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("hard link target {why}"),
                )
            })?;
            let Some((src_dir, src_name)) = self.root.parent(&src, Follow::Beneath)? else {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("hard link target {} is not in the root", src.display()),
                ));
            };
            // linkat without AT_SYMLINK_FOLLOW links the entry itself.
            rustix::fs::linkat(&src_dir, os(src_name), dir, os(name), AtFlags::empty())?;
            return Ok(());
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            use rustix::fs::FileType;
            let (ft, dev) = if kind.is_fifo() {
                (FileType::Fifo, 0)
            } else {
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                let ft = if kind.is_character_special() {
                    FileType::CharacterDevice
                } else {
                    FileType::BlockDevice
                };
                (ft, rustix::fs::makedev(major, minor))
            };
            rustix::fs::mknodat(dir, os(name), ft, Mode::from_raw_mode(0o600), dev)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unsupported tar entry type {:?}", kind),
            ));
        }
        if self.is_root {
            rustix::fs::chownat(
                dir,
                os(name),
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )?;
        }
        if !kind.is_symlink() {
            // The name is the node created just above, not a link.
            rustix::fs::chmodat(dir, os(name), Mode::from_raw_mode(mode), AtFlags::empty())?;
        }
        rustix::fs::utimensat(dir, os(name), &ts(mtime), AtFlags::SYMLINK_NOFOLLOW)?;
        Ok(())
    }

    /// A regular file: written under a temporary name, checked against the
    /// size its header claims, then renamed over the entry's name.
    fn write_file<R: Read>(
        &mut self,
        e: &mut tar::Entry<'_, R>,
        dir: BorrowedFd<'_>,
        name: &[u8],
        mode: u32,
        mtime: i64,
        (uid, gid): (u32, u32),
    ) -> io::Result<()> {
        self.tmp_counter += 1;
        let tmp = format!(
            ".layerpack-apply-{}-{}",
            std::process::id(),
            self.tmp_counter
        );
        let fd: OwnedFd = rustix::fs::openat(
            dir,
            tmp.as_str(),
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        let mut f = fs::File::from(fd);
        let want = e.size();
        let written = (|| {
            let n = io::copy(e, &mut f)?;
            if n != want {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the archive holds {n} bytes of the {want} its header claims"),
                ));
            }
            if self.is_root {
                rustix::fs::fchown(
                    &f,
                    Some(rustix::fs::Uid::from_raw(uid)),
                    Some(rustix::fs::Gid::from_raw(gid)),
                )?;
            }
            rustix::fs::fchmod(&f, Mode::from_raw_mode(mode))?;
            rustix::fs::futimens(&f, &ts(mtime))?;
            match rustix::fs::statat(dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st)
                    if rustix::fs::FileType::from_raw_mode(st.st_mode)
                        == rustix::fs::FileType::Directory =>
                {
                    beneath::remove_at(dir, name)?;
                }
                _ => {}
            }
            rustix::fs::renameat(dir, tmp.as_str(), dir, os(name))?;
            Ok(())
        })();
        if written.is_err() {
            let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
        }
        written
    }

    /// Directory metadata, deepest first. Each directory is opened again
    /// without following a link: one that an entry replaced by a symlink
    /// since is refused, never chmod'ed through.
    fn finish_dirs(&mut self) {
        let dirs = std::mem::take(&mut self.dirs);
        for d in dirs.iter().rev() {
            let res = (|| -> io::Result<()> {
                let Some((parent, name)) = self.root.parent(&d.path, Follow::Beneath)? else {
                    return Err(io::Error::from_raw_os_error(libc::ENOENT));
                };
                let fd = beneath::open_child_dir(parent.as_fd(), name, true)?;
                if self.is_root {
                    rustix::fs::fchown(
                        &fd,
                        Some(rustix::fs::Uid::from_raw(d.uid)),
                        Some(rustix::fs::Gid::from_raw(d.gid)),
                    )?;
                }
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(d.mode))?;
                rustix::fs::futimens(&fd, &ts(d.mtime))?;
                Ok(())
            })();
            if let Err(e) = res {
                let why = if beneath::absent(&e) {
                    "is no longer a directory of the root (replaced by a later entry); its metadata was not applied".to_string()
                } else {
                    format!("cannot set directory metadata: {e}")
                };
                self.refuse(d.path.as_bytes(), why);
                self.out.installed -= 1;
            }
        }
    }
}
