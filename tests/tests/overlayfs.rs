//! overlayfs specifics: the fold survives being killed after any number of
//! operations, and every scenario gives the same layer as the snapshot
//! backend. Needs root and overlayfs: ignored with the reason otherwise
//! (a failure when LAYERPACK_REQUIRE names what is missing).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use layerpack_backend_overlayfs::{OverlayBackend, OverlayConfig};
use layerpack_core::backend::{LayerBackend, SessionSpec};
use layerpack_core::config::BackendConfig;
use layerpack_core::scenarios::{self, backdate, compare_trees};
use layerpack_core::tree::fold::{FoldOptions, FOLD_FAIL_AFTER_ENV};
use layerpack_tests::{builtin_registry, missing, passed, Need, Outcome};

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

fn fold_is_idempotent_when_killed_after_any_operation() -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("overlayfs")]) {
        return skip;
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
            state: Default::default(),
        };
        let failing =
            OverlayBackend::new(OverlayConfig::default(), Path::new("/")).with_fold(FoldOptions {
                fail_after: Some(n),
            });
        let begun = failing.begin(&spec).unwrap();
        let spec = SessionSpec {
            state: begun.state,
            ..spec
        };
        rich_install(&begun.merged).unwrap();
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
    passed()
}

fn every_scenario_gives_the_same_layer_as_the_snapshot_backend() -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("overlayfs")]) {
        return skip;
    }
    let registry = builtin_registry();
    let ovl = registry
        .create("overlayfs", &BackendConfig::empty("overlayfs"))
        .unwrap();
    let work = scratch("differential");
    let problems = layerpack_tests::differ_from_snapshot(&*ovl, &work);
    fs::remove_dir_all(&work).unwrap();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    passed()
}

fn in_place_mode_passes_every_scenario() -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("overlayfs")]) {
        return skip;
    }
    let b = OverlayBackend::new(
        OverlayConfig {
            in_place: true,
            ..OverlayConfig::default()
        },
        Path::new("/"),
    );
    let work = scratch("in-place");
    let mut failures = Vec::new();
    let mut ran = 0;
    for sc in scenarios::all() {
        if let Some(why) = sc.skip_reason(&b.capabilities(), &work) {
            eprintln!("in-place {}: skipped: {why}", sc.test_name());
            continue;
        }
        ran += 1;
        if let Err(e) = scenarios::run(&b, &sc, &work) {
            failures.push(format!("{}: {e}", sc.test_name()));
        }
    }
    fs::remove_dir_all(&work).unwrap();
    assert!(ran >= 24, "only {ran} scenarios ran");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    passed()
}

