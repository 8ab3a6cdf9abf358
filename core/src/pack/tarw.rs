//! A GNU-format tar writer with byte-exact, deterministic output: names
//! longer than 100 bytes and long link targets use GNU `././@LongLink`
//! records, sizes and times that do not fit in octal use base-256, as GNU
//! tar does. Owners are numeric; user and group names are left empty.

use std::io::{self, Write};

/// Type of a tar entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TarKind {
    /// Regular file (`0`).
    File,
    /// Hard link to an earlier entry (`1`).
    HardLink,
    /// Symbolic link (`2`).
    Symlink,
    /// Character device (`3`).
    CharDevice,
    /// Block device (`4`).
    BlockDevice,
    /// Directory (`5`).
    Dir,
    /// FIFO (`6`).
    Fifo,
}

impl TarKind {
    fn flag(self) -> u8 {
        match self {
            TarKind::File => b'0',
            TarKind::HardLink => b'1',
            TarKind::Symlink => b'2',
            TarKind::CharDevice => b'3',
            TarKind::BlockDevice => b'4',
            TarKind::Dir => b'5',
            TarKind::Fifo => b'6',
        }
    }
}

/// One header's worth of metadata.
#[derive(Clone, Debug)]
pub struct TarHeader<'a> {
    /// Full name as stored (e.g. `./usr/bin/x`, `./usr/` for directories).
    pub name: &'a [u8],
    /// Entry type.
    pub kind: TarKind,
    /// Permission bits.
    pub mode: u32,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Bytes of data that follow (regular files only).
    pub size: u64,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Link target for symlinks and hard links.
    pub link: &'a [u8],
    /// Device numbers.
    pub dev: (u32, u32),
}

/// Writes entries to `out`; call [`TarWriter::finish`] at the end.
pub struct TarWriter<W: Write> {
    out: W,
}

fn octal_or_base256(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    if v < 1u64 << (3 * digits as u32).min(63) {
        let s = format!("{v:0digits$o}");
        field[..digits].copy_from_slice(s.as_bytes());
        field[digits] = 0;
    } else {
        // GNU base-256: high bit of the first byte set, big-endian value.
        field.fill(0);
        field[0] = 0x80;
        let bytes = v.to_be_bytes();
        let n = field.len();
        field[n - 8..].copy_from_slice(&bytes);
    }
}

impl<W: Write> TarWriter<W> {
    /// A writer over `out`.
    pub fn new(out: W) -> TarWriter<W> {
        TarWriter { out }
    }

    fn raw_header(
        &mut self,
        name: &[u8],
        flag: u8,
        h: &TarHeader<'_>,
        size: u64,
        link: &[u8],
    ) -> io::Result<()> {
        self.raw_header_with(name, flag, h, size, link, |_| {})
    }

    /// [`TarWriter::raw_header`], `extra` filling more fields before the
    /// checksum is computed.
    fn raw_header_with(
        &mut self,
        name: &[u8],
        flag: u8,
        h: &TarHeader<'_>,
        size: u64,
        link: &[u8],
        extra: impl FnOnce(&mut [u8; 512]),
    ) -> io::Result<()> {
        let mut b = [0u8; 512];
        let n = name.len().min(100);
        b[..n].copy_from_slice(&name[..n]);
        octal_or_base256(&mut b[100..108], h.mode as u64);
        octal_or_base256(&mut b[108..116], h.uid as u64);
        octal_or_base256(&mut b[116..124], h.gid as u64);
        octal_or_base256(&mut b[124..136], size);
        octal_or_base256(&mut b[136..148], h.mtime.max(0) as u64);
        b[156] = flag;
        let l = link.len().min(100);
        b[157..157 + l].copy_from_slice(&link[..l]);
        b[257..263].copy_from_slice(b"ustar ");
        b[263..265].copy_from_slice(b" \0");
        if matches!(h.kind, TarKind::CharDevice | TarKind::BlockDevice)
            && flag != b'L'
            && flag != b'K'
        {
            octal_or_base256(&mut b[329..337], h.dev.0 as u64);
            octal_or_base256(&mut b[337..345], h.dev.1 as u64);
        }
        extra(&mut b);
        b[148..156].fill(b' ');
        let sum: u32 = b.iter().map(|x| *x as u32).sum();
        let s = format!("{sum:06o}\0 ");
        b[148..156].copy_from_slice(s.as_bytes());
        self.out.write_all(&b)
    }

