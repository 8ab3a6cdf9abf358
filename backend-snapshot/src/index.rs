//! The on-disk index of a base taken at `init`: every entry's stat data in
//! scan order, paths prefix-compressed, integers as varints, closed by a
//! record count and a SHA-256 of the whole stream so that truncation or
//! corruption is detected instead of silently producing a wrong layer.
//!
//! Typical cost is 30–50 bytes per entry (a 1M-entry base gives a ~40 MB
//! index); it is written and read as a stream, never held in memory.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use layerpack_core::model::{FileKind, RelPath};
use layerpack_core::tree::Record;
use layerpack_core::{Error, ErrorKind, Result};
use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"LPSNAPv1";
const TAG_RECORD: u8 = 1;
const TAG_END: u8 = 0;
const HAS_HASH: u8 = 0x10;
const HAS_XATTRS: u8 = 0x20;
const HAS_TARGET: u8 = 0x40;

/// Facts about the snapshot, stored in the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Wall-clock time the scan started, ns since the epoch.
    pub start_ns: i64,
    /// Entries whose mtime or ctime is within this many ns before the
    /// start (or later) were racy and got a content hash.
    pub window_ns: i64,
    /// Every regular file got a content hash.
    pub hash_all: bool,
}

fn kind_code(k: FileKind) -> u8 {
    match k {
        FileKind::File => 0,
        FileKind::Dir => 1,
        FileKind::Symlink => 2,
        FileKind::CharDevice => 3,
        FileKind::BlockDevice => 4,
        FileKind::Fifo => 5,
        FileKind::Socket => 6,
    }
}

fn code_kind(c: u8) -> Option<FileKind> {
    Some(match c {
        0 => FileKind::File,
        1 => FileKind::Dir,
        2 => FileKind::Symlink,
        3 => FileKind::CharDevice,
        4 => FileKind::BlockDevice,
        5 => FileKind::Fifo,
        6 => FileKind::Socket,
        _ => return None,
    })
}

/// Writes an index; call [`IndexWriter::finish`] to make it valid.
pub struct IndexWriter {
    out: BufWriter<File>,
    hash: Sha256,
    prev: Vec<u8>,
    count: u64,
    buf: Vec<u8>,
    tmp: PathBuf,
    dest: PathBuf,
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_signed(buf: &mut Vec<u8>, v: i64) {
    put_varint(buf, ((v << 1) ^ (v >> 63)) as u64);
}

fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    put_varint(buf, b.len() as u64);
    buf.extend_from_slice(b);
}

