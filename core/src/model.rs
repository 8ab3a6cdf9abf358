//! The change model every backend produces and every consumer reads.
//!
//! Paths are raw bytes relative to the base: never assumed to be UTF-8, never
//! starting with `/`, components joined by `/`. They are ordered the way a
//! depth-first walk with byte-wise sorted directory entries visits them (as
//! `tar --sort=name` does): a parent comes right before its subtree, so
//! additions can be applied in order and deletions in reverse order.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A path relative to the base, as bytes. The empty path is the base itself.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct RelPath(Vec<u8>);

impl RelPath {
    /// The base itself.
    pub fn root() -> RelPath {
        RelPath(Vec::new())
    }

    /// Check a path that came from outside (an archive member, a deletion
    /// list, a whiteout, a manifest, a device table) and make it a
    /// `RelPath` that can only name something beneath the root.
    ///
    /// A leading `./` and a trailing `/` are accepted (tar writes them) and
    /// doubled `/` are folded; refused are an absolute path, `.` or `..`
    /// anywhere else, a NUL byte, and a path that names the root itself
    /// ([`BadPath::Empty`], so callers can skip a tar's `./` entry).
    pub fn parse(bytes: &[u8]) -> std::result::Result<RelPath, BadPath> {
        if bytes.starts_with(b"/") {
            return Err(BadPath::Absolute);
        }
        if bytes.contains(&0) {
            return Err(BadPath::Nul);
        }
        let body = bytes.strip_prefix(b"./").unwrap_or(bytes);
        let body = if body == b"." { &b""[..] } else { body };
        let mut out = Vec::with_capacity(body.len());
        for comp in body.split(|b| *b == b'/').filter(|c| !c.is_empty()) {
            match comp {
                b"." => return Err(BadPath::Dot),
                b".." => return Err(BadPath::DotDot),
                _ => {}
            }
            if !out.is_empty() {
                out.push(b'/');
            }
            out.extend_from_slice(comp);
        }
        if out.is_empty() {
            return Err(BadPath::Empty);
        }
        Ok(RelPath(out))
    }

    /// [`RelPath::parse`] as a layerpack error naming the path and `what`
    /// it came from.
    pub fn parse_for(bytes: &[u8], what: &str) -> crate::Result<RelPath> {
        RelPath::parse(bytes).map_err(|why| {
            crate::Error::new(
                crate::ErrorKind::InvalidInput,
                format!("{what} '{}': {why}", escape_bytes(bytes)),
            )
        })
    }

    /// Wrap bytes that are already in normal form (no leading, trailing or
    /// doubled `/`, no `.` or `..` component), e.g. read back from an index
    /// this program wrote or built with [`RelPath::join`] from names a
    /// directory listing gave.
    pub fn from_normalized(bytes: Vec<u8>) -> RelPath {
        debug_assert!(bytes.is_empty() || RelPath::parse(&bytes).is_ok_and(|p| p.0 == bytes));
        RelPath(bytes)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// True for the base itself.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// This path joined with one more component `name` (which must not
    /// contain `/`).
    pub fn join(&self, name: &[u8]) -> RelPath {
        let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
        v.extend_from_slice(&self.0);
        if !v.is_empty() {
            v.push(b'/');
        }
        v.extend_from_slice(name);
        RelPath(v)
    }

    /// The parent path, `None` for the root.
    pub fn parent(&self) -> Option<RelPath> {
        if self.0.is_empty() {
            return None;
        }
        Some(match self.0.iter().rposition(|b| *b == b'/') {
            Some(i) => RelPath(self.0[..i].to_vec()),
            None => RelPath::root(),
        })
    }

    /// The last component (empty for the root).
    pub fn file_name(&self) -> &[u8] {
        match self.0.iter().rposition(|b| *b == b'/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// True if `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        other.0.is_empty()
            || (self.0.starts_with(&other.0)
                && (self.0.len() == other.0.len() || self.0[other.0.len()] == b'/'))
    }

    /// Number of components.
    pub fn depth(&self) -> usize {
        if self.0.is_empty() {
            0
        } else {
            1 + self.0.iter().filter(|b| **b == b'/').count()
        }
    }

    /// The path under `base` on this machine.
    pub fn under(&self, base: &Path) -> PathBuf {
        if self.0.is_empty() {
            base.to_path_buf()
        } else {
            base.join(OsStr::from_bytes(&self.0))
        }
    }

    /// A printable form: UTF-8 shown as is, other bytes as `\xNN`, control
    /// characters escaped. For messages, never for parsing.
    pub fn display(&self) -> String {
        escape_bytes(&self.0)
    }
}

/// Escape bytes for display: valid UTF-8 text stays, anything else is `\xNN`.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Depth-first order: compare as if `/` sorted before every other byte.
pub fn path_cmp(a: &[u8], b: &[u8]) -> Ordering {
    let key = |x: u8| if x == b'/' { 0u8 } else { x };
    let n = a.len().min(b.len());
    for i in 0..n {
        let (x, y) = (key(a[i]), key(b[i]));
        if x != y {
            return x.cmp(&y);
        }
    }
    a.len().cmp(&b.len())
}

/// Two streams in [`path_cmp`] order merged into one; of a path in both,
/// the item of `preferred` is kept and the other dropped.
pub fn merge_by_path<T>(
    other: impl Iterator<Item = T>,
    preferred: impl Iterator<Item = T>,
    path: impl Fn(&T) -> &[u8],
) -> impl Iterator<Item = T> {
    let mut other = other.peekable();
    let mut preferred = preferred.peekable();
    std::iter::from_fn(move || {
        let ord = match (other.peek(), preferred.peek()) {
            (None, None) => return None,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(o), Some(p)) => path_cmp(path(o), path(p)),
        };
        if ord == Ordering::Less {
            return other.next();
        }
        if ord == Ordering::Equal {
            other.next();
        }
        preferred.next()
    })
}

impl Ord for RelPath {
    fn cmp(&self, other: &Self) -> Ordering {
        path_cmp(&self.0, &other.0)
    }
}

impl PartialOrd for RelPath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.display())
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

