//! layerpack-tests: shared helpers for the behaviour matrix and the
//! end-to-end tests of the `layerpack` binary.

use layerpack_core::registry::Registry;

/// A registry with every built-in backend, as the binary has it.
pub fn builtin_registry() -> Registry {
    let mut r = Registry::new();
    layerpack_backend_snapshot::register(&mut r).expect("register snapshot");
    layerpack_backend_overlayfs::register(&mut r).expect("register overlayfs");
    layerpack_backend_fuse::register(&mut r).expect("register fuse");
    layerpack_backend_aufs::register(&mut r).expect("register aufs");
    r
}

/// Backends named in `LAYERPACK_REQUIRE` (comma-separated): for these a
/// skip is a failure.
pub fn required_backends() -> Vec<String> {
    std::env::var("LAYERPACK_REQUIRE")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}
