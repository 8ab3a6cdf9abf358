//! What `final` does between reading the layer and folding it: decide the
//! package metadata and formats, report collisions with other packages,
//! and write the packages.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use layerpack_core::config::Config;
use layerpack_core::ledger::Ledger;
use layerpack_core::model::ChangeSet;
use layerpack_core::pack::compose::{self, Counts, ForeignPolicy};
use layerpack_core::pack::{
    self, devtable, Format, MetaFields, Owners, PackOptions, PackageMeta, Plan,
};
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
    /// Architecture when neither --arch nor the config gives one (what a
    /// build system knows, e.g. Buildroot's BR2_ARCH).
    #[arg(long = "default-arch", value_name = "ARCH", hide = true)]
    pub default_arch: Option<String>,
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
    /// License field (e.g. an SPDX expression).
    #[arg(long, value_name = "TEXT")]
    pub license: Option<String>,
    /// Buildroot device/permission table applied to the package (repeatable).
    #[arg(long = "device-table", value_name = "FILE")]
    pub device_tables: Vec<PathBuf>,
    /// Make a change to a file another package installed an error.
    #[arg(long)]
    pub strict: bool,
    /// Owners in the package: auto (the owners the install made when it
    /// ran as root; the build user's own uid/gid written as 0:0 when it
    /// ran unprivileged), keep, or root (everything 0:0).
    #[arg(long, value_name = "POLICY", value_parser = ["auto", "keep", "root"])]
    pub owners: Option<String>,
    /// Edits to files the package does not own: divert (default: shipped
    /// at a private path, installed and restored by generated scripts),
    /// ship (as the package's own file), skip, or fail.
    #[arg(long = "foreign-edits", value_name = "POLICY", value_parser = ["divert", "ship", "skip", "fail"])]
    pub foreign_edits: Option<String>,
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
    foreign: ForeignPolicy,
    strict: bool,
    /// Publish: give a package whose content changed under the same
    /// version the next revision, and drop its other versions from the
    /// feed (`repack`).
    pub publish: bool,
    opts: PackOptions,
    /// Messages for the user.
    pub notes: Vec<String>,
}

/// Whose package is being decided.
pub struct Subject<'a> {
    /// The build system's name for it.
    pub package: &'a str,
    /// The version recorded for it (by `init`, or in the ledger).
    pub version: Option<&'a str>,
    /// uid and gid the install ran as, when known.
    pub installer: Option<(u32, u32)>,
    /// What the build system knows of the package (Buildroot's `make
    /// show-info`: license, source): below the config's
    /// `[packages.<name>]`, above `[package_defaults]`.
    pub info: Option<&'a MetaFields>,
}

