//! A backend plugin that misbehaves on purpose, for the loader tests.
//!
//! With the `export` feature it is an ABI 2 plugin named `faulty` whose
//! `panic_in` setting names the entry point that panics (`create`,
//! `capabilities`, `probe`, `begin`, `freeze`, `thaw`, `content_root`,
//! `changes`, `move_down`, `discard`, `release`, `health`, `destroy`);
//! otherwise it does nothing useful but succeeds. With `abi3` it exports
//! only an ABI 3 entry symbol, with `abi1` only the ABI 1 symbol of older
//! releases; with `appended`, an ABI 2 table followed by a field a newer
//! release might add (a larger `struct_size`); with `truncated`, a table
//! whose `struct_size` is too small; with none, no entry symbol.

use std::path::PathBuf;

use layerpack_core::backend::{
    BackendState, Begun, Capabilities, ChangeOptions, Health, LayerBackend, Probe, SessionSpec,
};
use layerpack_core::config::BackendConfig;
use layerpack_core::model::ChangeSet;
use layerpack_core::plugin::PluginBackend;
use layerpack_core::Result;
use serde::Deserialize;

/// `[backends.faulty]` settings.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultySettings {
    /// The entry point that panics.
    pub panic_in: String,
}

/// The misbehaving backend.
pub struct Faulty {
    panic_in: String,
}

impl Faulty {
    fn maybe_panic(&self, here: &str) {
        if self.panic_in == here {
            panic!("faulty backend told to panic in {here}");
        }
    }
}

impl PluginBackend for Faulty {
    const NAME: &'static str = "faulty";

    fn create(cfg: &BackendConfig) -> Result<Self> {
        let s: FaultySettings = cfg.parse()?;
        let b = Faulty {
            panic_in: s.panic_in,
        };
        b.maybe_panic("create");
        Ok(b)
    }
}

impl Drop for Faulty {
    fn drop(&mut self) {
        if self.panic_in == "destroy" && !std::thread::panicking() {
            panic!("faulty backend told to panic in destroy");
        }
    }
}

impl LayerBackend for Faulty {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn capabilities(&self) -> Capabilities {
        self.maybe_panic("capabilities");
        Capabilities {
            can_discard: true,
            ..Capabilities::default()
        }
    }

    fn probe(&self) -> Probe {
        self.maybe_panic("probe");
        Probe::Available
    }

    fn begin(&self, spec: &SessionSpec) -> Result<Begun> {
        self.maybe_panic("begin");
        Ok(Begun {
            merged: spec.dir.join("merged"),
            state: BackendState {
                version: 7,
                data: serde_json::json!({"faulty": true}),
            },
        })
    }

    fn freeze(&self, _spec: &SessionSpec) -> Result<()> {
        self.maybe_panic("freeze");
        Ok(())
    }

    fn thaw(&self, _spec: &SessionSpec) -> Result<()> {
        self.maybe_panic("thaw");
        Ok(())
    }

    fn content_root(&self, spec: &SessionSpec) -> Result<PathBuf> {
        self.maybe_panic("content_root");
        Ok(spec.dir.join("content"))
    }

    fn changes(&self, _spec: &SessionSpec, _opts: &ChangeOptions) -> Result<ChangeSet> {
        self.maybe_panic("changes");
        Ok(ChangeSet::default())
    }

    fn move_down(&self, _spec: &SessionSpec) -> Result<()> {
        self.maybe_panic("move_down");
        Ok(())
    }

    fn discard(&self, _spec: &SessionSpec) -> Result<()> {
        self.maybe_panic("discard");
        Ok(())
    }

    fn release(&self, _spec: &SessionSpec) -> Result<()> {
        self.maybe_panic("release");
        Ok(())
    }

    fn health(&self, _spec: &SessionSpec) -> Health {
        self.maybe_panic("health");
        Health::Ok
    }
}

// One ABI 2 entry point per build: `appended`/`truncated` replace `export`.
#[cfg(all(
    feature = "export",
    not(any(feature = "appended", feature = "truncated"))
))]
layerpack_core::export_backend!(Faulty);

/// A table as a newer release might write it: ABI 2 plus an appended
/// field, announced by a larger `struct_size`.
#[cfg(any(feature = "appended", feature = "truncated"))]
#[repr(C)]
pub struct TableWithMore {
    /// The ABI 2 part.
    pub v2: layerpack_core::plugin::TableV2,
    /// What a newer release appended.
    pub appended: usize,
}

#[cfg(any(feature = "appended", feature = "truncated"))]
static MORE: TableWithMore = {
    let mut v2 = layerpack_core::plugin::table_v2::<Faulty>();
    v2.struct_size = if cfg!(feature = "truncated") {
        8
    } else {
        std::mem::size_of::<TableWithMore>() as u32
    };
    TableWithMore { v2, appended: 42 }
};

/// ABI 2 entry point returning the extended (or truncated) table.
#[cfg(any(feature = "appended", feature = "truncated"))]
#[allow(unsafe_code)]
#[no_mangle]
pub extern "C" fn layerpack_backend_v2() -> *const layerpack_core::plugin::TableV2 {
    &MORE.v2
}

/// The entry point of an ABI 1 plugin (older releases): the host refuses
/// the version before it reads the table.
#[cfg(feature = "abi1")]
#[allow(unsafe_code)]
#[no_mangle]
pub extern "C" fn layerpack_backend_v1() -> *const u8 {
    std::ptr::null()
}

/// An entry point for an ABI this host does not know (its table is never
/// read: the host refuses the version first).
#[cfg(feature = "abi3")]
#[allow(unsafe_code)]
#[no_mangle]
pub extern "C" fn layerpack_backend_v3() -> *const u8 {
    std::ptr::null()
}
