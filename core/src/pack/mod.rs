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
pub mod caps;
pub mod compose;
pub mod devtable;
pub mod feed;
pub mod pgz;
pub mod scripts;
pub mod tarw;
pub mod version;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::{Compression, GzBuilder};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::model::{
    escape_bytes, merge_by_path, Change, ChangeKind, ChangeSet, FileKind, Meta, RelPath, Xattrs,
};
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
    /// License (SPDX expression, as Buildroot's `<PKG>_LICENSE`).
    pub license: Option<String>,
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
            license,
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
    /// Replaces (other captured packages whose files this one edits).
    pub replaces: Option<String>,
    /// Section.
    pub section: Option<String>,
    /// Priority.
    pub priority: Option<String>,
    /// Source.
    pub source: Option<String>,
    /// License.
    pub license: Option<String>,
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

/// Check, before anything is captured, that `name` can name a package
/// when `formats` (as the command line and config give them) write one:
/// every format takes the ipk name, [a-z0-9][a-z0-9.+-]+ after mapping.
pub fn check_name_for_formats<S: AsRef<str>>(name: &str, formats: &[S]) -> Result<()> {
    let named = formats
        .iter()
        .flat_map(|f| f.as_ref().split(','))
        .any(|f| f.trim() != "none");
    if named {
        map_package_name(name)?;
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
            replaces: None,
            section: fields.section.clone(),
            priority: fields.priority.clone(),
            source: fields.source.clone(),
            license: fields.license.clone(),
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
            ("License", &m.license),
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
            ("Replaces", &self.replaces),
            ("Source", &self.source),
            ("License", &self.license),
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

/// Whose owners a package carries (`--owners`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Owners {
    /// The owners the capture saw (an install run as root, or a backend
    /// that recorded what an unprivileged install asked for).
    #[default]
    Keep,
    /// Everything 0:0.
    Root,
    /// The build user's own uid and gid become 0:0; other owners are kept
    /// (an unprivileged install can only create files it owns).
    MapUser {
        /// The build user's uid.
        uid: u32,
        /// The build user's gid.
        gid: u32,
    },
}

impl Owners {
    /// The owner and group written for an entry the capture saw as
    /// `uid:gid`.
    pub fn map(self, uid: u32, gid: u32) -> (u32, u32) {
        match self {
            Owners::Keep => (uid, gid),
            Owners::Root => (0, 0),
            Owners::MapUser { uid: u, gid: g } => (
                if uid == u { 0 } else { uid },
                if gid == g { 0 } else { gid },
            ),
        }
    }
}

/// How to turn a layer into package entries.
#[derive(Clone, Debug, Default)]
pub struct PackOptions {
    /// Clamp mtimes to this (seconds); from `SOURCE_DATE_EPOCH`.
    pub source_date_epoch: Option<i64>,
    /// The owner policy.
    pub owners: Owners,
    /// Permission table lines applied at pack time.
    pub device_table: Vec<devtable::DevEntry>,
    /// gzip level 1..=9 (default 6, as `gzip -6`).
    pub compression: Option<u32>,
    /// Threads for compressing data (0: one per core). The bytes written
    /// do not depend on it.
    pub threads: usize,
}

/// Where a package entry's content is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// The layer this capture read (the backend's content root).
    Layer,
    /// The base: an entry the package owns that this install left alone.
    Base,
    /// Nothing: a directory made up for the package's own paths.
    Synthetic,
}

/// Metadata read by an item or a planned entry: borrowed from the change
/// set it came from, or owned (an entry read from the base, a directory or
/// device node made up for the package).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaRef<'a> {
    /// An entry of the change set.
    Borrowed(&'a Meta),
    /// Read or made up for this package.
    Owned(Box<Meta>),
}

impl std::ops::Deref for MetaRef<'_> {
    type Target = Meta;
    fn deref(&self) -> &Meta {
        match self {
            MetaRef::Borrowed(m) => m,
            MetaRef::Owned(m) => m,
        }
    }
}

impl From<Meta> for MetaRef<'_> {
    fn from(m: Meta) -> Self {
        MetaRef::Owned(Box::new(m))
    }
}

/// One entry of a package, fully decided. What it is (type, size, link
/// target, device numbers, hash) is read from the metadata it came with;
/// what the package says of it (mode, owners, mtime) is decided here.
/// A plan holds few of them: the layer's are made as they are read
/// ([`Plan::entries`]); the lifetime lets callers lend paths and
/// metadata they hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEntry<'a> {
    /// Path in the package.
    pub path: Cow<'a, RelPath>,
    /// Where the content is read from, and the path there (differs from
    /// `path` for the private copy of an edit to a file the package does
    /// not own).
    pub source: Source,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// mtime, seconds.
    pub mtime: i64,
    meta: MetaRef<'a>,
    /// What few entries have, out of line to keep the common entry small.
    rare: Option<Box<Rare<'a>>>,
}

/// The parts of a planned entry most entries lack.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Rare<'a> {
    /// Path under the source root, when it is not `path`.
    src: Option<Cow<'a, RelPath>>,
    /// Earlier path this is a hard link to.
    hardlink_to: Option<Cow<'a, RelPath>>,
    /// The carried xattrs when they are not all of `meta`'s.
    xattrs: Option<Xattrs>,
}

impl<'a> PlannedEntry<'a> {
    /// An entry that no change set holds (a parent directory, a device
    /// table's node): `kind`, the device number `rdev`, nothing else.
    pub fn made_up(path: RelPath, source: Source, kind: FileKind, rdev: (u32, u32)) -> Self {
        let mut meta = Meta::new(kind, 0o755);
        if kind.is_device() {
            meta.rdev = Some(rdev);
        }
        PlannedEntry {
            path: Cow::Owned(path),
            source,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            meta: meta.into(),
            rare: None,
        }
    }

    /// An entry to package as it was captured: `name` in the package,
    /// what `meta` says of it, its content at `src` under the root of
    /// `source`. [`Plan::build`] decides owners, mode and the rest.
    pub fn captured(
        name: Cow<'a, RelPath>,
        meta: MetaRef<'a>,
        source: Source,
        src: Cow<'a, RelPath>,
    ) -> Self {
        let rare = (src != name).then(|| {
            Box::new(Rare {
                src: Some(src),
                ..Rare::default()
            })
        });
        PlannedEntry {
            path: name,
            source,
            mode: meta.mode,
            uid: meta.uid,
            gid: meta.gid,
            mtime: meta.mtime_ns.div_euclid(1_000_000_000),
            meta,
            rare,
        }
    }

