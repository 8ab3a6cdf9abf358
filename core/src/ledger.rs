//! The ownership ledger of a root: which captured package owns which path
//! at which content, and which edits each package made to paths it does
//! not own.
//!
//! It lives in the output directory, `<out>/layerpack-ledger.json`, beside
//! the packages and the `packages-file-list.txt` it generates: the feed,
//! its file list and its ledger describe the same set of packages, and go
//! together (a Buildroot `make clean` removes them with the root). The
//! roots captured into it are recorded, and may be several: with
//! Buildroot's per-package directories every package installs into its
//! own copy of the target, assembled from its dependencies' trees, and
//! ownership is a property of the feed they all end up in. It is read and written
//! under a lock (`.layerpack-ledger.lock`, removed when released), so
//! finals of different roots that share nothing else still serialise on
//! it, and it is replaced atomically: a `final` killed at any point leaves
//! the previous ledger or the new one.
//!
//! A path no package owns belongs to the base (what the root held before
//! layerpack first captured into it).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::{
    escape_bytes, path_cmp, Change, ChangeKind, ChangeSet, ChangeSetBuilder, FileKind, Meta,
    RelPath,
};

/// serde for a [`FileKind`] as its manifest name.
mod kind_text {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    use crate::model::FileKind;

    pub fn serialize<S: Serializer>(k: &FileKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(k.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<FileKind, D::Error> {
        let t = String::deserialize(d)?;
        FileKind::parse(&t).ok_or_else(|| D::Error::custom(format!("unknown type {t:?}")))
    }
}

/// serde for an optional SHA-256 as 64 hex digits.
mod hex_hash {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match h {
            Some(h) => s.serialize_str(&crate::tree::hex(h)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        let Some(t) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        let bad = || D::Error::custom(format!("not a SHA-256: {t:?}"));
        if t.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(t.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(Some(out))
    }
}
use crate::session::{lock_file, write_atomic_with, LockGuard};
use crate::{Error, ErrorKind, Result};

/// Version of the ledger's format.
pub const LEDGER_FORMAT: u32 = 1;
/// The ledger's file name in the output directory.
pub const LEDGER_FILE: &str = "layerpack-ledger.json";
/// Buildroot's per-package file list, derived from the ledger.
pub const FILE_LIST: &str = "packages-file-list.txt";
const LOCK_FILE: &str = ".layerpack-ledger.lock";

/// One path a package owns.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct OwnedPath {
    /// The path, relative to the root.
    #[serde(with = "crate::jsonbytes::bytes")]
    pub path: Vec<u8>,
    /// Its type (`file`, `dir`, `symlink`, … in the file).
    #[serde(rename = "type", with = "kind_text")]
    pub kind: FileKind,
    /// SHA-256 of a regular file's content when the package last shipped
    /// it (hex in the file).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hex_hash")]
    pub sha256: Option<[u8; 32]>,
}

/// What a package owns: its paths, in path order, with their type and
/// hash. Stored the way a change set is ([`ChangeSet`]: about 46 bytes a
/// file), so a feed that holds a million-file package costs a `final` of
/// any other package tens of megabytes, not hundreds.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct FileList(ChangeSet);

impl FileList {
    /// From paths in any order; a path given twice keeps its first record.
    pub fn from_vec(mut files: Vec<OwnedPath>) -> FileList {
        files.sort_by(|a, b| path_cmp(&a.path, &b.path));
        FileList::from_sorted(files.into_iter())
    }

    /// From paths in path order (others are merged in, a repeated path
    /// keeps its first record). The paths must be normal relative paths,
    /// as [`RelPath::parse`] makes them.
    pub fn from_sorted(files: impl Iterator<Item = OwnedPath>) -> FileList {
        let mut b = ChangeSetBuilder::new();
        for f in files {
            b.push(as_change(f));
        }
        FileList(b.finish())
    }

    /// Every file, in path order.
    pub fn iter(&self) -> impl Iterator<Item = OwnedPath> + '_ {
        self.0.iter().map(|c| OwnedPath {
            path: c.path.as_bytes().to_vec(),
            kind: c.meta.kind,
            sha256: c.meta.sha256,
        })
    }

    /// Number of files.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when it owns nothing.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A reader that looks paths up in path order, each in the time it
    /// takes to read the files between it and the previous one.
    pub fn seek(&self) -> Seek<'_> {
        let files: Box<dyn Iterator<Item = OwnedPath> + '_> = Box::new(self.iter());
        Seek {
            files: files.peekable(),
        }
    }
}

fn as_change(f: OwnedPath) -> Change {
    let mut meta = Meta::new(f.kind, 0);
    meta.sha256 = f.sha256;
    Change {
        path: RelPath::from_normalized(f.path),
        kind: ChangeKind::Added,
        meta,
    }
}

impl std::fmt::Debug for FileList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for FileList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for FileList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<FileList, D::Error> {
        struct Files;
        impl<'de> serde::de::Visitor<'de> for Files {
            type Value = FileList;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of owned paths")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<FileList, A::Error> {
                let mut b = ChangeSetBuilder::new();
                while let Some(mut f) = seq.next_element::<OwnedPath>()? {
                    let path = RelPath::parse_for(&f.path, "ledger path")
                        .map_err(|e| serde::de::Error::custom(e.to_string()))?;
                    f.path = path.as_bytes().to_vec();
                    b.push(as_change(f));
                }
                Ok(FileList(b.finish()))
            }
        }
        d.deserialize_seq(Files)
    }
}

