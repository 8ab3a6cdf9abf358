//! The aufs reader and fold on real branches: every scenario is installed
//! through a kernel overlay mount, the upper layer the kernel wrote is
//! rewritten into aufs's on-disk format (whiteouts as `.wh.<name>` hard
//! links of `.wh..wh.aufs`, opaque directories as `.wh..wh..opq`, aufs's
//! own directories added), and then read and folded as an aufs branch:
//! the change set must meet the scenario's expectation and the fold must
//! give the reference tree. Needs root and overlayfs (no aufs kernel);
//! skipped with the reason otherwise, a failure when LAYERPACK_REQUIRE
//! names overlayfs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use layerpack_backend_overlayfs::{OverlayBackend, OverlayConfig};
use layerpack_core::backend::{LayerBackend, SessionSpec};
use layerpack_core::model::FileKind;
use layerpack_core::scenarios::{self, backdate, compare_trees};
use layerpack_core::tree::fold::{fold, FoldOptions};
use layerpack_core::tree::upper::{read_upper, WhiteoutFormat};
use layerpack_core::tree::{ScanOptions, TreeScan};

fn available() -> bool {
    layerpack_tests::overlayfs_available("writing real branches")
}

/// Rewrite an overlayfs upper layer (unmounted) into aufs's format.
fn overlay_to_aufs(upper: &Path) {
    let wh = upper.join(".wh..wh.aufs");
    fs::write(&wh, b"").unwrap();
    for d in [".wh..wh.plnk", ".wh..wh.orph"] {
        fs::create_dir(upper.join(d)).unwrap();
    }
    let records: Vec<_> = TreeScan::start(upper, ScanOptions::default())
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    for r in records {
        let abs = r.path.under(upper);
        if r.kind == FileKind::CharDevice && r.rdev == 0 {
            fs::remove_file(&abs).unwrap();
            let name = [b".wh.".as_slice(), r.path.file_name()].concat();
            let parent = r.path.parent().unwrap().under(upper);
            fs::hard_link(&wh, parent.join(OsStr::from_bytes(&name))).unwrap();
            continue;
        }
        if r.kind == FileKind::Symlink {
            continue;
        }
        let opaque = matches!(xattr::get(&abs, "trusted.overlay.opaque"), Ok(Some(v)) if v == b"y");
        for n in xattr::list(&abs).unwrap() {
            if n.as_encoded_bytes().starts_with(b"trusted.overlay.") {
                xattr::remove(&abs, &n).unwrap();
            }
        }
        if opaque {
            fs::hard_link(&wh, abs.join(".wh..wh..opq")).unwrap();
        }
    }
}

fn run_one(sc: &scenarios::Scenario, work: &Path) -> Result<(), String> {
    let _ = fs::remove_dir_all(work);
    let (base, reference, session) = (work.join("base"), work.join("reference"), work.join("s"));
    for d in [&base, &reference, &session] {
        fs::create_dir_all(d).unwrap();
    }
    for d in [&base, &reference] {
        (sc.setup)(d).map_err(|e| format!("setup: {e}"))?;
        backdate(d).map_err(|e| format!("setup: {e}"))?;
    }
    let spec = SessionSpec {
        package: "p".into(),
        base: fs::canonicalize(&base).unwrap(),
        dir: fs::canonicalize(&session).unwrap(),
    };
    let ovl = OverlayBackend::new(OverlayConfig::default(), Path::new("/"));
    let merged = ovl.begin(&spec).map_err(|e| format!("begin: {e}"))?;
    let acted = (sc.act)(&merged);
    nix::mount::umount(&merged).map_err(|e| format!("umount: {e}"))?;
    acted.map_err(|e| format!("install: {e}"))?;
    (sc.act)(&reference).map_err(|e| format!("reference: {e}"))?;
    let upper: PathBuf = spec.dir.join("upper");
    overlay_to_aufs(&upper);
    let cs = read_upper(&upper, &spec.base, WhiteoutFormat::Aufs).map_err(|e| e.to_string())?;
    scenarios::check_expectation(sc, &cs)?;
    fold(
        &upper,
        &spec.base,
        WhiteoutFormat::Aufs,
        FoldOptions::default(),
    )
    .map_err(|e| format!("fold: {e}"))?;
    if fs::read_dir(&upper).unwrap().count() != 0 {
        return Err("the upper branch is not empty after the fold".into());
    }
    compare_trees(&reference, &spec.base).map_err(|e| format!("after the fold: {e}"))?;
    fs::remove_dir_all(work).unwrap();
    Ok(())
}

#[test]
fn every_scenario_read_and_folded_as_an_aufs_branch() {
    if !available() {
        return;
    }
    let work =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("aufs-{}", std::process::id()));
    let mut failures = Vec::new();
    let mut ran = 0;
    for sc in scenarios::all() {
        // aufs refuses a root holding .wh. names at begin (tested with the
        // fake); the other needs are met as root.
        if sc.needs.wh_names {
            continue;
        }
        ran += 1;
        if let Err(e) = run_one(&sc, &work.join(sc.test_name())) {
            failures.push(format!("{}: {e}", sc.test_name()));
        }
    }
    let _ = fs::remove_dir_all(&work);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(ran >= 24, "only {ran} scenarios ran");
}