    fn rare(&self) -> Option<&Rare<'a>> {
        self.rare.as_deref()
    }

    fn rare_mut(&mut self) -> &mut Rare<'a> {
        self.rare.get_or_insert_with(Box::default)
    }

    /// Earlier path this is a hard link to.
    pub fn hardlink_to(&self) -> Option<&RelPath> {
        self.rare()?.hardlink_to.as_deref()
    }

    /// Type.
    pub fn kind(&self) -> FileKind {
        self.meta.kind
    }

    /// Size of regular files (0 for everything else).
    pub fn size(&self) -> u64 {
        if self.meta.kind == FileKind::File {
            self.meta.size
        } else {
            0
        }
    }

    /// Symlink target.
    pub fn link_target(&self) -> Option<&[u8]> {
        self.meta.link_target.as_deref()
    }

    /// Device numbers ((0, 0) for what is not a device).
    pub fn rdev(&self) -> (u32, u32) {
        self.meta.rdev.unwrap_or((0, 0))
    }

    /// Content hash recorded when the layer was read.
    pub fn sha256(&self) -> Option<[u8; 32]> {
        self.meta.sha256
    }

    /// Extended attributes the package carries (`security.capability`,
    /// `user.*`, `trusted.*`), sorted by name.
    pub fn xattrs(&self) -> &Xattrs {
        self.rare()
            .and_then(|r| r.xattrs.as_ref())
            .unwrap_or(&self.meta.xattrs)
    }

    /// Where the content is read, under the source's root.
    pub fn src_path(&self) -> &RelPath {
        self.rare()
            .and_then(|r| r.src.as_deref())
            .unwrap_or(&self.path)
    }
}

/// An edit to a path the package does not own, carried by maintainer
/// scripts (see [`scripts`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edit {
    /// The edited path.
    pub path: RelPath,
    /// The install deleted it (else it holds new content, shipped at
    /// [`private_path`]).
    pub deleted: bool,
}

/// Which changes of a set [`LayerItems`] takes, by position.
type Selector<'a> = Box<dyn Fn(usize, &Change) -> bool + 'a>;

/// The layer's entries a plan ships at their own paths: the present
/// changes of a change set that a selector takes (by position in the set).
/// They are read from the set as the package is written, not copied into
/// the plan: a plan of a million files holds what is special about it,
/// not a million entries.
pub struct LayerItems<'a> {
    changes: &'a ChangeSet,
    select: Selector<'a>,
}

impl<'a> LayerItems<'a> {
    /// Every present change of `changes`.
    pub fn present(changes: &'a ChangeSet) -> LayerItems<'a> {
        LayerItems::selected(changes, |_, c| c.kind != ChangeKind::Deleted)
    }

    /// The changes of `changes` that `select` takes (it is given their
    /// position in the set); a deletion is never taken.
    pub fn selected(
        changes: &'a ChangeSet,
        select: impl Fn(usize, &Change) -> bool + 'a,
    ) -> LayerItems<'a> {
        LayerItems {
            changes,
            select: Box::new(select),
        }
    }

    fn take(&self, i: usize, c: &Change) -> bool {
        c.kind != ChangeKind::Deleted && (self.select)(i, c)
    }

    /// The items, in path order, undecided.
    fn items(&self) -> impl Iterator<Item = PlannedEntry<'static>> + '_ {
        self.changes
            .iter()
            .enumerate()
            .filter(|(i, c)| self.take(*i, c))
            .map(|(_, c)| layer_entry(c))
    }

    fn item(&self, path: &RelPath) -> Option<PlannedEntry<'static>> {
        let (i, c) = self.changes.get_indexed(path)?;
        self.take(i, &c).then(|| layer_entry(c))
    }
}

fn layer_entry(c: Change) -> PlannedEntry<'static> {
    let Change { path, meta, .. } = c;
    PlannedEntry::captured(
        Cow::Owned(path.clone()),
        meta.into(),
        Source::Layer,
        Cow::Owned(path),
    )
}

/// The entries of a package, and what could not be included.
#[derive(Default)]
pub struct Plan<'a> {
    layer: Option<LayerItems<'a>>,
    /// The entries not read from `layer` as they are (read from the base,
    /// made up, edited by the permission table, diverted), decided, in
    /// path order. One of them replaces a layer entry of the same path.
    others: Vec<PlannedEntry<'a>>,
    /// The first path of each hard-link group.
    first_of_group: HashMap<(Source, u32), RelPath>,
    opts: PackOptions,
    len: usize,
    content_bytes: u64,
    /// Deleted base paths removed by the generated `postinst` with no way
    /// back (policy `ship`), children first.
    pub deletions: Vec<RelPath>,
    /// Edits to paths the package does not own, saved and restored by the
    /// generated scripts.
    pub edits: Vec<Edit>,
    /// `security.capability` values the generated `postinst` sets, for
    /// clients that restore no xattrs.
    pub capabilities: Vec<(RelPath, Vec<u8>)>,
    /// Things the package cannot hold, for the user.
    pub warnings: Vec<String>,
    /// Where [`Source::Layer`] entries are read.
    pub layer_root: PathBuf,
    /// Where [`Source::Base`] entries are read.
    pub base_root: PathBuf,
}

impl std::fmt::Debug for Plan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("entries", &self.len)
            .field("deletions", &self.deletions)
            .field("edits", &self.edits)
            .field("warnings", &self.warnings)
            .finish_non_exhaustive()
    }
}

/// What decides a layer entry as it is read: the same rules
/// [`Plan::build`] applies to the others, without the notes (those were
/// taken when the plan was built).
struct Decider<'p> {
    opts: &'p PackOptions,
    first_of_group: &'p HashMap<(Source, u32), RelPath>,
}

