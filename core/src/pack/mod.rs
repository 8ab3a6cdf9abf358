//! Package writers: ipk (ar), OpenWrt-style ipk (gzip'd tar), a data
//! tarball, an OCI layer, and deb. Also control metadata, Buildroot
//! device/permission tables, the feed index and the reader behind
//! `apply`.
//!
//! Every writer starts from the same plan: the added and modified entries
//! of a change set (plus any missing parent directories, so a package is
//! self-contained), owners forced to 0:0 unless the backend recorded them
//! or a permission table says otherwise, mtimes clamped to
//! `SOURCE_DATE_EPOCH`, hard links as link entries, byte-wise depth-first
//! order. Same inputs, same bytes.

pub mod apply;
pub mod devtable;
pub mod feed;
pub mod pgz;
pub mod tarw;
pub mod version;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::{Compression, GzBuilder};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::model::{ChangeSet, FileKind, RelPath};
use crate::{Error, ErrorKind, Result};
use tarw::{TarHeader, TarKind, TarWriter};

/// Package formats `final` can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Format {
    /// ar archive: debian-binary, control.tar.gz, data.tar.gz (opkg, dpkg-deb).
    Ipk,
    /// gzip'd tar holding the same three members (OpenWrt's opkg).
    IpkOpenwrt,
    /// The data tarball alone (`.tar.gz`).
    Tar,
    /// An OCI image layer (`.tar`, `.wh.` whiteouts for deletions).
    Oci,
    /// A Debian package (the ipk layout; dpkg reads it).
    Deb,
}

impl Format {
    /// Every format and its name.
    pub const ALL: [(Format, &'static str); 5] = [
        (Format::Ipk, "ipk"),
        (Format::IpkOpenwrt, "ipk-openwrt"),
        (Format::Tar, "tar"),
        (Format::Oci, "oci"),
        (Format::Deb, "deb"),
    ];

    /// Parse a format name.
    pub fn parse(s: &str) -> Result<Format> {
        Format::ALL
            .iter()
            .find(|(_, n)| *n == s)
            .map(|(f, _)| *f)
            .ok_or_else(|| {
                let names: Vec<&str> = Format::ALL.iter().map(|(_, n)| *n).collect();
                Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "unknown package format '{s}'; known formats: {}",
                        names.join(", ")
                    ),
                )
            })
    }

    /// The format's name.
    pub fn name(self) -> &'static str {
        Format::ALL
            .iter()
            .find(|(f, _)| *f == self)
            .map(|(_, n)| *n)
            .unwrap_or("?")
    }

    /// Output file name for a package.
    pub fn file_name(self, m: &PackageMeta) -> String {
        let stem = format!(
            "{}_{}_{}",
            m.package,
            version::without_epoch(&m.version),
            m.architecture
        );
        match self {
            Format::Ipk | Format::IpkOpenwrt => format!("{stem}.ipk"),
            Format::Tar => format!("{stem}.tar.gz"),
            Format::Oci => format!("{stem}.oci-layer.tar"),
            Format::Deb => format!("{stem}.deb"),
        }
    }
}

/// Control fields as they come from the command line, the session, the
/// config (`[packages.<name>]`, `[package_defaults]`). Later sources fill
/// only what earlier ones left empty.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetaFields {
    /// Version (`[epoch:]upstream[-revision]`).
    pub version: Option<String>,
    /// Architecture (`all`, `arm_cortex-a7_neon-vfpv4`, ...).
    pub architecture: Option<String>,
    /// Maintainer.
    pub maintainer: Option<String>,
    /// Description: first line is the summary.
    pub description: Option<String>,
    /// Depends (comma-separated).
    pub depends: Option<String>,
    /// Section.
    pub section: Option<String>,
    /// Priority.
    pub priority: Option<String>,
    /// Source.
    pub source: Option<String>,
    /// Paths (absolute, as on the target) of configuration files.
    pub conffiles: Option<Vec<String>>,
}

impl MetaFields {
    /// Fill empty fields from `other`.
    pub fn or(mut self, other: &MetaFields) -> MetaFields {
        macro_rules! fill {
            ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = other.$f.clone(); } )* };
        }
        fill!(
            version,
            architecture,
            maintainer,
            description,
            depends,
            section,
            priority,
            source,
            conffiles
        );
        self
    }
}

