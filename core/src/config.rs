//! `layerpack.toml`: the optional config file. Unknown keys are errors that
//! name the file, the line and the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::{Error, ErrorKind, Result};

/// The whole config file. Every field is optional; no file at all means
/// the defaults (snapshot backend, state under the user's state directory).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where sessions live; must be outside every base.
    pub state_dir: Option<PathBuf>,
    /// Backend used when `init` gets no `--backend`: a name or `auto`.
    pub backend: Option<String>,
    /// Where `final` writes its outputs when `--out` is not given.
    pub out_dir: Option<PathBuf>,
    /// Hash every candidate file when reading a layer instead of trusting
    /// stat data.
    #[serde(default)]
    pub hash_all: bool,
    /// Package formats `final` writes when `--format` is not given
    /// (default: ipk).
    pub formats: Option<Vec<String>>,
    /// Owner policy: `auto` (default), `keep` or `root` (see `--owners`).
    pub owners: Option<String>,
    /// Foreign-edit policy: `divert` (default), `ship`, `skip` or `fail`
    /// (see `--foreign-edits`).
    pub foreign_edits: Option<String>,
    /// Buildroot device/permission tables applied to every package.
    #[serde(default)]
    pub device_tables: Vec<PathBuf>,
    /// Control fields for every package (`[package_defaults]`).
    #[serde(default)]
    pub package_defaults: crate::pack::MetaFields,
    /// Control fields per package (`[packages.<name>]`).
    #[serde(default)]
    pub packages: BTreeMap<String, crate::pack::MetaFields>,
    /// Per-backend settings: `[backends.<name>]`.
    #[serde(default)]
    pub backends: BTreeMap<String, toml::Spanned<toml::Table>>,
    /// Backend plugins to load: `[[plugin]] path = "..."`, relative to
    /// this file.
    #[serde(default)]
    pub plugin: Vec<PluginEntry>,
    /// The file this was read from (not a key).
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// The text it was read from, for locating keys in errors.
    #[serde(skip)]
    text: String,
}

/// One `[[plugin]]` entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginEntry {
    /// The shared library.
    pub path: PathBuf,
}

impl Config {
    /// Read and check `path`.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(path, "cannot read config file", e))?;
        let mut cfg = Config::parse(&text, path)?;
        // Relative paths in the file are relative to the file.
        let dir = path.parent().unwrap_or(Path::new("."));
        for p in [&mut cfg.state_dir, &mut cfg.out_dir]
            .into_iter()
            .flatten()
            .chain(cfg.device_tables.iter_mut())
            .chain(cfg.plugin.iter_mut().map(|p| &mut p.path))
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(cfg)
    }

    /// Parse config text; `origin` is used in error messages.
    pub fn parse(text: &str, origin: &Path) -> Result<Config> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| format!(" line {}:", line_of(text, s.start)))
                .unwrap_or_default();
            Error::new(
                ErrorKind::Config,
                format!("{}:{line} {}", origin.display(), e.message().trim_end()),
            )
        })?;
        cfg.source = Some(origin.to_path_buf());
        cfg.text = text.to_string();
        Ok(cfg)
    }

    /// Check every `[backends.<name>]` section against the backends of
    /// `registry`: a name no backend has is an error that lists the known
    /// ones (with the closest as "did you mean"), and each known section is
    /// parsed by its backend now, so a misspelt key fails at once, naming
    /// its line, whichever backend the command uses.
    pub fn check_backends(&self, registry: &crate::registry::Registry) -> Result<()> {
        let known = registry.names();
        for (name, t) in &self.backends {
            if registry.origin(name).is_none() {
                let at = self.at(t.span().start);
                let hint = closest(name, &known)
                    .map(|k| format!(" (did you mean '{k}'?)"))
                    .unwrap_or_default();
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "{at}[backends.{name}]: no backend is called '{name}'{hint}; known backends: {}",
                        known.join(", ")
                    ),
                ));
            }
            registry
                .create(name, &self.backend_config(name))
                .map(drop)?;
        }
        Ok(())
    }

    /// `file: line N: ` for byte offset `at` of the file.
    fn at(&self, at: usize) -> String {
        match &self.source {
            Some(p) => format!("{}: line {}: ", p.display(), line_of(&self.text, at)),
            None => String::new(),
        }
    }

    /// The `[backends.<name>]` table (empty when absent).
    pub fn backend_config(&self, name: &str) -> BackendConfig {
        match self.backends.get(name) {
            Some(t) => BackendConfig {
                name: name.to_string(),
                table: t.get_ref().clone(),
                origin: self
                    .source
                    .clone()
                    .map(|p| (p, line_of(&self.text, t.span().start))),
                text: Some(self.text.clone()),
            },
            None => BackendConfig::empty(name),
        }
    }
}

