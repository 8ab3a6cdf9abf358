//! layerpack-backend-overlayfs: kernel overlayfs.
//!
//! Not implemented yet. The crate exists so the registry, `layerpack
//! backends` and the behaviour matrix already know the name; its probe says
//! plainly that it is not implemented, and every operation is refused with
//! an `Unsupported` error.

use layerpack_core::backend::NotImplemented;
use layerpack_core::registry::{Origin, Registry};
use layerpack_core::Result;

/// The name this backend registers under.
pub const NAME: &str = "overlayfs";

/// Register the backend with `registry`.
pub fn register(registry: &mut Registry) -> Result<()> {
    registry.register(
        NAME,
        Origin::BuiltIn,
        Box::new(|_cfg| Ok(Box::new(NotImplemented::new(NAME)))),
    )
}