    fn long_record(&mut self, flag: u8, h: &TarHeader<'_>, value: &[u8]) -> io::Result<()> {
        let meta = TarHeader {
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            ..h.clone()
        };
        self.raw_header(b"././@LongLink", flag, &meta, value.len() as u64 + 1, b"")?;
        self.out.write_all(value)?;
        self.out.write_all(&[0])?;
        self.pad(value.len() as u64 + 1)
    }

    fn pad(&mut self, len: u64) -> io::Result<()> {
        let rem = (512 - (len % 512) as usize) % 512;
        self.out.write_all(&[0u8; 512][..rem])
    }

    /// Write one header (with GNU long-name records when needed). For
    /// regular files, the caller then writes exactly `size` bytes with
    /// [`TarWriter::data`].
    pub fn header(&mut self, h: &TarHeader<'_>) -> io::Result<()> {
        if h.link.len() > 100 {
            self.long_record(b'K', h, h.link)?;
        }
        if h.name.len() > 100 {
            self.long_record(b'L', h, h.name)?;
        }
        let size = if h.kind == TarKind::File { h.size } else { 0 };
        self.raw_header(h.name, h.kind.flag(), h, size, h.link)
    }

    /// Write a PAX extended header (`x`) holding `records` (keyword, value),
    /// which applies to the next header. Used for extended attributes
    /// (`SCHILY.xattr.<name>`, as GNU tar and libarchive write and read
    /// them); values are raw bytes. Nothing is written for no records.
    pub fn pax(&mut self, records: &[(Vec<u8>, Vec<u8>)]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut body = Vec::new();
        for (k, v) in records {
            body.extend_from_slice(&pax_record(k, v));
        }
        let h = TarHeader {
            name: b"././@PaxHeader",
            kind: TarKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: body.len() as u64,
            mtime: 0,
            link: b"",
            dev: (0, 0),
        };
        self.raw_header(h.name, b'x', &h, body.len() as u64, b"")?;
        self.out.write_all(&body)?;
        self.pad(body.len() as u64)
    }

    /// Write a sparse regular file as a GNU sparse member (type `S`, the
    /// old GNU format that GNU tar, libarchive and Python read): `map` is
    /// the file's data segments (offset, length) in order, `size` its
    /// logical size; the data of each segment is read from `src` at its
    /// offset. Holes take no space in the archive and are restored as
    /// holes. dpkg's unpacker refuses this type, so deb never uses it.
    pub fn sparse_file<R: io::Read + io::Seek>(
        &mut self,
        h: &TarHeader<'_>,
        map: &[(u64, u64)],
        src: &mut R,
    ) -> io::Result<u64> {
        if h.name.len() > 100 {
            self.long_record(b'L', h, h.name)?;
        }
        let mut entries: Vec<(u64, u64)> = map.to_vec();
        // As GNU tar does: a file that ends in a hole (or is all hole)
        // ends its map with an empty segment at its end.
        if entries.last().is_none_or(|(o, l)| o + l < h.size) {
            entries.push((h.size, 0));
        }
        let stored: u64 = map.iter().map(|(_, l)| l).sum();
        let (first, rest) = entries.split_at(entries.len().min(4));
        let chunks: Vec<&[(u64, u64)]> = rest.chunks(21).collect();
        self.raw_header_with(h.name, b'S', h, stored, b"", |b| {
            for (i, (o, l)) in first.iter().enumerate() {
                let at = 386 + 24 * i;
                octal_or_base256(&mut b[at..at + 12], *o);
                octal_or_base256(&mut b[at + 12..at + 24], *l);
            }
            b[482] = u8::from(!chunks.is_empty());
            octal_or_base256(&mut b[483..495], h.size);
        })?;
        for (n, chunk) in chunks.iter().enumerate() {
            let mut b = [0u8; 512];
            for (i, (o, l)) in chunk.iter().enumerate() {
                octal_or_base256(&mut b[24 * i..24 * i + 12], *o);
                octal_or_base256(&mut b[24 * i + 12..24 * i + 24], *l);
            }
            b[504] = u8::from(n + 1 < chunks.len());
            self.out.write_all(&b)?;
        }
        for (o, l) in map {
            src.seek(io::SeekFrom::Start(*o))?;
            let copied = io::copy(
                &mut <&mut R as io::Read>::take(&mut *src, *l),
                &mut self.out,
            )?;
            if copied != *l {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("file shrank while being packaged ({copied} of {l} bytes at {o})"),
                ));
            }
        }
        self.pad(stored)?;
        Ok(stored)
    }

    /// Copy a file's bytes (exactly `size` of them) and the block padding.
    pub fn data(&mut self, src: impl io::Read, size: u64) -> io::Result<u64> {
        let copied = io::copy(&mut src.take(size), &mut self.out)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file shrank while being packaged ({copied} of {size} bytes)"),
            ));
        }
        self.pad(size)?;
        Ok(copied)
    }

    /// Write the end-of-archive blocks and return the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&[0u8; 1024])?;
        Ok(self.out)
    }
}

