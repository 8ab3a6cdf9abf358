//! The change set, stored compactly: `final` of a million-file install
//! holds it from the layer read to the fold, so it costs what the changes
//! need to be written down, not a struct per change.
//!
//! Changes are encoded one after the other in 1 MiB chunks, in path order.
//! A path is stored as the length it shares with the previous path and
//! the bytes that differ (consecutive paths of a depth-first walk share
//! most of their bytes); numbers are varints, the mtime a difference from
//! the previous one. Every [`RESTART`]th change is stored whole, so a
//! lookup decodes at most that many. A change is decoded into a
//! [`Change`] when it is read: iterating costs one change at a time.

use std::collections::HashMap;
use std::fmt;

use crate::model::{Change, ChangeKind, FileKind, Meta, RelPath, Xattrs};

/// Changes stored whole, every this many.
const RESTART: usize = 64;
/// Size of a storage chunk.
const CHUNK: usize = 1 << 20;
/// No link group.
const NO_GROUP: u32 = u32::MAX;

const HAS_SHA: u8 = 1 << 5;
const HAS_GROUP: u8 = 1 << 6;
const HAS_RARE: u8 = 1 << 7;
const RARE_RDEV: u8 = 1;
const RARE_LINK: u8 = 2;
const RARE_XATTRS: u8 = 4;

const KINDS: [FileKind; 7] = [
    FileKind::File,
    FileKind::Dir,
    FileKind::Symlink,
    FileKind::CharDevice,
    FileKind::BlockDevice,
    FileKind::Fifo,
    FileKind::Socket,
];

fn change_code(k: ChangeKind) -> u8 {
    match k {
        ChangeKind::Added => 0,
        ChangeKind::Modified {
            content_changed: true,
        } => 1,
        ChangeKind::Modified {
            content_changed: false,
        } => 2,
        ChangeKind::Deleted => 3,
    }
}

fn change_kind(code: u8) -> ChangeKind {
    match code & 3 {
        0 => ChangeKind::Added,
        1 => ChangeKind::Modified {
            content_changed: true,
        },
        2 => ChangeKind::Modified {
            content_changed: false,
        },
        _ => ChangeKind::Deleted,
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Reads what [`put_varint`] and [`put_bytes`] wrote. The bytes were
/// written by this module, so running short is a bug, not bad input.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> u8 {
        let b = self.buf[self.at];
        self.at += 1;
        b
    }

    fn varint(&mut self) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let b = self.byte();
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return v;
            }
            shift += 7;
        }
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        s
    }

    fn bytes(&mut self) -> &'a [u8] {
        let n = self.varint() as usize;
        self.take(n)
    }
}

fn shared_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Every change one install made, sorted by path (see [`crate::model`]).
#[derive(Clone, Default)]
pub struct ChangeSet {
    chunks: Vec<Vec<u8>>,
    /// Where each stored-whole change starts: (chunk, offset).
    restarts: Vec<(u32, u32)>,
    len: usize,
    /// The link group a stored group number stands for (`NO_GROUP`: none).
    groups: Vec<u32>,
}

/// Writes changes into a [`ChangeSet`] one at a time. Changes pushed in
/// path order are stored as they come; the few that are not (a scan that
/// reports deletions where it finds their whiteout) are merged in by
/// [`ChangeSetBuilder::finish`].
#[derive(Default)]
pub struct ChangeSetBuilder {
    set: ChangeSet,
    last_path: Vec<u8>,
    last_mtime: i64,
    scratch: Vec<u8>,
    late: Vec<Change>,
    any_group: bool,
}

impl ChangeSetBuilder {
    /// An empty builder.
    pub fn new() -> ChangeSetBuilder {
        ChangeSetBuilder::default()
    }

    /// Add one change. For a path given twice the first is kept.
    pub fn push(&mut self, c: Change) {
        if self.set.len > 0
            && crate::model::path_cmp(c.path.as_bytes(), &self.last_path)
                != std::cmp::Ordering::Greater
        {
            self.late.push(c);
            return;
        }
        self.append(&c);
    }