/// Complete control metadata of one package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackageMeta {
    /// Package name in `[a-z0-9.+-]`.
    pub package: String,
    /// Version.
    pub version: String,
    /// Architecture.
    pub architecture: String,
    /// Maintainer.
    pub maintainer: String,
    /// Description.
    pub description: String,
    /// Optional fields, in control-file order.
    pub depends: Option<String>,
    /// Section.
    pub section: Option<String>,
    /// Priority.
    pub priority: Option<String>,
    /// Source.
    pub source: Option<String>,
    /// Configuration files.
    pub conffiles: Vec<String>,
}

/// Map a build-system package name to an ipk name: ASCII letters are
/// lower-cased, `_` becomes `-`; anything else outside `[a-z0-9.+-]` is an
/// error. Returns the name and whether it changed.
pub fn map_package_name(name: &str) -> Result<(String, bool)> {
    let mapped: String = name
        .chars()
        .map(|c| match c {
            'A'..='Z' => c.to_ascii_lowercase(),
            '_' => '-',
            c => c,
        })
        .collect();
    let ok = mapped
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".+-".contains(c));
    if !ok || mapped.len() < 2 || !mapped.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("package name '{name}' cannot be mapped to an ipk name ([a-z0-9][a-z0-9.+-]+, at least 2 characters)"),
        ));
    }
    let changed = mapped != name;
    Ok((mapped, changed))
}

/// What package name, version (without epoch) and architecture may take
/// together in a package's file name: `NAME_MAX` (255) less the longest
/// format suffix (`.oci-layer.tar`), two `_` and the temporary name
/// layerpack writes first (`.<file>.data-<pid>`).
pub const MAX_FILE_NAME_FIELDS: usize = 255 - 14 - 2 - 14;

/// Check, before anything is captured, that the package file for `name`
/// (mapped), `version` and `architecture` will fit in a file name, and
/// that the architecture is a plain word. Unknown fields count as what
/// they default to (`all`; no version: nothing to check yet).
pub fn check_file_name_fields(
    name: &str,
    version: Option<&str>,
    architecture: Option<&str>,
) -> Result<()> {
    let arch = architecture.unwrap_or("all");
    let arch_ok = !arch.is_empty()
        && arch
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.+-".contains(c));
    if !arch_ok {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("architecture {arch:?} is not an opkg architecture: use letters, digits and _ . + - (e.g. all, aarch64, arm_cortex-a7_neon-vfpv4)"),
        ));
    }
    let Some(version) = version else {
        return Ok(());
    };
    let (mapped, _) = map_package_name(name).unwrap_or((name.to_string(), false));
    let version = version.split_once(':').map_or(version, |(_, v)| v);
    let total = mapped.len() + version.len() + arch.len();
    if total > MAX_FILE_NAME_FIELDS {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "package {name}: name ({} bytes), version ({} bytes) and architecture ({} bytes) take {total} bytes of the package file name; at most {MAX_FILE_NAME_FIELDS} fit (a file name holds 255 bytes, with room for the format's suffix and layerpack's temporary name)",
                mapped.len(),
                version.len(),
                arch.len()
            ),
        ));
    }
    Ok(())
}

fn single_line(field: &str, v: &str) -> Result<()> {
    if v.contains('\n') || v.trim().is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("control field {field} must be one non-empty line, got {v:?}"),
        ));
    }
    Ok(())
}

