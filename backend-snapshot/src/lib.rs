//! layerpack-backend-snapshot: capture a layer by comparing the base before
//! and after the install.
//!
//! `begin` records the base in a compact on-disk index (stat data, not a
//! copy); `changes` scans the base again and merges it with the index under
//! the change rules of DESIGN.md. An unchanged (inode, ctime) proves an
//! entry untouched, because ctime cannot be set from userspace; entries
//! whose timestamps fall within the clock granularity of the snapshot are
//! "racy" (as in git) and get a content hash at `begin` so that a rewrite in
//! the same clock tick is still seen. No privileges, std + sha2 only, any
//! Unix. The install writes into the base itself, so a layer cannot be
//! discarded.
//!
//! See `docs.md` for the capability table and costs.

mod index;

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use layerpack_core::backend::{
    BackendState, Begun, Capabilities, ChangeOptions, Health, LayerBackend, Probe, SessionSpec,
};
use layerpack_core::config::BackendConfig;
use layerpack_core::model::{ChangeSet, FileKind};
use layerpack_core::registry::{Origin, Registry};
use layerpack_core::tree::{
    classify_by_stat, compare_by_hash, diff_streams, hash_file, meta_differs, reach, read_xattrs,
    Progress, Record, ScanOptions, TreeScan, Verdict,
};
use layerpack_core::{Error, Result};
use serde::Deserialize;

pub use index::{Header, IndexReader, IndexWriter};

/// The name this backend registers under.
pub const NAME: &str = "snapshot";

const INDEX_FILE: &str = "snapshot.idx";

/// `[backends.snapshot]` settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// Hash every regular file at `init`, so that `final` decides content
    /// changes by bytes alone (slower `init`, exact answers).
    pub hash_all: bool,
    /// Record extended attributes (needed to see xattr-only changes).
    pub xattrs: bool,
    /// When the state directory is on another filesystem than the root,
    /// entries changed less than this long before `init` are racy and get a
    /// content hash. 2000 ms covers FAT's 2 s timestamps and coarse kernel
    /// clocks. (On the same filesystem, the filesystem's own clock decides.)
    pub racy_window_ms: u64,
    /// Helper threads for scanning; 0 means one per core (at most 4).
    pub scan_threads: usize,
}

impl Default for SnapshotConfig {
    fn default() -> SnapshotConfig {
        SnapshotConfig {
            hash_all: false,
            xattrs: true,
            racy_window_ms: 2000,
            scan_threads: 0,
        }
    }
}

/// The snapshot backend.
pub struct SnapshotBackend {
    cfg: SnapshotConfig,
    progress: Option<Progress>,
}

impl SnapshotBackend {
    /// A backend with these settings.
    pub fn new(cfg: SnapshotConfig) -> SnapshotBackend {
        SnapshotBackend {
            cfg,
            progress: None,
        }
    }

    /// Report scan progress (entries seen) through `p`.
    pub fn with_progress(mut self, p: Option<Progress>) -> SnapshotBackend {
        self.progress = p;
        self
    }

    fn scan_options(&self) -> ScanOptions {
        ScanOptions {
            xattrs: self.cfg.xattrs,
            one_file_system: true,
            progress: self.progress.clone(),
            threads: match self.cfg.scan_threads {
                0 => layerpack_core::tree::default_scan_threads(),
                n => n,
            },
        }
    }

    fn index_path(spec: &SessionSpec) -> PathBuf {
        spec.dir.join(INDEX_FILE)
    }

    /// Entries whose mtime or ctime is at or after the returned time are
    /// racy. When the session directory is on the base's filesystem, a
    /// file created there now gives the filesystem's own clock (as git
    /// uses its index file's mtime): anything changed before that tick
    /// would get a later ctime if changed again. Otherwise the wall clock
    /// minus `racy_window_ms`. Returns (threshold, window used).
    fn racy_threshold(&self, spec: &SessionSpec) -> Result<(i64, i64)> {
        use std::os::unix::fs::MetadataExt;
        let window = self.cfg.racy_window_ms as i64 * 1_000_000;
        let fallback = (now_ns() - window, window);
        let probe = spec.dir.join("clock-probe");
        std::fs::write(&probe, b"")
            .map_err(|e| Error::io(&probe, "cannot create clock probe", e))?;
        let md = std::fs::metadata(&probe);
        let _ = std::fs::remove_file(&probe);
        let base_dev = std::fs::metadata(&spec.base).map(|m| m.dev());
        match (md, base_dev) {
            (Ok(md), Ok(dev)) if md.dev() == dev => {
                Ok((md.ctime() * 1_000_000_000 + md.ctime_nsec(), 0))
            }
            _ => Ok(fallback),
        }
    }
}