impl Decider<'_> {
    fn decide<'a>(&self, mut e: PlannedEntry<'a>) -> PlannedEntry<'a> {
        let hardlink_to = e.meta.link_group.and_then(|g| {
            self.first_of_group
                .get(&(e.source, g))
                .filter(|first| **first != *e.path)
                .cloned()
        });
        decide_entry(
            &mut e,
            self.opts,
            &mut OwnerReport::default(),
            &mut Vec::new(),
            hardlink_to.map(Cow::Owned),
        );
        if let Some(epoch) = self.opts.source_date_epoch {
            e.mtime = e.mtime.min(epoch);
        }
        e
    }
}

/// Owners, mode, carried xattrs and hard link of one entry; what cannot
/// be carried is said in `warnings`.
fn decide_entry<'a>(
    e: &mut PlannedEntry<'a>,
    opts: &PackOptions,
    owners: &mut OwnerReport,
    warnings: &mut Vec<String>,
    hardlink_to: Option<Cow<'a, RelPath>>,
) {
    let m = &*e.meta;
    let (uid, gid, mode) = owners.decide(opts.owners, &e.path, m);
    let mut xattrs = None;
    if !m.xattrs.keys().all(|k| is_packable_xattr(k)) {
        let mut carried = Xattrs::new();
        for (k, v) in &m.xattrs {
            if is_packable_xattr(k) {
                carried.insert(k.clone(), v.clone());
            } else {
                warnings.push(format!(
                    "{}: xattr {} is not carried (only security.capability, user.* and trusted.* are)",
                    e.path,
                    escape_bytes(k)
                ));
            }
        }
        xattrs = Some(carried);
    }
    (e.uid, e.gid, e.mode) = (uid, gid, mode);
    if hardlink_to.is_some() {
        e.rare_mut().hardlink_to = hardlink_to;
    }
    if xattrs.is_some() {
        e.rare_mut().xattrs = xattrs;
    }
}

/// The entries of a plan while it is built: the others, in path order,
/// the few made up or edited for them (parent directories, device-table
/// nodes) on the side until the two are merged, and the layer's, copied
/// to the side when the permission table edits them.
#[derive(Default)]
pub struct Entries<'p, 'a> {
    sorted: Vec<PlannedEntry<'a>>,
    extra: BTreeMap<RelPath, PlannedEntry<'a>>,
    layer: Option<(&'p LayerItems<'a>, Decider<'p>)>,
}

impl<'a> Entries<'_, 'a> {
    fn position(&self, path: &RelPath) -> std::result::Result<usize, usize> {
        self.sorted.binary_search_by(|e| e.path.as_ref().cmp(path))
    }

    fn layer_entry(&self, path: &RelPath) -> Option<PlannedEntry<'a>> {
        let (layer, decider) = self.layer.as_ref()?;
        let e = layer.item(path)?;
        (e.kind() != FileKind::Socket).then(|| decider.decide(e))
    }

    /// True when `path` has an entry.
    pub fn contains(&self, path: &RelPath) -> bool {
        self.position(path).is_ok()
            || self.extra.contains_key(path)
            || self.layer_entry(path).is_some()
    }

    /// The entry of `path`.
    pub fn get_mut(&mut self, path: &RelPath) -> Option<&mut PlannedEntry<'a>> {
        match self.position(path) {
            Ok(i) => Some(&mut self.sorted[i]),
            Err(_) => {
                if !self.extra.contains_key(path) {
                    let e = self.layer_entry(path)?;
                    self.extra.insert(path.clone(), e);
                }
                self.extra.get_mut(path)
            }
        }
    }

    /// The entry of `path`, made by `make` when there is none.
    pub fn get_or_insert_with(
        &mut self,
        path: &RelPath,
        make: impl FnOnce() -> PlannedEntry<'a>,
    ) -> &mut PlannedEntry<'a> {
        if self.position(path).is_err() && !self.extra.contains_key(path) {
            let e = self.layer_entry(path).unwrap_or_else(make);
            self.extra.insert(path.clone(), e);
        }
        match self.position(path) {
            Ok(i) => &mut self.sorted[i],
            Err(_) => self.extra.get_mut(path).expect("inserted above"),
        }
    }

    /// Add `e`, replacing the entry of its path.
    pub fn insert(&mut self, e: PlannedEntry<'a>) {
        match self.position(&e.path) {
            Ok(i) => self.sorted[i] = e,
            Err(_) => {
                self.extra.insert(e.path.clone().into_owned(), e);
            }
        }
    }

    /// Every entry at or below `prefix`, in no particular order (the
    /// layer's are copied to the side first).
    pub fn under_mut(
        &mut self,
        prefix: &RelPath,
    ) -> impl Iterator<Item = &mut PlannedEntry<'a>> + '_ {
        let prefix = prefix.clone();
        if let Some((layer, decider)) = &self.layer {
            for e in layer.items().filter(|e| e.path.starts_with(&prefix)) {
                if e.kind() != FileKind::Socket
                    && self
                        .sorted
                        .binary_search_by(|x| x.path.as_ref().cmp(&e.path))
                        .is_err()
                    && !self.extra.contains_key(&*e.path)
                {
                    let e = decider.decide(e);
                    self.extra.insert(e.path.clone().into_owned(), e);
                }
            }
        }
        self.sorted
            .iter_mut()
            .chain(self.extra.values_mut())
            .filter(move |e| e.path.starts_with(&prefix))
    }

    /// Number of entries held (the layer's not counted until copied).
    pub fn len(&self) -> usize {
        self.sorted.len() + self.extra.len()
    }

    /// True when none are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All held entries in path order.
    pub fn into_sorted(self) -> Vec<PlannedEntry<'a>> {
        let Entries {
            mut sorted, extra, ..
        } = self;
        if extra.len() <= 16 {
            // A few made-up entries: moved into place, without a second
            // copy of the whole list.
            sorted.reserve_exact(extra.len());
            for e in extra.into_values() {
                let at = sorted.partition_point(|x| x.path < e.path);
                sorted.push(e);
                sorted[at..].rotate_right(1);
            }
            return sorted;
        }
        let mut out = Vec::with_capacity(sorted.len() + extra.len());
        let mut extra = extra.into_values().peekable();
        for e in sorted {
            while let Some(x) = extra.next_if(|x| x.path < e.path) {
                out.push(x);
            }
            out.push(e);
        }
        out.extend(extra);
        out
    }
}