impl IndexWriter {
    /// Start writing `dest` (through a temporary file renamed at the end).
    pub fn create(dest: &Path, header: Header) -> Result<IndexWriter> {
        let tmp = dest.with_extension("tmp");
        let f = File::create(&tmp).map_err(|e| Error::io(&tmp, "cannot create index", e))?;
        let mut w = IndexWriter {
            out: BufWriter::with_capacity(256 * 1024, f),
            hash: Sha256::new(),
            prev: Vec::new(),
            count: 0,
            buf: Vec::with_capacity(256),
            tmp,
            dest: dest.to_path_buf(),
        };
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&header.start_ns.to_le_bytes());
        h.extend_from_slice(&header.window_ns.to_le_bytes());
        h.push(header.hash_all as u8);
        w.emit(h)?;
        Ok(w)
    }

    fn emit(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.hash.update(&bytes);
        self.out
            .write_all(&bytes)
            .map_err(|e| Error::io(&self.tmp, "cannot write index", e))
    }

    /// Append one record (records must come in scan order).
    pub fn push(&mut self, r: &Record) -> Result<()> {
        let mut b = std::mem::take(&mut self.buf);
        b.clear();
        b.push(TAG_RECORD);
        let path = r.path.as_bytes();
        let common = path
            .iter()
            .zip(&self.prev)
            .take_while(|(a, b)| a == b)
            .count();
        put_varint(&mut b, common as u64);
        put_bytes(&mut b, &path[common..]);
        let mut flags = kind_code(r.kind);
        if r.sha256.is_some() {
            flags |= HAS_HASH;
        }
        if !r.xattrs.is_empty() {
            flags |= HAS_XATTRS;
        }
        if r.link_target.is_some() {
            flags |= HAS_TARGET;
        }
        b.push(flags);
        for v in [r.mode as u64, r.uid as u64, r.gid as u64, r.size] {
            put_varint(&mut b, v);
        }
        put_signed(&mut b, r.mtime_ns);
        put_signed(&mut b, r.ctime_ns);
        for v in [r.ino, r.dev, r.nlink, r.rdev] {
            put_varint(&mut b, v);
        }
        if let Some(h) = &r.sha256 {
            b.extend_from_slice(h);
        }
        if !r.xattrs.is_empty() {
            put_varint(&mut b, r.xattrs.len() as u64);
            for (k, v) in &r.xattrs {
                put_bytes(&mut b, k);
                put_bytes(&mut b, v);
            }
        }
        if let Some(t) = &r.link_target {
            put_bytes(&mut b, t);
        }
        self.hash.update(&b);
        let res = self
            .out
            .write_all(&b)
            .map_err(|e| Error::io(&self.tmp, "cannot write index", e));
        self.buf = b;
        res?;
        self.prev.clear();
        self.prev.extend_from_slice(path);
        self.count += 1;
        Ok(())
    }

    /// Write the trailer, flush, fsync and move into place. Returns the
    /// number of records.
    pub fn finish(mut self) -> Result<u64> {
        let mut t = vec![TAG_END];
        put_varint(&mut t, self.count);
        self.hash.update(&t);
        let digest: [u8; 32] = self.hash.clone().finalize().into();
        t.extend_from_slice(&digest);
        self.out
            .write_all(&t)
            .map_err(|e| Error::io(&self.tmp, "cannot write index", e))?;
        let f = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, "cannot write index", e.into_error()))?;
        f.sync_all()
            .map_err(|e| Error::io(&self.tmp, "cannot sync index", e))?;
        std::fs::rename(&self.tmp, &self.dest)
            .map_err(|e| Error::io(&self.dest, "cannot move index into place", e))?;
        Ok(self.count)
    }
}

/// Reads an index back as a stream of records. The last item is an error
/// if the file is truncated or does not match its checksum.
pub struct IndexReader {
    input: Input,
    prev: Vec<u8>,
    count: u64,
    path: PathBuf,
    done: bool,
    /// The header.
    pub header: Header,
}

/// A read buffer that hashes the file body (all but the trailing 32-byte
/// digest) as it is read, a chunk at a time.
struct Input {
    file: File,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// File offset of `buf[end]`.
    read_to: u64,
    /// Bytes covered by the digest.
    body_len: u64,
    hash: Sha256,
}

impl Input {
    /// Make at least `need` bytes available; false at end of file.
    fn fill(&mut self, need: usize) -> std::io::Result<bool> {
        if self.end - self.pos >= need {
            return Ok(true);
        }
        self.buf.copy_within(self.pos..self.end, 0);
        self.end -= self.pos;
        self.pos = 0;
        if self.buf.len() < need {
            self.buf.resize(need.next_power_of_two(), 0);
        }
        while self.end < need {
            let n = self.file.read(&mut self.buf[self.end..])?;
            if n == 0 {
                return Ok(false);
            }
            let first = self.read_to;
            let hashed_end = (first + n as u64).min(self.body_len);
            if hashed_end > first {
                let len = (hashed_end - first) as usize;
                self.hash.update(&self.buf[self.end..self.end + len]);
            }
            self.read_to += n as u64;
            self.end += n;
        }
        Ok(true)
    }
}