/// The entry of `known` closest to `name` by edit distance, when it is
/// close enough to be a typo.
pub fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1];
            for (j, cb) in b.iter().enumerate() {
                let sub = prev[j] + usize::from(ca != *cb);
                cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
            }
            prev = cur;
        }
        prev[b.len()]
    }
    known
        .iter()
        .map(|k| (distance(name, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3) || k.starts_with(name) || name.starts_with(k))
        .min()
        .map(|(_, k)| k)
}

/// 1-based line number of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// One backend's settings, with where they came from for error messages.
#[derive(Clone, Debug)]
pub struct BackendConfig {
    /// Backend name.
    pub name: String,
    /// The raw table.
    pub table: toml::Table,
    /// File and line of the `[backends.<name>]` header, if from a file.
    pub origin: Option<(PathBuf, usize)>,
    /// The whole file's text, to find the line of a key at fault.
    pub text: Option<String>,
}

impl BackendConfig {
    /// No settings.
    pub fn empty(name: &str) -> BackendConfig {
        BackendConfig {
            name: name.to_string(),
            table: toml::Table::new(),
            origin: None,
            text: None,
        }
    }

    /// The line of `key` in this section, if the file is known (the
    /// section's own header line otherwise).
    fn line_of_key(&self, key: &str) -> Option<usize> {
        let (_, header) = self.origin.as_ref()?;
        let text = self.text.as_ref()?;
        for (i, line) in text.lines().enumerate().skip(*header) {
            let l = line.trim_start();
            if l.starts_with('[') {
                break;
            }
            let k = l.split('=').next().unwrap_or("").trim().trim_matches('"');
            if l.contains('=') && k == key {
                return Some(i + 1);
            }
        }
        Some(*header)
    }

    /// Deserialize into the backend's own settings struct (which should use
    /// `deny_unknown_fields`); errors name file, line and section.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        T::deserialize(toml::Value::Table(self.table.clone())).map_err(|e| {
            // serde names the key at fault as `unknown field `k``, or
            // `invalid type ... for key `k``: point at its line.
            let key = e
                .message()
                .split('`')
                .nth(1)
                .map(str::to_string)
                .unwrap_or_default();
            let at = match (&self.origin, self.line_of_key(&key)) {
                (Some((p, _)), Some(line)) => format!("{}: line {line}: ", p.display()),
                _ => String::new(),
            };
            Error::new(
                ErrorKind::Config,
                format!("{at}[backends.{}]: {}", self.name, e.message().trim_end()),
            )
        })
    }

    /// Settings from the TOML text of a `[backends.<name>]` table's body
    /// (how they cross the plugin boundary); errors name the section.
    pub fn from_text(
        name: &str,
        text: &str,
        origin: Option<(PathBuf, usize)>,
    ) -> Result<BackendConfig> {
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("[backends.{name}]: {}", e.message()),
            )
        })?;
        Ok(BackendConfig {
            name: name.to_string(),
            table,
            origin,
            text: None,
        })
    }

    /// The same settings as TOML text (for plugins).
    pub fn to_text(&self) -> String {
        toml::to_string(&self.table).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err =
            Config::parse("backend = \"snapshot\"\nbakend = 1\n", Path::new("x.toml")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        let msg = err.to_string();
        assert!(msg.contains("x.toml"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
        assert!(msg.contains("bakend"), "{msg}");
    }

    #[test]
    fn backend_section_errors_name_the_section() {
        #[derive(Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct S {
            hash_all: Option<bool>,
        }
        let cfg = Config::parse("\n[backends.snapshot]\nhsh = 1\n", Path::new("c.toml")).unwrap();
        let err = cfg.backend_config("snapshot").parse::<S>().unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("c.toml: line 3"),
            "the key's line, not the header's: {msg}"
        );
        assert!(msg.contains("[backends.snapshot]"), "{msg}");
        assert!(msg.contains("hsh"), "{msg}");
    }

    #[test]
    fn close_names_are_suggested() {
        let known = ["snapshot", "overlayfs", "fuse", "aufs"];
        assert_eq!(closest("overlay", &known), Some("overlayfs"));
        assert_eq!(closest("snapshoot", &known), Some("snapshot"));
        assert_eq!(closest("nonesuch", &known), None);
    }
}