/// Why an outside path was refused by [`RelPath::parse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadPath {
    /// It names the root itself.
    Empty,
    /// It starts with `/`.
    Absolute,
    /// It has a `.` component after the start.
    Dot,
    /// It has a `..` component.
    DotDot,
    /// It contains a NUL byte.
    Nul,
}

impl fmt::Display for BadPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BadPath::Empty => "names the root itself",
            BadPath::Absolute => "is an absolute path",
            BadPath::Dot => "has a '.' component",
            BadPath::DotDot => "has a '..' component",
            BadPath::Nul => "contains a NUL byte",
        })
    }
}

/// For literals in code and tests: panics on a path [`RelPath::parse`]
/// refuses (other than the empty root).
impl From<&str> for RelPath {
    fn from(s: &str) -> RelPath {
        match RelPath::parse(s.as_bytes()) {
            Ok(p) => p,
            Err(BadPath::Empty) => RelPath::root(),
            Err(e) => panic!("invalid path literal {s:?}: {e}"),
        }
    }
}

/// The type of a filesystem entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Character device.
    CharDevice,
    /// Block device.
    BlockDevice,
    /// Named pipe.
    Fifo,
    /// Unix socket.
    Socket,
}

impl FileKind {
    /// From the `S_IFMT` bits of a mode.
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => FileKind::File,
            libc::S_IFDIR => FileKind::Dir,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            _ => return None,
        })
    }

    /// The `S_IFMT` bits for this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileKind::File => libc::S_IFREG,
            FileKind::Dir => libc::S_IFDIR,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::CharDevice => libc::S_IFCHR,
            FileKind::BlockDevice => libc::S_IFBLK,
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::Socket => libc::S_IFSOCK,
        }
    }

    /// Stable lowercase name used in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::File => "file",
            FileKind::Dir => "dir",
            FileKind::Symlink => "symlink",
            FileKind::CharDevice => "char",
            FileKind::BlockDevice => "block",
            FileKind::Fifo => "fifo",
            FileKind::Socket => "socket",
        }
    }

    /// Inverse of [`FileKind::as_str`].
    pub fn parse(s: &str) -> Option<FileKind> {
        Some(match s {
            "file" => FileKind::File,
            "dir" => FileKind::Dir,
            "symlink" => FileKind::Symlink,
            "char" => FileKind::CharDevice,
            "block" => FileKind::BlockDevice,
            "fifo" => FileKind::Fifo,
            "socket" => FileKind::Socket,
            _ => return None,
        })
    }

    /// True for character and block devices.
    pub fn is_device(self) -> bool {
        matches!(self, FileKind::CharDevice | FileKind::BlockDevice)
    }
}

/// Extended attributes, sorted by name. Values are raw bytes.
pub type Xattrs = BTreeMap<Vec<u8>, Vec<u8>>;

/// The metadata of one entry as a package needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Type of entry.
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Size in bytes (regular files; symlinks: length of the target).
    pub size: u64,
    /// Modification time in nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Device number for character and block devices (major, minor).
    pub rdev: Option<(u32, u32)>,
    /// Extended attributes (overlay/aufs internals never appear here).
    pub xattrs: Xattrs,
    /// Symlink target bytes.
    pub link_target: Option<Vec<u8>>,
    /// SHA-256 of the content, for regular files in a change set.
    pub sha256: Option<[u8; 32]>,
    /// Hard-link group within the change set: entries with the same number
    /// are one inode. `None` when the entry has no other link in the layer.
    pub link_group: Option<u32>,
}