impl<'a> Subject<'a> {
    /// The subject of a capture session.
    pub fn of_session(s: &'a SessionFile) -> Subject<'a> {
        Subject {
            package: &s.package,
            version: s.version.as_deref(),
            installer: s.installer,
            info: None,
        }
    }
}

impl Packaging {
    /// Decide formats and metadata for `s`; `version` from the command line.
    pub fn decide(
        args: &PackArgs,
        version: Option<&str>,
        cfg: &Config,
        s: &Subject<'_>,
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
            license: args.license.clone(),
            conffiles: None,
        };
        let session = MetaFields {
            version: s.version.map(str::to_string),
            ..MetaFields::default()
        };
        let fields = cli
            .or(&session)
            .or(cfg
                .packages
                .get(s.package)
                .unwrap_or(&MetaFields::default()))
            .or(s.info.unwrap_or(&MetaFields::default()))
            .or(&cfg.package_defaults)
            .or(&MetaFields {
                architecture: args.default_arch.clone(),
                ..MetaFields::default()
            });
        let mut notes = Vec::new();
        let meta = if formats.is_empty() {
            None
        } else {
            match PackageMeta::resolve(s.package, &fields) {
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
        let owners = match args
            .owners
            .as_deref()
            .or(cfg.owners.as_deref())
            .unwrap_or("auto")
        {
            "keep" => Owners::Keep,
            "root" => Owners::Root,
            // An unprivileged install: what it made without asking for an
            // owner is root's (as Buildroot's image step makes it); owners
            // a backend recorded for it are kept as asked.
            "auto" => match s.installer {
                Some((uid, gid)) if uid != 0 => Owners::MapUser { uid, gid },
                _ => Owners::Keep,
            },
            other => bail!("owners = {other:?} in the config is not one of auto, keep, root"),
        };
        let foreign = ForeignPolicy::parse(
            args.foreign_edits
                .as_deref()
                .or(cfg.foreign_edits.as_deref())
                .unwrap_or("divert"),
        )
        .context("foreign_edits in the config")?;
        Ok(Packaging {
            formats,
            meta,
            foreign,
            strict: args.strict,
            publish: false,
            opts: PackOptions {
                source_date_epoch,
                owners,
                device_table,
                compression: args.compression,
                threads: 0,
            },
            notes,
        })
    }

    /// Add `names` to the package's `Depends:` (not itself, not twice).
    pub fn add_depends(&mut self, names: &std::collections::BTreeSet<String>) {
        if let Some(m) = &mut self.meta {
            let mut v: Vec<String> = m
                .depends
                .iter()
                .flat_map(|d| d.split(',').map(|x| x.trim().to_string()))
                .filter(|x| !x.is_empty())
                .collect();
            for n in names {
                let known = v
                    .iter()
                    .any(|x| x.split_whitespace().next() == Some(n.as_str()));
                if *n != m.package && !known {
                    v.push(n.clone());
                }
            }
            m.depends = (!v.is_empty()).then(|| v.join(", "));
        }
    }

    /// The `Package:` name this package is written as.
    fn package_name(&self, name: &str) -> String {
        match &self.meta {
            Some(m) => m.package.clone(),
            None => pack::map_package_name(name)
                .map(|m| m.0)
                .unwrap_or_else(|_| name.to_lowercase()),
        }
    }

    /// Compose the package of session `s` from the layer `cs` (content
    /// under `content`) and the ledger in `out`, write it in every format,
    /// and record what it owns (ledger and `packages-file-list.txt`).
    pub fn write(
        &mut self,
        s: &SessionFile,
        cs: &ChangeSet,
        content: &Path,
        out: &Path,
    ) -> Result<Written> {
        let mut ledger = Ledger::open(out, &s.base)?;
        if ledger.imported {
            self.notes.push(format!(
                "{} had no ledger: ownership taken from packages-file-list.txt",
                out.display()
            ));
        }
        let written = self.compose_and_emit(&mut ledger, &s.package, cs, content, &s.base, out)?;
        // What the package owns from the layer is read from the change set
        // as the ledger is written, not copied into its record.
        let none = layerpack_core::ledger::FileList::default();
        let kept = ledger.get(&s.package).map_or(&none, |r| &r.files);
        let routes = &written.routes;
        let files = || -> Box<dyn Iterator<Item = layerpack_core::ledger::OwnedPath> + '_> {
            Box::new(compose::with_layer_files(
                kept.iter(),
                compose::owned_from_layer(cs, routes),
            ))
        };
        let streamed = layerpack_core::ledger::StreamedFiles {
            name: &s.package,
            files: &files,
        };
        let unlisted = ledger.save_with(Some(streamed))?;
        self.saved(unlisted, out, written)
    }

    /// Compose the package of `name` from the layer `cs` (under `layer`)
    /// and what it owns in `base`, write it, and update `ledger` (not
    /// saved).
    pub fn compose_and_emit(
        &mut self,
        ledger: &mut Ledger,
        name: &str,
        cs: &ChangeSet,
        layer: &Path,
        base: &Path,
        out: &Path,
    ) -> Result<Written> {
        let package = self.package_name(name);
        if let Some(other) = ledger
            .packages
            .iter()
            .find(|p| p.name != name && p.package.as_deref() == Some(package.as_str()))
        {
            bail!(
                "'{}' and '{name}' are both written as the package '{package}' in {}; rename one of them",
                other.name,
                out.display()
            );
        }
        let version = self
            .meta
            .as_ref()
            .map(|m| m.version.clone())
            .or_else(|| ledger.get(name).and_then(|r| r.version.clone()));
        let mut c = compose::compose(
            name,
            &package,
            version.as_deref(),
            ledger,
            cs,
            base,
            self.foreign,
        )?;
        if self.strict && !c.replaces.is_empty() {
            bail!(
                "--strict: {name} changed files that other packages installed: {}",
                c.notes.join("; ")
            );
        }
        self.notes.extend(c.notes.iter().cloned());
        let mut written = Vec::new();
        if let Some(meta) = &mut self.meta {
            let own = meta.package.clone();
            let join = |have: &Option<String>, add: &std::collections::BTreeSet<String>| {
                let mut v: Vec<String> = have.iter().cloned().collect();
                v.extend(add.iter().filter(|n| **n != own).cloned());
                (!v.is_empty()).then(|| v.join(", "))
            };
            meta.replaces = join(&meta.replaces, &c.replaces);
            meta.depends = join(&meta.depends, &c.depends);
            let mut plan = Plan::build_with(
                Some(compose::layer_items(cs, &c.routes)),
                std::mem::take(&mut c.items),
                layer,
                base,
                &self.opts,
            )?;
            plan.deletions = c.deletions.clone();
            plan.edits = c.edits.clone();
            self.notes.extend(plan.warnings.iter().cloned());
            let removals = plan.deletions.len() + plan.edits.len();
            if removals > 0 && self.formats.iter().any(|f| matches!(f, Format::Tar)) {
                self.notes.push(format!(
                    "the tar format cannot express the {removals} deletions and edits of files the package does not own; they are in the manifest",
                ));
            }
            if self.formats.contains(&Format::Deb) {
                for e in plan.entries().filter(|e| !e.xattrs().is_empty()) {
                    self.notes.push(format!(
                        "{}: the deb carries no xattrs (dpkg refuses PAX headers); {}",
                        e.path,
                        if e.xattrs().contains_key(&b"security.capability"[..]) {
                            "its postinst sets the file capabilities"
                        } else {
                            "they are not installed by dpkg"
                        }
                    ));
                }
            }
            let upstream = meta.version.clone();
            for (i, f) in self.formats.iter().enumerate() {
                let (path, digest) = pack::write_package_digest(*f, meta, &plan, &self.opts, out)?;
                if i == 0 && self.publish {
                    let published =
                        next_publication(c.record.published.as_ref(), &upstream, &digest);
                    if published.version() != meta.version {
                        // Written under the upstream version first: write
                        // again under the published one.
                        std::fs::remove_file(&path)
                            .with_context(|| format!("cannot remove {}", path.display()))?;
                        meta.version = published.version();
                        let (path, _) =
                            pack::write_package_digest(*f, meta, &plan, &self.opts, out)?;
                        written.push(path);
                    } else {
                        written.push(path);
                    }
                    if published.revision > 0 && c.record.published.as_ref() != Some(&published) {
                        self.notes.push(format!(
                            "content changed under version {upstream}: published as {}",
                            published.version()
                        ));
                    }
                    c.record.published = Some(published);
                    continue;
                }
                written.push(path);
            }
            if self.publish {
                drop_other_versions(out, meta, &self.formats, &written)?;
            }
            meta.version = upstream;
        }
        for (other, paths) in &c.taken {
            ledger.disown(other, paths);
        }
        ledger.set(c.take_record());
        Ok(Written {
            paths: written,
            counts: c.counts,
            routes: c.routes,
        })
    }