fn make_install_into_the_root_path_is_captured_in_place() -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("overlayfs")]) {
        return skip;
    }
    let d = scratch("destdir");
    let root = d.join("target");
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::write(root.join("usr/bin/old"), b"old").unwrap();
    let cfg = d.join("layerpack.toml");
    fs::write(&cfg, "[backends.overlayfs]\nin_place = true\n").unwrap();
    fs::write(
        d.join("Makefile"),
        "install:\n\tmkdir -p $(DESTDIR)/usr/bin $(DESTDIR)/etc\n\tinstall -m 0755 hello.sh $(DESTDIR)/usr/bin/hello\n\tprintf 'x=1\\n' > $(DESTDIR)/etc/hello.conf\n\trm -f $(DESTDIR)/usr/bin/old\n",
    )
    .unwrap();
    fs::write(d.join("hello.sh"), "#!/bin/sh\necho hello\n").unwrap();
    let lp = |args: &[&str]| {
        let o = std::process::Command::new(layerpack_tests::layerpack_bin())
            .args(["--config", cfg.to_str().unwrap()])
            .args(args)
            .current_dir(&d)
            .env("LAYERPACK_STATE_DIR", d.join("state"))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let merged = lp(&[
        "init",
        "hello",
        "--root",
        root.to_str().unwrap(),
        "--backend",
        "overlayfs",
        "--version",
        "1.0",
    ]);
    assert_eq!(
        PathBuf::from(merged.trim_end()),
        fs::canonicalize(&root).unwrap(),
        "in place: the root itself"
    );
    let make = std::process::Command::new("make")
        .args(["-s", "install", &format!("DESTDIR={}", root.display())])
        .current_dir(&d)
        .status();
    match make {
        Ok(s) => assert!(s.success()),
        Err(_) => {
            // No make here: the same steps by hand.
            fs::create_dir_all(root.join("etc")).unwrap();
            fs::copy(d.join("hello.sh"), root.join("usr/bin/hello")).unwrap();
            fs::set_permissions(
                root.join("usr/bin/hello"),
                fs::Permissions::from_mode(0o755),
            )
            .unwrap();
            fs::write(root.join("etc/hello.conf"), "x=1\n").unwrap();
            fs::remove_file(root.join("usr/bin/old")).unwrap();
        }
    }
    lp(&["final", "hello", "--out", "out"]);
    let doc: serde_json::Value =
        serde_json::from_slice(&fs::read(d.join("out/hello.changes.json")).unwrap()).unwrap();
    let got: Vec<(String, String)> = doc["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["path"].as_str().unwrap().to_string(),
                c["change"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("etc", "added"),
        ("etc/hello.conf", "added"),
        ("usr/bin/hello", "added"),
        ("usr/bin/old", "deleted"),
    ]
    .iter()
    .map(|(p, c)| (p.to_string(), c.to_string()))
    .collect();
    assert_eq!(got, want);
    assert!(d.join("out/hello_1.0_all.ipk").exists());
    // Folded: the root holds the result with nothing mounted on it.
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&d.to_string_lossy().to_string()),
        "{mounts}"
    );
    assert!(root.join("usr/bin/hello").exists() && !root.join("usr/bin/old").exists());
    fs::remove_dir_all(&d).unwrap();
    passed()
}

const UNPRIVILEGED: u32 = 4242;