impl PackageMeta {
    /// Complete metadata for build-system package `name` from `fields`:
    /// Version is required; Architecture defaults to `all`, Maintainer and
    /// Description to fixed texts (never the build host's user or name).
    pub fn resolve(name: &str, fields: &MetaFields) -> Result<PackageMeta> {
        let (package, _) = map_package_name(name)?;
        let version = fields.version.clone().ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("no version for package '{name}': give --version to init or final, or set version in [packages.{name}]"),
            )
        })?;
        let valid_version = version.starts_with(|c: char| c.is_ascii_digit())
            && version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".+~:-".contains(c));
        if !valid_version {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("version '{version}' of package '{name}' is not a Debian/opkg version (start with a digit; letters, digits and . + ~ : - only)"),
            ));
        }
        let m = PackageMeta {
            package,
            version,
            architecture: fields.architecture.clone().unwrap_or_else(|| "all".into()),
            maintainer: fields
                .maintainer
                .clone()
                .unwrap_or_else(|| "Unknown <unknown@unknown>".into()),
            description: fields
                .description
                .clone()
                .unwrap_or_else(|| format!("{name}, captured by layerpack")),
            depends: fields.depends.clone(),
            section: fields.section.clone(),
            priority: fields.priority.clone(),
            source: fields.source.clone(),
            conffiles: fields.conffiles.clone().unwrap_or_default(),
        };
        single_line("Architecture", &m.architecture)?;
        check_file_name_fields(name, Some(&m.version), Some(&m.architecture))?;
        single_line("Maintainer", &m.maintainer)?;
        for (f, v) in [
            ("Depends", &m.depends),
            ("Section", &m.section),
            ("Priority", &m.priority),
            ("Source", &m.source),
        ] {
            if let Some(v) = v {
                single_line(f, v)?;
            }
        }
        for c in &m.conffiles {
            if !c.starts_with('/') || c.contains(['\n', '\r', '\0']) {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("conffile {c:?} must be one absolute path on one line"),
                ));
            }
        }
        if m.description.trim().is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "control field Description is empty",
            ));
        }
        Ok(m)
    }

    /// The `control` file text.
    pub fn control(&self, installed_size: u64) -> String {
        let mut s = format!("Package: {}\nVersion: {}\n", self.package, self.version);
        for (k, v) in [
            ("Depends", &self.depends),
            ("Source", &self.source),
            ("Section", &self.section),
            ("Priority", &self.priority),
        ] {
            if let Some(v) = v {
                s.push_str(&format!("{k}: {v}\n"));
            }
        }
        s.push_str(&format!(
            "Maintainer: {}\nArchitecture: {}\nInstalled-Size: {installed_size}\n",
            self.maintainer, self.architecture
        ));
        let mut lines = self.description.trim_end().lines();
        s.push_str(&format!(
            "Description: {}\n",
            lines.next().unwrap_or("").trim()
        ));
        for l in lines {
            if l.trim().is_empty() {
                s.push_str(" .\n");
            } else {
                s.push_str(&format!(" {}\n", l.trim_end()));
            }
        }
        s
    }
}

/// How to turn a layer into package entries.
#[derive(Clone, Debug, Default)]
pub struct PackOptions {
    /// Clamp mtimes to this (seconds); from `SOURCE_DATE_EPOCH`.
    pub source_date_epoch: Option<i64>,
    /// Keep the owners the backend recorded (fuse) instead of 0:0.
    pub keep_owners: bool,
    /// Permission table lines applied at pack time.
    pub device_table: Vec<devtable::DevEntry>,
    /// gzip level 1..=9 (default 6, as `gzip -6`).
    pub compression: Option<u32>,
    /// Threads for compressing data (0: one per core). The bytes written
    /// do not depend on it.
    pub threads: usize,
}

/// One entry of a package, fully decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEntry {
    /// Path.
    pub path: RelPath,
    /// Type.
    pub kind: FileKind,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size of regular files.
    pub size: u64,
    /// mtime, seconds.
    pub mtime: i64,
    /// Symlink target.
    pub link_target: Option<Vec<u8>>,
    /// Device numbers.
    pub rdev: (u32, u32),
    /// Earlier path this is a hard link to.
    pub hardlink_to: Option<RelPath>,
    /// Content hash recorded when the layer was read.
    pub sha256: Option<[u8; 32]>,
}

/// The entries of a package, and what could not be included.
#[derive(Debug, Default)]
pub struct Plan {
    /// Entries in path order.
    pub entries: Vec<PlannedEntry>,
    /// Deleted base paths, children first.
    pub deletions: Vec<RelPath>,
    /// Things the package cannot hold, for the user.
    pub warnings: Vec<String>,
}