    fn append(&mut self, c: &Change) {
        let restart = self.set.len.is_multiple_of(RESTART);
        let path = c.path.as_bytes();
        let (shared, mtime_base) = if restart {
            (0, 0)
        } else {
            (shared_prefix(path, &self.last_path), self.last_mtime)
        };
        let m = &c.meta;
        let out = &mut self.scratch;
        out.clear();
        let kind = KINDS.iter().position(|k| *k == m.kind).unwrap_or(0) as u8;
        let rare = m.rdev.is_some() || m.link_target.is_some() || !m.xattrs.is_empty();
        let mut head = change_code(c.kind) | (kind << 2);
        if m.sha256.is_some() {
            head |= HAS_SHA;
        }
        if m.link_group.is_some() {
            head |= HAS_GROUP;
        }
        if rare {
            head |= HAS_RARE;
        }
        out.push(head);
        put_varint(out, shared as u64);
        put_bytes(out, &path[shared..]);
        put_varint(out, u64::from(m.mode));
        put_varint(out, u64::from(m.uid));
        put_varint(out, u64::from(m.gid));
        put_varint(out, m.size);
        let d = m.mtime_ns.wrapping_sub(mtime_base);
        put_varint(out, ((d << 1) ^ (d >> 63)) as u64);
        if let Some(h) = &m.sha256 {
            out.extend_from_slice(h);
        }
        if let Some(g) = m.link_group {
            self.any_group = true;
            put_varint(out, u64::from(g));
        }
        if rare {
            let flags = (if m.rdev.is_some() { RARE_RDEV } else { 0 })
                | (if m.link_target.is_some() {
                    RARE_LINK
                } else {
                    0
                })
                | (if m.xattrs.is_empty() { 0 } else { RARE_XATTRS });
            out.push(flags);
            if let Some((ma, mi)) = m.rdev {
                put_varint(out, u64::from(ma));
                put_varint(out, u64::from(mi));
            }
            if let Some(t) = &m.link_target {
                put_bytes(out, t);
            }
            if !m.xattrs.is_empty() {
                put_varint(out, m.xattrs.len() as u64);
                for (k, v) in &m.xattrs {
                    put_bytes(out, k);
                    put_bytes(out, v);
                }
            }
        }
        let fits = self
            .set
            .chunks
            .last()
            .is_some_and(|ch| ch.capacity() - ch.len() >= out.len());
        if !fits {
            self.set
                .chunks
                .push(Vec::with_capacity(CHUNK.max(out.len())));
        }
        let ci = self.set.chunks.len() - 1;
        let chunk = &mut self.set.chunks[ci];
        if restart {
            self.set.restarts.push((ci as u32, chunk.len() as u32));
        }
        chunk.extend_from_slice(out);
        self.set.len += 1;
        self.last_path.truncate(shared);
        self.last_path.extend_from_slice(&path[shared..]);
        self.last_mtime = m.mtime_ns;
    }

    /// The change set: late changes merged in, paths given twice dropped,
    /// hard-link groups of one dropped and the others numbered in path
    /// order (so equal layers give equal sets).
    pub fn finish(mut self) -> ChangeSet {
        if !self.late.is_empty() {
            // Stable: of equal late paths the first pushed comes first.
            let mut late = std::mem::take(&mut self.late);
            late.sort_by(|a, b| a.path.cmp(&b.path));
            let mut merged = ChangeSetBuilder::new();
            let mut late = late.into_iter().peekable();
            // The old set is read while the new one grows: twice the
            // compact size for a moment, never a struct per change.
            for c in self.set.raw_iter() {
                while let Some(l) = late.next_if(|l| l.path < c.path) {
                    merged.push(l);
                }
                merged.push(c);
            }
            late.for_each(|l| merged.push(l));
            // Equal paths arrived in order, so each went to `late` again.
            merged.late.clear();
            return merged.finish();
        }
        let mut set = self.set;
        if self.any_group {
            set.number_groups();
        }
        set.shrink();
        set
    }
}