fn rootless_run_passes_the_scenarios_that_need_no_root() -> Outcome {
    use std::os::unix::process::CommandExt;
    if let Some(skip) = missing(&[Need::Root, Need::Backend("overlayfs")]) {
        return skip;
    }
    let d = scratch("rootless");
    let own = |p: &Path| {
        std::os::unix::fs::chown(p, Some(UNPRIVILEGED), Some(UNPRIVILEGED)).unwrap();
    };
    own(&d);
    // The scenarios, in process, as an unprivileged uid (selftest enters a
    // user namespace for overlayfs as `run` does).
    let scratch = d.join("selftest");
    fs::create_dir(&scratch).unwrap();
    own(&scratch);
    let o = std::process::Command::new(layerpack_tests::layerpack_bin())
        .args(["selftest", "--backend", "overlayfs", "--dir"])
        .arg(&scratch)
        .uid(UNPRIVILEGED)
        .gid(UNPRIVILEGED)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let summary = out.lines().last().unwrap();
    assert!(summary.starts_with("overlayfs: "), "{summary}");
    let n_passed: u32 = summary
        .split(": ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(n_passed >= 22, "{out}");
    for needs_root in ["s06_chown_only", "s19_special_files"] {
        assert!(
            out.contains(&format!("skip {needs_root}: needs real root")),
            "{out}"
        );
    }

    // And the command line: `run` as that user.
    let root = d.join("root");
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/old"), b"old").unwrap();
    for p in [&root, &root.join("etc"), &root.join("etc/old")] {
        own(p);
    }
    let o = std::process::Command::new(layerpack_tests::layerpack_bin())
        .args([
            "run",
            "rootless",
            "--root",
            root.to_str().unwrap(),
            "--backend",
            "overlayfs",
            "--version",
            "1",
            "--out",
        ])
        .arg(d.join("out"))
        .args([
            "--",
            "sh",
            "-c",
            "echo new > \"$LAYERPACK_ROOT/etc/new\" && rm \"$LAYERPACK_ROOT/etc/old\"",
        ])
        .env("LAYERPACK_STATE_DIR", d.join("state"))
        .current_dir(&d)
        .uid(UNPRIVILEGED)
        .gid(UNPRIVILEGED)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(fs::read(root.join("etc/new")).unwrap(), b"new\n");
    assert!(!root.join("etc/old").exists());
    let doc: serde_json::Value =
        serde_json::from_slice(&fs::read(d.join("out/rootless.changes.json")).unwrap()).unwrap();
    let got: Vec<&str> = doc["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["change"].as_str().unwrap())
        .collect();
    assert_eq!(got, ["added", "deleted"]);
    // init alone, as that user, says what to do instead.
    let o = std::process::Command::new(layerpack_tests::layerpack_bin())
        .args([
            "init",
            "alone",
            "--root",
            root.to_str().unwrap(),
            "--backend",
            "overlayfs",
        ])
        .env("LAYERPACK_STATE_DIR", d.join("state"))
        .uid(UNPRIVILEGED)
        .gid(UNPRIVILEGED)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("layerpack run --backend overlayfs"));
    fs::remove_dir_all(&d).unwrap();
    passed()
}

fn a_root_on_overlayfs_is_refused_with_the_reason() -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("overlayfs")]) {
        return skip;
    }
    let d = scratch("nested");
    for sub in ["base", "s1", "s2"] {
        fs::create_dir(d.join(sub)).unwrap();
    }
    let b = OverlayBackend::new(OverlayConfig::default(), Path::new("/"));
    let outer = SessionSpec {
        package: "outer".into(),
        base: fs::canonicalize(d.join("base")).unwrap(),
        dir: d.join("s1"),
        state: Default::default(),
    };
    let begun = b.begin(&outer).unwrap();
    let outer = SessionSpec {
        state: begun.state,
        ..outer
    };
    let inner = SessionSpec {
        package: "inner".into(),
        base: begun.merged,
        dir: d.join("s2"),
        state: Default::default(),
    };
    let err = b.begin(&inner).unwrap_err();
    b.discard(&outer).unwrap();
    assert_eq!(err.kind(), layerpack_core::ErrorKind::Unsupported);
    assert!(err.to_string().contains("itself on overlayfs"), "{err}");
    assert_eq!(
        fs::read_dir(d.join("s2")).unwrap().count(),
        0,
        "begin undid its work"
    );
    fs::remove_dir_all(&d).unwrap();
    passed()
}

/// A `final` killed during move-down leaves part of the layer in the base:
/// `abort` must refuse to discard the rest, and `final` finishes the job.
fn abort_after_an_interrupted_move_down_is_refused_and_final_finishes() -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("overlayfs")]) {
        return skip;
    }
    let d = scratch("interrupted");
    let root = d.join("root");
    rich_base(&root);
    let reference = d.join("reference");
    rich_base(&reference);
    rich_install(&reference).unwrap();
    // The crash point comes from the test-only environment variable.
    let (failing, plain) = (Some("3"), None);
    let lp = |fail: Option<&str>, args: &[&str]| {
        let mut c = std::process::Command::new(layerpack_tests::layerpack_bin());
        c.args(args)
            .env("LAYERPACK_STATE_DIR", d.join("state"))
            .env_remove(FOLD_FAIL_AFTER_ENV);
        if let Some(n) = fail {
            c.env(FOLD_FAIL_AFTER_ENV, n);
        }
        c.output().unwrap()
    };
    let init = lp(
        failing,
        &[
            "init",
            "p",
            "--root",
            root.to_str().unwrap(),
            "--backend",
            "overlayfs",
        ],
    );
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let merged = PathBuf::from(String::from_utf8(init.stdout).unwrap().trim_end());
    rich_install(&merged).unwrap();
    let out = d.join("out");
    let fin = lp(failing, &["final", "p", "--out", out.to_str().unwrap()]);
    assert!(!fin.status.success());
    let abort = lp(plain, &["abort", "p"]);
    let err = String::from_utf8_lossy(&abort.stderr);
    assert!(!abort.status.success(), "abort must refuse");
    assert!(
        err.contains("interrupted") && err.contains("layerpack final p"),
        "{err}"
    );
    let fin = lp(plain, &["final", "p", "--out", out.to_str().unwrap()]);
    assert!(
        fin.status.success(),
        "{}",
        String::from_utf8_lossy(&fin.stderr)
    );
    compare_trees(&reference, &root).unwrap();
    fs::remove_dir_all(&d).unwrap();
    passed()
}