impl Plan {
    /// Decide the entries for `changes`, whose content lives under `root`.
    pub fn new(changes: &ChangeSet, root: &Path, opts: &PackOptions) -> Result<Plan> {
        let mut plan = Plan::default();
        let mut map: BTreeMap<RelPath, PlannedEntry> = BTreeMap::new();
        let mut first_of_group: BTreeMap<u32, RelPath> = BTreeMap::new();
        for c in changes.present() {
            let m = &c.meta;
            if m.kind == FileKind::Socket {
                plan.warnings
                    .push(format!("{}: sockets cannot be packaged; skipped", c.path));
                continue;
            }
            let hardlink_to = match m.link_group {
                Some(g) => match first_of_group.get(&g) {
                    Some(first) => Some(first.clone()),
                    None => {
                        first_of_group.insert(g, c.path.clone());
                        None
                    }
                },
                None => None,
            };
            let (uid, gid) = if opts.keep_owners {
                (m.uid, m.gid)
            } else {
                (0, 0)
            };
            map.insert(
                c.path.clone(),
                PlannedEntry {
                    path: c.path.clone(),
                    kind: m.kind,
                    mode: m.mode,
                    uid,
                    gid,
                    size: if m.kind == FileKind::File { m.size } else { 0 },
                    mtime: m.mtime_ns.div_euclid(1_000_000_000),
                    link_target: m.link_target.clone(),
                    rdev: m.rdev.unwrap_or((0, 0)),
                    hardlink_to,
                    sha256: m.sha256,
                },
            );
        }
        // Parents that exist in the root but did not change: include them
        // so the package installs into an empty root too.
        let paths: Vec<RelPath> = map.keys().cloned().collect();
        for p in paths {
            let mut cur = p.parent();
            while let Some(dir) = cur {
                if dir.is_root() || map.contains_key(&dir) {
                    break;
                }
                let md = fs::symlink_metadata(&*crate::tree::reach(root, &dir)?)
                    .map_err(|e| Error::io(dir.under(root), "cannot read a parent directory", e))?;
                use std::os::unix::fs::MetadataExt;
                map.insert(
                    dir.clone(),
                    PlannedEntry {
                        path: dir.clone(),
                        kind: FileKind::Dir,
                        mode: md.mode() & 0o7777,
                        uid: if opts.keep_owners { md.uid() } else { 0 },
                        gid: if opts.keep_owners { md.gid() } else { 0 },
                        size: 0,
                        mtime: md.mtime(),
                        link_target: None,
                        rdev: (0, 0),
                        hardlink_to: None,
                        sha256: None,
                    },
                );
                cur = dir.parent();
            }
        }
        devtable::apply_table(&opts.device_table, &mut map, &mut plan.warnings)?;
        if let Some(epoch) = opts.source_date_epoch {
            for e in map.values_mut() {
                e.mtime = e.mtime.min(epoch);
            }
        }
        plan.entries = map.into_values().collect();
        plan.deletions = changes.deletions().map(|c| c.path.clone()).collect();
        Ok(plan)
    }

    /// Installed-Size as opkg-build counts it: bytes of regular files.
    pub fn installed_size(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.kind == FileKind::File)
            .map(|e| e.size)
            .sum()
    }
}

fn gz(level: Option<u32>) -> impl FnOnce(Vec<u8>) -> GzEncoder<Vec<u8>> {
    move |out| {
        GzBuilder::new()
            .mtime(0)
            .operating_system(3)
            .write(out, Compression::new(level.unwrap_or(6).clamp(1, 9)))
    }
}

fn io_err(path: &Path, what: &str) -> impl Fn(std::io::Error) -> Error {
    let (path, what) = (path.to_path_buf(), what.to_string());
    move |e| Error::io(&path, what.clone(), e)
}

