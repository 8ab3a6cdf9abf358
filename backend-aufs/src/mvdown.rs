//! The aufs move-down ioctl: request number, argument layout and what its
//! answers mean.
//!
//! From `include/uapi/linux/aufs_type.h` (aufs4.x–aufs6.x):
//!
//! ```c
//! struct aufs_stfs { uint64_t f_blocks, f_bavail, f_files, f_ffree; };
//! struct aufs_stbr { int16_t brid; int16_t bindex; struct aufs_stfs stfs; } __aligned(8);
//! struct aufs_mvdown {
//!     uint32_t flags;                 /* in/out */
//!     struct aufs_stbr stbr[2];       /* [AUFS_MVDOWN_UPPER], [AUFS_MVDOWN_LOWER] */
//!     int8_t au_errno;                /* out */
//! } __aligned(8);
//! #define AUFS_CTL_MVDOWN _IOWR('A', AuCtl_MVDOWN /* 4 */, struct aufs_mvdown)
//! ```
//!
//! The only flag passed in is `AUFS_MVDOWN_ROLOWER` ("do it even if the
//! lower branch is mounted `ro`"). `AUFS_MVDOWN_OWLOWER` (overwrite a file
//! that exists below) is never passed: on an aufs6.1 kernel it oopsed the
//! kernel with the default `plink` and returned `EIO` with `noplink`.
//! Whatever the ioctl may not do is left to the userspace fold.

use layerpack_core::Error;
use std::io;
use std::path::Path;

/// `struct aufs_stfs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AufsStfs {
    /// Total blocks.
    pub f_blocks: u64,
    /// Free blocks for unprivileged users.
    pub f_bavail: u64,
    /// Total inodes.
    pub f_files: u64,
    /// Free inodes.
    pub f_ffree: u64,
}

/// `struct aufs_stbr` (8-byte aligned).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default)]
pub struct AufsStbr {
    /// Branch id (input with `BRID_*` flags, not used here).
    pub brid: i16,
    /// Branch index (output).
    pub bindex: i16,
    /// Free space (output with `STFS`, not used here).
    pub stfs: AufsStfs,
}

/// `struct aufs_mvdown` (8-byte aligned). Kept as the reference layout;
/// [`encode`] and [`decode`] use the offsets it has.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default)]
pub struct AufsMvdown {
    /// `AUFS_MVDOWN_*` flags, in and out.
    pub flags: u32,
    /// Upper and lower branch records.
    pub stbr: [AufsStbr; 2],
    /// aufs's own error code, out (`EAU_MVDOWN_*`).
    pub au_errno: i8,
}

/// Size of `struct aufs_mvdown`.
pub const SIZE: usize = 96;
/// Offset of `stbr`.
pub const OFFSET_STBR: usize = 8;
/// Offset of `au_errno`.
pub const OFFSET_AU_ERRNO: usize = 88;

/// `_IOWR(ty, nr, size)`. The generic layout (x86, arm, riscv, s390) puts
/// read|write = 3 in two bits at 30; powerpc, mips and sparc put 2|4 = 6 in
/// three bits at 29: the same value, so for a size below 8 KiB the request
/// is the same on every Linux architecture.
const fn iowr(ty: u8, nr: u8, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}

/// `AUFS_CTL_MVDOWN` = `_IOWR('A', 4, struct aufs_mvdown)` = 0xC0604104.
pub const AUFS_CTL_MVDOWN: u64 = iowr(b'A', 4, SIZE);

/// `AUFS_MVDOWN_OWLOWER`: never passed (see the module docs).
pub const OWLOWER: u32 = 1 << 1;
/// `AUFS_MVDOWN_ROLOWER`: move down even into a branch mounted `ro`.
pub const ROLOWER: u32 = 1 << 3;
/// `AUFS_MVDOWN_ROLOWER_R`: output, the lower branch was `ro`.
pub const ROLOWER_R: u32 = 1 << 4;

/// The argument for one move-down: `ROLOWER` only, everything else zero.
pub fn encode() -> [u8; SIZE] {
    let mut b = [0u8; SIZE];
    b[..4].copy_from_slice(&ROLOWER.to_ne_bytes());
    b
}

/// `(flags, au_errno)` from an argument the kernel filled in.
pub fn decode(b: &[u8]) -> (u32, i8) {
    let mut f = [0u8; 4];
    f.copy_from_slice(&b[..4]);
    (u32::from_ne_bytes(f), b[OFFSET_AU_ERRNO] as i8)
}

/// What aufs's own error code means (`EAU_MVDOWN_*`).
pub fn au_errno_text(code: i8) -> Option<&'static str> {
    Some(match code {
        1 => "its directory is opaque in the upper branch (EAU_MVDOWN_OPAQUE)",
        2 => "a whiteout for it exists below (EAU_MVDOWN_WHITEOUT)",
        3 => "it is not in the top branch (EAU_MVDOWN_UPPER)",
        4 => "it is already in the bottom branch (EAU_MVDOWN_BOTTOM)",
        5 => "no upper branch holds it (EAU_MVDOWN_NOUPPER)",
        6 => "there is no lower branch to move it to (EAU_MVDOWN_NOLOWERBR)",
        _ => return None,
    })
}

/// What to do after one ioctl.
#[derive(Debug)]
pub enum Outcome {
    /// The file is now in the base.
    Moved,
    /// The ioctl may not move this file (it exists below, is busy or
    /// linked, …); the userspace fold will.
    FoldLater(String),
    /// Move-down through the ioctl does not work on this mount at all; fold
    /// everything that is left from userspace.
    StopOnline(String),
    /// Something is wrong with a branch: stop, change nothing more.
    Fatal(Error),
}