impl IndexReader {
    /// Open `path` and read its header.
    pub fn open(path: &Path) -> Result<IndexReader> {
        let f = File::open(path).map_err(|e| Error::io(path, "cannot open snapshot index", e))?;
        let len = f
            .metadata()
            .map_err(|e| Error::io(path, "cannot open snapshot index", e))?
            .len();
        let mut r = IndexReader {
            input: Input {
                file: f,
                buf: vec![0u8; 256 * 1024],
                pos: 0,
                end: 0,
                read_to: 0,
                body_len: len.saturating_sub(32),
                hash: Sha256::new(),
            },
            prev: Vec::new(),
            count: 0,
            path: path.to_path_buf(),
            done: false,
            header: Header {
                start_ns: 0,
                window_ns: 0,
                hash_all: false,
            },
        };
        let mut h = [0u8; 25];
        r.read_exact(&mut h)?;
        if &h[..8] != MAGIC {
            return Err(r.corrupt("not a layerpack snapshot index"));
        }
        let i64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[at..at + 8]);
            i64::from_le_bytes(b)
        };
        r.header = Header {
            start_ns: i64_at(8),
            window_ns: i64_at(16),
            hash_all: h[24] != 0,
        };
        Ok(r)
    }

    fn corrupt(&self, what: &str) -> Error {
        Error::new(
            ErrorKind::Corrupt,
            format!("snapshot index is corrupt or truncated ({what}); abort the session and run init again"),
        )
        .with_path(&self.path)
    }

    fn read_exact(&mut self, out: &mut [u8]) -> Result<()> {
        match self.input.fill(out.len()) {
            Ok(true) => {
                let i = &mut self.input;
                out.copy_from_slice(&i.buf[i.pos..i.pos + out.len()]);
                i.pos += out.len();
                Ok(())
            }
            Ok(false) => Err(self.corrupt("unexpected end of file")),
            Err(e) => Err(Error::io(&self.path, "cannot read snapshot index", e)),
        }
    }

    fn byte(&mut self) -> Result<u8> {
        let i = &mut self.input;
        if i.pos < i.end {
            i.pos += 1;
            return Ok(i.buf[i.pos - 1]);
        }
        let mut b = [0u8];
        self.read_exact(&mut b)?;
        Ok(b[0])
    }

    /// File offset of the next unread byte.
    fn offset(&self) -> u64 {
        self.input.read_to - (self.input.end - self.input.pos) as u64
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.corrupt("bad number"))
    }

    fn signed(&mut self) -> Result<i64> {
        let v = self.varint()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    fn bytes(&mut self) -> Result<Vec<u8>> {
        let n = self.varint()?;
        if n > 1 << 24 {
            return Err(self.corrupt("implausible length"));
        }
        let mut v = vec![0u8; n as usize];
        self.read_exact(&mut v)?;
        Ok(v)
    }

    fn record(&mut self) -> Result<Option<Record>> {
        match self.byte()? {
            TAG_RECORD => {}
            TAG_END => {
                let count = self.varint()?;
                if self.offset() != self.input.body_len {
                    return Err(self.corrupt("trailer is not at the end"));
                }
                let mut got = [0u8; 32];
                self.read_exact(&mut got)?;
                let expect: [u8; 32] = self.input.hash.clone().finalize().into();
                if count != self.count || got != expect {
                    return Err(self.corrupt("checksum mismatch"));
                }
                return Ok(None);
            }
            _ => return Err(self.corrupt("bad record tag")),
        }
        let common = self.varint()? as usize;
        let suffix = self.bytes()?;
        if common > self.prev.len() {
            return Err(self.corrupt("bad path prefix"));
        }
        self.prev.truncate(common);
        self.prev.extend_from_slice(&suffix);
        let flags = self.byte()?;
        let kind = code_kind(flags & 0x0f).ok_or_else(|| self.corrupt("bad file type"))?;
        let mode = self.varint()? as u32;
        let uid = self.varint()? as u32;
        let gid = self.varint()? as u32;
        let size = self.varint()?;
        let mtime_ns = self.signed()?;
        let ctime_ns = self.signed()?;
        let ino = self.varint()?;
        let dev = self.varint()?;
        let nlink = self.varint()?;
        let rdev = self.varint()?;
        let sha256 = if flags & HAS_HASH != 0 {
            let mut h = [0u8; 32];
            self.read_exact(&mut h)?;
            Some(h)
        } else {
            None
        };
        let mut xattrs = layerpack_core::model::Xattrs::new();
        if flags & HAS_XATTRS != 0 {
            for _ in 0..self.varint()? {
                let k = self.bytes()?;
                let v = self.bytes()?;
                xattrs.insert(k, v);
            }
        }
        let link_target = if flags & HAS_TARGET != 0 {
            Some(self.bytes()?)
        } else {
            None
        };
        self.count += 1;
        Ok(Some(Record {
            path: RelPath::from_normalized(self.prev.clone()),
            kind,
            mode,
            uid,
            gid,
            size,
            mtime_ns,
            ctime_ns,
            ino,
            dev,
            nlink,
            rdev,
            xattrs,
            link_target,
            sha256,
        }))
    }
}