/// Write the data tarball of `plan` (content read from `root`).
/// `prefix` is `./` for ipk and tar, empty for OCI.
fn write_data_tar<W: Write>(
    out: W,
    plan: &Plan,
    root: &Path,
    prefix: &[u8],
    oci_whiteouts: bool,
) -> Result<W> {
    let mut w = TarWriter::new(out);
    let progress = crate::progress::step(
        format!("packing {} entries", plan.entries.len()),
        crate::progress::Unit::Bytes,
    );
    let mut names: Vec<(RelPath, Vec<u8>)> = Vec::new();
    let present: std::collections::BTreeSet<&RelPath> =
        plan.entries.iter().map(|e| &e.path).collect();
    let mut entries: Vec<(RelPath, Option<&PlannedEntry>)> = plan
        .entries
        .iter()
        .map(|e| (e.path.clone(), Some(e)))
        .collect();
    if oci_whiteouts {
        for d in &plan.deletions {
            let parent = d.parent().unwrap_or_default();
            let parent_deleted = plan.deletions.contains(&parent);
            let parent_replaced = present.contains(&parent)
                && plan
                    .entries
                    .iter()
                    .any(|e| e.path == parent && e.kind != FileKind::Dir);
            if !parent_deleted && !parent_replaced {
                let wh = parent.join(&[b".wh.", d.file_name()].concat());
                entries.push((wh, None));
            }
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
    }
    for (path, e) in entries {
        let mut name = prefix.to_vec();
        name.extend_from_slice(path.as_bytes());
        let Some(e) = e else {
            let h = TarHeader {
                name: &name,
                kind: TarKind::File,
                mode: 0o644,
                uid: 0,
                gid: 0,
                size: 0,
                mtime: 0,
                link: b"",
                dev: (0, 0),
            };
            w.header(&h).map_err(io_err(root, "cannot write package"))?;
            continue;
        };
        if oci_whiteouts && path.file_name().starts_with(b".wh.") {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{path}: an OCI layer cannot hold a file named .wh.*; it would be read as a whiteout"),
            ));
        }
        let abs = crate::tree::reach(root, &path)?;
        let mut link = Vec::new();
        let kind = if let Some(first) = &e.hardlink_to {
            link = prefix.to_vec();
            link.extend_from_slice(first.as_bytes());
            TarKind::HardLink
        } else {
            match e.kind {
                FileKind::File => TarKind::File,
                FileKind::Dir => {
                    name.push(b'/');
                    TarKind::Dir
                }
                FileKind::Symlink => {
                    link = e.link_target.clone().unwrap_or_default();
                    TarKind::Symlink
                }
                FileKind::CharDevice => TarKind::CharDevice,
                FileKind::BlockDevice => TarKind::BlockDevice,
                FileKind::Fifo => TarKind::Fifo,
                FileKind::Socket => continue,
            }
        };
        let h = TarHeader {
            name: &name,
            kind,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            size: e.size,
            mtime: e.mtime,
            link: &link,
            dev: e.rdev,
        };
        w.header(&h).map_err(io_err(&abs, "cannot write package"))?;
        if kind == TarKind::File {
            let f = fs::OpenOptions::new()
                .read(true)
                .open(&abs)
                .map_err(io_err(&abs, "cannot open for packaging"))?;
            let mut hashing = HashingReader {
                inner: f,
                hash: Sha256::new(),
            };
            w.data(&mut hashing, e.size)
                .map_err(io_err(&abs, "cannot package"))?;
            progress.add(e.size);
            let got: [u8; 32] = hashing.hash.finalize().into();
            if e.sha256.is_some_and(|h| h != got) {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!("{path} changed after the layer was read; run final again"),
                )
                .with_path(&abs));
            }
        }
        names.push((path, name));
    }
    w.finish().map_err(io_err(root, "cannot write package"))
}

struct HashingReader<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Single-quote bytes for a POSIX shell.
fn shell_quote(b: &[u8]) -> Vec<u8> {
    let mut out = vec![b'\''];
    for &c in b {
        if c == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(c);
        }
    }
    out.push(b'\'');
    out
}

/// The generated `postinst` that removes what the install deleted.
pub fn deletion_script(package: &str, deletions: &[RelPath]) -> Vec<u8> {
    let mut s = format!(
        "#!/bin/sh\n# Generated by layerpack: the install of {package} removed these paths\n# from the root it was captured in.\nroot=\"${{PKG_ROOT:-${{IPKG_INSTROOT:-}}}}\"\nroot=\"${{root%/}}\"\n"
    )
    .into_bytes();
    for d in deletions {
        s.extend_from_slice(b"p=\"$root\"/");
        s.extend_from_slice(&shell_quote(d.as_bytes()));
        s.extend_from_slice(b"\nif [ -d \"$p\" ] && [ ! -L \"$p\" ]; then rmdir \"$p\" 2>/dev/null || true; else rm -f \"$p\"; fi\n");
    }
    s.extend_from_slice(b"exit 0\n");
    s
}

