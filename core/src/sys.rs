//! A narrow trait over the privileged calls backends make (mount, umount),
//! with the real implementation and a recording fake. Backends take one in
//! their constructor, so tests — here and in integration tests — can check
//! the exact calls and inject failures without root or a kernel feature.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Mount flags layerpack uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MountFlags {
    /// `MS_BIND`.
    pub bind: bool,
    /// `MS_PRIVATE` (change propagation of an existing mount).
    pub private: bool,
}

/// One recorded call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// `mount(2)`.
    Mount {
        /// Source (device, `overlay`, or the directory to bind).
        source: Option<PathBuf>,
        /// Mount point.
        target: PathBuf,
        /// Filesystem type.
        fstype: Option<String>,
        /// Flags.
        flags: MountFlags,
        /// Option string.
        data: Option<String>,
    },
    /// `umount2(2)` without flags.
    Umount {
        /// Mount point.
        target: PathBuf,
    },
    /// `ioctl(2)` on a descriptor opened for it.
    Ioctl {
        /// The file opened.
        path: PathBuf,
        /// Request number.
        request: u64,
        /// The argument buffer as passed in.
        arg: Vec<u8>,
    },
}

impl Call {
    /// The `mount --bind source target` call.
    pub fn bind(source: &Path, target: &Path) -> Call {
        Call::Mount {
            source: Some(source.to_path_buf()),
            target: target.to_path_buf(),
            fstype: None,
            flags: MountFlags {
                bind: true,
                private: false,
            },
            data: None,
        }
    }

    /// The `mount --make-private target` call.
    pub fn make_private(target: &Path) -> Call {
        Call::Mount {
            source: None,
            target: target.to_path_buf(),
            fstype: None,
            flags: MountFlags {
                bind: false,
                private: true,
            },
            data: None,
        }
    }
}

/// Answers a faked `ioctl`: may change the argument buffer (and the file
/// tree, to play the kernel's part) and decide the result.
pub type IoctlResponder = Box<dyn Fn(&Path, u64, &mut [u8]) -> io::Result<()> + Send + Sync>;

/// The privileged calls.
pub trait Sys: Send + Sync {
    /// `mount(2)`.
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MountFlags,
        data: Option<&str>,
    ) -> io::Result<()>;

    /// `umount2(2)`.
    fn umount(&self, target: &Path) -> io::Result<()>;

    /// Whether something of `fstype` (any, if `None`) is mounted at `target`.
    /// An unreadable or malformed mount table is an error, never "no".
    fn is_mounted(&self, target: &Path, fstype: Option<&str>) -> io::Result<bool>;

    /// Open `path` read-only without following a final symlink and without
    /// blocking (a fifo that appeared there is never waited on), then
    /// `ioctl(fd, request, arg)`; `arg` is read and written by the kernel.
    fn ioctl(&self, path: &Path, request: u64, arg: &mut [u8]) -> io::Result<()>;
}

/// The real calls (Linux).
pub struct RealSys;

/// One line of `/proc/self/mountinfo`, as bytes (octal escapes decoded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    /// Mount ID.
    pub id: u64,
    /// Device of the filesystem (`major:minor`).
    pub dev: (u32, u32),
    /// The directory of the filesystem that is mounted (`/` unless a bind
    /// mount of a subdirectory).
    pub root: Vec<u8>,
    /// Where it is mounted.
    pub mount_point: Vec<u8>,
    /// Filesystem type (`overlay`, `fuse.layerpack`, …).
    pub fstype: Vec<u8>,
    /// Mount source.
    pub source: Vec<u8>,
    /// Per-superblock options (overlay's `upperdir=…` is here).
    pub super_options: Vec<u8>,
}

fn unescape_mountinfo(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Parse mountinfo text. A line that does not have the documented fields
/// is an error, never skipped: a mount check must fail closed.
pub fn parse_mountinfo(text: &[u8]) -> io::Result<Vec<MountInfo>> {
    let bad = |n: usize, why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/self/mountinfo line {n}: {why}"),
        )
    };
    let mut out = Vec::new();
    for (i, line) in text.split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let f: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
        let sep = f
            .iter()
            .position(|x| *x == b"-")
            .filter(|&p| p >= 6 && f.len() >= p + 4)
            .ok_or_else(|| bad(i + 1, "no ' - ' separator with three fields after it"))?;
        let num = |x: &[u8]| -> Option<u64> { std::str::from_utf8(x).ok()?.parse().ok() };
        let id = num(f[0]).ok_or_else(|| bad(i + 1, "bad mount id"))?;
        let dev = std::str::from_utf8(f[2])
            .ok()
            .and_then(|d| d.split_once(':'))
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .ok_or_else(|| bad(i + 1, "bad major:minor"))?;
        out.push(MountInfo {
            id,
            dev,
            root: unescape_mountinfo(f[3]),
            mount_point: unescape_mountinfo(f[4]),
            fstype: unescape_mountinfo(f[sep + 1]),
            source: unescape_mountinfo(f[sep + 2]),
            super_options: unescape_mountinfo(f[sep + 3]),
        });
    }
    Ok(out)
}

