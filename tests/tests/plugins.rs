//! Backend plugins through the ABI: every load error, a plugin that panics
//! in each entry point (the host reports an error and keeps running), an
//! ABI version mismatch, a name clash, `layerpack backends` listing
//! plugins, and the example copy plugin chosen by name from a config file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use layerpack_core::backend::{Health, LayerBackend, Probe, SessionSpec};
use layerpack_core::plugin::{register_plugin, ABI_MAX};
use layerpack_core::registry::Registry;
use layerpack_core::testkit::load_plugin_backend;
use layerpack_core::ErrorKind;
use layerpack_tests::{
    build_plugin, builtin_registry, layerpack_bin, missing, passed, Need, Outcome,
};

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("plugins-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn load_err(path: &Path) -> layerpack_core::Error {
    register_plugin(&mut Registry::new(), path).expect_err("the load must fail")
}

fn a_missing_file_is_named() -> Outcome {
    let p = scratch("missing").join("libnothere.so");
    let e = load_err(&p);
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.to_string().contains("libnothere.so"), "{e}");
    assert!(e.to_string().contains("no such file"), "{e}");
    passed()
}

fn a_file_that_is_not_a_shared_library_is_refused() -> Outcome {
    let p = scratch("notlib").join("libtext.so");
    fs::write(&p, "just text\n").unwrap();
    let e = load_err(&p);
    assert_eq!(e.kind(), ErrorKind::Plugin);
    assert!(
        e.to_string().contains("not a loadable shared library"),
        "{e}"
    );
    assert!(e.to_string().contains("libtext.so"), "{e}");
    passed()
}

fn a_library_without_the_entry_symbol_is_refused() -> Outcome {
    let p = build_plugin("layerpack-plugin-faulty", &[]);
    let e = load_err(&p);
    assert_eq!(e.kind(), ErrorKind::Plugin);
    assert!(
        e.to_string()
            .contains("does not export layerpack_backend_v2"),
        "{e}"
    );
    passed()
}

fn an_abi_version_out_of_range_is_named_with_the_supported_range() -> Outcome {
    let p = build_plugin("layerpack-plugin-faulty", &["abi3"]);
    let e = load_err(&p);
    assert_eq!(e.kind(), ErrorKind::Plugin);
    let want = format!("implements ABI 3; this build supports 2..={ABI_MAX}");
    assert!(e.to_string().contains(&want), "{e}");
    passed()
}

fn a_plugin_of_the_old_abi_1_is_refused_naming_both_versions() -> Outcome {
    let p = build_plugin("layerpack-plugin-faulty", &["abi1"]);
    let e = load_err(&p);
    assert_eq!(e.kind(), ErrorKind::Plugin);
    let want = format!("implements ABI 1; this build supports 2..={ABI_MAX}");
    assert!(e.to_string().contains(&want), "{e}");
    passed()
}

fn a_longer_table_is_accepted_and_a_short_one_refused() -> Outcome {
    let p = build_plugin("layerpack-plugin-faulty", &["appended"]);
    let b = load_plugin_backend(&p, "").unwrap();
    assert_eq!(b.name(), "faulty");
    assert_eq!(b.probe(), Probe::Available);
    let p = build_plugin("layerpack-plugin-faulty", &["truncated"]);
    let e = load_err(&p);
    assert!(e.to_string().contains("table has 8 bytes; at least"), "{e}");
    passed()
}

fn a_name_taken_by_a_built_in_is_refused() -> Outcome {
    let p = build_plugin("layerpack-backend-snapshot", &["plugin"]);
    let mut r = builtin_registry();
    let e = register_plugin(&mut r, &p).expect_err("clash");
    assert!(
        e.to_string()
            .contains("backend name 'snapshot' is already taken by a built-in backend"),
        "{e}"
    );
    assert!(e.to_string().contains(&p.display().to_string()), "{e}");
    // The same library loads fine where the name is free.
    let mut alone = Registry::new();
    register_plugin(&mut alone, &p).unwrap();
    passed()
}