fn control_tar(meta: &PackageMeta, plan: &Plan, level: Option<u32>, mtime: i64) -> Result<Vec<u8>> {
    let text = meta.control(plan.installed_size());
    feed::parse_control(&text).map_err(|why| {
        Error::new(
            ErrorKind::InvalidInput,
            format!(
                "the control file of {} would not be valid: {why}",
                meta.package
            ),
        )
    })?;
    let mut files: Vec<(&str, Vec<u8>, u32)> = vec![("./control", text.into_bytes(), 0o644)];
    if !meta.conffiles.is_empty() {
        let mut c = meta.conffiles.join("\n");
        c.push('\n');
        files.push(("./conffiles", c.into_bytes(), 0o644));
    }
    if !plan.deletions.is_empty() {
        let mut list = Vec::new();
        for d in &plan.deletions {
            list.extend_from_slice(d.as_bytes());
            list.push(0);
        }
        files.push(("./layerpack.deletions", list, 0o644));
        files.push((
            "./postinst",
            deletion_script(&meta.package, &plan.deletions),
            0o755,
        ));
    }
    files.sort_by(|a, b| a.0.cmp(b.0));
    let mut w = TarWriter::new(gz(level)(Vec::new()));
    for (name, data, mode) in files {
        let h = TarHeader {
            name: name.as_bytes(),
            kind: TarKind::File,
            mode,
            uid: 0,
            gid: 0,
            size: data.len() as u64,
            mtime,
            link: b"",
            dev: (0, 0),
        };
        w.header(&h)
            .and_then(|()| w.data(&data[..], data.len() as u64).map(drop))
            .map_err(|e| Error::new(ErrorKind::Io, format!("cannot write control.tar.gz: {e}")))?;
    }
    w.finish()
        .and_then(|g| g.finish())
        .map_err(|e| Error::new(ErrorKind::Io, format!("cannot write control.tar.gz: {e}")))
}

fn threads(opts: &PackOptions) -> usize {
    match opts.threads {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    }
}

/// Write the gzip'd data tarball of `plan` to `path`.
fn write_data_tar_gz(path: &Path, plan: &Plan, root: &Path, opts: &PackOptions) -> Result<()> {
    let f = fs::File::create(path).map_err(io_err(path, "cannot create"))?;
    let gz = pgz::ParallelGz::new(
        std::io::BufWriter::new(f),
        opts.compression.unwrap_or(6),
        threads(opts),
    );
    let gz = write_data_tar(gz, plan, root, b"./", false)?;
    let w = gz.finish().map_err(io_err(path, "cannot write"))?;
    w.into_inner()
        .map_err(|e| Error::io(path, "cannot write", e.into_error()))?
        .sync_all()
        .map_err(io_err(path, "cannot sync"))
}