/// The entry of a directory above the package's entries that the package
/// lacks, so that it installs into an empty root too: read from the base
/// (where unchanged directories are), else from the layer; the private
/// directories of edits exist in neither.
fn parent_entry(
    dir: RelPath,
    layer_root: &Path,
    base_root: &Path,
    opts: &PackOptions,
) -> PlannedEntry<'static> {
    use std::os::unix::fs::MetadataExt;
    let found = [base_root, layer_root].into_iter().find_map(|r| {
        let abs = crate::tree::reach(r, &dir).ok()?;
        fs::symlink_metadata(&*abs).ok().filter(|m| m.is_dir())
    });
    match &found {
        Some(md) => {
            let mut e = PlannedEntry::made_up(dir, Source::Base, FileKind::Dir, (0, 0));
            (e.uid, e.gid) = opts.owners.map(md.uid(), md.gid());
            (e.mode, e.mtime) = (md.mode() & 0o7777, md.mtime());
            e
        }
        None => PlannedEntry::made_up(dir, Source::Synthetic, FileKind::Dir, (0, 0)),
    }
}

/// Where the new content of an edit to a file the package `package` does
/// not own travels inside it.
pub fn private_path(package: &str, path: &RelPath) -> RelPath {
    RelPath::from_normalized(
        [
            b"var/lib/layerpack/".as_slice(),
            package.as_bytes(),
            b"/new/",
            path.as_bytes(),
        ]
        .concat(),
    )
}

/// True for the xattrs a package carries: file capabilities and the
/// `user` and `trusted` namespaces (union-filesystem internals never reach
/// a change set). SELinux labels, ACLs and other `system`/`security`
/// attributes belong to the build host's policy, not to the package.
pub fn is_packable_xattr(name: &[u8]) -> bool {
    name == b"security.capability" || name.starts_with(b"user.") || name.starts_with(b"trusted.")
}

impl<'a> Plan<'a> {
    /// The plan of a package that holds exactly the present entries of
    /// `changes`, whose content lives under `root`; deletions are removed
    /// by the generated `postinst`.
    pub fn new(changes: &'a ChangeSet, root: &Path, opts: &PackOptions) -> Result<Plan<'a>> {
        let mut plan = Plan::build_with(
            Some(LayerItems::present(changes)),
            Vec::new(),
            root,
            root,
            opts,
        )?;
        plan.deletions = changes.deletions().map(|c| c.path).collect();
        Ok(plan)
    }

    /// [`Plan::build_with`] of `items` alone.
    pub fn build(
        items: Vec<PlannedEntry<'a>>,
        layer_root: &Path,
        base_root: &Path,
        opts: &PackOptions,
    ) -> Result<Plan<'a>> {
        Plan::build_with(None, items, layer_root, base_root, opts)
    }

    /// Decide the entries of `layer` and `items` (made by
    /// [`PlannedEntry::captured`], in any order; of a path in both, the
    /// item is kept): the owner policy, carried xattrs, hard links,
    /// missing parent directories, the permission table, mtime clamping.
    /// The layer's entries are decided again, the same way, as they are
    /// read: [`Plan::entries`].
    pub fn build_with(
        layer: Option<LayerItems<'a>>,
        mut items: Vec<PlannedEntry<'a>>,
        layer_root: &Path,
        base_root: &Path,
        opts: &PackOptions,
    ) -> Result<Plan<'a>> {
        // Path order, so the first link of a hard-link group comes first;
        // a repeated path keeps the last.
        items.sort_by(|a, b| a.path.cmp(&b.path));
        items.dedup_by(|later, kept| {
            let same = later.path == kept.path;
            if same {
                std::mem::swap(later, kept);
            }
            same
        });
        let mut plan = Plan {
            layer_root: layer_root.to_path_buf(),
            base_root: base_root.to_path_buf(),
            opts: opts.clone(),
            ..Plan::default()
        };
        let mut warnings = Vec::new();
        // Said first, in path order.
        let mut sockets = Vec::new();
        // One pass over both, in path order: hard-link groups, the notes
        // of the owner policy and the xattrs, and the parent directories
        // nobody provides.
        let mut owners = OwnerReport::default();
        let mut first_of_group: HashMap<(Source, u32), RelPath> = HashMap::new();
        let mut parents: Vec<RelPath> = Vec::new();
        let mut missing: BTreeMap<RelPath, PlannedEntry<'a>> = BTreeMap::new();
        let mut layer_iter = layer.as_ref().map(|l| l.items().peekable());
        let mut slot = 0usize;
        loop {
            let next_layer = layer_iter.as_mut().and_then(|it| it.peek());
            let take_item = match (next_layer, items.get(slot)) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some(l), Some(i)) => l.path >= i.path,
            };
            let path = if take_item {
                if let Some(it) = layer_iter.as_mut() {
                    // The item replaces a layer entry of its path.
                    it.next_if(|l| l.path == items[slot].path);
                }
                let e = &mut items[slot];
                slot += 1;
                if e.kind() == FileKind::Socket {
                    sockets.push(format!("{}: sockets cannot be packaged; skipped", e.path));
                    continue;
                }
                let hardlink_to = group_link(&mut first_of_group, e);
                decide_entry(e, opts, &mut owners, &mut warnings, hardlink_to);
                e.path.clone().into_owned()
            } else {
                let Some(mut e) = layer_iter.as_mut().and_then(|it| it.next()) else {
                    break;
                };
                if e.kind() == FileKind::Socket {
                    sockets.push(format!("{}: sockets cannot be packaged; skipped", e.path));
                    continue;
                }
                let hardlink_to = group_link(&mut first_of_group, &e);
                decide_entry(&mut e, opts, &mut owners, &mut warnings, hardlink_to);
                e.path.into_owned()
            };
            // `parents` holds the directories above the entry before this
            // one that the package has (given or made up): those that are
            // above this one too are its own, and the rest are missing.
            while parents.last().is_some_and(|p| !path.starts_with(p)) {
                parents.pop();
            }
            let mut need = Vec::new();
            let mut cur = path.parent();
            while let Some(dir) = cur {
                if dir.is_root() || parents.last() == Some(&dir) {
                    break;
                }
                cur = dir.parent();
                need.push(dir);
            }
            for dir in need.into_iter().rev() {
                let made = parent_entry(dir.clone(), layer_root, base_root, opts);
                missing.insert(dir.clone(), made);
                parents.push(dir);
            }
            parents.push(path);
        }
        drop(layer_iter);
        items.retain(|e| e.kind() != FileKind::Socket);
        sockets.append(&mut warnings);
        plan.warnings = sockets;
        plan.warnings.extend(owners.notes(opts.owners));
        plan.first_of_group = first_of_group;
        let mut entries = Entries {
            sorted: items,
            extra: missing,
            layer: layer.as_ref().map(|l| {
                (
                    l,
                    Decider {
                        opts,
                        first_of_group: &plan.first_of_group,
                    },
                )
            }),
        };
        devtable::apply_table(&opts.device_table, &mut entries, &mut plan.warnings)?;
        entries.layer = None;
        let mut others = entries.into_sorted();
        if let Some(epoch) = opts.source_date_epoch {
            for e in &mut others {
                e.mtime = e.mtime.min(epoch);
            }
        }
        plan.others = others;
        plan.layer = layer;
        let (mut len, mut bytes, mut caps) = (0, 0, Vec::new());
        for e in plan.entries() {
            len += 1;
            if e.kind() == FileKind::File && e.hardlink_to().is_none() {
                bytes += e.size();
            }
            if e.hardlink_to().is_none() {
                if let Some(v) = e.xattrs().get(&b"security.capability"[..]) {
                    caps.push((e.path.clone().into_owned(), v.clone()));
                }
            }
        }
        (plan.len, plan.content_bytes, plan.capabilities) = (len, bytes, caps);
        Ok(plan)
    }

    /// The entries, decided, in path order.
    pub fn entries(&self) -> impl Iterator<Item = PlannedEntry<'a>> + '_ {
        let decider = Decider {
            opts: &self.opts,
            first_of_group: &self.first_of_group,
        };
        let layer: Box<dyn Iterator<Item = PlannedEntry<'a>> + '_> = match &self.layer {
            Some(l) => Box::new(
                l.items()
                    .filter(|e| e.kind() != FileKind::Socket)
                    .map(move |e| decider.decide(e)),
            ),
            None => Box::new(std::iter::empty()),
        };
        merge_by_path(layer, self.others.iter().cloned(), |e| e.path.as_bytes())
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the package holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of regular files (what opkg-build counts).
    pub fn content_bytes(&self) -> u64 {
        self.content_bytes
    }

    /// `Installed-Size` for `format`: bytes for opkg's formats (as
    /// opkg-build counts), KiB rounded up for deb (as Debian Policy
    /// defines it).
    pub fn installed_size(&self, format: Format) -> u64 {
        let bytes = self.content_bytes();
        if format == Format::Deb {
            bytes.div_ceil(1024)
        } else {
            bytes
        }
    }

    fn root_of(&self, e: &PlannedEntry) -> &Path {
        match e.source {
            Source::Base => &self.base_root,
            _ => &self.layer_root,
        }
    }
}