/// `AUFS_MAX_NAMELEN` of `include/uapi/linux/aufs_type.h`: `NAME_MAX`
/// less room for two `.wh.` prefixes, a dot and four characters. aufs
/// refuses longer names with `ENAMETOOLONG`.
pub const AUFS_MAX_NAMELEN: u16 = 242;

/// Classify the result of the ioctl on `path`.
pub fn outcome(path: &Path, result: io::Result<()>, arg: &[u8]) -> Outcome {
    let (_, au) = decode(arg);
    let err = match result {
        Ok(()) => return Outcome::Moved,
        Err(e) => e,
    };
    let errno = err.raw_os_error().unwrap_or(0);
    let why = match au_errno_text(au) {
        Some(t) => format!("{err}: {t}"),
        None => err.to_string(),
    };
    match (errno, au) {
        (_, 6) => Outcome::StopOnline(why),
        (_, 1..=5) => Outcome::FoldLater(why),
        (libc::EEXIST, _) => Outcome::FoldLater(format!("{why}: the base already has this path")),
        (libc::EBUSY, _) => Outcome::FoldLater(format!(
            "{why}: the file is open elsewhere, hard-linked or pseudo-linked"
        )),
        // A symlink or fifo that replaced the file since the scan.
        (libc::ELOOP | libc::ENXIO, _) => Outcome::FoldLater(why),
        // A name past aufs's own limit, or a path aufs will not move
        // across branches: the fold works on the base's filesystem itself.
        (libc::ENAMETOOLONG, _) => Outcome::FoldLater(format!(
            "{why}: longer than aufs's name limit ({AUFS_MAX_NAMELEN} bytes)"
        )),
        (libc::EXDEV, _) => {
            Outcome::FoldLater(format!("{why}: aufs will not move it across branches"))
        }
        (libc::ENOTTY, _) => Outcome::StopOnline(format!(
            "{why}: not an aufs mount, or an aufs built without move-down"
        )),
        (libc::EINVAL, _) => Outcome::StopOnline(format!(
            "{why}: this aufs does not accept the move-down request"
        )),
        _ => Outcome::Fatal(Error::io(path, "aufs move-down failed", err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of, size_of};

    #[test]
    fn layout_matches_the_kernel_header() {
        assert_eq!(size_of::<AufsStfs>(), 32);
        assert_eq!(size_of::<AufsStbr>(), 40);
        assert_eq!(offset_of!(AufsStbr, stfs), 8);
        assert_eq!(size_of::<AufsMvdown>(), SIZE);
        assert_eq!(align_of::<AufsMvdown>(), 8);
        assert_eq!(offset_of!(AufsMvdown, stbr), OFFSET_STBR);
        assert_eq!(offset_of!(AufsMvdown, au_errno), OFFSET_AU_ERRNO);
    }

    #[test]
    fn request_number_is_iowr_a_4_96() {
        assert_eq!(AUFS_CTL_MVDOWN, 0xC060_4104);
    }

    #[test]
    fn the_argument_asks_rolower_and_never_owlower() {
        let a = encode();
        let (flags, au) = decode(&a);
        assert_eq!(flags, ROLOWER);
        assert_eq!(flags & OWLOWER, 0);
        assert_eq!(au, 0);
        assert!(a[4..].iter().all(|&b| b == 0));
    }

    #[test]
    fn answers_map_to_clear_outcomes() {
        let p = Path::new("/m/etc/x");
        let with_au = |code: i8| {
            let mut a = encode();
            a[OFFSET_AU_ERRNO] = code as u8;
            a
        };
        let e = |n| Err(io::Error::from_raw_os_error(n));
        assert!(matches!(outcome(p, Ok(()), &encode()), Outcome::Moved));
        match outcome(p, e(libc::EEXIST), &encode()) {
            Outcome::FoldLater(w) => assert!(w.contains("base already has"), "{w}"),
            o => panic!("{o:?}"),
        }
        match outcome(p, e(libc::EBUSY), &encode()) {
            Outcome::FoldLater(w) => assert!(w.contains("hard-linked"), "{w}"),
            o => panic!("{o:?}"),
        }
        match outcome(p, e(libc::EINVAL), &with_au(4)) {
            Outcome::FoldLater(w) => assert!(w.contains("EAU_MVDOWN_BOTTOM"), "{w}"),
            o => panic!("{o:?}"),
        }
        for code in 1..=5 {
            assert!(au_errno_text(code).is_some());
            assert!(matches!(
                outcome(p, e(libc::EINVAL), &with_au(code)),
                Outcome::FoldLater(_)
            ));
        }
        assert!(matches!(
            outcome(p, e(libc::EINVAL), &with_au(6)),
            Outcome::StopOnline(_)
        ));
        match outcome(p, e(libc::ENOTTY), &encode()) {
            Outcome::StopOnline(w) => assert!(w.contains("not an aufs mount"), "{w}"),
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            outcome(p, e(libc::EINVAL), &encode()),
            Outcome::StopOnline(_)
        ));
        match outcome(p, e(libc::EIO), &encode()) {
            Outcome::Fatal(err) => assert!(err.to_string().contains("/m/etc/x"), "{err}"),
            o => panic!("{o:?}"),
        }
    }
}
