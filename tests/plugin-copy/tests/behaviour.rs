//! The behaviour suite against the copy backend, linked in and loaded
//! through the plugin ABI from the shared library cargo built.

use std::path::PathBuf;

use layerpack_backend_copy::CopyBackend;
use layerpack_core::config::BackendConfig;
use layerpack_core::plugin::PluginBackend;
use layerpack_core::testkit;

fn work(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("copy-{name}-{}", std::process::id()))
}

#[test]
fn behaviour_suite_linked_in() {
    let b = CopyBackend::create(&BackendConfig::empty("copy")).expect("create");
    let dir = work("linked");
    testkit::run_suite(&b, &dir, |_| None, |_| {}).assert_passed();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn behaviour_suite_through_the_plugin_abi() {
    let so = testkit::cdylib_path(env!("CARGO_PKG_NAME"));
    let b = testkit::load_plugin_backend(&so, "reflink = \"auto\"").expect("load plugin");
    let dir = work("abi");
    testkit::run_suite(&*b, &dir, |_| None, |_| {}).assert_passed();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_bad_setting_is_refused_naming_the_key() {
    let so = testkit::cdylib_path(env!("CARGO_PKG_NAME"));
    let err = testkit::load_plugin_backend(&so, "reflink = \"sometimes\"")
        .err()
        .expect("refused");
    assert!(err.to_string().contains("reflink"), "{err}");
}
