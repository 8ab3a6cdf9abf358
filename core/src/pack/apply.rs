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
    /// Edits of files the package does not own carried out (saved first,
    /// restorable), from its `layerpack.edits`.
    pub edits: usize,
    /// Things not done that do not make the install fail (an xattr the
    /// filesystem or the caller's privileges refuse), per path.
    pub notes: Vec<String>,
    /// Maintainer scripts the package holds. `apply` runs none: the steps
    /// of the scripts layerpack generated are carried out natively
    /// (`generated` true), anything else is not run.
    pub scripts: Vec<(String, bool)>,
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
            "control.tar.gz" => deletions = Some(read_control(&mut body, package)?),
            "data.tar.gz" => {
                let Some(ctl) = deletions.take() else {
                    return Err(bad(
                        package,
                        "data.tar.gz comes before control.tar.gz, or there is no control.tar.gz",
                    ));
                };
                x.delete_all(&ctl.deletions);
                x.extract(tar::Archive::new(GzDecoder::new(&mut body)))?;
                x.edit_all(&ctl);
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
            b"control.tar.gz" => deletions = Some(read_control(&mut e, package)?),
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
    let ctl = deletions.ok_or_else(|| bad(package, "no control.tar.gz member"))?;
    let data = data.ok_or_else(|| bad(package, "no data.tar.gz member"))?;
    x.delete_all(&ctl.deletions);
    x.extract(tar::Archive::new(GzDecoder::new(BufReader::new(data))))?;
    x.edit_all(&ctl);
    Ok(())
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

/// What `apply` reads from a `control.tar.gz`.
#[derive(Default)]
struct Control {
    /// `Package:`.
    package: Option<String>,
    /// `layerpack.deletions`.
    deletions: Vec<Vec<u8>>,
    /// `layerpack.edits`: (deleted, path).
    edits: Vec<(bool, Vec<u8>)>,
    /// Maintainer scripts: (name, generated by layerpack).
    scripts: Vec<(String, bool)>,
}

/// The control stream (bounded in size): package name, layerpack's lists,
/// and which maintainer scripts there are.
fn read_control(control: &mut impl Read, package: &Path) -> Result<Control> {
    let limited = control.take(CONTROL_LIMIT);
    let mut a = tar::Archive::new(GzDecoder::new(limited).take(CONTROL_LIMIT));
    let mut c = Control::default();
    for e in a
        .entries()
        .map_err(|e| bad(package, format!("control.tar.gz is not a tar archive: {e}")))?
    {
        let mut e = e.map_err(|e| bad(package, format!("broken control.tar.gz: {e}")))?;
        let name = e.path_bytes().to_vec();
        let name = name.strip_prefix(b"./").unwrap_or(&name).to_vec();
        let mut body = Vec::new();
        e.read_to_end(&mut body)
            .map_err(|err| bad(package, format!("broken control.tar.gz: {err}")))?;
        match &name[..] {
            b"control" => {
                c.package = String::from_utf8_lossy(&body)
                    .lines()
                    .find_map(|l| l.strip_prefix("Package:"))
                    .map(|v| v.trim().to_string())
            }
            b"layerpack.deletions" => {
                c.deletions = body
                    .split(|b| *b == 0)
                    .filter(|p| !p.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect()
            }
            b"layerpack.edits" => {
                c.edits = body
                    .split(|b| *b == 0)
                    .filter_map(|r| match r.split_first() {
                        Some((b'm', p)) => Some((false, p.to_vec())),
                        Some((b'd', p)) => Some((true, p.to_vec())),
                        _ => None,
                    })
                    .collect()
            }
            b"preinst" | b"postinst" | b"prerm" | b"postrm" => {
                let generated = body
                    .split(|b| *b == b'\n')
                    .nth(1)
                    .is_some_and(|l| l.starts_with(super::scripts::MARKER.as_bytes()));
                c.scripts
                    .push((String::from_utf8_lossy(&name).into_owned(), generated));
            }
            _ => {}
        }
    }
    // Whatever is left of the member (end blocks, padding).
    io::copy(control, &mut io::sink()).map_err(|e| Error::io(package, "cannot read package", e))?;
    Ok(c)
}

/// Copy the xattrs a package may carry from one open file to another
/// (best effort: the source came from the same package).
fn copy_xattrs(src: &fs::File, dst: &fs::File) {
    let Ok(n) = rustix::fs::flistxattr_query(src) else {
        return;
    };
    let mut names = vec![0u8; n];
    let Ok(n) = rustix::fs::flistxattr(src, &mut names[..]) else {
        return;
    };
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if !super::is_packable_xattr(name) || crate::tree::is_internal_xattr(name) {
            continue;
        }
        let Ok(len) = rustix::fs::fgetxattr_query(src, os(name)) else {
            continue;
        };
        let mut v = vec![0u8; len];
        if let Ok(len) = rustix::fs::fgetxattr(src, os(name), &mut v[..]) {
            let _ =
                rustix::fs::fsetxattr(dst, os(name), &v[..len], rustix::fs::XattrFlags::empty());
        }
    }
}

/// Directory metadata applied after the children (creating children bumps
/// a directory's mtime).
struct DirMeta {
    path: RelPath,
    mode: u32,
    mtime: i64,
    uid: u32,
    gid: u32,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Copy a sparse member's bytes, leaving holes where it reads zeros (in
/// 64 KiB blocks): a 10 GiB file with a few KB of data stays a few KB on
/// disk.
fn copy_sparse(src: &mut impl Read, f: &mut fs::File) -> io::Result<u64> {
    use std::io::Write;
    const BLOCK: usize = 64 * 1024;
    let mut buf = vec![0u8; BLOCK];
    let mut total = 0u64;
    loop {
        let n = read_full(src, &mut buf)?;
        if n == 0 {
            break;
        }
        if buf[..n] == crate::tree::ZEROS[..n] {
            f.seek(io::SeekFrom::Current(n as i64))?;
        } else {
            f.write_all(&buf[..n])?;
        }
        total += n as u64;
    }
    f.set_len(total)?;
    Ok(total)
}

/// What a regular file gets once its bytes are written.
#[derive(Clone, Copy)]
struct FileMeta<'a> {
    mode: u32,
    mtime: i64,
    uid: u32,
    gid: u32,
    xattrs: &'a [(Vec<u8>, Vec<u8>)],
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
                // Each path counts once, however often the archive names it.
                if self.seen.insert(path) {
                    self.out.installed += 1;
                }
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
        let xattrs = self.pax_xattrs(e, path);
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
                xattrs,
            });
            return Ok(());
        }
        if kind.is_file() || kind == tar::EntryType::Continuous || kind == tar::EntryType::GNUSparse
        {
            let meta = FileMeta {
                mode,
                mtime,
                uid,
                gid,
                xattrs: &xattrs,
            };
            return self.write_file(e, dir, name, &meta, path);
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
        if !xattrs.is_empty() {
            use std::os::fd::AsRawFd;
            // The node just made, named through the directory's descriptor;
            // lsetxattr does not follow it.
            let mut at = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
            at.extend_from_slice(name);
            for (k, v) in &xattrs {
                if let Err(err) =
                    rustix::fs::lsetxattr(os(&at), os(k), v, rustix::fs::XattrFlags::empty())
                {
                    self.out.notes.push(format!(
                        "{path}: xattr {} not restored: {err}",
                        escape_bytes(k)
                    ));
                }
            }
        }
        rustix::fs::utimensat(dir, os(name), &ts(mtime), AtFlags::SYMLINK_NOFOLLOW)?;
        Ok(())
    }

    /// The `SCHILY.xattr.*` records of an entry that a package may carry
    /// (file capabilities, `user.*`, `trusted.*` other than union
    /// filesystems' own); others are noted and dropped.
    fn pax_xattrs<R: Read>(
        &mut self,
        e: &mut tar::Entry<'_, R>,
        path: &RelPath,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        let Ok(Some(exts)) = e.pax_extensions() else {
            return out;
        };
        for x in exts.flatten() {
            let Some(k) = x.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                continue;
            };
            if super::is_packable_xattr(k) && !crate::tree::is_internal_xattr(k) {
                out.push((k.to_vec(), x.value_bytes().to_vec()));
            } else {
                self.out.notes.push(format!(
                    "{path}: xattr {} is not one a package may set; not restored",
                    escape_bytes(k)
                ));
            }
        }
        out
    }

    /// A regular file: written under a temporary name, checked against the
    /// size its header claims, then renamed over the entry's name.
    fn write_file<R: Read>(
        &mut self,
        e: &mut tar::Entry<'_, R>,
        dir: BorrowedFd<'_>,
        name: &[u8],
        meta: &FileMeta<'_>,
        path: &RelPath,
    ) -> io::Result<()> {
        let FileMeta {
            mode,
            mtime,
            uid,
            gid,
            xattrs,
        } = *meta;
        let sparse = e.header().entry_type() == tar::EntryType::GNUSparse;
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
            let n = if sparse {
                copy_sparse(e, &mut f)?
            } else {
                io::copy(e, &mut f)?
            };
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
            // After the chown, which clears file capabilities.
            for (k, v) in xattrs {
                if let Err(err) =
                    rustix::fs::fsetxattr(&f, os(k), v, rustix::fs::XattrFlags::empty())
                {
                    self.out.notes.push(format!(
                        "{path}: xattr {} not restored: {err}",
                        escape_bytes(k)
                    ));
                }
            }
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

    /// Carry out the package's `layerpack.edits` (what its generated
    /// `postinst` does on a package manager): the old entry is saved under
    /// `var/lib/layerpack/<pkg>/orig/` (or marked absent) once, then the
    /// new entry shipped under `…/new/` is copied into place, or the entry
    /// is removed. Deletions go children first, then changes parents
    /// first.
    fn edit_all(&mut self, ctl: &Control) {
        self.out.scripts = ctl.scripts.clone();
        if ctl.edits.is_empty() {
            return;
        }
        let Some(pkg) = ctl
            .package
            .as_deref()
            .filter(|p| crate::session::validate_package_name(p).is_ok())
        else {
            self.refuse(
                b"layerpack.edits",
                "the control file names no valid Package, so the saved copies have no place; edits not carried out",
            );
            return;
        };
        let deletions = ctl.edits.iter().filter(|e| e.0).rev();
        let changes = ctl.edits.iter().filter(|e| !e.0);
        for (deleted, raw) in deletions.chain(changes) {
            let path = match RelPath::parse(raw) {
                Ok(p) => p,
                Err(why) => {
                    self.refuse(raw, format!("edit refused: the path {why}"));
                    continue;
                }
            };
            match self.edit(pkg, &path, *deleted) {
                Ok(()) => self.out.edits += 1,
                Err(e) => self.refuse(raw, format!("edit not carried out: {e}")),
            }
        }
    }

    fn edit(&mut self, pkg: &str, path: &RelPath, deleted: bool) -> io::Result<()> {
        let under = |what: &str| {
            RelPath::from_normalized(
                [
                    format!("var/lib/layerpack/{pkg}/{what}/").as_bytes(),
                    path.as_bytes(),
                ]
                .concat(),
            )
        };
        let (orig, absent, new) = (under("orig"), under("absent"), under("new"));
        let exists = |rel: &RelPath| -> io::Result<bool> {
            let Some((dir, name)) = self.root.parent(rel, Follow::Beneath)? else {
                return Ok(false);
            };
            match rustix::fs::statat(&dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(_) => Ok(true),
                Err(rustix::io::Errno::NOENT) => Ok(false),
                Err(e) => Err(e.into()),
            }
        };
        let target_there = exists(path)?;
        if !exists(&orig)? && !exists(&absent)? {
            if target_there {
                // Saving is a rename: the old entry keeps everything it
                // had (inode, links, xattrs).
                let (tdir, tname) = self.parent_dir(path)?;
                let (odir, oname) = self.parent_dir(&orig)?;
                rustix::fs::renameat(&tdir, os(tname), &odir, os(oname))?;
            } else {
                let (adir, aname) = self.parent_dir(&absent)?;
                drop(rustix::fs::openat(
                    &adir,
                    os(aname),
                    OFlags::CREATE | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )?);
            }
        }
        let (tdir, tname) = self.parent_dir(path)?;
        if deleted {
            beneath::remove_at(tdir.as_fd(), tname)?;
            return Ok(());
        }
        let Some((ndir, nname)) = self.root.parent(&new, Follow::Beneath)? else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("the package holds no new content at {new}"),
            ));
        };
        self.copy_node(ndir.as_fd(), nname, tdir.as_fd(), tname)
    }

    /// The directory of `rel` (created as needed) and its last component.
    fn parent_dir<'p>(&self, rel: &'p RelPath) -> io::Result<(OwnedFd, &'p [u8])> {
        let dir = self
            .root
            .dir_create(&rel.parent().unwrap_or_default(), Follow::Beneath)?;
        Ok((dir, rel.file_name()))
    }

    /// Copy a regular file or symlink with its owner, mode, xattrs and
    /// mtime over `to` (atomically: a temporary name, then a rename).
    fn copy_node(
        &mut self,
        from_dir: BorrowedFd<'_>,
        from: &[u8],
        to_dir: BorrowedFd<'_>,
        to: &[u8],
    ) -> io::Result<()> {
        let st = rustix::fs::statat(from_dir, os(from), AtFlags::SYMLINK_NOFOLLOW)?;
        let ft = rustix::fs::FileType::from_raw_mode(st.st_mode);
        self.tmp_counter += 1;
        let tmp = format!(
            ".layerpack-apply-{}-{}",
            std::process::id(),
            self.tmp_counter
        );
        let made = (|| -> io::Result<()> {
            match ft {
                rustix::fs::FileType::RegularFile => {
                    let src = fs::File::from(rustix::fs::openat(
                        from_dir,
                        os(from),
                        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )?);
                    let mut dst = fs::File::from(rustix::fs::openat(
                        to_dir,
                        tmp.as_str(),
                        OFlags::CREATE
                            | OFlags::EXCL
                            | OFlags::WRONLY
                            | OFlags::NOFOLLOW
                            | OFlags::CLOEXEC,
                        Mode::from_raw_mode(0o600),
                    )?);
                    io::copy(&mut &src, &mut dst)?;
                    if self.is_root {
                        rustix::fs::fchown(
                            &dst,
                            Some(rustix::fs::Uid::from_raw(st.st_uid)),
                            Some(rustix::fs::Gid::from_raw(st.st_gid)),
                        )?;
                    }
                    rustix::fs::fchmod(&dst, Mode::from_raw_mode(st.st_mode & 0o7777))?;
                    copy_xattrs(&src, &dst);
                    rustix::fs::futimens(&dst, &ts(st.st_mtime))?;
                }
                rustix::fs::FileType::Symlink => {
                    let target = rustix::fs::readlinkat(from_dir, os(from), Vec::new())?;
                    rustix::fs::symlinkat(target.as_c_str(), to_dir, tmp.as_str())?;
                }
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "only regular files and symlinks are carried as edits",
                    ))
                }
            }
            if let Ok(there) = rustix::fs::statat(to_dir, os(to), AtFlags::SYMLINK_NOFOLLOW) {
                if rustix::fs::FileType::from_raw_mode(there.st_mode)
                    == rustix::fs::FileType::Directory
                {
                    beneath::remove_at(to_dir, to)?;
                }
            }
            rustix::fs::renameat(to_dir, tmp.as_str(), to_dir, os(to))?;
            Ok(())
        })();
        if made.is_err() {
            let _ = rustix::fs::unlinkat(to_dir, tmp.as_str(), AtFlags::empty());
        }
        made
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
                for (k, v) in &d.xattrs {
                    if let Err(err) =
                        rustix::fs::fsetxattr(&fd, os(k), v, rustix::fs::XattrFlags::empty())
                    {
                        self.out.notes.push(format!(
                            "{}: xattr {} not restored: {err}",
                            d.path,
                            escape_bytes(k)
                        ));
                    }
                }
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
                // Counted once when written, however many entries named it.
                if self.seen.remove(&d.path) {
                    self.out.installed -= 1;
                }
            }
        }
    }
}