/// Lookups of paths in path order in a [`FileList`] ([`FileList::seek`]).
pub struct Seek<'a> {
    files: std::iter::Peekable<Box<dyn Iterator<Item = OwnedPath> + 'a>>,
}

impl Seek<'_> {
    /// The record of `path`, which must not come before the one asked
    /// for last.
    pub fn find(&mut self, path: &[u8]) -> Option<&OwnedPath> {
        while self
            .files
            .next_if(|f| path_cmp(&f.path, path) == std::cmp::Ordering::Less)
            .is_some()
        {}
        self.files.peek().filter(|f| f.path == path)
    }
}

/// Who owns a path, other than one package: asked in path order.
pub struct Owners<'a> {
    packages: Vec<(&'a str, Seek<'a>)>,
}

impl<'a> Owners<'a> {
    /// The package that owns `path` (the last captured, when several
    /// do); `path` must not come before the one asked for last.
    pub fn get(&mut self, path: &[u8]) -> Option<&'a str> {
        let mut owner = None;
        for (name, seek) in &mut self.packages {
            if seek.find(path).is_some() {
                owner = Some(*name);
            }
        }
        owner
    }
}

/// An edit a package made to a path it does not own.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EditRecord {
    /// The path.
    #[serde(with = "crate::jsonbytes::bytes")]
    pub path: Vec<u8>,
    /// The install deleted it (else it changed it).
    pub deleted: bool,
    /// The package that owns it; none for the base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// What one package owns and edits.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct PackageRecord {
    /// The package's name as the build system gave it (the session name).
    pub name: String,
    /// Its `Package:` field, when a package was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
    /// Its version, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// What it owns, in path order.
    pub files: FileList,
    /// Its edits to paths it does not own, in path order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edits: Vec<EditRecord>,
    /// What the feed last published for it (`layerpack repack`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<Published>,
}

/// A published package: its upstream version, the revision layerpack
/// added, and the content digest it had (see
/// [`crate::pack::write_package_digest`]). A repack whose content differs
/// under the same upstream version gets the next revision, written
/// `<upstream>+lp<N>`, which opkg and dpkg order after `<upstream>`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// The build system's version.
    pub upstream: String,
    /// layerpack's revision on top (0: none).
    pub revision: u32,
    /// Content digest, hex.
    pub digest: String,
}

impl Published {
    /// The version string it was published as.
    pub fn version(&self) -> String {
        if self.revision == 0 {
            self.upstream.clone()
        } else {
            format!("{}+lp{}", self.upstream, self.revision)
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerFile {
    format: u32,
    /// The roots captured into this feed, in first-use order.
    roots: Vec<serde_json::Value>,
    packages: Vec<PackageRecord>,
}

/// [`LedgerFile`] as written: borrowed, so saving copies nothing.
#[derive(Serialize)]
struct LedgerOut<'a, 's> {
    format: u32,
    roots: Vec<serde_json::Value>,
    packages: PackagesOut<'a, 's>,
}

struct PackagesOut<'a, 's>(&'a Ledger, &'a Option<StreamedFiles<'s>>);

impl Serialize for PackagesOut<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_seq(self.0.packages.iter().map(|rec| RecordOut {
            name: &rec.name,
            package: rec.package.as_deref(),
            version: rec.version.as_deref(),
            files: FilesOut(rec, self.1),
            edits: &rec.edits,
            published: rec.published.as_ref(),
        }))
    }
}

/// A [`PackageRecord`] as written (the same fields).
#[derive(Serialize)]
struct RecordOut<'a, 's> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    package: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'a str>,
    files: FilesOut<'a, 's>,
    #[serde(skip_serializing_if = "<[EditRecord]>::is_empty")]
    edits: &'a [EditRecord],
    #[serde(skip_serializing_if = "Option::is_none")]
    published: Option<&'a Published>,
}

struct FilesOut<'a, 's>(&'a PackageRecord, &'a Option<StreamedFiles<'s>>);

impl Serialize for FilesOut<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.1 {
            Some(st) if st.name == self.0.name => s.collect_seq((st.files)()),
            _ => s.collect_seq(self.0.files.iter()),
        }
    }
}