/// Register the snapshot backend with `registry`.
pub fn register(registry: &mut Registry) -> Result<()> {
    register_with_progress(registry, None)
}

/// Register, reporting scan progress through `progress`.
pub fn register_with_progress(registry: &mut Registry, progress: Option<Progress>) -> Result<()> {
    registry.register(
        NAME,
        Origin::BuiltIn,
        Box::new(move |cfg: &BackendConfig| {
            let c: SnapshotConfig = cfg.parse()?;
            Ok(Box::new(
                SnapshotBackend::new(c).with_progress(progress.clone()),
            ))
        }),
    )
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl LayerBackend for SnapshotBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            can_discard: false,
            needs_root: false,
            online_move_down: true,
            rootless: true,
            in_place: true,
            records_ownership: false,
            reserves_wh_names: false,
            max_name_len: None,
        }
    }

    fn probe(&self) -> Probe {
        Probe::Available
    }

    fn begin(&self, spec: &SessionSpec) -> Result<Begun> {
        let (racy_from, window_ns) = self.racy_threshold(spec)?;
        let header = Header {
            start_ns: racy_from,
            window_ns,
            hash_all: self.cfg.hash_all,
        };
        let dest = Self::index_path(spec);
        let result = (|| {
            let mut w = IndexWriter::create(&dest, header)?;
            for rec in TreeScan::start(&spec.base, self.scan_options())? {
                let mut rec = rec?;
                let racy = rec.mtime_ns.max(rec.ctime_ns) >= racy_from;
                if rec.kind == FileKind::File && (header.hash_all || racy) {
                    rec.sha256 = Some(hash_file(&reach(&spec.base, &rec.path)?)?);
                }
                w.push(&rec)?;
            }
            w.finish()
        })();
        match result {
            // All the state is the index file in the session directory.
            Ok(_) => Ok(Begun {
                merged: spec.base.clone(),
                state: BackendState::default(),
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&dest);
                let _ = std::fs::remove_file(dest.with_extension("tmp"));
                Err(e)
            }
        }
    }

    fn changes(&self, spec: &SessionSpec, opts: &ChangeOptions) -> Result<ChangeSet> {
        let old = IndexReader::open(&Self::index_path(spec))?;
        // xattrs are read only for entries that were touched: listing them
        // for every entry would double the cost of the scan.
        let new = TreeScan::start(
            &spec.base,
            ScanOptions {
                xattrs: false,
                ..self.scan_options()
            },
        )?;
        let base = spec.base.as_path();
        let hash_new = opts.hash_all;
        let xattrs = self.cfg.xattrs;
        diff_streams(
            old,
            new,
            base,
            |o, n| {
                let touched = o.ctime_ns != n.ctime_ns || o.ino != n.ino || o.dev != n.dev;
                n.xattrs = if xattrs && touched {
                    read_xattrs(&reach(base, &n.path)?)?
                } else {
                    // ctime unchanged: the xattrs are what they were.
                    o.xattrs.clone()
                };
                if let Some(v) = classify_by_stat(o, n) {
                    return Ok(v);
                }
                decide_same_size_and_mtime(o, n, hash_new, base)
            },
            |n| {
                if xattrs {
                    n.xattrs = read_xattrs(&reach(base, &n.path)?)?;
                }
                Ok(())
            },
        )
    }

    fn move_down(&self, _spec: &SessionSpec) -> Result<()> {
        // The install wrote into the base: the layer is already folded.
        Ok(())
    }

    fn health(&self, spec: &SessionSpec) -> Health {
        if Self::index_path(spec).is_file() {
            Health::Ok
        } else {
            Health::Broken(format!(
                "snapshot index {} is missing; run `layerpack abort {}`",
                Self::index_path(spec).display(),
                spec.package
            ))
        }
    }
}

/// A regular file whose size and mtime are what the index says.
fn decide_same_size_and_mtime(
    o: &Record,
    n: &mut Record,
    hash_new: bool,
    base: &std::path::Path,
) -> Result<Verdict> {
    let untouched = o.ino == n.ino && o.dev == n.dev && o.ctime_ns == n.ctime_ns;
    if untouched && o.sha256.is_none() && !hash_new {
        // ctime cannot be set from userspace and the entry was not racy:
        // nothing about it changed.
        return Ok(Verdict::Same);
    }
    let meta = if meta_differs(o, n) {
        Verdict::Metadata
    } else {
        Verdict::Same
    };
    if let Some(old_hash) = o.sha256 {
        return compare_by_hash(o, old_hash, n, &reach(base, &n.path)?);
    }
    if untouched {
        return Ok(Verdict::Same);
    }
    // Touched (new ctime or a new inode), same size and mtime, and no
    // stored hash to compare with.
    if meta == Verdict::Metadata {
        return Ok(Verdict::Metadata);
    }
    if o.ino == n.ino && o.dev == n.dev && o.nlink != n.nlink {
        // Only a hard link to it was added or removed.
        return Ok(Verdict::Same);
    }
    // Bytes may have been rewritten with size and mtime restored (`cp -p`,
    // `touch -r`): without the old bytes, report it rather than miss it.
    Ok(Verdict::Content)
}