/// This process's mounts.
pub fn read_mountinfo() -> io::Result<Vec<MountInfo>> {
    parse_mountinfo(&std::fs::read("/proc/self/mountinfo")?)
}

/// The mounts of this process that are mounted inside `dir` or name it
/// in their source or options (an overlay whose upper layer is there),
/// innermost (latest) first.
pub fn mounts_referring_to(dir: &Path) -> io::Result<Vec<MountInfo>> {
    use std::os::unix::ffi::OsStrExt;
    let d = dir.as_os_str().as_bytes();
    let mention = |hay: &[u8]| {
        hay.windows(d.len() + 1)
            .any(|w| w.starts_with(d) && matches!(w[d.len()], b'/' | b',' | b':'))
            || hay.ends_with(d)
    };
    let mut out: Vec<MountInfo> = read_mountinfo()?
        .into_iter()
        .filter(|m| {
            let inside = m.mount_point.starts_with(d)
                && m.mount_point.get(d.len()).is_none_or(|c| *c == b'/');
            inside || mention(&m.super_options) || mention(&m.source)
        })
        .collect();
    out.reverse();
    Ok(out)
}

/// Is something (of `fstype`) mounted at `target`, per mountinfo `text`.
/// Paths compare as bytes; a malformed mountinfo is an error.
pub fn mountinfo_has(text: &[u8], target: &Path, fstype: Option<&str>) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let want = target.as_os_str().as_bytes();
    Ok(parse_mountinfo(text)?
        .iter()
        .any(|m| m.mount_point == want && fstype.is_none_or(|t| m.fstype == t.as_bytes())))
}

impl Sys for RealSys {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MountFlags,
        data: Option<&str>,
    ) -> io::Result<()> {
        use nix::mount::MsFlags;
        let mut f = MsFlags::empty();
        if flags.bind {
            f |= MsFlags::MS_BIND;
        }
        if flags.private {
            f |= MsFlags::MS_PRIVATE;
        }
        nix::mount::mount(source, target, fstype, f, data).map_err(io::Error::from)
    }

    fn umount(&self, target: &Path) -> io::Result<()> {
        nix::mount::umount2(target, nix::mount::MntFlags::empty()).map_err(io::Error::from)
    }

    fn is_mounted(&self, target: &Path, fstype: Option<&str>) -> io::Result<bool> {
        mountinfo_has(&std::fs::read("/proc/self/mountinfo")?, target, fstype)
    }

    #[allow(unsafe_code)]
    fn ioctl(&self, path: &Path, request: u64, arg: &mut [u8]) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)?;
        // The request encodes the argument size; refuse a buffer that does
        // not match it, so the kernel never writes past `arg`.
        let size_mask = if cfg!(any(
            target_arch = "powerpc",
            target_arch = "powerpc64",
            target_arch = "mips",
            target_arch = "mips64",
            target_arch = "sparc",
            target_arch = "sparc64"
        )) {
            0x1fff
        } else {
            0x3fff
        };
        let size = ((request >> 16) & size_mask) as usize;
        if size != arg.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ioctl {request:#x} takes {size} bytes, given {}", arg.len()),
            ));
        }
        // SAFETY: `f` is an open descriptor for the duration of the call,
        // and `arg` is a live, exclusively borrowed buffer of exactly the
        // size the request encodes, so the kernel reads and writes only
        // within it.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), request as _, arg.as_mut_ptr()) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// Records every call, keeps a table of what is "mounted", and fails the
/// call numbered `fail_at` (0-based) with `errno` when set.
#[derive(Default)]
pub struct FakeSys {
    calls: Mutex<Vec<Call>>,
    mounted: Mutex<Vec<(PathBuf, Option<String>)>>,
    fail: Mutex<Option<(usize, i32)>>,
    responder: Mutex<Option<IoctlResponder>>,
}

impl FakeSys {
    /// A fake with nothing mounted.
    pub fn new() -> FakeSys {
        FakeSys::default()
    }