/// The earlier path of `e`'s hard-link group, or none when `e` is the
/// first (which it then becomes).
fn group_link<'a>(
    first_of_group: &mut HashMap<(Source, u32), RelPath>,
    e: &PlannedEntry<'a>,
) -> Option<Cow<'a, RelPath>> {
    let g = e.meta.link_group?;
    match first_of_group.get(&(e.source, g)) {
        Some(first) => Some(Cow::Owned(first.clone())),
        None => {
            first_of_group.insert((e.source, g), e.path.clone().into_owned());
            None
        }
    }
}

/// What the owner policy changed, for one message per kind of change.
#[derive(Default)]
struct OwnerReport {
    mapped: usize,
    reset: usize,
    first: Option<RelPath>,
    stripped: Vec<String>,
}

impl OwnerReport {
    /// Owner, group and mode of `m` under `policy`. A setuid (setgid) bit
    /// is dropped when the owner (group) written is not the one the
    /// capture saw: a package never makes a file setuid to somebody else.
    fn decide(&mut self, policy: Owners, path: &RelPath, m: &Meta) -> (u32, u32, u32) {
        let (uid, gid) = policy.map(m.uid, m.gid);
        let mut mode = m.mode;
        if (uid, gid) != (m.uid, m.gid) {
            match policy {
                Owners::Root => self.reset += 1,
                _ => self.mapped += 1,
            }
            self.first.get_or_insert_with(|| path.clone());
            if m.kind != FileKind::Dir {
                let mut dropped = Vec::new();
                if uid != m.uid && mode & 0o4000 != 0 {
                    mode &= !0o4000;
                    dropped.push("setuid");
                }
                if gid != m.gid && mode & 0o2000 != 0 {
                    mode &= !0o2000;
                    dropped.push("setgid");
                }
                if !dropped.is_empty() {
                    self.stripped.push(format!(
                        "{path}: {} bit dropped: the capture saw {}:{}, the package would say {uid}:{gid}; use --owners=keep or a device table line to ship it",
                        dropped.join(" and "),
                        m.uid,
                        m.gid
                    ));
                }
            }
        }
        (uid, gid, mode)
    }