/// The files of one package, given as a stream when the ledger is
/// written instead of being held in its record: those of a layer a
/// million files long are read from its change set.
pub struct StreamedFiles<'a> {
    /// The package.
    pub name: &'a str,
    /// Every file it owns, in path order; called once per file written.
    pub files: &'a dyn Fn() -> Box<dyn Iterator<Item = OwnedPath> + 'a>,
}

/// An open, locked ledger.
pub struct Ledger {
    path: PathBuf,
    out: PathBuf,
    roots: Vec<PathBuf>,
    /// Packages in the order they were first captured.
    pub packages: Vec<PackageRecord>,
    /// Said when the ledger was made from an older `packages-file-list.txt`.
    pub imported: bool,
    _lock: LockGuard,
}

impl Ledger {
    /// Lock and read the ledger in `out` for `root` (canonical). A missing
    /// ledger starts empty, or from `packages-file-list.txt` when one is
    /// there (written before the ledger existed).
    pub fn open(out: &Path, root: &Path) -> Result<Ledger> {
        let lock =
            lock_file(&out.join(LOCK_FILE), true, "the ownership ledger")?.remove_on_release();
        let path = out.join(LEDGER_FILE);
        let mut l = Ledger {
            path: path.clone(),
            out: out.to_path_buf(),
            roots: Vec::new(),
            packages: Vec::new(),
            imported: false,
            _lock: lock,
        };
        match std::fs::File::open(&path) {
            Ok(file) => {
                // Read as it is parsed: the file lists go straight into
                // their compact form.
                let f: LedgerFile = serde_json::from_reader(std::io::BufReader::new(file))
                    .map_err(|e| {
                        Error::new(
                            ErrorKind::InvalidInput,
                            format!("not a layerpack ledger: {e}"),
                        )
                        .with_path(&path)
                    })?;
                if f.format != LEDGER_FORMAT {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!(
                            "ledger format {} is not the {LEDGER_FORMAT} this layerpack reads",
                            f.format
                        ),
                    )
                    .with_path(&path));
                }
                for r in &f.roots {
                    let bytes = crate::jsonbytes::from_json(r).ok_or_else(|| {
                        Error::new(ErrorKind::InvalidInput, "a root that is not a path")
                            .with_path(&path)
                    })?;
                    use std::os::unix::ffi::OsStringExt;
                    l.roots
                        .push(PathBuf::from(std::ffi::OsString::from_vec(bytes)));
                }
                let mut seen = BTreeSet::new();
                for p in &f.packages {
                    if !seen.insert(p.name.clone()) {
                        return Err(Error::new(
                            ErrorKind::InvalidInput,
                            format!("package '{}' is listed twice", p.name),
                        )
                        .with_path(&path));
                    }
                    crate::session::validate_package_name(&p.name)
                        .map_err(|e| e.with_path(&path))?;
                    for o in &p.edits {
                        RelPath::parse_for(&o.path, "ledger path")
                            .map_err(|e| e.with_path(&path))?;
                    }
                }
                l.packages = f.packages;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => l.import_file_list()?,
            Err(e) => return Err(Error::io(&path, "cannot read the ledger", e)),
        }
        if !l.roots.iter().any(|r| r == root) {
            l.roots.push(root.to_path_buf());
        }
        Ok(l)
    }

    /// Start from an existing `packages-file-list.txt`: each `pkg,./path`
    /// line says `pkg` owns `path` (content unknown).
    fn import_file_list(&mut self) -> Result<()> {
        let list = self.out.join(FILE_LIST);
        let bytes = match std::fs::read(&list) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(&list, "cannot read", e)),
        };
        let mut by_pkg: Vec<(String, BTreeMap<Vec<u8>, OwnedPath>)> = Vec::new();
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Some(comma) = line.iter().position(|b| *b == b',') else {
                continue;
            };
            let (Ok(pkg), Ok(path)) = (
                std::str::from_utf8(&line[..comma]),
                RelPath::parse(&line[comma + 1..]),
            ) else {
                continue;
            };
            if crate::session::validate_package_name(pkg).is_err() {
                continue;
            }
            let i = match by_pkg.iter().position(|(n, _)| n == pkg) {
                Some(i) => i,
                None => {
                    by_pkg.push((pkg.to_string(), BTreeMap::new()));
                    by_pkg.len() - 1
                }
            };
            by_pkg[i].1.insert(
                path.as_bytes().to_vec(),
                OwnedPath {
                    path: path.as_bytes().to_vec(),
                    kind: FileKind::File,
                    sha256: None,
                },
            );
        }
        self.imported = !by_pkg.is_empty();
        self.packages = by_pkg
            .into_iter()
            .map(|(name, files)| PackageRecord {
                name,
                files: FileList::from_vec(files.into_values().collect()),
                ..PackageRecord::default()
            })
            .collect();
        Ok(())
    }

    /// The record of `name`.
    pub fn get(&self, name: &str) -> Option<&PackageRecord> {
        self.packages.iter().find(|p| p.name == name)
    }

    /// Who owns each path, other than `except`, asked in path order.
    pub fn owners_except(&self, except: &str) -> Owners<'_> {
        Owners {
            packages: self
                .packages
                .iter()
                .filter(|p| p.name != except)
                .map(|p| (p.name.as_str(), p.files.seek()))
                .collect(),
        }
    }

    /// The `Package:` name another captured package was written as.
    pub fn package_field(&self, name: &str) -> String {
        self.get(name)
            .and_then(|p| p.package.clone())
            .or_else(|| crate::pack::map_package_name(name).ok().map(|m| m.0))
            .unwrap_or_else(|| name.to_string())
    }

    /// Replace (or add) the record of `rec.name`.
    pub fn set(&mut self, mut rec: PackageRecord) {
        rec.edits.sort_by(|a, b| path_cmp(&a.path, &b.path));
        match self.packages.iter_mut().find(|p| p.name == rec.name) {
            Some(p) => *p = rec,
            None => self.packages.push(rec),
        }
    }

    /// `paths` no longer belong to `name` (another package took them).
    pub fn disown(&mut self, name: &str, paths: &BTreeSet<Vec<u8>>) {
        if let Some(p) = self.packages.iter_mut().find(|p| p.name == name) {
            p.files = FileList::from_sorted(p.files.iter().filter(|f| !paths.contains(&f.path)));
        }
    }

    /// Write the ledger, then the file list derived from it. Returns the
    /// paths that cannot be written in the line-based list (a newline in
    /// the name), per package.
    pub fn save(&self) -> Result<Vec<(String, String)>> {
        self.save_with(None)
    }

    /// [`Ledger::save`], with the files of one package read from
    /// `streamed` rather than from its record.
    pub fn save_with(&self, streamed: Option<StreamedFiles<'_>>) -> Result<Vec<(String, String)>> {
        let doc = LedgerOut {
            format: LEDGER_FORMAT,
            roots: self
                .roots
                .iter()
                .map(|r| crate::jsonbytes::to_json(r.as_os_str().as_encoded_bytes()))
                .collect(),
            packages: PackagesOut(self, &streamed),
        };
        write_atomic_with(&self.path, |w| {
            serde_json::to_writer_pretty(&mut *w, &doc).map_err(std::io::Error::from)?;
            w.write_all(b"\n")
        })?;
        let mut unlisted = Vec::new();
        write_atomic_with(&self.out.join(FILE_LIST), |w| {
            for p in &self.packages {
                let files: Box<dyn Iterator<Item = Cow<'_, OwnedPath>>> = match &streamed {
                    Some(st) if st.name == p.name => Box::new((st.files)().map(Cow::Owned)),
                    _ => Box::new(p.files.iter().map(Cow::Owned)),
                };
                for f in files.filter(|f| f.kind != FileKind::Dir) {
                    if f.path.contains(&b'\n') {
                        unlisted.push((p.name.clone(), escape_bytes(&f.path)));
                        continue;
                    }
                    w.write_all(p.name.as_bytes())?;
                    w.write_all(b",./")?;
                    w.write_all(&f.path)?;
                    w.write_all(b"\n")?;
                }
            }
            Ok(())
        })?;
        Ok(unlisted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("layerpack-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_import_and_root_check() {
        let d = scratch("ledger");
        let out = d.join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(
            out.join(FILE_LIST),
            "a,./usr/bin/a\nb,./etc/b\na,./usr/lib/x\n",
        )
        .unwrap();
        let root = d.join("root");
        let mut l = Ledger::open(&out, &root).unwrap();
        assert!(l.imported);
        assert_eq!(l.get("a").unwrap().files.len(), 2);
        let mut owners = l.owners_except("a");
        assert_eq!(owners.get(b"etc/a"), None);
        assert_eq!(owners.get(b"etc/b"), Some("b"));
        assert_eq!(owners.get(b"usr/bin/a"), None);
        drop(owners);
        let mut rec = l.get("a").unwrap().clone();
        let mut files: Vec<OwnedPath> = rec.files.iter().collect();
        files.push(OwnedPath {
            path: b"odd\nname".to_vec(),
            kind: FileKind::File,
            sha256: Some([7; 32]),
        });
        rec.files = FileList::from_vec(files);
        l.set(rec);
        let unlisted = l.save().unwrap();
        assert_eq!(unlisted.len(), 1);
        drop(l);
        let list = std::fs::read_to_string(out.join(FILE_LIST)).unwrap();
        assert_eq!(list, "a,./usr/bin/a\na,./usr/lib/x\nb,./etc/b\n");
        let l = Ledger::open(&out, &root).unwrap();
        assert!(!l.imported);
        let files: Vec<OwnedPath> = l.get("a").unwrap().files.iter().collect();
        assert_eq!(files.len(), 3);
        assert_eq!(files[0].path, b"odd\nname");
        assert_eq!(files[0].sha256, Some([7; 32]));
        drop(l);
        // Another root (Buildroot's per-package directories) shares it.
        let l = Ledger::open(&out, &d.join("other")).unwrap();
        assert_eq!(l.roots, [root.clone(), d.join("other")]);
        drop(l);
        assert!(!out.join(LOCK_FILE).exists());
    }

    #[test]
    fn hostile_paths_are_refused() {
        let d = scratch("ledger-bad");
        let root = d.join("root");
        let doc = serde_json::json!({"format": 1, "roots": [root.to_str().unwrap()],
            "packages": [{"name": "a", "files": [{"path": "../etc/passwd", "type": "file"}]}]});
        std::fs::write(d.join(LEDGER_FILE), doc.to_string()).unwrap();
        let e = Ledger::open(&d, &root).err().unwrap();
        assert!(e.to_string().contains("../etc/passwd"), "{e}");
        assert!(e.to_string().contains(LEDGER_FILE), "{e}");
    }

    #[test]
    fn owners_are_found_in_path_order_and_the_last_captured_wins() {
        let list = |paths: &[&str], sha: u8| {
            FileList::from_vec(
                paths
                    .iter()
                    .map(|p| OwnedPath {
                        path: p.as_bytes().to_vec(),
                        kind: FileKind::File,
                        sha256: Some([sha; 32]),
                    })
                    .collect(),
            )
        };
        let a = list(&["usr/b", "usr/a", "usr/a", "usr/a/x", "etc/c"], 1);
        let got: Vec<Vec<u8>> = a.iter().map(|f| f.path).collect();
        let want: Vec<&[u8]> = vec![b"etc/c", b"usr/a", b"usr/a/x", b"usr/b"];
        assert_eq!(got, want);
        let d = scratch("ledger-owners");
        let mut l = Ledger::open(&d, &d.join("root")).unwrap();
        for (name, files) in [
            ("a", a),
            ("b", list(&["usr/a/x", "var/y"], 2)),
            ("c", list(&["usr/a"], 3)),
        ] {
            l.set(PackageRecord {
                name: name.into(),
                files,
                ..PackageRecord::default()
            });
        }
        let mut o = l.owners_except("c");
        let asked = [
            "a", "etc/c", "usr/a", "usr/a/x", "usr/a/z", "usr/b", "var/y", "zz",
        ];
        let got: Vec<Option<&str>> = asked.iter().map(|p| o.get(p.as_bytes())).collect();
        assert_eq!(
            got,
            [
                None,
                Some("a"),
                Some("a"),
                Some("b"),
                None,
                Some("a"),
                Some("b"),
                None
            ]
        );
        let mut seek = l.get("c").unwrap().files.seek();
        assert!(seek.find(b"etc").is_none());
        assert_eq!(seek.find(b"usr/a").map(|f| f.sha256), Some(Some([3; 32])));
        assert!(seek.find(b"usr/b").is_none());
    }
}
