//! layerpack-backend-copy: an example backend built as a plugin.
//!
//! The install writes into the root itself. `begin` first copies the root
//! into the session directory with `cp -a --reflink=auto` (a reflink where
//! the filesystem can — btrfs, XFS, bcachefs — a full copy elsewhere);
//! `changes` compares that copy with the root; `move_down` only drops the
//! copy, since the root already holds the result; `discard` puts the copy
//! back, so a failed install leaves no trace.
//!
//! It is meant as the template for a new backend: copy this crate, rename
//! it, and replace the copying with your filesystem's snapshots.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use layerpack_core::backend::{
    BackendState, Begun, Capabilities, ChangeOptions, Health, LayerBackend, Probe, SessionSpec,
    Unavailable,
};
use layerpack_core::config::BackendConfig;
use layerpack_core::model::ChangeSet;
use layerpack_core::plugin::PluginBackend;
use layerpack_core::tree::{diff_trees, ScanOptions};
use layerpack_core::{Error, ErrorKind, Result};
use serde::Deserialize;

/// `[backends.copy]` settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CopySettings {
    /// `cp --reflink=` mode: `auto` (reflink where the filesystem can),
    /// `always` (fail where it cannot) or `never`.
    pub reflink: String,
}

impl Default for CopySettings {
    fn default() -> Self {
        CopySettings {
            reflink: "auto".into(),
        }
    }
}

/// The copy backend.
pub struct CopyBackend {
    settings: CopySettings,
}

/// Marks a finished copy: a session without it never handed out the root.
const COMPLETE: &str = "copy-complete";

impl CopyBackend {
    fn copy_dir(spec: &SessionSpec) -> PathBuf {
        spec.dir.join("before")
    }

    /// `cp -a --reflink=MODE from/. to`: the contents of `from` into `to`,
    /// keeping owners, modes, times, hard links, special files and xattrs.
    fn cp(&self, from: &Path, to: &Path) -> Result<()> {
        let out = Command::new("cp")
            .arg("-a")
            .arg(format!("--reflink={}", self.settings.reflink))
            .arg("--")
            .arg(from.join("."))
            .arg(to)
            .output()
            .map_err(|e| Error::io(to, "cannot run cp", e))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Io,
                format!(
                    "cp -a {} {} failed: {}",
                    from.display(),
                    to.display(),
                    String::from_utf8_lossy(&out.stderr).trim_end()
                ),
            ))
        }
    }

    /// Remove everything inside `dir`, keeping `dir` itself.
    fn empty(dir: &Path) -> Result<()> {
        for e in fs::read_dir(dir).map_err(|e| Error::io(dir, "cannot list", e))? {
            let p = e.map_err(|e| Error::io(dir, "cannot list", e))?.path();
            let md = fs::symlink_metadata(&p).map_err(|e| Error::io(&p, "cannot stat", e))?;
            if md.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            }
            .map_err(|e| Error::io(&p, "cannot remove", e))?;
        }
        Ok(())
    }

    fn drop_copy(spec: &SessionSpec) -> Result<()> {
        let _ = fs::remove_file(spec.dir.join(COMPLETE));
        let copy = Self::copy_dir(spec);
        match fs::remove_dir_all(&copy) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(&copy, "cannot remove the copy", e))
            }
            _ => Ok(()),
        }
    }
}

impl PluginBackend for CopyBackend {
    const NAME: &'static str = "copy";

    fn create(cfg: &BackendConfig) -> Result<Self> {
        let settings: CopySettings = cfg.parse()?;
        if !["auto", "always", "never"].contains(&settings.reflink.as_str()) {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "[backends.copy] reflink = \"{}\": expected auto, always or never",
                    settings.reflink
                ),
            ));
        }
        Ok(CopyBackend { settings })
    }
}

impl LayerBackend for CopyBackend {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            can_discard: true,
            rootless: true,
            in_place: true,
            ..Capabilities::default()
        }
    }

    fn probe(&self) -> Probe {
        match Command::new("cp").arg("--version").output() {
            Ok(o) if o.status.success() && o.stdout.starts_with(b"cp (GNU coreutils)") => {
                Probe::Available
            }
            _ => Probe::Unavailable(Unavailable::Missing {
                what: "GNU cp".into(),
                hint: "install coreutils (cp -a --reflink) on the PATH".into(),
            }),
        }
    }

    fn begin(&self, spec: &SessionSpec) -> Result<Begun> {
        let copy = Self::copy_dir(spec);
        fs::create_dir(&copy).map_err(|e| Error::io(&copy, "cannot create", e))?;
        let done = self.cp(&spec.base, &copy).and_then(|()| {
            fs::write(spec.dir.join(COMPLETE), b"")
                .map_err(|e| Error::io(&spec.dir, "cannot mark the copy complete", e))
        });
        if let Err(e) = done {
            let _ = Self::drop_copy(spec);
            return Err(e);
        }
        // Everything it needs is in the session directory: no state.
        Ok(Begun {
            merged: spec.base.clone(),
            state: BackendState::default(),
        })
    }

    fn changes(&self, spec: &SessionSpec, _opts: &ChangeOptions) -> Result<ChangeSet> {
        // Every entry of the copy is a new inode, so files that look the
        // same are compared by content: hash_all changes nothing here.
        diff_trees(&Self::copy_dir(spec), &spec.base, &ScanOptions::default())
    }

    fn move_down(&self, spec: &SessionSpec) -> Result<()> {
        // The root already is the result.
        Self::drop_copy(spec)
    }

    fn discard(&self, spec: &SessionSpec) -> Result<()> {
        if spec.dir.join(COMPLETE).exists() {
            // Rerunnable: the copy stays intact until the root is restored.
            Self::empty(&spec.base)?;
            self.cp(&Self::copy_dir(spec), &spec.base)?;
        }
        Self::drop_copy(spec)
    }

    fn release(&self, spec: &SessionSpec) -> Result<()> {
        Self::drop_copy(spec)
    }

    fn health(&self, spec: &SessionSpec) -> Health {
        if spec.dir.join(COMPLETE).exists() {
            Health::Ok
        } else {
            Health::Broken(format!(
                "the copy of the root is missing or incomplete; run `layerpack abort {}`",
                spec.package
            ))
        }
    }
}

layerpack_core::export_backend!(CopyBackend);
