//! A package is not a layer: decide what the package of one capture holds,
//! from the layer and the ownership ledger.
//!
//! - Everything the package owns that still exists in the root: what this
//!   install added or changed (read from the layer) and its earlier files
//!   the install left alone (read from the base). What it owned and the
//!   install deleted is gone from the package; an upgrade then removes it
//!   as obsolete.
//! - Edits to paths it does not own (the base's, or another package's)
//!   follow the foreign-edit policy: by default (`divert`) the new entry
//!   travels at a private path and the generated scripts save the old one,
//!   put the new one in place, and restore the old one on removal.
//! - A path another captured package owns that this one now provides
//!   (policy `ship`, or a path that package lost and this one re-created)
//!   moves to this package, whose control then says `Replaces:` the other;
//!   a content edit of another package's file also says `Depends:` on it.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::{private_path, Edit, LayerItems, MetaRef, PlannedEntry, Source};
use crate::ledger::{EditRecord, FileList, Ledger, OwnedPath, PackageRecord};
use crate::model::{merge_by_path, path_cmp, ChangeKind, ChangeSet, FileKind, RelPath};
use crate::tree::Record;
use crate::{Error, ErrorKind, Result};

/// What to do with an edit to a path the package does not own
/// (`--foreign-edits`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ForeignPolicy {
    /// Ship the new entry at a private path; scripts save, replace and
    /// restore the old one.
    #[default]
    Divert,
    /// Ship it as the package's own file (a remove deletes it).
    Ship,
    /// Leave it out of the package (it stays in the root), and say so.
    Skip,
    /// Refuse: `final` fails and names the paths.
    Fail,
}

impl ForeignPolicy {
    /// Parse `divert`, `ship`, `skip` or `fail`.
    pub fn parse(s: &str) -> Result<ForeignPolicy> {
        Ok(match s {
            "divert" => ForeignPolicy::Divert,
            "ship" => ForeignPolicy::Ship,
            "skip" => ForeignPolicy::Skip,
            "fail" => ForeignPolicy::Fail,
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("foreign-edit policy '{s}' is not one of divert, ship, skip, fail"),
                ))
            }
        })
    }
}

/// The route one change took into the package.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The package's own path, shipped as data.
    Owned,
    /// The package's own path, deleted by the install: gone from it.
    Dropped,
    /// A changed directory it shares with others: shipped, owned by none.
    SharedDir,
    /// An edit of a path it does not own, carried by the scripts.
    Divert,
    /// An edit of a path it does not own, shipped as its own.
    Ship,
    /// An edit of a path it does not own, left out.
    Skip,
}

impl Route {
    /// The name `changes.json` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Owned => "owned",
            Route::Dropped => "dropped",
            Route::SharedDir => "shared-dir",
            Route::Divert => "divert",
            Route::Ship => "ship",
            Route::Skip => "skip",
        }
    }
}

/// How many entries took which route.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Added or changed by this install, owned by the package.
    pub from_layer: usize,
    /// Owned from an earlier capture and left alone by this install.
    pub kept: usize,
    /// Owned earlier, deleted by this install or gone from the root.
    pub dropped: usize,
    /// Edits of paths it does not own carried by scripts.
    pub diverted: usize,
    /// Edits of paths it does not own shipped as its own (`ship`).
    pub shipped: usize,
    /// Edits left out (`skip`).
    pub skipped: usize,
}

/// The package of one capture.
#[derive(Debug, Default)]
pub struct Composition<'a> {
    /// The entries not shipped from the layer at their own paths (those
    /// are [`Composition::layer_items`]), in no particular order.
    pub items: Vec<PlannedEntry<'a>>,
    /// Deletions of paths it does not own, `ship` policy (no way back).
    pub deletions: Vec<RelPath>,
    /// Edits carried by scripts.
    pub edits: Vec<Edit>,
    /// Captured packages whose files this one provides or edits.
    pub replaces: BTreeSet<String>,
    /// Captured packages whose files this one edits in place.
    pub depends: BTreeSet<String>,
    /// Paths that moved to this package from another: (package, paths).
    pub taken: BTreeMap<String, BTreeSet<Vec<u8>>>,
    /// The package's ledger record after this capture, but for its files:
    /// [`Composition::take_record`] adds those it kept.
    pub record: PackageRecord,
    /// Files owned earlier and kept (left alone by this install).
    kept: Vec<OwnedPath>,
    /// The routes taken, counted.
    pub counts: Counts,
    /// The route of each change of the layer, in the change set's order.
    pub routes: Vec<Route>,
    /// One line per path that is not simply the package's own, for the
    /// user ("touched by more than one package" and friends).
    pub notes: Vec<String>,
}

fn owned(path: &RelPath, kind: FileKind, sha: Option<[u8; 32]>) -> OwnedPath {
    OwnedPath {
        path: path.as_bytes().to_vec(),
        kind,
        sha256: sha,
    }
}

