//! Name → backend factory. `auto` tries backends in a fixed order and says
//! why each one it passed over was skipped.

use crate::backend::LayerBackend;
use crate::config::BackendConfig;
use crate::{Error, ErrorKind, Result};

/// Builds a backend from its settings.
pub type Factory = Box<dyn Fn(&BackendConfig) -> Result<Box<dyn LayerBackend>> + Send + Sync>;

/// Where a registered backend comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Linked into this binary.
    BuiltIn,
    /// Loaded from a shared library.
    Plugin {
        /// The library file.
        path: std::path::PathBuf,
        /// ABI version it implements.
        abi: u32,
    },
}

struct Registered {
    name: String,
    origin: Origin,
    factory: Factory,
}

/// The backends this process knows.
#[derive(Default)]
pub struct Registry {
    entries: Vec<Registered>,
}

/// A chosen backend and, for each backend passed over, its name and why.
pub type AutoChoice = (Box<dyn LayerBackend>, Vec<(String, String)>);

/// The order `auto` tries built-ins in: cheapest capture and discard first,
/// the backend that works everywhere last.
pub const AUTO_ORDER: &[&str] = &["overlayfs", "aufs", "fuse", "snapshot"];

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Add a backend. A second registration under the same name is refused.
    pub fn register(&mut self, name: &str, origin: Origin, factory: Factory) -> Result<()> {
        if let Some(existing) = self.entries.iter().find(|e| e.name == name) {
            let what = match &existing.origin {
                Origin::BuiltIn => "a built-in backend".to_string(),
                Origin::Plugin { path, .. } => format!("the plugin {}", path.display()),
            };
            return Err(Error::new(
                ErrorKind::Config,
                format!("backend name '{name}' is already taken by {what}"),
            ));
        }
        self.entries.push(Registered {
            name: name.to_string(),
            origin,
            factory,
        });
        Ok(())
    }

    /// Registered names, in registration order.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.name.as_str()).collect()
    }

    /// Where `name` comes from.
    pub fn origin(&self, name: &str) -> Option<&Origin> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| &e.origin)
    }

    /// Build the backend called `name`; an unknown name lists the known ones.
    pub fn create(&self, name: &str, cfg: &BackendConfig) -> Result<Box<dyn LayerBackend>> {
        match self.entries.iter().find(|e| e.name == name) {
            Some(e) => (e.factory)(cfg),
            None => Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "unknown backend '{name}'; known backends: {}, or auto",
                    self.names().join(", ")
                ),
            )),
        }
    }

    /// The first available backend in [`AUTO_ORDER`], and for each one passed
    /// over, why.
    pub fn auto(&self, cfg_for: &dyn Fn(&str) -> BackendConfig) -> Result<AutoChoice> {
        let mut skipped = Vec::new();
        for name in AUTO_ORDER {
            if self.origin(name).is_none() {
                continue;
            }
            match self.create(name, &cfg_for(name)) {
                Ok(b) => match b.probe().reason() {
                    None => return Ok((b, skipped)),
                    Some(why) => skipped.push((name.to_string(), why.to_string())),
                },
                Err(e) => skipped.push((name.to_string(), e.to_string())),
            }
        }
        let why: Vec<String> = skipped.iter().map(|(n, w)| format!("{n}: {w}")).collect();
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("no backend is available here ({})", why.join("; ")),
        ))
    }
}