impl Iterator for IndexReader {
    type Item = Result<Record>;
    fn next(&mut self) -> Option<Result<Record>> {
        if self.done {
            return None;
        }
        match self.record() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(path: &[u8], kind: FileKind) -> Record {
        Record {
            path: RelPath::from_normalized(path.to_vec()),
            kind,
            mode: 0o755,
            uid: 1000,
            gid: 100,
            size: 1 << 40,
            mtime_ns: -5,
            ctime_ns: 1_700_000_000_123_456_789,
            ino: 42,
            dev: 2049,
            nlink: 2,
            rdev: 0,
            xattrs: [(b"user.a".to_vec(), b"\x00\xff".to_vec())]
                .into_iter()
                .collect(),
            link_target: (kind == FileKind::Symlink).then(|| b"../x\n".to_vec()),
            sha256: Some([7; 32]),
        }
    }

    fn write(path: &Path, recs: &[Record]) {
        let h = Header {
            start_ns: 99,
            window_ns: 2,
            hash_all: true,
        };
        let mut w = IndexWriter::create(path, h).unwrap();
        for r in recs {
            w.push(r).unwrap();
        }
        assert_eq!(w.finish().unwrap(), recs.len() as u64);
    }

    #[test]
    fn round_trip() {
        let dir = std::env::temp_dir().join(format!("lp-idx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("i");
        let recs = vec![
            rec(b"usr", FileKind::Dir),
            rec(b"usr/bin", FileKind::Dir),
            rec(b"usr/bin/\xff\nx", FileKind::File),
            rec(b"usr/lib", FileKind::Symlink),
        ];
        write(&path, &recs);
        let r = IndexReader::open(&path).unwrap();
        assert_eq!(r.header.start_ns, 99);
        let back: Vec<Record> = r.map(|r| r.unwrap()).collect();
        assert_eq!(back, recs);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn truncation_and_corruption_are_detected() {
        let dir = std::env::temp_dir().join(format!("lp-idx-t-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("i");
        write(
            &path,
            &[rec(b"a", FileKind::File), rec(b"b", FileKind::File)],
        );
        let full = std::fs::read(&path).unwrap();
        for cut in [10, full.len() / 2, full.len() - 1] {
            std::fs::write(&path, &full[..cut]).unwrap();
            let err = IndexReader::open(&path)
                .and_then(|r| r.collect::<Result<Vec<_>>>())
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Corrupt, "cut at {cut}");
        }
        let mut flipped = full.clone();
        flipped[40] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        let err = IndexReader::open(&path)
            .and_then(|r| r.collect::<Result<Vec<_>>>())
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
