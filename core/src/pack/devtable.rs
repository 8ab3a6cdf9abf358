//! Buildroot's device/permission table (makedevs syntax), applied to a
//! package at pack time:
//!
//! `name type mode uid gid major minor start inc count`
//!
//! Types: `f` file (must be in the package), `F` file (skipped if absent),
//! `d` directory (added with missing parents), `r` directory and
//! everything below it, `c`/`b` devices and `p` fifos (added). `mode`, `uid`
//! and `gid` of `-1` keep the current value; `-` is an empty field. With a
//! `count`, names `name<start>`, `name<start+1>`, … are made, minors
//! increasing by `inc`. Owners are numeric, or `root`.

use std::path::Path;

use super::{Entries, PlannedEntry};
use crate::model::{FileKind, RelPath};
use crate::{Error, ErrorKind, Result};

/// One line of a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevEntry {
    /// Where it came from (`file:line`), for messages.
    pub origin: String,
    /// Path relative to the root.
    pub path: RelPath,
    /// `f F d r c b p`.
    pub kind: char,
    /// Mode, or `None` to keep.
    pub mode: Option<u32>,
    /// Owner, or `None` to keep.
    pub uid: Option<u32>,
    /// Group, or `None` to keep.
    pub gid: Option<u32>,
    /// Device major.
    pub major: u32,
    /// Device minor.
    pub minor: u32,
    /// First suffix number.
    pub start: u32,
    /// Minor increment.
    pub inc: u32,
    /// Number of nodes (0: just `name`).
    pub count: u32,
}

fn field_num(origin: &str, what: &str, v: &str, radix: u32) -> Result<Option<u32>> {
    if v == "-" || v == "-1" {
        return Ok(None);
    }
    if what != "mode" && v == "root" {
        return Ok(Some(0));
    }
    u32::from_str_radix(v, radix).map(Some).map_err(|_| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("{origin}: {what} '{v}' is not a number (owners must be numeric or root here)"),
        )
    })
}

/// Parse a table; `name` is used in error messages.
pub fn parse(text: &str, name: &Path) -> Result<Vec<DevEntry>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let origin = format!("{}:{}", name.display(), i + 1);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('|') {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{origin}: '|xattr' lines are not supported yet"),
            ));
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != 10 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{origin}: expected 10 fields (name type mode uid gid major minor start inc count), found {}", f.len()),
            ));
        }
        let kind = match f[1] {
            "f" | "F" | "d" | "r" | "c" | "b" | "p" => f[1].chars().next().unwrap_or('f'),
            t => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("{origin}: unknown type '{t}' (expected one of f F d r c b p)"),
                ))
            }
        };
        let num = |what: &str, v: &str| field_num(&origin, what, v, 10);
        out.push(DevEntry {
            path: RelPath::parse_for(
                f[0].trim_start_matches('/').as_bytes(),
                &format!("{origin}: name"),
            )?,
            kind,
            mode: field_num(&origin, "mode", f[2], 8)?,
            uid: num("uid", f[3])?,
            gid: num("gid", f[4])?,
            major: num("major", f[5])?.unwrap_or(0),
            minor: num("minor", f[6])?.unwrap_or(0),
            start: num("start", f[7])?.unwrap_or(0),
            inc: num("inc", f[8])?.unwrap_or(0),
            count: num("count", f[9])?.unwrap_or(0),
            origin,
        });
    }
    Ok(out)
}

fn set(e: &mut PlannedEntry, d: &DevEntry) {
    if let Some(m) = d.mode {
        e.mode = m & 0o7777;
    }
    if let Some(u) = d.uid {
        e.uid = u;
    }
    if let Some(g) = d.gid {
        e.gid = g;
    }
}

fn node(path: RelPath, kind: FileKind, d: &DevEntry, minor: u32) -> PlannedEntry<'static> {
    let rdev = if kind.is_device() {
        (d.major, minor)
    } else {
        (0, 0)
    };
    let mut e = PlannedEntry::made_up(path, super::Source::Synthetic, kind, rdev);
    e.mode = d.mode.unwrap_or(0o644) & 0o7777;
    e.uid = d.uid.unwrap_or(0);
    e.gid = d.gid.unwrap_or(0);
    e
}

/// Apply the table to the planned entries.
pub fn apply_table(
    table: &[DevEntry],
    map: &mut Entries<'_, '_>,
    warnings: &mut Vec<String>,
) -> Result<()> {
    for d in table {
        match d.kind {
            'f' | 'F' => match map.get_mut(&d.path) {
                Some(e) if e.kind() == FileKind::File => set(e, d),
                _ if d.kind == 'F' => {}
                _ => warnings.push(format!(
                    "{}: {} is not a file of this package; line skipped",
                    d.origin, d.path
                )),
            },
            'd' => {
                let mut cur = Some(d.path.clone());
                let mut chain = Vec::new();
                while let Some(p) = cur {
                    if p.is_root() {
                        break;
                    }
                    cur = p.parent();
                    chain.push(p);
                }
                for (i, p) in chain.into_iter().enumerate() {
                    let key = p.clone();
                    let e = map.get_or_insert_with(&key, || {
                        let mut n = node(p, FileKind::Dir, d, 0);
                        n.mode = 0o755;
                        n
                    });
                    if i == 0 {
                        set(e, d);
                    }
                }
            }
            'r' => {
                let mut hit = false;
                for e in map.under_mut(&d.path) {
                    set(e, d);
                    hit = true;
                }
                if !hit {
                    warnings.push(format!(
                        "{}: nothing of this package is under {}; line skipped",
                        d.origin, d.path
                    ));
                }
            }
            'c' | 'b' | 'p' => {
                let kind = match d.kind {
                    'c' => FileKind::CharDevice,
                    'b' => FileKind::BlockDevice,
                    _ => FileKind::Fifo,
                };
                if d.count == 0 {
                    map.insert(node(d.path.clone(), kind, d, d.minor));
                } else {
                    for i in 0..d.count {
                        let n = d.start + i;
                        let mut name = d.path.as_bytes().to_vec();
                        name.extend_from_slice(n.to_string().as_bytes());
                        let p = RelPath::from_normalized(name);
                        map.insert(node(p, kind, d, d.minor + i * d.inc));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_buildroot_lines() {
        let t = parse(
            "# comment\n/usr/bin/foo f 4755 0 0 - - - - -\n/dev/hda b 640 root root 3 1 1 1 15\n/data r -1 1000 1000 - - - - -\n",
            Path::new("t.txt"),
        )
        .unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].mode, Some(0o4755));
        assert_eq!((t[1].major, t[1].minor, t[1].count), (3, 1, 15));
        assert_eq!(t[2].mode, None);
        let e = parse("/x q 644 0 0 - - - - -\n", Path::new("t.txt")).unwrap_err();
        assert!(e.to_string().contains("t.txt:1"), "{e}");
        let e = parse("/x f 644 bob 0 - - - - -\n", Path::new("t.txt")).unwrap_err();
        assert!(e.to_string().contains("bob"), "{e}");
    }

    #[test]
    fn creates_device_batches() {
        let t = parse("/dev/hda b 640 0 0 3 1 1 1 15\n", Path::new("t")).unwrap();
        let mut map = Entries::default();
        apply_table(&t, &mut map, &mut Vec::new()).unwrap();
        assert_eq!(map.len(), 15);
        let all = map.into_sorted();
        let last = all
            .iter()
            .find(|e| *e.path == RelPath::from("dev/hda15"))
            .unwrap();
        assert_eq!(
            (last.kind(), last.rdev(), last.mode),
            (FileKind::BlockDevice, (3, 15), 0o640)
        );
    }
}
