//! The aufs reader and fold on real branches: every scenario is installed
//! through a kernel overlay mount, the upper layer the kernel wrote is
//! rewritten into aufs's on-disk format (whiteouts as `.wh.<name>` hard
//! links of `.wh..wh.aufs`, opaque directories as `.wh..wh..opq`, aufs's
//! own directories added), and then read and folded as an aufs branch:
//! the change set must meet the scenario's expectation and the fold must
//! give the reference tree. One trial per scenario. Needs root and
//! overlayfs (no aufs kernel): ignored with the reason otherwise, a
//! failure when LAYERPACK_REQUIRE names what is missing; a scenario the
//! machine cannot run (no `user.*` xattrs on the scratch filesystem) is
//! ignored with the same typed reason as in the matrix.

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
use layerpack_tests::{
    judge_skip, missing, required_backends, Completion, Need, Outcome, SkipVerdict,
};
use libtest_mimic::{Arguments, Failed, Trial};

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
        state: Default::default(),
    };
    let ovl = OverlayBackend::new(OverlayConfig::default(), Path::new("/"));
    let merged = ovl.begin(&spec).map_err(|e| format!("begin: {e}"))?.merged;
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

fn one_scenario(sc: scenarios::Scenario) -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("overlayfs")]) {
        return skip;
    }
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("aufs-{}", std::process::id()))
        .join(sc.test_name());
    let caps = layerpack_core::backend::Capabilities {
        can_discard: true,
        ..Default::default()
    };
    if let Some(skip) = sc.skip_reason(&caps, work.parent().unwrap()) {
        // The branch is read as aufs: required when aufs or overlayfs is.
        let required = required_backends();
        let must_run = required.iter().any(|r| r == "aufs" || r == "overlayfs");
        return match judge_skip("aufs", must_run, &skip, &required) {
            SkipVerdict::Fail(msg) => Err(msg.into()),
            SkipVerdict::Ignore(why) => Ok(Completion::ignored_with(why)),
        };
    }
    run_one(&sc, &work).map_err(Failed::from)?;
    Ok(Completion::Completed)
}

fn main() -> std::process::ExitCode {
    let args = Arguments::from_args();
    let trials = scenarios::all()
        .into_iter()
        // aufs refuses a root holding .wh. names at begin (tested with
        // the fake syscalls).
        .filter(|sc| !sc.needs.wh_names)
        .map(|sc| {
            let name = format!("aufs-branch::{}", sc.test_name());
            Trial::ignorable_test(name, move || one_scenario(sc))
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}