    fn notes(self, policy: Owners) -> Vec<String> {
        let mut out = Vec::new();
        let first = self.first.map(|p| p.to_string()).unwrap_or_default();
        if self.mapped > 0 {
            if let Owners::MapUser { uid, gid } = policy {
                out.push(format!(
                    "owners: {} entries (first {first}) owned by the build user {uid}:{gid} are written as root (0:0): the install ran unprivileged (policy auto; --owners=keep keeps them)",
                    self.mapped
                ));
            }
        }
        if self.reset > 0 {
            out.push(format!(
                "owners: {} entries (first {first}) not owned by 0:0 are written as 0:0 (--owners=root)",
                self.reset
            ));
        }
        out.extend(self.stripped);
        out
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

/// Files with at least this much hole are written as sparse members.
const SPARSE_MIN: u64 = 64 * 1024;

/// The entries of an OCI layer made from `plan`: an edit of a file the
/// package does not own is the new entry at its own path (or a
/// whiteout), and the private directories of the scripts' copies are not
/// needed. In path order.
fn oci_entries<'a>(plan: &Plan<'a>) -> Vec<(Cow<'static, RelPath>, Option<PlannedEntry<'a>>)> {
    let private = b"var/lib/layerpack/".as_slice();
    let mut entries: Vec<(Cow<'static, RelPath>, Option<PlannedEntry<'a>>)> = plan
        .entries()
        .filter(|e| {
            !(e.source == Source::Synthetic
                && e.kind() == FileKind::Dir
                && (e.path.as_bytes().starts_with(private)
                    || private.starts_with(e.path.as_bytes())))
        })
        .map(|e| (Cow::Owned(e.src_path().clone()), Some(e)))
        .collect();
    let replaced: std::collections::BTreeSet<RelPath> = entries
        .iter()
        .filter(|(_, e)| e.as_ref().is_some_and(|e| e.kind() != FileKind::Dir))
        .map(|(p, _)| p.clone().into_owned())
        .collect();
    let mut deleted: Vec<RelPath> = plan.deletions.clone();
    deleted.extend(
        plan.edits
            .iter()
            .filter(|e| e.deleted)
            .map(|e| e.path.clone()),
    );
    let deleted_set: std::collections::BTreeSet<&RelPath> = deleted.iter().collect();
    let mut whiteouts = Vec::new();
    for d in &deleted {
        let parent = d.parent().unwrap_or_default();
        if !deleted_set.contains(&parent) && !replaced.contains(&parent) {
            whiteouts.push(parent.join(&[b".wh.", d.file_name()].concat()));
        }
    }
    entries.extend(whiteouts.into_iter().map(|wh| (Cow::Owned(wh), None)));
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries
}

/// Write the data tarball of `plan`. `prefix` is `./` for ipk and tar,
/// empty for OCI; `extended` says whether entries carry their xattrs as PAX
/// records and sparse files as GNU sparse members (dpkg's unpacker refuses
/// both, so deb uses neither).
fn write_data_tar<W: Write>(
    out: W,
    plan: &Plan,
    prefix: &[u8],
    oci_whiteouts: bool,
    extended: bool,
) -> Result<(W, [u8; 32])> {
    let root = plan.layer_root.as_path();
    let mut w = TarWriter::new(out);
    let progress = crate::progress::step(
        format!("packing {} entries", plan.len()),
        crate::progress::Unit::Bytes,
    );
    let mut digest = Sha256::new();
    // A package's entries are the plan's, read as they are written; an
    // OCI layer's are listed apart (other names, whiteouts).
    let listed: Box<dyn Iterator<Item = (Cow<'_, RelPath>, Option<PlannedEntry>)>> =
        if oci_whiteouts {
            Box::new(oci_entries(plan).into_iter())
        } else {
            Box::new(
                plan.entries()
                    .map(|e| (Cow::Owned(e.path.clone().into_owned()), Some(e))),
            )
        };
    for (path, e) in listed {
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
        let e = &e;
        if oci_whiteouts && path.file_name().starts_with(b".wh.") {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{path}: an OCI layer cannot hold a file named .wh.*; it would be read as a whiteout"),
            ));
        }
        let abs = crate::tree::reach(plan.root_of(e), e.src_path())?;
        let mut link = Vec::new();
        let kind = if let Some(first) = e.hardlink_to() {
            link = prefix.to_vec();
            link.extend_from_slice(first.as_bytes());
            TarKind::HardLink
        } else {
            match e.kind() {
                FileKind::File => TarKind::File,
                FileKind::Dir => {
                    name.push(b'/');
                    TarKind::Dir
                }
                FileKind::Symlink => {
                    link = e.link_target().unwrap_or_default().to_vec();
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
            size: e.size(),
            mtime: e.mtime,
            link: &link,
            dev: e.rdev(),
        };
        if extended && !e.xattrs().is_empty() {
            let records: Vec<(Vec<u8>, Vec<u8>)> = e
                .xattrs()
                .iter()
                .map(|(k, v)| ([b"SCHILY.xattr.".as_slice(), k].concat(), v.clone()))
                .collect();
            w.pax(&records)
                .map_err(io_err(&abs, "cannot write package"))?;
        }
        let file = if kind == TarKind::File {
            let f = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&abs)
                .map_err(io_err(&abs, "cannot open for packaging"))?;
            let segments = if extended && e.size() >= SPARSE_MIN {
                crate::tree::data_segments(&f, e.size())
                    .map_err(io_err(&abs, "cannot read for packaging"))?
            } else {
                vec![(0, e.size())]
            };
            let stored: u64 = segments.iter().map(|s| s.1).sum();
            if e.size() - stored.min(e.size()) >= SPARSE_MIN {
                // Holes travel as holes: read and stored once, data only.
                let before = f.metadata().map_err(io_err(&abs, "cannot stat"))?;
                let mut f = HashingReader {
                    inner: f,
                    hash: Sha256::new(),
                };
                w.sparse_file(&h, &segments, &mut f)
                    .map_err(io_err(&abs, "cannot package"))?;
                for (o, l) in &segments {
                    f.hash.update(format!("{o}+{l};").as_bytes());
                }
                digest_entry(&mut digest, &h, &f.hash.clone().finalize().into());
                let f = f.inner;
                let after = f.metadata().map_err(io_err(&abs, "cannot stat"))?;
                use std::os::unix::fs::MetadataExt;
                if after.len() != e.size()
                    || (after.mtime(), after.mtime_nsec()) != (before.mtime(), before.mtime_nsec())
                {
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!("{path} changed after the layer was read; run final again"),
                    )
                    .with_path(&abs));
                }
                progress.add(stored);
                continue;
            }
            Some(f)
        } else {
            None
        };
        w.header(&h).map_err(io_err(&abs, "cannot write package"))?;
        if let Some(f) = file {
            let mut hashing = HashingReader {
                inner: f,
                hash: Sha256::new(),
            };
            w.data(&mut hashing, e.size())
                .map_err(io_err(&abs, "cannot package"))?;
            progress.add(e.size());
            let got: [u8; 32] = hashing.hash.finalize().into();
            digest_entry(&mut digest, &h, &got);
            if e.sha256().is_some_and(|h| h != got) {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!("{path} changed after the layer was read; run final again"),
                )
                .with_path(&abs));
            }
        }
        if kind != TarKind::File {
            digest_entry(&mut digest, &h, &[0; 32]);
        }
    }
    let out = w.finish().map_err(io_err(root, "cannot write package"))?;
    Ok((out, digest.finalize().into()))
}