impl ChangeSet {
    /// Build from changes in any order; sorts them and numbers hard-link
    /// groups in path order so equal layers give equal sets.
    pub fn from_unsorted(mut changes: Vec<Change>) -> ChangeSet {
        changes.sort_by(|a, b| a.path.cmp(&b.path));
        let mut b = ChangeSetBuilder::new();
        for c in changes {
            b.push(c);
        }
        b.finish()
    }

    fn shrink(&mut self) {
        if let Some(last) = self.chunks.last_mut() {
            last.shrink_to_fit();
        }
        self.chunks.shrink_to_fit();
        self.restarts.shrink_to_fit();
    }

    /// Number groups with two or more members in path order; the others
    /// are none.
    fn number_groups(&mut self) {
        self.groups.clear();
        let mut members: HashMap<u32, u32> = HashMap::new();
        for c in self.raw_iter() {
            if let Some(g) = c.meta.link_group {
                *members.entry(g).or_default() += 1;
            }
        }
        let top = members.keys().copied().max().unwrap_or(0) as usize;
        let mut groups = vec![NO_GROUP; top + 1];
        let mut next = 0;
        for c in self.raw_iter() {
            if let Some(g) = c.meta.link_group {
                let slot = &mut groups[g as usize];
                if *slot == NO_GROUP && members[&g] >= 2 {
                    *slot = next;
                    next += 1;
                }
            }
        }
        self.groups = groups;
    }

    fn raw_iter(&self) -> Iter<'_> {
        Iter {
            set: self,
            chunk: 0,
            at: 0,
            index: 0,
            path: Vec::new(),
            mtime: 0,
            raw_groups: true,
        }
    }

    /// All changes in path order.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            raw_groups: false,
            ..self.raw_iter()
        }
    }

    /// All changes in path order, as a vector.
    pub fn to_vec(&self) -> Vec<Change> {
        self.iter().collect()
    }

    /// Number of changes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the install changed nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Added and modified entries, parents first.
    pub fn present(&self) -> impl Iterator<Item = Change> + '_ {
        self.iter().filter(|c| c.kind != ChangeKind::Deleted)
    }

    /// Deleted entries, children before parents.
    pub fn deletions(&self) -> impl Iterator<Item = Change> {
        let v: Vec<Change> = self
            .iter()
            .filter(|c| c.kind == ChangeKind::Deleted)
            .collect();
        v.into_iter().rev()
    }

    fn iter_from(&self, restart: usize) -> Iter<'_> {
        let (chunk, at) = self.restarts[restart];
        Iter {
            set: self,
            chunk: chunk as usize,
            at: at as usize,
            index: restart * RESTART,
            path: Vec::new(),
            mtime: 0,
            raw_groups: false,
        }
    }

    /// The change for one path.
    pub fn get(&self, path: &RelPath) -> Option<Change> {
        self.get_indexed(path).map(|(_, c)| c)
    }

    /// The change for one path, and its position in the set.
    pub fn get_indexed(&self, path: &RelPath) -> Option<(usize, Change)> {
        if self.restarts.is_empty() {
            return None;
        }
        // The last restart whose first path is not after `path`.
        let (mut lo, mut hi) = (0, self.restarts.len());
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            let first = self.iter_from(mid).next()?;
            if first.path <= *path {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        (lo * RESTART..)
            .zip(self.iter_from(lo).take(RESTART))
            .take_while(|(_, c)| c.path <= *path)
            .find(|(_, c)| c.path == *path)
    }

    /// Bytes the set holds, for the benchmark's accounting.
    pub fn stored_bytes(&self) -> usize {
        self.chunks.iter().map(Vec::capacity).sum::<usize>()
            + self.restarts.capacity() * 8
            + self.groups.capacity() * 4
    }
}