fn a_plugin_writable_by_another_user_is_refused_when_root() -> Outcome {
    if let Some(skip) = missing(&[Need::Root]) {
        return skip;
    }
    let built = build_plugin("layerpack-plugin-faulty", &["export"]);
    let d = scratch("perm");
    let open_dir = d.join("open");
    fs::create_dir(&open_dir).unwrap();
    fs::set_permissions(&open_dir, fs::Permissions::from_mode(0o777)).unwrap();
    let in_open_dir = open_dir.join("libfaulty.so");
    fs::copy(&built, &in_open_dir).unwrap();
    let e = load_err(&in_open_dir);
    assert_eq!(e.kind(), ErrorKind::Permission);
    assert!(e.to_string().contains("a directory above it"), "{e}");

    let file = d.join("libfaulty-open.so");
    fs::copy(&built, &file).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o666)).unwrap();
    let e = load_err(&file);
    assert_eq!(e.kind(), ErrorKind::Permission);
    assert!(e.to_string().contains("the file"), "{e}");
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    register_plugin(&mut Registry::new(), &file).unwrap();
    passed()
}

fn spec(d: &Path) -> SessionSpec {
    SessionSpec {
        package: "p".into(),
        base: d.join("base"),
        dir: d.join("session"),
        state: Default::default(),
    }
}

fn a_panic_in_any_entry_point_is_an_error_and_the_host_keeps_running() -> Outcome {
    let so = build_plugin("layerpack-plugin-faulty", &["export"]);
    let d = scratch("panic");
    let spec = spec(&d);
    let panicked = |e: &str, entry: &str| {
        assert!(
            e.contains(&format!("plugin backend 'faulty' panicked in {entry}")),
            "{entry}: {e}"
        );
        assert!(e.contains("faulty backend told to panic"), "{entry}: {e}");
    };
    for entry in ["create", "capabilities"] {
        let e = load_plugin_backend(&so, &format!("panic_in = \"{entry}\""))
            .err()
            .expect("create must fail");
        assert_eq!(e.kind(), ErrorKind::Plugin);
        panicked(&e.to_string(), entry);
    }
    let with = |entry: &str| load_plugin_backend(&so, &format!("panic_in = \"{entry}\"")).unwrap();
    match with("probe").probe() {
        Probe::Unavailable(why) => panicked(&why.to_string(), "probe"),
        Probe::Available => panic!("probe must report the panic"),
    }
    match with("health").health(&spec) {
        Health::Broken(why) => panicked(&why, "health"),
        h => panic!("health must report the panic, not {h:?}"),
    }
    type Op = fn(&dyn LayerBackend, &SessionSpec) -> layerpack_core::Result<()>;
    let ops: [(&str, Op); 8] = [
        ("begin", |b, s| b.begin(s).map(drop)),
        ("content_root", |b, s| b.content_root(s).map(drop)),
        ("freeze", |b, s| b.freeze(s)),
        ("thaw", |b, s| b.thaw(s)),
        ("changes", |b, s| {
            b.changes(s, &Default::default()).map(drop)
        }),
        ("move_down", |b, s| b.move_down(s)),
        ("discard", |b, s| b.discard(s)),
        ("release", |b, s| b.release(s)),
    ];
    for (entry, op) in ops {
        let b = with(entry);
        let e = op(&*b, &spec).expect_err("must fail");
        assert_eq!(e.kind(), ErrorKind::Plugin, "{entry}");
        panicked(&e.to_string(), entry);
        // The same backend still answers the other entry points.
        assert_eq!(b.probe(), Probe::Available);
        if entry != "content_root" {
            assert_eq!(b.content_root(&spec).unwrap(), spec.dir.join("content"));
        }
    }
    // A panic while the host drops the backend is caught too.
    drop(with("destroy"));
    // A well-behaved instance of the same library works normally.
    let ok = with("nowhere");
    let begun = ok.begin(&spec).unwrap();
    assert_eq!(begun.merged, spec.dir.join("merged"));
    // The backend's state crosses the ABI both ways unchanged.
    assert_eq!(begun.state.version, 7);
    assert_eq!(begun.state.data, serde_json::json!({"faulty": true}));
    let spec = SessionSpec {
        state: begun.state,
        ..spec
    };
    assert!(ok.changes(&spec, &Default::default()).unwrap().is_empty());
    ok.move_down(&spec).unwrap();
    passed()
}