impl Meta {
    /// Metadata with everything but the kind and mode zeroed.
    pub fn new(kind: FileKind, mode: u32) -> Meta {
        Meta {
            kind,
            mode,
            uid: 0,
            gid: 0,
            size: 0,
            mtime_ns: 0,
            rdev: None,
            xattrs: Xattrs::new(),
            link_target: None,
            sha256: None,
            link_group: None,
        }
    }
}

/// What happened to a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// The path is absent from the base.
    Added,
    /// The path exists in both; `content_changed` is false when only mode,
    /// owner, device number or xattrs differ.
    Modified {
        /// Type, size, symlink target, mtime or bytes differ.
        content_changed: bool,
    },
    /// The base path is gone.
    Deleted,
}

impl ChangeKind {
    /// `+`, `~`, `m` or `-`, as in SCENARIOS.md.
    pub fn symbol(self) -> char {
        match self {
            ChangeKind::Added => '+',
            ChangeKind::Modified {
                content_changed: true,
            } => '~',
            ChangeKind::Modified {
                content_changed: false,
            } => 'm',
            ChangeKind::Deleted => '-',
        }
    }

    /// `added`, `modified` or `deleted`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Added => "added",
            ChangeKind::Modified { .. } => "modified",
            ChangeKind::Deleted => "deleted",
        }
    }
}

/// One change. `meta` is the new state, or for deletions the state the base
/// had.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Path relative to the base.
    pub path: RelPath,
    /// What happened.
    pub kind: ChangeKind,
    /// The new state (the old one for deletions).
    pub meta: Meta,
}

pub use crate::changeset::{ChangeSet, ChangeSetBuilder};

/// Split a device number into (major, minor) the way glibc does.
pub fn split_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff);
    (major as u32, minor as u32)
}

/// Join (major, minor) into a device number the way glibc does.
pub fn make_dev(major: u32, minor: u32) -> u64 {
    let (major, minor) = (major as u64, minor as u64);
    ((major & 0xffff_f000) << 32)
        | ((major & 0x0000_0fff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0x0000_00ff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_first_order_keeps_subtrees_together() {
        let mut v: Vec<RelPath> = ["a.b", "a/x", "a", "a-b", "a/x/y", "b"]
            .iter()
            .map(|s| RelPath::from(*s))
            .collect();
        v.sort();
        let got: Vec<String> = v.iter().map(|p| p.display()).collect();
        assert_eq!(got, ["a", "a/x", "a/x/y", "a-b", "a.b", "b"]);
    }

    #[test]
    fn relpath_parent_and_name() {
        let p = RelPath::parse(b"./usr//bin/x/").unwrap();
        assert_eq!(p.as_bytes(), b"usr/bin/x");
        assert_eq!(p.file_name(), b"x");
        assert_eq!(p.parent().unwrap().as_bytes(), b"usr/bin");
        assert!(p.starts_with(&RelPath::from("usr")));
        assert!(!RelPath::from("usrx").starts_with(&RelPath::from("usr")));
        assert_eq!(p.depth(), 3);
    }

    #[test]
    fn outside_paths_that_could_escape_are_refused() {
        for (bad, why) in [
            (&b""[..], BadPath::Empty),
            (b"./", BadPath::Empty),
            (b".", BadPath::Empty),
            (b"..", BadPath::DotDot),
            (b"sub/..", BadPath::DotDot),
            (b"x/../..", BadPath::DotDot),
            (b"./a/./b", BadPath::Dot),
            (b"/etc/passwd", BadPath::Absolute),
            (b"a\0b", BadPath::Nul),
        ] {
            assert_eq!(RelPath::parse(bad), Err(why), "{:?}", escape_bytes(bad));
        }
        assert_eq!(RelPath::parse(b"a\xff\nb").unwrap().as_bytes(), b"a\xff\nb");
        assert_eq!(RelPath::parse(b"..x/.y").unwrap().as_bytes(), b"..x/.y");
    }

    #[test]
    fn escapes_non_utf8_and_newlines() {
        assert_eq!(escape_bytes(b"a\nb\xff"), "a\\nb\\xff");
    }

    #[test]
    fn dev_numbers_round_trip() {
        for (ma, mi) in [(1, 3), (7, 0), (259, 65536), (4095, 255)] {
            assert_eq!(split_dev(make_dev(ma, mi)), (ma, mi));
        }
    }

    #[test]
    fn changeset_numbers_link_groups_in_path_order() {
        let mut m = Meta::new(FileKind::File, 0o644);
        m.link_group = Some(77);
        let c = |p: &str| Change {
            path: p.into(),
            kind: ChangeKind::Added,
            meta: m.clone(),
        };
        let set = ChangeSet::from_unsorted(vec![c("b"), c("a")]).to_vec();
        assert_eq!(set[0].meta.link_group, Some(0));
        assert_eq!(set[1].meta.link_group, Some(0));
    }
}