/// Add one entry to a package's content digest: everything but its mtime.
fn digest_entry(digest: &mut Sha256, h: &TarHeader<'_>, content: &[u8; 32]) {
    digest.update(h.name);
    digest.update(
        format!(
            "\0{:?} {:o} {}:{} {} {}:{}\0",
            h.kind, h.mode, h.uid, h.gid, h.size, h.dev.0, h.dev.1
        )
        .as_bytes(),
    );
    digest.update(h.link);
    digest.update(b"\0");
    digest.update(content);
}

struct HashingReader<R> {
    inner: R,
    hash: Sha256,
}

/// Seeking skips bytes without hashing them (a sparse file's holes).
impl<R: std::io::Seek> std::io::Seek for HashingReader<R> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

fn control_tar(
    meta: &PackageMeta,
    plan: &Plan,
    format: Format,
    level: Option<u32>,
    mtime: i64,
) -> Result<Vec<u8>> {
    let text = meta.control(plan.installed_size(format));
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
    }
    if !plan.edits.is_empty() {
        files.push(("./layerpack.edits", scripts::edits_member(plan), 0o644));
    }
    if let Some(script) = scripts::postinst(&meta.package, plan) {
        files.push(("./postinst", script, 0o755));
    }
    if let Some(script) = scripts::postrm(&meta.package, plan) {
        files.push(("./postrm", script, 0o755));
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

/// Write the gzip'd data tarball of `plan` to `path`; `sync`: it is the
/// package itself (not a member copied into one), so it must reach the
/// disk before it is renamed into place.
fn write_data_tar_gz(
    path: &Path,
    plan: &Plan,
    opts: &PackOptions,
    extended: bool,
    sync: bool,
) -> Result<[u8; 32]> {
    let f = fs::File::create(path).map_err(io_err(path, "cannot create"))?;
    let gz = pgz::ParallelGz::new(
        std::io::BufWriter::new(f),
        opts.compression.unwrap_or(6),
        threads(opts),
    );
    let (gz, digest) = write_data_tar(gz, plan, b"./", false, extended)?;
    let w = gz.finish().map_err(io_err(path, "cannot write"))?;
    let f = w
        .into_inner()
        .map_err(|e| Error::io(path, "cannot write", e.into_error()))?;
    if sync {
        f.sync_all().map_err(io_err(path, "cannot sync"))?;
    }
    Ok(digest)
}

/// Write `format` of the package into `out_dir`; returns the file written.
/// Data is streamed through temporary files next to the result, which
/// appears atomically (rename) once complete; memory stays small whatever
/// the size of the layer.
pub fn write_package(
    format: Format,
    meta: &PackageMeta,
    plan: &Plan,
    opts: &PackOptions,
    out_dir: &Path,
) -> Result<PathBuf> {
    write_package_digest(format, meta, plan, opts, out_dir).map(|(p, _)| p)
}

/// [`write_package`], also returning the package's content digest: a
/// SHA-256 over every entry's name, type, mode, owner, size, link target,
/// device numbers and content — everything but mtimes — so a rebuild that
/// only touched timestamps has the same digest.
pub fn write_package_digest(
    format: Format,
    meta: &PackageMeta,
    plan: &Plan,
    opts: &PackOptions,
    out_dir: &Path,
) -> Result<(PathBuf, [u8; 32])> {
    let mut digest = [0u8; 32];
    let name = format.file_name(meta);
    let dest = out_dir.join(&name);
    let tmp = out_dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let tmp_data = out_dir.join(format!(".{name}.data-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let level = opts.compression;
        let ctl_mtime = opts.source_date_epoch.unwrap_or(0);
        match format {
            Format::Tar => digest = write_data_tar_gz(&tmp, plan, opts, true, true)?,
            Format::Oci => {
                let f = fs::File::create(&tmp).map_err(io_err(&tmp, "cannot create"))?;
                let (w, d) = write_data_tar(std::io::BufWriter::new(f), plan, b"", true, true)?;
                digest = d;
                w.into_inner()
                    .map_err(|e| Error::io(&tmp, "cannot write", e.into_error()))?
                    .sync_all()
                    .map_err(io_err(&tmp, "cannot sync"))?;
            }
            Format::Ipk | Format::Deb | Format::IpkOpenwrt => {
                // A temporary member: the package it is copied into is
                // what gets synced.
                digest = write_data_tar_gz(&tmp_data, plan, opts, format != Format::Deb, false)?;
                let data_len = fs::metadata(&tmp_data)
                    .map_err(io_err(&tmp_data, "cannot stat"))?
                    .len();
                let control = control_tar(meta, plan, format, level, ctl_mtime)?;
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
    result.map(|()| (dest, digest))
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

    fn item(path: &str, uid: u32, gid: u32, mode: u32) -> PlannedEntry<'static> {
        let mut meta = Meta::new(FileKind::File, mode);
        (meta.uid, meta.gid) = (uid, gid);
        PlannedEntry::captured(
            Cow::Owned(RelPath::from(path)),
            meta.into(),
            Source::Layer,
            Cow::Owned(RelPath::from(path)),
        )
    }

    #[test]
    fn owner_policies_and_setid_bits() {
        let items = vec![
            item("usr/bin/plocate", 0, 101, 0o2755),
            item("usr/bin/mine", 1000, 1000, 0o4755),
            item("etc/gshadow", 0, 42, 0o640),
        ];
        let empty = std::env::temp_dir();
        let plan = |owners| {
            let opts = PackOptions {
                owners,
                ..PackOptions::default()
            };
            let p = Plan::build(items.clone(), &empty, &empty, &opts).unwrap();
            let got: Vec<(String, u32, u32, u32)> = p
                .entries()
                .filter(|e| e.kind() == FileKind::File)
                .map(|e| (e.path.to_string(), e.uid, e.gid, e.mode))
                .collect();
            (got, p.warnings)
        };
        let (keep, w) = plan(Owners::Keep);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(
            keep,
            [
                ("etc/gshadow".into(), 0, 42, 0o640),
                ("usr/bin/mine".into(), 1000, 1000, 0o4755),
                ("usr/bin/plocate".into(), 0, 101, 0o2755),
            ]
        );
        // An unprivileged install by uid 1000: its own files become root's,
        // and a setuid bit does not follow the owner change.
        let (mapped, w) = plan(Owners::MapUser {
            uid: 1000,
            gid: 1000,
        });
        assert_eq!(mapped[1], ("usr/bin/mine".into(), 0, 0, 0o755));
        assert_eq!(mapped[2], ("usr/bin/plocate".into(), 0, 101, 0o2755));
        assert!(
            w.iter()
                .any(|m| m.contains("1 entries") && m.contains("build user 1000:1000")),
            "{w:?}"
        );
        assert!(
            w.iter()
                .any(|m| m.contains("usr/bin/mine: setuid bit dropped")),
            "{w:?}"
        );
        // Everything root: never a setgid-root binary.
        let (root, w) = plan(Owners::Root);
        assert_eq!(root[2], ("usr/bin/plocate".into(), 0, 0, 0o755));
        assert_eq!(root[0], ("etc/gshadow".into(), 0, 0, 0o640));
        assert!(
            w.iter()
                .any(|m| m.contains("usr/bin/plocate: setgid bit dropped")),
            "{w:?}"
        );
    }

    /// The layer's entries, read from the change set as the package is
    /// written, are decided exactly as the same entries given whole.
    #[test]
    fn layer_entries_read_from_the_set_are_decided_like_items() {
        use crate::model::{Change, ChangeKind};
        let mut changes = Vec::new();
        let mut add = |path: &str, kind: FileKind, mode: u32, f: &dyn Fn(&mut Meta)| {
            let mut m = Meta::new(kind, mode);
            (m.uid, m.gid, m.mtime_ns) = (1000, 1000, 4_000_000_000_000_000_000);
            f(&mut m);
            changes.push(Change {
                path: path.into(),
                kind: ChangeKind::Added,
                meta: m,
            });
        };
        add("usr/bin/a", FileKind::File, 0o4755, &|m| {
            m.link_group = Some(1);
            m.xattrs.insert(b"security.capability".to_vec(), vec![1]);
            m.xattrs.insert(b"security.selinux".to_vec(), vec![2]);
        });
        add("usr/bin/b", FileKind::File, 0o755, &|m| {
            m.link_group = Some(1)
        });
        add("usr/lib", FileKind::Dir, 0o755, &|_| {});
        add("usr/lib/sock", FileKind::Socket, 0o755, &|_| {});
        add("usr/lib/x/y/z", FileKind::File, 0o644, &|m| m.size = 3);
        add("usr/share/doc/d", FileKind::File, 0o644, &|_| {});
        add("usr/share/doc/e", FileKind::File, 0o644, &|_| {});
        let cs = ChangeSet::from_unsorted(changes);
        let table = devtable::parse(
            "/usr/bin/b f 0700 0 0 - - - - -\n/usr/share r 0600 5 5 - - - - -\n/dev/null c 666 0 0 1 3 - - -\n",
            Path::new("table.txt"),
        )
        .unwrap();
        let empty = std::env::temp_dir().join("lp-no-such-root");
        let opts = PackOptions {
            owners: Owners::MapUser {
                uid: 1000,
                gid: 1000,
            },
            device_table: table,
            source_date_epoch: Some(1_700_000_000),
            ..PackOptions::default()
        };
        let streamed = Plan::new(&cs, &empty, &opts).unwrap();
        let whole: Vec<PlannedEntry> = cs
            .present()
            .map(|c| {
                PlannedEntry::captured(
                    Cow::Owned(c.path.clone()),
                    c.meta.into(),
                    Source::Layer,
                    Cow::Owned(c.path),
                )
            })
            .collect();
        let given = Plan::build(whole, &empty, &empty, &opts).unwrap();
        let a: Vec<PlannedEntry> = streamed.entries().collect();
        let b: Vec<PlannedEntry> = given.entries().collect();
        assert_eq!(a, b);
        assert_eq!(streamed.len(), a.len());
        assert_eq!(streamed.warnings, given.warnings);
        assert_eq!(streamed.capabilities, given.capabilities);
        assert_eq!(streamed.content_bytes(), 3);
        let got: Vec<(String, u32, u32, u32, i64, Option<String>)> = a
            .iter()
            .map(|e| {
                (
                    e.path.to_string(),
                    e.mode,
                    e.uid,
                    e.gid,
                    e.mtime,
                    e.hardlink_to().map(|p| p.to_string()),
                )
            })
            .collect();
        let want: Vec<(String, u32, u32, u32, i64, Option<String>)> = [
            ("dev/null", 0o666, 0, 0, 0, None),
            ("usr", 0o755, 0, 0, 0, None),
            ("usr/bin", 0o755, 0, 0, 0, None),
            ("usr/bin/a", 0o755, 0, 0, 1_700_000_000, None),
            ("usr/bin/b", 0o700, 0, 0, 1_700_000_000, Some("usr/bin/a")),
            ("usr/lib", 0o755, 0, 0, 1_700_000_000, None),
            ("usr/lib/x", 0o755, 0, 0, 0, None),
            ("usr/lib/x/y", 0o755, 0, 0, 0, None),
            ("usr/lib/x/y/z", 0o644, 0, 0, 1_700_000_000, None),
            ("usr/share", 0o600, 5, 5, 0, None),
            ("usr/share/doc", 0o600, 5, 5, 0, None),
            ("usr/share/doc/d", 0o600, 5, 5, 1_700_000_000, None),
            ("usr/share/doc/e", 0o600, 5, 5, 1_700_000_000, None),
        ]
        .iter()
        .map(|(p, m, u, g, t, l)| (p.to_string(), *m, *u, *g, *t, l.map(str::to_string)))
        .collect();
        assert_eq!(got, want);
        assert!(streamed
            .warnings
            .iter()
            .any(|w| w.contains("usr/lib/sock: sockets")));
        assert!(streamed
            .warnings
            .iter()
            .any(|w| w.contains("security.selinux")));
        assert_eq!(
            streamed.capabilities,
            [(RelPath::from("usr/bin/a"), vec![1])]
        );
    }
}