impl layerpack_core::plugin::PluginBackend for SnapshotBackend {
    const NAME: &'static str = NAME;

    fn create(cfg: &BackendConfig) -> Result<Self> {
        let c: SnapshotConfig = cfg.parse()?;
        Ok(SnapshotBackend::new(c))
    }
}

// Built as a plugin with `cargo rustc -p layerpack-backend-snapshot --release
// --features plugin --crate-type cdylib` (see CONTRIBUTING.md). Only in
// that build: two plugins' entry symbols linked into one binary would clash.
#[cfg(feature = "plugin")]
layerpack_core::export_backend!(SnapshotBackend);

#[cfg(test)]
mod tests {
    use super::*;
    use layerpack_core::ErrorKind;
    use std::fs;
    use std::io::Write;

    fn spec(tag: &str) -> SessionSpec {
        let root = std::env::temp_dir().join(format!("lp-snap-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("base/etc")).unwrap();
        fs::create_dir_all(root.join("session")).unwrap();
        SessionSpec {
            package: "t".into(),
            base: root.join("base"),
            dir: root.join("session"),
            state: Default::default(),
        }
    }

    /// With a zero racy window and the file older than a clock tick, no
    /// hash is stored: the inode+ctime rule alone must catch a rewrite
    /// whose size and mtime were restored.
    #[test]
    fn ctime_catches_rewrite_with_restored_mtime_without_hashes() {
        let s = spec("ctime");
        let f = s.base.join("etc/a.conf");
        fs::write(&f, b"aaaa").unwrap();
        let before = fs::metadata(&f).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let b = SnapshotBackend::new(SnapshotConfig {
            racy_window_ms: 0,
            ..SnapshotConfig::default()
        });
        b.begin(&s).unwrap();
        let idx: Vec<Record> = IndexReader::open(&s.dir.join(INDEX_FILE))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert!(idx.iter().all(|r| r.sha256.is_none()), "nothing was racy");
        assert!(b.changes(&s, &ChangeOptions::default()).unwrap().is_empty());
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .write_all(b"bbbb")
            .unwrap();
        fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(before)
            .unwrap();
        let cs = b.changes(&s, &ChangeOptions::default()).unwrap();
        assert_eq!(cs.len(), 1);
        assert_eq!(cs.to_vec()[0].kind.symbol(), '~');
        fs::remove_dir_all(s.base.parent().unwrap()).unwrap();
    }

    /// A racy file (changed just before init) is hashed, so an identical
    /// rewrite in the same tick is no change and a different one is.
    #[test]
    fn racy_entries_are_hashed() {
        let s = spec("racy");
        let f = s.base.join("etc/a.conf");
        fs::write(&f, b"aaaa").unwrap();
        // An mtime after the snapshot's clock makes the entry racy whatever
        // the clock granularity.
        let future = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
        fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(future)
            .unwrap();
        let b = SnapshotBackend::new(SnapshotConfig::default());
        b.begin(&s).unwrap();
        let idx: Vec<Record> = IndexReader::open(&s.dir.join(INDEX_FILE))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert!(idx.iter().any(|r| r.sha256.is_some()));
        let mtime = fs::metadata(&f).unwrap().modified().unwrap();
        let rewrite = |data: &[u8]| {
            fs::write(&f, data).unwrap();
            fs::File::options()
                .write(true)
                .open(&f)
                .unwrap()
                .set_modified(mtime)
                .unwrap();
        };
        rewrite(b"aaaa");
        assert!(b.changes(&s, &ChangeOptions::default()).unwrap().is_empty());
        rewrite(b"abcd");
        let cs = b.changes(&s, &ChangeOptions::default()).unwrap();
        assert_eq!(cs.to_vec()[0].kind.symbol(), '~');
        fs::remove_dir_all(s.base.parent().unwrap()).unwrap();
    }

    #[test]
    fn unknown_config_key_is_an_error() {
        let mut t = layerpack_core::toml::Table::new();
        t.insert("hsh".into(), true.into());
        let cfg = BackendConfig {
            name: NAME.into(),
            table: t,
            origin: None,
            text: None,
        };
        let err = cfg.parse::<SnapshotConfig>().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("hsh"));
    }
}