    /// Make call number `n` (0-based, counting every call) fail with `errno`.
    pub fn fail_at(&self, n: usize, errno: i32) {
        *self.fail.lock().unwrap_or_else(|p| p.into_inner()) = Some((n, errno));
    }

    /// Answer `ioctl` calls with `f` (default: succeed, buffer unchanged).
    pub fn on_ioctl(&self, f: IoctlResponder) {
        *self.responder.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// The calls so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn record(&self, c: Call) -> io::Result<()> {
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        let n = calls.len();
        calls.push(c);
        match *self.fail.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((at, errno)) if at == n => Err(io::Error::from_raw_os_error(errno)),
            _ => Ok(()),
        }
    }
}

impl Sys for FakeSys {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MountFlags,
        data: Option<&str>,
    ) -> io::Result<()> {
        self.record(Call::Mount {
            source: source.map(Path::to_path_buf),
            target: target.to_path_buf(),
            fstype: fstype.map(str::to_string),
            flags,
            data: data.map(str::to_string),
        })?;
        if !flags.private {
            let ty = if flags.bind {
                None
            } else {
                fstype.map(str::to_string)
            };
            self.mounted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((target.to_path_buf(), ty));
        }
        Ok(())
    }

    fn umount(&self, target: &Path) -> io::Result<()> {
        self.record(Call::Umount {
            target: target.to_path_buf(),
        })?;
        let mut m = self.mounted.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = m.iter().rposition(|(t, _)| t == target) {
            m.remove(i);
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        }
    }

    fn is_mounted(&self, target: &Path, fstype: Option<&str>) -> io::Result<bool> {
        Ok(self
            .mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(t, ty)| t == target && fstype.is_none_or(|f| ty.as_deref() == Some(f))))
    }

    fn ioctl(&self, path: &Path, request: u64, arg: &mut [u8]) -> io::Result<()> {
        self.record(Call::Ioctl {
            path: path.to_path_buf(),
            request,
            arg: arg.to_vec(),
        })?;
        match &*self.responder.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(f) => f(path, request, arg),
            None => Ok(()),
        }
    }
}

/// Have glibc map large allocations (4 MiB and more: the change set, the
/// plan, the ledger's lists) on their own and give them back when freed.
/// Its default threshold slides up to 32 MiB as big blocks are freed, so a
/// list that grows by doubling leaves its old copies in the heap, where
/// they stay resident: a 200k-change `final` peaked 15 % higher for that.
/// Elsewhere (other C libraries) this does nothing.
pub fn map_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt takes two integers and only sets a tunable of the
    // allocator; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_matched_as_bytes_with_escapes_and_type() {
        let text = b"36 25 0:32 / /a\\040b rw,relatime shared:1 - overlay overlay rw,lowerdir=/x\n\
                     37 25 8:1 /sub /n\\303\\277\\377 rw - ext4 /dev/sda1 rw\n";
        let has = |p: &[u8], t| {
            use std::os::unix::ffi::OsStrExt;
            mountinfo_has(text, Path::new(std::ffi::OsStr::from_bytes(p)), t).unwrap()
        };
        assert!(has(b"/a b", Some("overlay")));
        assert!(has(b"/a b", None));
        assert!(!has(b"/a b", Some("ext4")));
        assert!(!has(b"/a", None));
        // Not UTF-8: compared byte for byte, not lossily.
        assert!(has(b"/n\xc3\xbf\xff", Some("ext4")));
        assert!(!has("/n\u{ff}\u{fffd}".as_bytes(), None));
        let m = parse_mountinfo(text).unwrap();
        assert_eq!((m[1].dev, &m[1].root[..]), ((8, 1), &b"/sub"[..]));
    }

    #[test]
    fn malformed_mountinfo_is_an_error_not_unmounted() {
        for bad in [
            &b"36 25 0:32 / /m rw\n"[..],
            b"x 25 0:32 / /m rw - overlay o rw\n",
        ] {
            assert!(mountinfo_has(bad, Path::new("/m"), None).is_err());
        }
    }

    #[test]
    fn fake_records_tracks_and_fails_on_demand() {
        let f = FakeSys::new();
        f.fail_at(1, libc::EBUSY);
        f.mount(
            Some(Path::new("overlay")),
            Path::new("/m"),
            Some("overlay"),
            MountFlags::default(),
            Some("o"),
        )
        .unwrap();
        assert!(f.is_mounted(Path::new("/m"), Some("overlay")).unwrap());
        assert_eq!(
            f.umount(Path::new("/m")).unwrap_err().raw_os_error(),
            Some(libc::EBUSY)
        );
        assert_eq!(f.calls().len(), 2);
    }
}
