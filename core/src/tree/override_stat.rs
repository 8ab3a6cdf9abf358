//! Recorded ownership: the `user.containers.override_stat` xattr.
//!
//! An unprivileged install cannot `chown root:root`, make a file setuid
//! for another owner or `mknod` a device. A union filesystem that sees
//! every call (the FUSE backend) lets such calls succeed inside the layer
//! and records what was asked for on the entry, in the grammar
//! containers/storage and fuse-overlayfs use: `uid:gid:mode[:type]`, the
//! mode in octal (permission bits with setuid, setgid and sticky), the
//! type one of `file`, `dir`, `symlink`, `pipe`, `socket`, `char-M-m`,
//! `block-M-m`. A device is stored as an empty regular file whose record
//! says what it is. Every tree read ([`crate::tree::Record`]) applies the
//! record, so packages carry the owners, modes and devices the install
//! asked for; the xattr itself is bookkeeping, never content.
//!
//! Under fakeroot (`FAKEROOTKEY` set) records are not applied: fakeroot's
//! database then holds the tree's owners and modes, and what it shows is
//! what the image it makes will hold. Buildroot's image step is such a
//! run: it resets every owner to 0:0 and applies the permission tables
//! there, behind the records' back.

use crate::model::{make_dev, split_dev, FileKind};

/// The xattr's name.
pub const XATTR: &str = "user.containers.override_stat";

/// Whether readers apply records: not under fakeroot (see the module
/// docs). Decided once per process.
pub fn in_effect() -> bool {
    static IN_EFFECT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *IN_EFFECT.get_or_init(|| std::env::var_os("FAKEROOTKEY").is_none_or(|k| k.is_empty()))
}

/// One parsed record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Override {
    /// Owner asked for.
    pub uid: u32,
    /// Group asked for.
    pub gid: u32,
    /// Permission bits asked for (`0o7777`).
    pub mode: u32,
    /// The type asked for, when the record says (a device stored as a
    /// regular file), with its device number.
    pub kind: Option<(FileKind, u64)>,
}

impl Override {
    /// Parse a record; `None` when it is not in the grammar.
    pub fn parse(value: &[u8]) -> Option<Override> {
        let text = std::str::from_utf8(value).ok()?;
        let text = text.trim_end_matches('\0');
        let mut parts = text.splitn(4, ':');
        let uid = parts.next()?.parse().ok()?;
        let gid = parts.next()?.parse().ok()?;
        let mode = u32::from_str_radix(parts.next()?, 8).ok()?;
        if mode > 0o7777 {
            return None;
        }
        let kind = match parts.next() {
            None => None,
            Some(t) => Some(parse_type(t)?),
        };
        Some(Override {
            uid,
            gid,
            mode,
            kind,
        })
    }

    /// The record as stored.
    pub fn format(&self) -> String {
        let mut s = format!("{}:{}:{:04o}", self.uid, self.gid, self.mode);
        if let Some((kind, rdev)) = self.kind {
            s.push(':');
            s.push_str(&type_name(kind, rdev));
        }
        s
    }
}

fn parse_type(t: &str) -> Option<(FileKind, u64)> {
    Some(match t {
        "file" => (FileKind::File, 0),
        "dir" => (FileKind::Dir, 0),
        "symlink" => (FileKind::Symlink, 0),
        "pipe" => (FileKind::Fifo, 0),
        "socket" => (FileKind::Socket, 0),
        _ => {
            let (kind, nums) = if let Some(n) = t.strip_prefix("char-") {
                (FileKind::CharDevice, n)
            } else if let Some(n) = t.strip_prefix("block-") {
                (FileKind::BlockDevice, n)
            } else {
                return None;
            };
            let (major, minor) = nums.split_once('-')?;
            (kind, make_dev(major.parse().ok()?, minor.parse().ok()?))
        }
    })
}

fn type_name(kind: FileKind, rdev: u64) -> String {
    match kind {
        FileKind::File => "file".into(),
        FileKind::Dir => "dir".into(),
        FileKind::Symlink => "symlink".into(),
        FileKind::Fifo => "pipe".into(),
        FileKind::Socket => "socket".into(),
        FileKind::CharDevice | FileKind::BlockDevice => {
            let (major, minor) = split_dev(rdev);
            let prefix = if kind == FileKind::CharDevice {
                "char"
            } else {
                "block"
            };
            format!("{prefix}-{major}-{minor}")
        }
    }
}

/// What an entry of type `stored` (as on disk) is once `o` is applied:
/// only a regular file can stand for another type, and only for a
/// device, a fifo or a socket (an empty placeholder); a record naming its
/// own type, or none, changes owner and mode only.
pub fn effective_kind(stored: FileKind, stored_rdev: u64, o: &Override) -> (FileKind, u64) {
    match o.kind {
        Some((k, rdev))
            if stored == FileKind::File
                && (k.is_device() || matches!(k, FileKind::Fifo | FileKind::Socket)) =>
        {
            (k, rdev)
        }
        _ => (stored, stored_rdev),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_in_the_containers_grammar() {
        for (text, o) in [
            (
                "0:0:4755",
                Override {
                    uid: 0,
                    gid: 0,
                    mode: 0o4755,
                    kind: None,
                },
            ),
            (
                "0:5:0620:char-136-3",
                Override {
                    uid: 0,
                    gid: 5,
                    mode: 0o620,
                    kind: Some((FileKind::CharDevice, make_dev(136, 3))),
                },
            ),
            (
                "7:8:0660:block-8-1",
                Override {
                    uid: 7,
                    gid: 8,
                    mode: 0o660,
                    kind: Some((FileKind::BlockDevice, make_dev(8, 1))),
                },
            ),
            (
                "0:0:0755:dir",
                Override {
                    uid: 0,
                    gid: 0,
                    mode: 0o755,
                    kind: Some((FileKind::Dir, 0)),
                },
            ),
        ] {
            assert_eq!(Override::parse(text.as_bytes()), Some(o), "{text}");
            assert_eq!(o.format(), text);
        }
        // containers/storage writes the mode with a leading zero.
        assert_eq!(
            Override::parse(b"0:0:0644:file").map(|o| o.mode),
            Some(0o644)
        );
        for bad in ["", "0:0", "x:0:0644", "0:0:9", "0:0:17777", "0:0:0644:tape"] {
            assert_eq!(Override::parse(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn only_a_regular_file_stands_for_another_type() {
        let dev = Override::parse(b"0:0:0600:char-1-3").unwrap();
        assert_eq!(
            effective_kind(FileKind::File, 0, &dev),
            (FileKind::CharDevice, make_dev(1, 3))
        );
        assert_eq!(effective_kind(FileKind::Dir, 0, &dev), (FileKind::Dir, 0));
    }
}