/// Write `format` of the package into `out_dir`; returns the file written.
/// Data is streamed through temporary files next to the result, which
/// appears atomically (rename) once complete; memory stays small whatever
/// the size of the layer.
pub fn write_package(
    format: Format,
    meta: &PackageMeta,
    plan: &Plan,
    root: &Path,
    opts: &PackOptions,
    out_dir: &Path,
) -> Result<PathBuf> {
    let name = format.file_name(meta);
    let dest = out_dir.join(&name);
    let tmp = out_dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let tmp_data = out_dir.join(format!(".{name}.data-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let level = opts.compression;
        let ctl_mtime = opts.source_date_epoch.unwrap_or(0);
        match format {
            Format::Tar => write_data_tar_gz(&tmp, plan, root, opts)?,
            Format::Oci => {
                let f = fs::File::create(&tmp).map_err(io_err(&tmp, "cannot create"))?;
                let w = write_data_tar(std::io::BufWriter::new(f), plan, root, b"", true)?;
                w.into_inner()
                    .map_err(|e| Error::io(&tmp, "cannot write", e.into_error()))?
                    .sync_all()
                    .map_err(io_err(&tmp, "cannot sync"))?;
            }
            Format::Ipk | Format::Deb | Format::IpkOpenwrt => {
                write_data_tar_gz(&tmp_data, plan, root, opts)?;
                let data_len = fs::metadata(&tmp_data)
                    .map_err(io_err(&tmp_data, "cannot stat"))?
                    .len();
                let control = control_tar(meta, plan, level, ctl_mtime)?;
                let f = fs::File::create(&tmp).map_err(io_err(&tmp, "cannot create"))?;
                let mut out = std::io::BufWriter::new(f);
                let data = fs::File::open(&tmp_data).map_err(io_err(&tmp_data, "cannot open"))?;
                let werr = io_err(&tmp, "cannot write package");
                if format == Format::IpkOpenwrt {
                    let gz = pgz::ParallelGz::new(out, level.unwrap_or(6), threads(opts));
                    let mut w = TarWriter::new(gz);
                    let members: [(&str, u64); 3] = [
                        ("./debian-binary", 4),
                        ("./data.tar.gz", data_len),
                        ("./control.tar.gz", control.len() as u64),
                    ];
                    for (member, size) in members {
                        let h = TarHeader {
                            name: member.as_bytes(),
                            kind: TarKind::File,
                            mode: 0o644,
                            uid: 0,
                            gid: 0,
                            size,
                            mtime: ctl_mtime,
                            link: b"",
                            dev: (0, 0),
                        };
                        w.header(&h).map_err(&werr)?;
                        let copied = match member {
                            "./debian-binary" => w.data(&b"2.0\n"[..], size),
                            "./data.tar.gz" => w.data(&data, size),
                            _ => w.data(&control[..], size),
                        };
                        copied.map_err(&werr)?;
                    }
                    out = w.finish().and_then(|g| g.finish()).map_err(&werr)?;
                } else {
                    out.write_all(b"!<arch>\n").map_err(&werr)?;
                    for (member, body) in [
                        ("debian-binary", &b"2.0\n"[..]),
                        ("control.tar.gz", &control[..]),
                    ] {
                        out.write_all(&tarw::ar_member_header(member, body.len() as u64))
                            .and_then(|()| out.write_all(body))
                            .and_then(|()| {
                                out.write_all(if body.len() % 2 == 1 { b"\n" } else { b"" })
                            })
                            .map_err(&werr)?;
                    }
                    out.write_all(&tarw::ar_member_header("data.tar.gz", data_len))
                        .map_err(&werr)?;
                    let copied =
                        std::io::copy(&mut (&data).take(data_len), &mut out).map_err(&werr)?;
                    if copied != data_len {
                        return Err(Error::new(
                            ErrorKind::Io,
                            "data.tar.gz shrank while being packaged",
                        )
                        .with_path(&tmp_data));
                    }
                    if data_len % 2 == 1 {
                        out.write_all(b"\n").map_err(&werr)?;
                    }
                }
                out.into_inner()
                    .map_err(|e| Error::io(&tmp, "cannot write", e.into_error()))?
                    .sync_all()
                    .map_err(io_err(&tmp, "cannot sync"))?;
            }
        }
        fs::rename(&tmp, &dest).map_err(io_err(&dest, "cannot move package into place"))?;
        if let Ok(d) = fs::File::open(out_dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    let _ = fs::remove_file(&tmp_data);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_mapping() {
        assert_eq!(map_package_name("hello").unwrap(), ("hello".into(), false));
        assert_eq!(
            map_package_name("Qt5_Base").unwrap(),
            ("qt5-base".into(), true)
        );
        assert!(map_package_name("_x").is_err());
        assert!(map_package_name("a").is_err());
    }

    #[test]
    fn version_is_required_and_checked() {
        let e = PackageMeta::resolve("hello", &MetaFields::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("--version"));
        let f = MetaFields {
            version: Some("v1".into()),
            ..MetaFields::default()
        };
        assert!(PackageMeta::resolve("hello", &f).is_err());
    }

    #[test]
    fn control_text() {
        let f = MetaFields {
            version: Some("1:1.0-r1".into()),
            description: Some("Hello\nworld\n\nmore".into()),
            depends: Some("libc".into()),
            ..MetaFields::default()
        };
        let m = PackageMeta::resolve("Hello_World", &f).unwrap();
        assert_eq!(
            m.control(3),
            "Package: hello-world\nVersion: 1:1.0-r1\nDepends: libc\nMaintainer: Unknown <unknown@unknown>\nArchitecture: all\nInstalled-Size: 3\nDescription: Hello\n world\n .\n more\n"
        );
        assert_eq!(Format::Ipk.file_name(&m), "hello-world_1.0-r1_all.ipk");
    }

    #[test]
    fn deletion_script_quotes_everything() {
        let s = deletion_script("p", &[RelPath::from("etc/it's\nodd"), RelPath::from("etc")]);
        let s = String::from_utf8(s).unwrap();
        assert!(s.contains("p=\"$root\"/'etc/it'\\''s\nodd'"), "{s}");
    }
}