/// The changes of a [`ChangeSet`], decoded one at a time.
pub struct Iter<'a> {
    set: &'a ChangeSet,
    chunk: usize,
    at: usize,
    index: usize,
    path: Vec<u8>,
    mtime: i64,
    raw_groups: bool,
}

impl Iterator for Iter<'_> {
    type Item = Change;

    fn next(&mut self) -> Option<Change> {
        if self.index >= self.set.len {
            return None;
        }
        while self.at >= self.set.chunks[self.chunk].len() {
            self.chunk += 1;
            self.at = 0;
        }
        let mut r = Reader {
            buf: &self.set.chunks[self.chunk],
            at: self.at,
        };
        let head = r.byte();
        let shared = r.varint() as usize;
        let suffix = r.bytes();
        self.path.truncate(shared);
        self.path.extend_from_slice(suffix);
        let kind = KINDS[usize::from((head >> 2) & 7)];
        let mut m = Meta::new(kind, r.varint() as u32);
        m.uid = r.varint() as u32;
        m.gid = r.varint() as u32;
        m.size = r.varint();
        let z = r.varint();
        let d = ((z >> 1) as i64) ^ -((z & 1) as i64);
        let base = if self.index.is_multiple_of(RESTART) {
            0
        } else {
            self.mtime
        };
        m.mtime_ns = base.wrapping_add(d);
        self.mtime = m.mtime_ns;
        if head & HAS_SHA != 0 {
            let mut h = [0u8; 32];
            h.copy_from_slice(r.take(32));
            m.sha256 = Some(h);
        }
        if head & HAS_GROUP != 0 {
            let g = r.varint() as u32;
            m.link_group = if self.raw_groups {
                Some(g)
            } else {
                match self.set.groups.get(g as usize) {
                    Some(&n) if n != NO_GROUP => Some(n),
                    _ => None,
                }
            };
        }
        if head & HAS_RARE != 0 {
            let flags = r.byte();
            if flags & RARE_RDEV != 0 {
                m.rdev = Some((r.varint() as u32, r.varint() as u32));
            }
            if flags & RARE_LINK != 0 {
                m.link_target = Some(r.bytes().to_vec());
            }
            if flags & RARE_XATTRS != 0 {
                let n = r.varint();
                let mut x = Xattrs::new();
                for _ in 0..n {
                    let k = r.bytes().to_vec();
                    x.insert(k, r.bytes().to_vec());
                }
                m.xattrs = x;
            }
        }
        self.at = r.at;
        self.index += 1;
        Some(Change {
            path: RelPath::from_normalized(self.path.clone()),
            kind: change_kind(head),
            meta: m,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.set.len - self.index;
        (n, Some(n))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl<'a> IntoIterator for &'a ChangeSet {
    type Item = Change;
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl PartialEq for ChangeSet {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl Eq for ChangeSet {}

impl fmt::Debug for ChangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(path: &str, kind: ChangeKind, meta: Meta) -> Change {
        Change {
            path: path.into(),
            kind,
            meta,
        }
    }

    fn varied(i: usize) -> Meta {
        let kind = KINDS[i % KINDS.len()];
        let mut m = Meta::new(kind, (i as u32 * 37) & 0o7777);
        m.uid = (i * 1000) as u32;
        m.gid = i as u32;
        m.size = (i as u64) << (i % 40);
        m.mtime_ns = if i.is_multiple_of(3) {
            -(i as i64) * 1_000_000_007
        } else {
            1_700_000_000_000_000_000 + (i as i64) * 13
        };
        if kind == FileKind::File {
            m.sha256 = Some([i as u8; 32]);
        }
        if kind.is_device() {
            m.rdev = Some((i as u32, u32::MAX - i as u32));
        }
        if kind == FileKind::Symlink {
            m.link_target = Some(format!("../t\n{i}\u{0}").into_bytes());
        }
        if i.is_multiple_of(5) {
            m.xattrs.insert(b"user.a".to_vec(), vec![0xff; i % 7]);
            m.xattrs.insert(b"security.capability".to_vec(), vec![1, 2]);
        }
        m
    }

    #[test]
    fn every_field_survives_the_encoding() {
        let mut b = ChangeSetBuilder::new();
        let mut want = Vec::new();
        for i in 0..1000 {
            let kind = [
                ChangeKind::Added,
                ChangeKind::Deleted,
                ChangeKind::Modified {
                    content_changed: true,
                },
                ChangeKind::Modified {
                    content_changed: false,
                },
            ][i % 4];
            let p = format!("d{:02}/n\u{e9}\n{i:05}", i / 100);
            let c = change(&p, kind, varied(i));
            want.push(c.clone());
            b.push(c);
        }
        let set = b.finish();
        assert_eq!(set.len(), 1000);
        assert_eq!(set.to_vec(), want);
        for c in want.iter().step_by(7) {
            assert_eq!(set.get(&c.path).as_ref(), Some(c));
        }
        assert_eq!(set.get(&RelPath::from("d00")), None);
        assert_eq!(set.get(&RelPath::from("zz")), None);
        assert!(set.stored_bytes() < 1000 * 120, "{}", set.stored_bytes());
    }

    #[test]
    fn late_changes_are_merged_and_the_first_of_a_path_is_kept() {
        let mut b = ChangeSetBuilder::new();
        let m = Meta::new(FileKind::File, 0o644);
        let mut first = m.clone();
        first.uid = 1;
        for p in ["a", "c", "e"] {
            b.push(change(p, ChangeKind::Added, m.clone()));
        }
        b.push(change("b", ChangeKind::Deleted, m.clone()));
        b.push(change("c", ChangeKind::Deleted, m.clone()));
        b.push(change("a/x", ChangeKind::Deleted, first.clone()));
        b.push(change("a/x", ChangeKind::Deleted, m.clone()));
        let set = b.finish();
        let got: Vec<(String, char, u32)> = set
            .iter()
            .map(|c| (c.path.display(), c.kind.symbol(), c.meta.uid))
            .collect();
        let want = [
            ("a", '+', 0),
            ("a/x", '-', 1),
            ("b", '-', 0),
            ("c", '+', 0),
            ("e", '+', 0),
        ];
        let want: Vec<(String, char, u32)> = want
            .iter()
            .map(|(p, k, u)| (p.to_string(), *k, *u))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn link_groups_are_numbered_in_path_order_and_groups_of_one_dropped() {
        let mut b = ChangeSetBuilder::new();
        for (p, g) in [
            ("a", Some(9)),
            ("b", Some(3)),
            ("c", Some(9)),
            ("d", Some(3)),
            ("e", Some(5)),
        ] {
            let mut m = Meta::new(FileKind::File, 0o644);
            m.link_group = g;
            b.push(change(p, ChangeKind::Added, m));
        }
        let groups: Vec<Option<u32>> = b.finish().iter().map(|c| c.meta.link_group).collect();
        assert_eq!(groups, [Some(0), Some(1), Some(0), Some(1), None]);
    }

    #[test]
    fn deep_paths_take_little_room() {
        let mut b = ChangeSetBuilder::new();
        let mut m = Meta::new(FileKind::File, 0o644);
        m.sha256 = Some([7; 32]);
        for i in 0..100_000u32 {
            m.mtime_ns = 1_700_000_000_000_000_000 + i64::from(i) * 20_000;
            let p = format!(
                "usr/share/big/d{:04}/file-with-a-longish-name-{:05}.txt",
                i / 100,
                i % 100
            );
            b.push(change(&p, ChangeKind::Added, m.clone()));
        }
        let set = b.finish();
        // The SHA-256 is 32 of them.
        let per = set.stored_bytes() / set.len();
        assert!(per <= 52, "{per} bytes per change");
    }
}