    /// Save the ledger and the file list made from it.
    pub fn save(&mut self, ledger: &Ledger, out: &Path, written: Written) -> Result<Written> {
        let unlisted = ledger.save()?;
        self.saved(unlisted, out, written)
    }

    /// Note the `unlisted` paths of a saved ledger; add it and its file
    /// list to `written`.
    fn saved(
        &mut self,
        unlisted: Vec<(String, String)>,
        out: &Path,
        mut written: Written,
    ) -> Result<Written> {
        for (pkg, path) in unlisted {
            self.notes.push(format!(
                "{path:?} ({pkg}) has a newline in its name; it is in the ledger and changes.json but not in packages-file-list.txt"
            ));
        }
        written
            .paths
            .push(out.join(layerpack_core::ledger::LEDGER_FILE));
        written
            .paths
            .push(out.join(layerpack_core::ledger::FILE_LIST));
        Ok(written)
    }
}

/// What to publish a package with content `digest` under `upstream` as,
/// given what was published last.
fn next_publication(
    last: Option<&layerpack_core::ledger::Published>,
    upstream: &str,
    digest: &[u8; 32],
) -> layerpack_core::ledger::Published {
    let digest = layerpack_core::tree::hex(digest);
    let revision = match last {
        Some(p) if p.upstream == upstream && p.digest == digest => p.revision,
        Some(p) if p.upstream == upstream => p.revision + 1,
        _ => 0,
    };
    layerpack_core::ledger::Published {
        upstream: upstream.to_string(),
        revision,
        digest,
    }
}

/// Remove the feed's other versions of `meta`'s package in `formats`
/// (a feed serves one version of each package).
fn drop_other_versions(
    out: &Path,
    meta: &PackageMeta,
    formats: &[Format],
    keep: &[PathBuf],
) -> Result<()> {
    let prefix = format!("{}_", meta.package);
    for e in std::fs::read_dir(out).with_context(|| format!("cannot list {}", out.display()))? {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = formats.iter().any(|f| {
            let own = f.file_name(meta);
            let suffix = own
                .strip_prefix(&format!(
                    "{}_{}",
                    meta.package,
                    pack::version::without_epoch(&meta.version)
                ))
                .unwrap_or("");
            !suffix.is_empty() && name.ends_with(suffix)
        });
        if name.starts_with(&prefix) && ours && !keep.iter().any(|k| k == &e.path()) {
            std::fs::remove_file(e.path())
                .with_context(|| format!("cannot remove {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// What [`Packaging::write`] wrote.
pub struct Written {
    /// Files written.
    pub paths: Vec<PathBuf>,
    /// Which route the package's entries took.
    pub counts: Counts,
    /// The route of each change (for `changes.json`).
    pub routes: Vec<compose::Route>,
}