/// The layer's changes a package ships at their own paths (its own,
/// shared directories, and edits shipped as its own), read from `cs`, the
/// change set it was composed from, by the `routes` composing it gave.
pub fn layer_items<'s>(cs: &'s ChangeSet, routes: &'s [Route]) -> LayerItems<'s> {
    LayerItems::selected(cs, move |i, _| {
        matches!(
            routes.get(i),
            Some(Route::Owned | Route::SharedDir | Route::Ship)
        )
    })
}

impl Composition<'_> {
    /// The package's ledger record, with the files it kept from its
    /// earlier capture; those it owns from the layer are
    /// [`owned_from_layer`], merged in when the ledger is written
    /// ([`with_layer_files`]): the list is as long as the layer.
    pub fn take_record(&mut self) -> PackageRecord {
        let mut record = std::mem::take(&mut self.record);
        let mut files = std::mem::take(&mut self.kept);
        files.sort_by(|a, b| path_cmp(&a.path, &b.path));
        // A path is kept once, with its first record.
        files.dedup_by(|later, first| later.path == first.path);
        record.files = FileList::from_vec(files);
        record
    }
}

/// The files of `cs` a package owns after composing it gave `routes`: its
/// own and the edits it ships as its own, in path order.
pub fn owned_from_layer<'s>(
    cs: &'s ChangeSet,
    routes: &'s [Route],
) -> impl Iterator<Item = OwnedPath> + 's {
    cs.iter()
        .zip(routes)
        .filter(|(ch, route)| match route {
            Route::Owned => true,
            Route::Ship => ch.kind != ChangeKind::Deleted,
            _ => false,
        })
        .map(|(ch, _)| owned(&ch.path, ch.meta.kind, ch.meta.sha256))
}

/// The files `kept` gives and those `layer` gives (each in path order),
/// merged; a path in both keeps its record in `kept`.
pub fn with_layer_files<'s>(
    kept: impl Iterator<Item = OwnedPath> + 's,
    layer: impl Iterator<Item = OwnedPath> + 's,
) -> impl Iterator<Item = OwnedPath> + 's {
    merge_by_path(layer, kept, |f| &f.path)
}

/// Compose the package of `name` (written as `package`) from the layer
/// `cs` and the ledger; the base is `base`.
pub fn compose<'a>(
    name: &str,
    package: &str,
    version: Option<&str>,
    ledger: &Ledger,
    cs: &'a ChangeSet,
    base: &Path,
    policy: ForeignPolicy,
) -> Result<Composition<'a>> {
    let none = PackageRecord::default();
    let prev = ledger.get(name).unwrap_or(&none);
    // Both asked in the change set's order, which is path order.
    let mut others = ledger.owners_except(name);
    let mut prev_owned = prev.files.seek();
    let prev_edits: BTreeMap<&[u8], &EditRecord> =
        prev.edits.iter().map(|e| (e.path.as_slice(), e)).collect();
    let mut c = Composition {
        routes: Vec::with_capacity(cs.len()),
        ..Composition::default()
    };
    let mut edits_after: BTreeMap<Vec<u8>, EditRecord> = BTreeMap::new();
    let mut refused = Vec::new();
    for ch in cs {
        let key = ch.path.as_bytes();
        let m = &ch.meta;
        // A path the package edited earlier keeps its original owner,
        // even when this install re-created what it had deleted.
        let foreign_owner: Option<Option<&str>> = if prev_owned.find(key).is_some() {
            None
        } else if let Some(e) = prev_edits.get(key) {
            Some(e.owner.as_deref())
        } else if ch.kind == ChangeKind::Added {
            None
        } else {
            Some(others.get(key))
        };
        let Some(owner) = foreign_owner else {
            // The package's own path.
            if ch.kind == ChangeKind::Deleted {
                c.counts.dropped += 1;
                c.routes.push(Route::Dropped);
                continue;
            }
            c.routes.push(Route::Owned);
            if let Some(other) = others.get(key) {
                c.notes.push(format!(
                    "{}: provided by {package} now; {other} installed it before (Replaces: {other})",
                    ch.path
                ));
                c.replaces.insert(ledger.package_field(other));
                c.taken
                    .entry(other.to_string())
                    .or_default()
                    .insert(key.to_vec());
            }
            c.counts.from_layer += 1;
            continue;
        };
        let whose = owner
            .map(str::to_string)
            .unwrap_or_else(|| "the base".into());
        if m.kind == FileKind::Dir && ch.kind != ChangeKind::Deleted {
            // Directories are shared: a changed one is shipped as a
            // directory entry, owned by nobody new.
            c.routes.push(Route::SharedDir);
            continue;
        }
        let deleted = ch.kind == ChangeKind::Deleted;
        let content = matches!(
            ch.kind,
            ChangeKind::Modified {
                content_changed: true
            } | ChangeKind::Added
        );
        match policy {
            ForeignPolicy::Fail => {
                refused.push(format!("{} ({})", ch.path, whose));
                c.routes.push(Route::Skip);
                continue;
            }
            ForeignPolicy::Skip => {
                c.counts.skipped += 1;
                c.routes.push(Route::Skip);
                c.notes.push(format!(
                    "{}: {} by {package} but owned by {whose}; left out of the package (--foreign-edits=skip)",
                    ch.path,
                    if deleted { "deleted" } else { "changed" }
                ));
                continue;
            }
            ForeignPolicy::Ship => {
                c.counts.shipped += 1;
                c.routes.push(Route::Ship);
                if deleted {
                    c.deletions.push(ch.path.clone());
                } else if let Some(o) = owner {
                    c.taken
                        .entry(o.to_string())
                        .or_default()
                        .insert(key.to_vec());
                }
            }
            ForeignPolicy::Divert => {
                c.counts.diverted += 1;
                c.routes.push(Route::Divert);
                if !deleted {
                    c.items.push(PlannedEntry::captured(
                        Cow::Owned(private_path(package, &ch.path)),
                        MetaRef::Owned(Box::new(ch.meta.clone())),
                        Source::Layer,
                        Cow::Owned(ch.path.clone()),
                    ));
                }
                c.edits.push(Edit {
                    path: ch.path.clone(),
                    deleted,
                });
                edits_after.insert(
                    key.to_vec(),
                    EditRecord {
                        path: key.to_vec(),
                        deleted,
                        owner: owner.map(str::to_string),
                    },
                );
            }
        }
        if let Some(o) = owner {
            let field = ledger.package_field(o);
            c.notes.push(format!(
                "{}: touched by more than one package ({o} installed it, {package} {} it); {package} says Replaces: {field}{}",
                ch.path,
                if deleted { "deleted" } else { "changed" },
                if content { format!(", Depends: {field}") } else { String::new() }
            ));
            c.replaces.insert(field.clone());
            if content {
                c.depends.insert(field);
            }
        }
    }
    if !refused.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "--foreign-edits=fail: the install of {name} changed {} path(s) it does not own: {}",
                refused.len(),
                refused.join(", ")
            ),
        ));
    }
    carry_forward(ledger, package, prev, cs, base, &mut c, &mut edits_after)?;
    c.edits.sort_by(|a, b| a.path.cmp(&b.path));
    c.record = PackageRecord {
        name: name.to_string(),
        package: Some(package.to_string()),
        version: version.map(str::to_string),
        files: FileList::default(),
        edits: edits_after.into_values().collect(),
        published: prev.published.clone(),
    };
    Ok(c)
}

