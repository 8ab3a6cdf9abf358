//! overlayfs specifics: the fold survives being killed after any number of
//! operations, and every scenario gives the same layer as the snapshot
//! backend. Needs root and overlayfs; skipped with the reason otherwise
//! (a failure when LAYERPACK_REQUIRE names overlayfs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use layerpack_backend_overlayfs::{OverlayBackend, OverlayConfig};
use layerpack_core::backend::{ChangeOptions, LayerBackend, SessionSpec};
use layerpack_core::config::BackendConfig;
use layerpack_core::scenarios::{self, backdate, compare_trees};
use layerpack_tests::{builtin_registry, required_backends};

fn available() -> bool {
    let b = OverlayBackend::new(OverlayConfig::default(), Path::new("/"));
    match b.probe().reason() {
        None => true,
        Some(why) => {
            assert!(
                !required_backends().iter().any(|r| r == "overlayfs"),
                "LAYERPACK_REQUIRE includes overlayfs, but: {why}"
            );
            eprintln!("skipped: overlayfs unavailable: {why}");
            false
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("ovl-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn rich_base(b: &Path) {
    for d in [
        "etc/x.d",
        "opt/app",
        "usr/share/doc/foo",
        "lib",
        "var",
        "srv/keep",
    ] {
        fs::create_dir_all(b.join(d)).unwrap();
    }
    for (f, c) in [
        ("etc/a.conf", "aaaa"),
        ("etc/b.conf", "bbbb"),
        ("etc/y", "file"),
        ("etc/x.d/1.conf", "1"),
        ("etc/x.d/2.conf", "2"),
        ("opt/app/a", "a"),
        ("opt/app/b", "b"),
        ("usr/share/doc/foo/README", "r"),
        ("usr/share/doc/foo/NEWS", "n"),
        ("srv/keep/data", "d"),
    ] {
        fs::write(b.join(f), c).unwrap();
    }
    symlink("aa", b.join("lib/m")).unwrap();
}

fn rich_install(m: &Path) -> std::io::Result<()> {
    fs::create_dir_all(m.join("usr/bin"))?;
    fs::write(m.join("usr/bin/hello"), "hello\n")?;
    fs::set_permissions(m.join("usr/bin/hello"), fs::Permissions::from_mode(0o755))?;
    fs::hard_link(m.join("usr/bin/hello"), m.join("usr/bin/hello2"))?;
    fs::OpenOptions::new()
        .write(true)
        .open(m.join("etc/a.conf"))?
        .write_all(b"AAAA")?;
    fs::set_permissions(m.join("etc/b.conf"), fs::Permissions::from_mode(0o600))?;
    fs::remove_dir_all(m.join("usr/share/doc/foo"))?;
    fs::remove_dir_all(m.join("etc/x.d"))?;
    fs::write(m.join("etc/x.d"), "now a file")?;
    fs::remove_file(m.join("etc/y"))?;
    fs::create_dir(m.join("etc/y"))?;
    fs::write(m.join("etc/y/z"), "z")?;
    fs::remove_dir_all(m.join("opt/app"))?;
    fs::create_dir(m.join("opt/app"))?;
    fs::write(m.join("opt/app/c"), "c")?;
    fs::remove_file(m.join("lib/m"))?;
    symlink("bb", m.join("lib/m"))?;
    symlink("x", m.join("lib/l"))?;
    fs::create_dir(m.join("var/empty"))?;
    fs::set_permissions(m.join("srv/keep"), fs::Permissions::from_mode(0o700))?;
    xattr::set(m.join("srv/keep/data"), "user.test", b"1")?;
    Ok(())
}

#[test]
fn fold_is_idempotent_when_killed_after_any_operation() {
    if !available() {
        return;
    }
    let mut completed = false;
    for n in 0..400 {
        let d = scratch(&format!("fold{n}"));
        for sub in ["base", "reference", "session"] {
            fs::create_dir(d.join(sub)).unwrap();
        }
        rich_base(&d.join("base"));
        rich_base(&d.join("reference"));
        backdate(&d.join("base")).unwrap();
        backdate(&d.join("reference")).unwrap();
        let spec = SessionSpec {
            package: "fold".into(),
            base: fs::canonicalize(d.join("base")).unwrap(),
            dir: d.join("session"),
        };
        let failing = OverlayBackend::new(
            OverlayConfig {
                fold_fail_after: Some(n),
            },
            Path::new("/"),
        );
        let merged = failing.begin(&spec).unwrap();
        rich_install(&merged).unwrap();
        rich_install(&d.join("reference")).unwrap();
        let first = failing.move_down(&spec);
        if first.is_ok() {
            compare_trees(&d.join("reference"), &d.join("base")).unwrap();
            fs::remove_dir_all(&d).unwrap();
            eprintln!("the fold completed in {n} operations; every earlier kill point was rerun");
            assert!(n > 20, "the fold took only {n} operations");
            completed = true;
            break;
        }
        assert!(first.unwrap_err().to_string().contains("failpoint"));
        // Run it again, as `layerpack final` after a crash would.
        let again = OverlayBackend::new(OverlayConfig::default(), Path::new("/"));
        again.move_down(&spec).unwrap();
        if let Err(e) = compare_trees(&d.join("reference"), &d.join("base")) {
            panic!("killed after {n} operations, the rerun gave a different base: {e}");
        }
        fs::remove_dir_all(&d).unwrap();
    }
    assert!(completed, "the fold never completed within 400 operations");
}

#[test]
fn every_scenario_gives_the_same_layer_as_the_snapshot_backend() {
    if !available() {
        return;
    }
    let registry = builtin_registry();
    let snap = registry
        .create("snapshot", &BackendConfig::empty("snapshot"))
        .unwrap();
    let ovl = registry
        .create("overlayfs", &BackendConfig::empty("overlayfs"))
        .unwrap();
    let work = scratch("differential");
    let mut problems = Vec::new();
    for sc in scenarios::all() {
        if sc.end != scenarios::End::MoveDown
            || sc.skip_reason(&ovl.capabilities(), &work).is_some()
        {
            continue;
        }
        let mut sets = Vec::new();
        let mut bases = Vec::new();
        for b in [&snap, &ovl] {
            let d = work.join(format!("{}-{}", sc.test_name(), b.name()));
            for sub in ["base", "session"] {
                fs::create_dir_all(d.join(sub)).unwrap();
            }
            (sc.setup)(&d.join("base")).unwrap();
            backdate(&d.join("base")).unwrap();
            let spec = SessionSpec {
                package: "diff".into(),
                base: fs::canonicalize(d.join("base")).unwrap(),
                dir: d.join("session"),
            };
            let merged = b.begin(&spec).unwrap();
            (sc.act)(&merged).unwrap();
            let cs = b.changes(&spec, &ChangeOptions::default()).unwrap();
            b.move_down(&spec).unwrap();
            sets.push(cs);
            bases.push(d.join("base"));
        }
        let allowed: std::collections::BTreeMap<Vec<u8>, &str> =
            (sc.expect)().into_iter().collect();
        let symbols =
            |cs: &layerpack_core::model::ChangeSet| -> std::collections::BTreeMap<Vec<u8>, char> {
                cs.changes()
                    .iter()
                    .map(|c| (c.path.as_bytes().to_vec(), c.kind.symbol()))
                    .collect()
            };
        let (a, b) = (symbols(&sets[0]), symbols(&sets[1]));
        for path in a.keys().chain(b.keys()) {
            let (x, y) = (
                a.get(path).copied().unwrap_or('0'),
                b.get(path).copied().unwrap_or('0'),
            );
            let ok = x == y
                || allowed
                    .get(path)
                    .is_some_and(|s| s.contains(x) && s.contains(y));
            if !ok {
                problems.push(format!(
                    "{}: {:?}: snapshot {x}, overlayfs {y}",
                    sc.test_name(),
                    String::from_utf8_lossy(path)
                ));
            }
        }
        if let Err(e) = compare_trees(&bases[0], &bases[1]) {
            problems.push(format!(
                "{}: bases differ after move-down: {e}",
                sc.test_name()
            ));
        }
    }
    fs::remove_dir_all(&work).unwrap();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