fn lp(cfg: &Path, d: &Path, args: &[&str]) -> Output {
    std::process::Command::new(layerpack_bin())
        .args(["--config", cfg.to_str().unwrap()])
        .args(args)
        .current_dir(d)
        .env("LAYERPACK_STATE_DIR", d.join("state"))
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The example plugin, copied next to a config that names it by a
/// relative path and makes it the default backend.
fn copy_plugin_config(d: &Path) -> PathBuf {
    let so = build_plugin("layerpack-backend-copy", &[]);
    fs::create_dir_all(d.join("plugins")).unwrap();
    fs::copy(&so, d.join("plugins/libcopy.so")).unwrap();
    let cfg = d.join("layerpack.toml");
    fs::write(
        &cfg,
        "backend = \"copy\"\n\n[[plugin]]\npath = \"plugins/libcopy.so\"\n\n[backends.copy]\nreflink = \"auto\"\n",
    )
    .unwrap();
    cfg
}

fn backends_lists_plugins_with_path_and_abi() -> Outcome {
    let d = scratch("list");
    let cfg = copy_plugin_config(&d);
    let o = lp(&cfg, &d, &["--json", "backends"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let lines: Vec<serde_json::Value> = o
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let copy = lines
        .iter()
        .find(|l| l["name"] == "copy")
        .expect("copy listed");
    let want = fs::canonicalize(d.join("plugins/libcopy.so")).unwrap();
    assert_eq!(copy["plugin"]["path"], want.to_str().unwrap());
    assert_eq!(copy["plugin"]["abi"], 2);
    assert_eq!(copy["available"], true);
    assert_eq!(
        lines.iter().find(|l| l["name"] == "snapshot").unwrap()["plugin"],
        serde_json::Value::Null
    );
    let o = lp(&cfg, &d, &["backends"]);
    let out = text(&o.stdout);
    assert!(
        out.contains(&format!(
            "copy       plugin {} (ABI 2) available",
            want.display()
        )),
        "{out}"
    );
    passed()
}

fn the_example_plugin_is_chosen_by_name_and_passes_the_suite() -> Outcome {
    let d = scratch("copy");
    let cfg = copy_plugin_config(&d);
    let o = lp(&cfg, &d, &["selftest", "--backend", "copy"]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}{}", text(&o.stderr));
    let summary = out.lines().last().unwrap();
    assert!(
        summary.starts_with("copy: ") && summary.contains(" 0 failed"),
        "{out}"
    );

    // A real capture through the config's default backend, ending in an ipk.
    let root = d.join("root");
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/old.conf"), "old").unwrap();
    let o = lp(
        &cfg,
        &d,
        &[
            "run", "hello", "--root", root.to_str().unwrap(), "--version", "1.0", "--arch", "all",
            "--out", "out", "--", "sh", "-c",
            "mkdir -p \"$LAYERPACK_ROOT/usr/bin\" && echo hi > \"$LAYERPACK_ROOT/usr/bin/hello\" && rm \"$LAYERPACK_ROOT/etc/old.conf\"",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let doc: serde_json::Value =
        serde_json::from_slice(&fs::read(d.join("out/hello.changes.json")).unwrap()).unwrap();
    assert_eq!(doc["backend"], "copy", "{doc}");
    let paths: Vec<&str> = doc["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["etc/old.conf", "usr", "usr/bin", "usr/bin/hello"]);
    assert!(d.join("out/hello_1.0_all.ipk").exists());
    passed()
}

fn a_bad_plugin_in_the_config_is_a_clear_error() -> Outcome {
    let d = scratch("badcfg");
    let cfg = d.join("layerpack.toml");
    fs::write(&cfg, "[[plugin]]\npath = \"nothere.so\"\n").unwrap();
    let o = lp(&cfg, &d, &["backends"]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.contains(&d.join("nothere.so").display().to_string()),
        "{err}"
    );
    fs::write(&cfg, "[[plugin]]\npath = \"x.so\"\nwhere = 1\n").unwrap();
    let o = lp(&cfg, &d, &["backends"]);
    let err = text(&o.stderr);
    assert!(err.contains("line 3") && err.contains("where"), "{err}");
    passed()
}

/// Every field of every change survives the ABI: for each scenario, the
/// snapshot backend linked in and the same backend loaded as a plugin read
/// the same open session, and their change sets must be equal (paths as
/// bytes, kinds, metadata, xattrs, device numbers, link targets, hashes,
/// hard-link groups).
fn change_sets_cross_the_abi_unchanged() -> Outcome {
    use layerpack_core::config::BackendConfig;
    use layerpack_core::scenarios;
    let so = build_plugin("layerpack-backend-snapshot", &["plugin"]);
    let mut plugin_registry = Registry::new();
    register_plugin(&mut plugin_registry, &so).unwrap();
    let via_abi = plugin_registry
        .create("snapshot", &BackendConfig::empty("snapshot"))
        .unwrap();
    let linked = builtin_registry()
        .create("snapshot", &BackendConfig::empty("snapshot"))
        .unwrap();
    let d = scratch("fidelity");
    let (mut compared, mut changes) = (0, 0);
    for sc in scenarios::all() {
        if sc.skip_reason(&linked.capabilities(), &d).is_some() {
            continue;
        }
        let w = d.join(sc.test_name());
        let (base, session) = (w.join("base"), w.join("session"));
        fs::create_dir_all(&base).unwrap();
        fs::create_dir_all(&session).unwrap();
        (sc.setup)(&base).unwrap();
        scenarios::backdate(&base).unwrap();
        let spec = SessionSpec {
            package: "p".into(),
            base: fs::canonicalize(&base).unwrap(),
            dir: session,
            state: Default::default(),
        };
        let begun = via_abi.begin(&spec).unwrap();
        let spec = SessionSpec {
            state: begun.state.clone(),
            ..spec
        };
        assert_eq!(begun.merged, spec.base);
        (sc.act)(&begun.merged).unwrap();
        via_abi.freeze(&spec).unwrap();
        assert_eq!(
            via_abi.content_root(&spec).unwrap(),
            linked.content_root(&spec).unwrap()
        );
        for hash_all in [false, true] {
            let opts = layerpack_core::backend::ChangeOptions { hash_all };
            let a = linked.changes(&spec, &opts).unwrap();
            let b = via_abi.changes(&spec, &opts).unwrap();
            assert_eq!(a, b, "{}", sc.test_name());
            changes += a.len();
        }
        via_abi.move_down(&spec).unwrap();
        compared += 1;
    }
    assert!(compared >= 20, "only {compared} scenarios compared");
    assert!(changes > 100, "only {changes} changes compared");
    fs::remove_dir_all(&d).unwrap();
    passed()
}

layerpack_tests::test_main!(
    a_missing_file_is_named,
    a_file_that_is_not_a_shared_library_is_refused,
    a_library_without_the_entry_symbol_is_refused,
    an_abi_version_out_of_range_is_named_with_the_supported_range,
    a_plugin_of_the_old_abi_1_is_refused_naming_both_versions,
    a_longer_table_is_accepted_and_a_short_one_refused,
    a_name_taken_by_a_built_in_is_refused,
    a_plugin_writable_by_another_user_is_refused_when_root,
    a_panic_in_any_entry_point_is_an_error_and_the_host_keeps_running,
    backends_lists_plugins_with_path_and_abi,
    the_example_plugin_is_chosen_by_name_and_passes_the_suite,
    a_bad_plugin_in_the_config_is_a_clear_error,
    change_sets_cross_the_abi_unchanged,
);