/// A volatile overlay (the default where the kernel has it) survives
/// `final --keep` (unmount, then mount again over the volatile marker);
/// after a reboot its layer is not trusted: `status` says so, `final`
/// refuses before writing anything, `abort` drops it.
fn volatile_layers_remount_after_keep_and_are_refused_after_a_reboot() -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("overlayfs")]) {
        return skip;
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    if !layerpack_core::union::kernel_has_volatile(&release) {
        return Ok(libtest_mimic_ignored(
            "the kernel's overlayfs has no volatile",
        ));
    }
    let d = scratch("volatile");
    let root = d.join("root");
    rich_base(&root);
    let out = d.join("out");
    let lp = |args: &[&str]| {
        std::process::Command::new(layerpack_tests::layerpack_bin())
            .args(args)
            .env("LAYERPACK_STATE_DIR", d.join("state"))
            .output()
            .unwrap()
    };
    let okd = |o: &std::process::Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let r = root.to_str().unwrap();
    let o = out.to_str().unwrap();
    let merged = PathBuf::from(
        okd(&lp(&[
            "init",
            "vol",
            "--root",
            r,
            "--backend",
            "overlayfs",
            "--version",
            "1",
        ]))
        .trim_end(),
    );
    let session = d.join("state/sessions/vol/session.json");
    let text = fs::read_to_string(&session).unwrap();
    assert!(text.contains("volatile"), "mounted volatile: {text}");
    fs::write(merged.join("one"), "1").unwrap();
    okd(&lp(&["final", "vol", "--out", o, "--keep"]));
    // Mounted again over work/work/incompat/volatile.
    fs::write(merged.join("two"), "2").unwrap();
    // A reboot, as the session sees it: another boot id.
    let boot = layerpack_core::union::boot_id().unwrap();
    let text = fs::read_to_string(&session).unwrap();
    assert!(text.contains(&boot), "{text}");
    okd(&lp(&["final", "vol", "--out", o, "--keep"]));
    fs::write(
        &session,
        text.replace(&boot, "00000000-0000-0000-0000-000000000000"),
    )
    .unwrap();
    let status = lp(&["status"]);
    let said = String::from_utf8_lossy(&status.stdout).into_owned()
        + &String::from_utf8_lossy(&status.stderr);
    assert!(said.contains("rebooted"), "{said}");
    let before = fs::read(out.join("vol_1_all.ipk")).unwrap();
    let fin = lp(&["final", "vol", "--out", o]);
    assert_eq!(fin.status.code(), Some(1));
    let err = String::from_utf8_lossy(&fin.stderr);
    assert!(
        err.contains("volatile") && err.contains("layerpack abort vol"),
        "{err}"
    );
    assert_eq!(
        fs::read(out.join("vol_1_all.ipk")).unwrap(),
        before,
        "nothing written"
    );
    okd(&lp(&["abort", "vol"]));
    assert!(!root.join("one").exists(), "the untrusted layer is dropped");
    fs::remove_dir_all(&d).unwrap();
    passed()
}

fn libtest_mimic_ignored(why: &str) -> layerpack_tests::Completion {
    layerpack_tests::Completion::ignored_with(why)
}

layerpack_tests::test_main!(
    volatile_layers_remount_after_keep_and_are_refused_after_a_reboot,
    fold_is_idempotent_when_killed_after_any_operation,
    every_scenario_gives_the_same_layer_as_the_snapshot_backend,
    in_place_mode_passes_every_scenario,
    make_install_into_the_root_path_is_captured_in_place,
    rootless_run_passes_the_scenarios_that_need_no_root,
    a_root_on_overlayfs_is_refused_with_the_reason,
    abort_after_an_interrupted_move_down_is_refused_and_final_finishes,
);
