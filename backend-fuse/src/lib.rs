//! layerpack-backend-fuse: our own union filesystem in userspace (FUSE).
//!
//! Not implemented yet. The crate exists so the registry, `layerpack
//! backends` and the behaviour matrix already know the name; its probe says
//! plainly that it is not implemented ([`Unavailable::NotImplemented`]),
//! and every operation is refused with an `Unsupported` error.

use layerpack_core::backend::{
    Begun, Capabilities, ChangeOptions, LayerBackend, Probe, SessionSpec, Unavailable,
};
use layerpack_core::model::ChangeSet;
use layerpack_core::registry::{Origin, Registry};
use layerpack_core::{Error, ErrorKind, Result};

/// The name this backend registers under.
pub const NAME: &str = "fuse";

/// The placeholder: probes unavailable and refuses every operation.
pub struct FuseBackend;

impl FuseBackend {
    fn refuse<T>(&self) -> Result<T> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "backend 'fuse' is not implemented yet; use --backend snapshot",
        ))
    }
}

impl LayerBackend for FuseBackend {
    fn name(&self) -> &str {
        NAME
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    fn probe(&self) -> Probe {
        Probe::Unavailable(Unavailable::NotImplemented)
    }
    fn begin(&self, _: &SessionSpec) -> Result<Begun> {
        self.refuse()
    }
    fn changes(&self, _: &SessionSpec, _: &ChangeOptions) -> Result<ChangeSet> {
        self.refuse()
    }
    fn move_down(&self, _: &SessionSpec) -> Result<()> {
        self.refuse()
    }
}

/// Register the backend with `registry`.
pub fn register(registry: &mut Registry) -> Result<()> {
    registry.register(
        NAME,
        Origin::BuiltIn,
        Box::new(|_cfg| Ok(Box::new(FuseBackend))),
    )
}