/// One PAX record: `"<len> <keyword>=<value>\n"`, where `<len>` counts
/// the whole record including its own digits.
pub fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    let mut out = format!("{len} ").into_bytes();
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

/// A GNU ar archive (`!<arch>`) with deterministic member headers: mtime,
/// uid and gid 0, mode 100644, as dpkg-deb and opkg-build write them.
pub fn ar_archive(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = b"!<arch>\n".to_vec();
    for (name, data) in members {
        let h = format!(
            "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
            name,
            0,
            0,
            0,
            "100644",
            data.len()
        );
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        if data.len() % 2 == 1 {
            out.push(b'\n');
        }
    }
    out
}

/// The 60-byte header of one ar member (data follows, padded to even length).
pub fn ar_member_header(name: &str, size: u64) -> Vec<u8> {
    format!(
        "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
        name, 0, 0, 0, "100644", size
    )
    .into_bytes()
}

/// Parse an ar archive into (name, data) members.
pub fn ar_members(data: &[u8]) -> Option<Vec<(String, &[u8])>> {
    let mut rest = data.strip_prefix(b"!<arch>\n")?;
    let mut out = Vec::new();
    while rest.len() >= 60 {
        let h = &rest[..60];
        let name = String::from_utf8_lossy(&h[..16])
            .trim_end()
            .trim_end_matches('/')
            .to_string();
        let size: usize = std::str::from_utf8(&h[48..58]).ok()?.trim().parse().ok()?;
        let body = rest.get(60..60 + size)?;
        out.push((name, body));
        let next = 60 + size + size % 2;
        rest = rest.get(next.min(rest.len())..)?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(tar_bytes: &[u8]) -> Vec<(Vec<u8>, u8, u64, Vec<u8>)> {
        let mut a = tar::Archive::new(tar_bytes);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let link = e.link_name_bytes().map(|l| l.to_vec()).unwrap_or_default();
                let name = e.path_bytes().to_vec();
                let flag = e.header().entry_type().as_byte();
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut data).unwrap();
                (name, flag, data.len() as u64, link)
            })
            .collect()
    }

    #[test]
    fn long_names_and_links_round_trip_through_an_independent_reader() {
        let long: Vec<u8> = [b"./".as_slice(), &[b'x'; 250]].concat();
        let target: Vec<u8> = [b"../".as_slice(), &[b'y'; 180]].concat();
        let mut w = TarWriter::new(Vec::new());
        let base = TarHeader {
            name: b"./usr/",
            kind: TarKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 1,
            link: b"",
            dev: (0, 0),
        };
        w.header(&base).unwrap();
        w.header(&TarHeader {
            name: &long,
            kind: TarKind::File,
            size: 3,
            ..base.clone()
        })
        .unwrap();
        w.data(&b"abc"[..], 3).unwrap();
        w.header(&TarHeader {
            name: b"./l",
            kind: TarKind::Symlink,
            link: &target,
            ..base.clone()
        })
        .unwrap();
        let bytes = w.finish().unwrap();
        let got = entries(&bytes);
        assert_eq!(got[0], (b"./usr/".to_vec(), b'5', 0, vec![]));
        assert_eq!(got[1], (long.clone(), b'0', 3, vec![]));
        assert_eq!(got[2], (b"./l".to_vec(), b'2', 0, target.clone()));
    }

    #[test]
    fn huge_sizes_use_base256() {
        let mut f = [0u8; 12];
        octal_or_base256(&mut f, 9 << 30);
        assert_eq!(f[0], 0x80);
        octal_or_base256(&mut f, 0o777);
        assert_eq!(&f, b"00000000777\0");
    }

    #[test]
    fn ar_round_trip() {
        let a = ar_archive(&[("debian-binary", b"2.0\n"), ("x", b"odd")]);
        assert!(a.starts_with(
            b"!<arch>\ndebian-binary   0           0     0     100644  4         `\n"
        ));
        let m = ar_members(&a).unwrap();
        assert_eq!(m[0], ("debian-binary".to_string(), &b"2.0\n"[..]));
        assert_eq!(m[1], ("x".to_string(), &b"odd"[..]));
    }
}
