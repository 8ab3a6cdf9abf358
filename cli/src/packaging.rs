//! What `final` does between reading the layer and folding it: decide the
//! package metadata and formats, report collisions with other packages,
//! and write the packages.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use layerpack_core::config::Config;
use layerpack_core::model::{ChangeKind, ChangeSet};
use layerpack_core::pack::{self, devtable, Format, MetaFields, PackOptions, PackageMeta, Plan};
use layerpack_core::session::SessionFile;

/// Package options of `final` and `run`.
#[derive(Args, Debug, Default, Clone)]
pub struct PackArgs {
    /// Package formats, comma-separated: ipk, ipk-openwrt, tar, oci, deb, or none (default: ipk).
    #[arg(long, value_delimiter = ',', value_name = "FORMATS")]
    pub format: Vec<String>,
    /// Architecture field (default: all).
    #[arg(long, value_name = "ARCH")]
    pub arch: Option<String>,
    /// Maintainer field.
    #[arg(long, value_name = "TEXT")]
    pub maintainer: Option<String>,
    /// Description field (first line: summary).
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,
    /// Depends field.
    #[arg(long, value_name = "LIST")]
    pub depends: Option<String>,
    /// Section field.
    #[arg(long, value_name = "NAME")]
    pub section: Option<String>,
    /// Priority field.
    #[arg(long, value_name = "NAME")]
    pub priority: Option<String>,
    /// Source field.
    #[arg(long, value_name = "NAME")]
    pub source: Option<String>,
    /// Buildroot device/permission table applied to the package (repeatable).
    #[arg(long = "device-table", value_name = "FILE")]
    pub device_tables: Vec<PathBuf>,
    /// Make a change to a file another package installed an error.
    #[arg(long)]
    pub strict: bool,
    /// gzip level 1-9 (default 6).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=9))]
    pub compression: Option<u32>,
}

/// The formats to write, and whether the user asked for them explicitly.
fn formats(args: &PackArgs, cfg: &Config) -> Result<(Vec<Format>, bool)> {
    let (names, explicit): (Vec<String>, bool) = if !args.format.is_empty() {
        (args.format.clone(), true)
    } else if let Some(f) = &cfg.formats {
        (f.clone(), true)
    } else {
        (vec!["ipk".into()], false)
    };
    let mut out = Vec::new();
    for n in names {
        if n == "none" {
            continue;
        }
        let f = Format::parse(n.trim())?;
        if !out.contains(&f) {
            out.push(f);
        }
    }
    if out.contains(&Format::Ipk) && out.contains(&Format::IpkOpenwrt) {
        bail!("ipk and ipk-openwrt write the same file name; choose one");
    }
    Ok((out, explicit))
}

/// Everything decided before anything is written.
pub struct Packaging {
    formats: Vec<Format>,
    meta: Option<PackageMeta>,
    opts: PackOptions,
    /// Messages for the user.
    pub notes: Vec<String>,
}

impl Packaging {
    /// Decide formats and metadata for `s`; `version` from the command line.
    pub fn decide(
        args: &PackArgs,
        version: Option<&str>,
        cfg: &Config,
        s: &SessionFile,
        keep_owners: bool,
    ) -> Result<Packaging> {
        let (formats, explicit) = formats(args, cfg)?;
        let cli = MetaFields {
            version: version.map(str::to_string),
            architecture: args.arch.clone(),
            maintainer: args.maintainer.clone(),
            description: args.description.clone(),
            depends: args.depends.clone(),
            section: args.section.clone(),
            priority: args.priority.clone(),
            source: args.source.clone(),
            conffiles: None,
        };
        let session = MetaFields {
            version: s.version.clone(),
            ..MetaFields::default()
        };
        let fields = cli
            .or(&session)
            .or(cfg
                .packages
                .get(&s.package)
                .unwrap_or(&MetaFields::default()))
            .or(&cfg.package_defaults);
        let mut notes = Vec::new();
        let meta = if formats.is_empty() {
            None
        } else {
            match PackageMeta::resolve(&s.package, &fields) {
                Ok(m) => {
                    if m.package != s.package {
                        notes.push(format!(
                            "package name '{}' is written as '{}' (ipk names are [a-z0-9.+-]: capitals lowered, _ becomes -)",
                            s.package, m.package
                        ));
                    }
                    Some(m)
                }
                Err(e) if !explicit && fields.version.is_none() => {
                    notes.push(format!("no package written: {e}"));
                    None
                }
                Err(e) => return Err(e.into()),
            }
        };
        let mut device_table = Vec::new();
        for t in cfg.device_tables.iter().chain(&args.device_tables) {
            let text = std::fs::read_to_string(t)
                .with_context(|| format!("cannot read device table {}", t.display()))?;
            device_table.extend(devtable::parse(&text, t)?);
        }
        let source_date_epoch =
            match std::env::var("SOURCE_DATE_EPOCH") {
                Ok(v) if !v.is_empty() => Some(v.trim().parse::<i64>().with_context(|| {
                    format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds")
                })?),
                _ => None,
            };
        Ok(Packaging {
            formats,
            meta,
            opts: PackOptions {
                source_date_epoch,
                keep_owners,
                device_table,
                compression: args.compression,
                threads: 0,
            },
            notes,
        })
    }

    /// Write the packages of `cs` (content under `root`) into `out`.
    pub fn write(&mut self, cs: &ChangeSet, root: &Path, out: &Path) -> Result<Vec<PathBuf>> {
        let Some(meta) = &self.meta else {
            return Ok(Vec::new());
        };
        let plan = Plan::new(cs, root, &self.opts)?;
        self.notes.extend(plan.warnings.iter().cloned());
        if !plan.deletions.is_empty() && self.formats.iter().any(|f| matches!(f, Format::Tar)) {
            self.notes.push(format!(
                "the tar format cannot express the {} deletions; they are in the manifest",
                plan.deletions.len()
            ));
        }
        let mut written = Vec::new();
        for f in &self.formats {
            written.push(pack::write_package(*f, meta, &plan, root, &self.opts, out)?);
        }
        Ok(written)
    }
}

/// Paths this change set modifies or deletes that another package in
/// `packages-file-list.txt` installed: (path, other package).
pub fn collisions(out: &Path, package: &str, cs: &ChangeSet) -> Result<Vec<(String, String)>> {
    let list = match std::fs::read(out.join("packages-file-list.txt")) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context("cannot read packages-file-list.txt"),
    };
    let mut owner: BTreeMap<&[u8], &str> = BTreeMap::new();
    for line in list.split(|b| *b == b'\n') {
        let Some(comma) = line.iter().position(|b| *b == b',') else {
            continue;
        };
        let (pkg, path) = (&line[..comma], &line[comma + 1..]);
        let path = path.strip_prefix(b"./").unwrap_or(path);
        if let Ok(pkg) = std::str::from_utf8(pkg) {
            if pkg != package {
                owner.insert(path, pkg);
            }
        }
    }
    Ok(cs
        .changes()
        .iter()
        .filter(|c| c.kind != ChangeKind::Added)
        .filter_map(|c| {
            owner
                .get(c.path.as_bytes())
                .map(|o| (c.path.display(), o.to_string()))
        })
        .collect())
}