/// What the package owned or edited before and this install left alone:
/// read from the base, where it still is.
#[allow(clippy::too_many_arguments)]
fn carry_forward(
    ledger: &Ledger,
    package: &str,
    prev: &PackageRecord,
    cs: &ChangeSet,
    base: &Path,
    c: &mut Composition<'_>,
    edits_after: &mut BTreeMap<Vec<u8>, EditRecord>,
) -> Result<()> {
    // Hard links among the kept entries, by inode.
    let mut groups: BTreeMap<(u64, u64), u32> = BTreeMap::new();
    let mut stat = |path: &RelPath| -> Result<Option<crate::model::Meta>> {
        let read =
            crate::tree::reach(base, path).and_then(|abs| Record::read(&abs, path.clone(), true));
        match read {
            Ok(r) => {
                let mut m = r.to_meta();
                if r.kind != FileKind::Dir && r.nlink > 1 {
                    let n = groups.len() as u32;
                    m.link_group = Some(*groups.entry((r.dev, r.ino)).or_insert(n));
                }
                Ok(Some(m))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    };
    for o in prev.files.iter() {
        let path = RelPath::parse_for(&o.path, "ledger path")?;
        // A path of the layer was decided above (a duplicate in the
        // ledger is dropped by the caller's dedup).
        if cs.get(&path).is_some() {
            continue;
        }
        match stat(&path)? {
            Some(m) => {
                let mut o = o.clone();
                o.kind = m.kind;
                c.kept.push(o);
                c.items.push(PlannedEntry::captured(
                    Cow::Owned(path.clone()),
                    m.into(),
                    Source::Base,
                    Cow::Owned(path),
                ));
                c.counts.kept += 1;
            }
            None => {
                c.counts.dropped += 1;
                c.notes.push(format!(
                    "{path}: owned by {package} but no longer in the root; dropped from the package"
                ));
            }
        }
    }
    for e in &prev.edits {
        let path = RelPath::parse_for(&e.path, "ledger path")?;
        if cs.get(&path).is_some() || edits_after.contains_key(&e.path) {
            continue;
        }
        let now = stat(&path)?;
        match (e.deleted, now) {
            (false, Some(m)) => c.items.push(PlannedEntry::captured(
                Cow::Owned(private_path(package, &path)),
                m.into(),
                Source::Base,
                Cow::Owned(path.clone()),
            )),
            (true, None) => {}
            _ => continue,
        }
        if let Some(o) = &e.owner {
            let field = ledger.package_field(o);
            c.replaces.insert(field.clone());
            if !e.deleted {
                c.depends.insert(field);
            }
        }
        c.edits.push(Edit {
            path,
            deleted: e.deleted,
        });
        edits_after.insert(e.path.clone(), e.clone());
        c.counts.diverted += 1;
    }
    Ok(())
}
