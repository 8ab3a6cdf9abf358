//! Packages: ipk that independent readers accept, reproducibility, the
//! feed index, `apply` round trips for every scenario a package can
//! express, and hostile archives that must not write outside the root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use layerpack_core::backend::{ChangeOptions, LayerBackend, SessionSpec};
use layerpack_core::config::BackendConfig;
use layerpack_core::pack::tarw::{TarHeader, TarKind, TarWriter};
use layerpack_core::pack::{
    self, apply, feed, Format, MetaFields, Owners, PackOptions, PackageMeta, Plan,
};
use layerpack_core::scenarios::{self, backdate, compare_trees};
use layerpack_tests::{builtin_registry, layerpack_bin, missing, passed, Need, Outcome};
use serde_json::Value;

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("pkg-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn lp(dir: &Path, args: &[&str]) -> Output {
    Command::new(layerpack_bin())
        .args(args)
        .current_dir(dir)
        .env("LAYERPACK_STATE_DIR", dir.join("state"))
        .env_remove("LAYERPACK_CONFIG")
        .env_remove("SOURCE_DATE_EPOCH")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `layerpack run <pkg> --root root --out out <opts> -- sh -c <script>` in `dir`.
fn install(dir: &Path, pkg: &str, opts: &[&str], script: &str) -> Output {
    let mut args = vec!["run", pkg, "--root", "root", "--out", "out"];
    args.extend_from_slice(opts);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    lp(dir, &args)
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run a reader the test declared in its needs ([`READERS`]).
fn tool(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} (declared as needed): {e}"))
}

/// The independent readers the interop checks compare against.
const READERS: &[Need] = &[
    Need::Tool("dpkg-deb"),
    Need::Tool("bsdtar"),
    Need::Tool("python3"),
    Need::Tool("tar"),
];

const HELLO: &str =
    r#"mkdir -p "$LAYERPACK_ROOT/usr/bin" && echo hi > "$LAYERPACK_ROOT/usr/bin/hello""#;

fn hello(dir: &Path, extra: &[&str]) -> PathBuf {
    fs::create_dir_all(dir.join("root")).unwrap();
    let mut args = vec![
        "run",
        "hello",
        "--root",
        "root",
        "--version",
        "1.0",
        "--arch",
        "all",
        "--out",
        "out",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "sh", "-c", HELLO]);
    ok(&lp(dir, &args));
    dir.join("out/hello_1.0_all.ipk")
}

fn python(script: &str, arg: &Path) -> String {
    let o = tool("python3", &["-c", script, arg.to_str().unwrap()]);
    ok(&o)
}

/// Members of the ar archive, extracted next to it.
fn unpack_ar(ipk: &Path) -> PathBuf {
    let dir = ipk.with_extension("unpacked");
    fs::create_dir_all(&dir).unwrap();
    let bytes = fs::read(ipk).unwrap();
    for (name, data) in pack::tarw::ar_members(&bytes).unwrap() {
        fs::write(dir.join(name), data).unwrap();
    }
    dir
}

fn hello_ipk_is_read_by_dpkg_deb_tar_bsdtar_and_python() -> Outcome {
    if let Some(skip) = missing(READERS) {
        return skip;
    }
    let d = scratch("hello");
    let ipk = hello(&d, &[]);
    let bytes = fs::read(&ipk).unwrap();
    assert!(bytes.starts_with(
        b"!<arch>\ndebian-binary   0           0     0     100644  4         `\n2.0\n"
    ));
    let members: Vec<String> = pack::tarw::ar_members(&bytes)
        .unwrap()
        .into_iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(members, ["debian-binary", "control.tar.gz", "data.tar.gz"]);

    {
        let info = ok(&tool("dpkg-deb", &["-I", ipk.to_str().unwrap()]));
        assert!(
            info.contains("Package: hello") && info.contains("Version: 1.0"),
            "{info}"
        );
        assert!(info.contains("Installed-Size: 3"), "{info}");
        let list = ok(&tool("dpkg-deb", &["-c", ipk.to_str().unwrap()]));
        let rows: Vec<(&str, &str)> = list
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[1], f[5])
            })
            .collect();
        assert_eq!(
            rows,
            [
                ("0/0", "./usr/"),
                ("0/0", "./usr/bin/"),
                ("0/0", "./usr/bin/hello")
            ]
        );
    }
    let parts = unpack_ar(&ipk);
    let data = parts.join("data.tar.gz");
    let gnu = ok(&tool("tar", &["-tzf", data.to_str().unwrap()]));
    assert_eq!(gnu, "./usr/\n./usr/bin/\n./usr/bin/hello\n");
    assert_eq!(ok(&tool("bsdtar", &["-tzf", data.to_str().unwrap()])), gnu);
    let py = python(
        "import tarfile,sys\nfor m in tarfile.open(sys.argv[1]):\n print(m.name, oct(m.mode), m.uid, m.gid, m.type.decode(), m.linkname)",
        &data,
    );
    assert_eq!(
        py,
        "./usr 0o755 0 0 5 \n./usr/bin 0o755 0 0 5 \n./usr/bin/hello 0o644 0 0 0 \n"
    );
    // The gzip headers carry no time and no name.
    let gz = fs::read(&data).unwrap();
    assert_eq!(&gz[3..8], &[0, 0, 0, 0, 0], "FLG and MTIME are zero");
    passed()
}

fn same_layer_and_epoch_give_identical_bytes_across_roots() -> Outcome {
    let a = scratch("repro-a");
    let b = scratch("repro-b");
    for d in [&a, &b] {
        for fmt in ["ipk", "ipk-openwrt", "tar", "oci", "deb"] {
            fs::create_dir_all(d.join("root")).unwrap();
            let o = Command::new(layerpack_bin())
                .args([
                    "run",
                    "hello",
                    "--root",
                    "root",
                    "--version",
                    "1.0",
                    "--format",
                    fmt,
                    "--out",
                    fmt,
                    "--",
                    "sh",
                    "-c",
                    HELLO,
                ])
                .current_dir(d)
                .env("LAYERPACK_STATE_DIR", d.join("state"))
                .env("SOURCE_DATE_EPOCH", "1700000000")
                .output()
                .unwrap();
            ok(&o);
            fs::remove_dir_all(d.join("root")).unwrap();
        }
    }
    for (fmt, file) in [
        ("ipk", "hello_1.0_all.ipk"),
        ("ipk-openwrt", "hello_1.0_all.ipk"),
        ("tar", "hello_1.0_all.tar.gz"),
        ("oci", "hello_1.0_all.oci-layer.tar"),
        ("deb", "hello_1.0_all.deb"),
    ] {
        let x = fs::read(a.join(fmt).join(file)).unwrap();
        let y = fs::read(b.join(fmt).join(file)).unwrap();
        assert_eq!(x, y, "{fmt} differs between two builds");
    }
    // mtimes are clamped to SOURCE_DATE_EPOCH.
    let data = unpack_ar(&a.join("ipk/hello_1.0_all.ipk")).join("data.tar.gz");
    let py = python(
        "import tarfile,sys\nprint(max(m.mtime for m in tarfile.open(sys.argv[1])))",
        &data,
    );
    assert_eq!(py.trim(), "1700000000");
    passed()
}

fn ipk_and_ipk_openwrt_together_are_refused() -> Outcome {
    let d = scratch("both");
    fs::create_dir_all(d.join("root")).unwrap();
    let o = lp(
        &d,
        &[
            "run",
            "hello",
            "--root",
            "root",
            "--version",
            "1",
            "--format",
            "ipk,ipk-openwrt",
            "--",
            "true",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("choose one"));
    passed()
}

fn openwrt_ipk_is_a_gzipped_tar_of_the_three_members() -> Outcome {
    if let Some(skip) = missing(READERS) {
        return skip;
    }
    let d = scratch("openwrt");
    hello(&d, &["--format", "ipk-openwrt"]);
    let ipk = d.join("out/hello_1.0_all.ipk");
    let outer = ok(&tool("tar", &["-tzvf", ipk.to_str().unwrap()]));
    let names: Vec<&str> = outer
        .lines()
        .map(|l| l.split_whitespace().last().unwrap())
        .collect();
    assert_eq!(
        names,
        ["./debian-binary", "./data.tar.gz", "./control.tar.gz"]
    );
    let control = feed::read_control(&fs::read(&ipk).unwrap()).unwrap();
    assert!(
        control.starts_with("Package: hello\nVersion: 1.0\n"),
        "{control}"
    );
    let root = d.join("target");
    fs::create_dir(&root).unwrap();
    let a = apply::apply(&ipk, &root).unwrap();
    assert_eq!(a.format, "ipk-openwrt");
    assert_eq!(fs::read(root.join("usr/bin/hello")).unwrap(), b"hi\n");
    passed()
}

fn missing_version_is_an_error_only_when_a_format_was_asked_for() -> Outcome {
    let d = scratch("nover");
    fs::create_dir_all(d.join("root")).unwrap();
    let o = install(&d, "pkg", &[], "touch \"$LAYERPACK_ROOT/f\"");
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no package written") && err.contains("--version"),
        "{err}"
    );
    assert!(d.join("out/pkg.changes.json").exists());
    let o = lp(
        &d,
        &[
            "run", "qq", "--root", "root", "--out", "out", "--format", "ipk", "--", "true",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no version for package 'qq'"));
    assert!(
        !d.join("out/qq.changes.json").exists(),
        "nothing written on error"
    );
    ok(&lp(&d, &["abort", "qq"]));
    passed()
}

fn names_outside_the_ipk_alphabet_are_mapped_and_said() -> Outcome {
    let d = scratch("names");
    fs::create_dir_all(d.join("root")).unwrap();
    let o = install(
        &d,
        "Foo_Bar",
        &["--version", "2:1.0-r1"],
        "touch \"$LAYERPACK_ROOT/f\"",
    );
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("'Foo_Bar' is written as 'foo-bar'"));
    let ipk = d.join("out/foo-bar_1.0-r1_all.ipk");
    let control = feed::read_control(&fs::read(&ipk).unwrap()).unwrap();
    assert!(
        control.contains("Package: foo-bar\nVersion: 2:1.0-r1\n"),
        "{control}"
    );
    passed()
}

fn deletions_go_into_postinst_and_the_postinst_removes_exactly_them() -> Outcome {
    if let Some(skip) = missing(READERS) {
        return skip;
    }
    let d = scratch("postinst");
    let root = d.join("root");
    fs::create_dir_all(root.join("etc/dir")).unwrap();
    fs::write(root.join("etc/keep"), b"k").unwrap();
    fs::write(root.join("etc/it's gone"), b"x").unwrap();
    fs::write(root.join("etc/dir/f"), b"x").unwrap();
    let target = d.join("target");
    Command::new("cp")
        .args(["-a", root.to_str().unwrap(), target.to_str().unwrap()])
        .status()
        .unwrap();
    ok(&install(
        &d,
        "del",
        &["--version", "1"],
        "rm -r \"$LAYERPACK_ROOT/etc/it's gone\" \"$LAYERPACK_ROOT/etc/dir\"",
    ));
    let parts = unpack_ar(&d.join("out/del_1_all.ipk"));
    let ctl = parts.join("control");
    fs::create_dir(&ctl).unwrap();
    ok(&tool(
        "tar",
        &[
            "-xzf",
            parts.join("control.tar.gz").to_str().unwrap(),
            "-C",
            ctl.to_str().unwrap(),
        ],
    ));
    let postinst = ctl.join("postinst");
    assert_eq!(
        fs::metadata(&postinst).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let o = Command::new("sh")
        .arg(&postinst)
        .env("PKG_ROOT", &target)
        .output()
        .unwrap();
    ok(&o);
    assert!(target.join("etc/keep").exists());
    assert!(!target.join("etc/it's gone").exists());
    assert!(!target.join("etc/dir").exists());
    let doc: Value =
        serde_json::from_slice(&fs::read(d.join("out/del.changes.json")).unwrap()).unwrap();
    let deleted: Vec<&str> = doc["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["change"] == "deleted")
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert_eq!(deleted, ["etc/dir", "etc/dir/f", "etc/it's gone"]);
    passed()
}

fn changes_to_another_packages_files_are_collisions() -> Outcome {
    let d = scratch("collide");
    fs::create_dir_all(d.join("root")).unwrap();
    ok(&install(
        &d,
        "first",
        &["--version", "1"],
        "mkdir -p \"$LAYERPACK_ROOT/etc\"; echo 1 > \"$LAYERPACK_ROOT/etc/shared.conf\"",
    ));
    let o = install(
        &d,
        "second",
        &["--version", "1"],
        "echo 2 >> \"$LAYERPACK_ROOT/etc/shared.conf\"",
    );
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("etc/shared.conf: touched by more than one package (first installed it, second changed it)"), "{err}");
    let o = install(
        &d,
        "third",
        &["--version", "1", "--strict"],
        "echo 3 >> \"$LAYERPACK_ROOT/etc/shared.conf\"",
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--strict"));
    assert!(!d.join("out/third_1_all.ipk").exists());
    assert!(!d.join("out/third.changes.json").exists());
    passed()
}

fn device_table_sets_modes_owners_and_adds_nodes() -> Outcome {
    let d = scratch("devtable");
    let table = d.join("perms.txt");
    fs::write(&table, "/usr/bin/hello f 4755 0 0 - - - - -\n/usr/bin r -1 10 20 - - - - -\n/dev/ttyS c 600 0 5 4 64 0 1 2\n").unwrap();
    hello(&d, &["--device-table", table.to_str().unwrap()]);
    let data = unpack_ar(&d.join("out/hello_1.0_all.ipk")).join("data.tar.gz");
    let py = python(
        "import tarfile,sys\nfor m in tarfile.open(sys.argv[1]):\n print(m.name, oct(m.mode), m.uid, m.gid, m.devmajor, m.devminor)",
        &data,
    );
    assert_eq!(
        py,
        "./dev/ttyS0 0o600 0 5 4 64\n./dev/ttyS1 0o600 0 5 4 65\n./usr 0o755 0 0 0 0\n./usr/bin 0o755 10 20 0 0\n./usr/bin/hello 0o4755 10 20 0 0\n"
    );
    passed()
}

/// Three packages, one of them in two versions: the golden `Packages`.
fn feed_index_matches_the_golden_file() -> Outcome {
    let d = scratch("feed");
    let content = d.join("content");
    fs::create_dir_all(content.join("usr/bin")).unwrap();
    fs::write(content.join("usr/bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
    for p in ["usr", "usr/bin", "usr/bin/tool"] {
        fs::set_permissions(content.join(p), fs::Permissions::from_mode(0o755)).unwrap();
    }
    backdate(&content).unwrap();
    let empty = d.join("empty");
    fs::create_dir(&empty).unwrap();
    let cs = layerpack_core::tree::diff_trees(&empty, &content, &Default::default()).unwrap();
    let opts = PackOptions {
        source_date_epoch: Some(1_700_000_000),
        owners: Owners::Root,
        ..PackOptions::default()
    };
    let plan = Plan::new(&cs, &content, &opts).unwrap();
    let feed_dir = d.join("feed");
    fs::create_dir_all(feed_dir.join("sub")).unwrap();
    for (name, version, arch, depends, out) in [
        ("alpha", "1.0", "all", None, feed_dir.clone()),
        (
            "beta",
            "2.0-r1",
            "arm_cortex-a7",
            Some("alpha"),
            feed_dir.clone(),
        ),
        (
            "beta",
            "10.0-r1",
            "arm_cortex-a7",
            Some("alpha (>= 1.0)"),
            feed_dir.join("sub"),
        ),
        ("gamma", "1:0.1", "all", None, feed_dir.clone()),
    ] {
        let f = MetaFields {
            version: Some(version.into()),
            architecture: Some(arch.into()),
            maintainer: Some("Feed Test <feed@example.org>".into()),
            description: Some(format!("{name} test package\nSecond line.")),
            depends: depends.map(str::to_string),
            ..MetaFields::default()
        };
        let meta = PackageMeta::resolve(name, &f).unwrap();
        pack::write_package(Format::Ipk, &meta, &plan, &opts, &out).unwrap();
    }
    let o = lp(&d, &["index", feed_dir.to_str().unwrap()]);
    ok(&o);
    let got = fs::read_to_string(feed_dir.join("Packages")).unwrap();
    let golden_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/Packages");
    if std::env::var_os("LAYERPACK_BLESS").is_some() {
        fs::write(&golden_path, &got).unwrap();
    }
    let golden = fs::read_to_string(&golden_path).unwrap();
    assert_eq!(
        got, golden,
        "Packages differs from tests/golden/Packages (LAYERPACK_BLESS=1 rewrites it)"
    );
    let mut gz = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(&fs::read(feed_dir.join("Packages.gz")).unwrap()[..]),
        &mut gz,
    )
    .unwrap();
    assert_eq!(gz, got.as_bytes());
    // Deterministic: a second run writes the same bytes.
    ok(&lp(&d, &["index", feed_dir.to_str().unwrap()]));
    assert_eq!(fs::read_to_string(feed_dir.join("Packages")).unwrap(), got);
    passed()
}

/// Scenarios whose result a package can express: owners other than root
/// (6), xattrs (7) and failed installs (24) are not.
fn expressible(id: u32) -> bool {
    !matches!(id, 6 | 7 | 24)
}

fn apply_round_trip_for_every_expressible_scenario() -> Outcome {
    if let Some(skip) = missing(READERS) {
        return skip;
    }
    let work = scratch("roundtrip");
    let registry = builtin_registry();
    let backend = registry
        .create("snapshot", &BackendConfig::empty("snapshot"))
        .unwrap();
    let mut failures = Vec::new();
    let mut ran = 0;
    for sc in scenarios::all() {
        if !expressible(sc.id) {
            continue;
        }
        if let Some(why) = sc.skip_reason(&backend.capabilities(), &work) {
            eprintln!("round trip {}: skipped: {why}", sc.test_name());
            continue;
        }
        ran += 1;
        if let Err(e) = round_trip(&*backend, &sc, &work.join(sc.test_name())) {
            failures.push(format!("{}: {e}", sc.test_name()));
        }
    }
    assert!(ran >= 19, "only {ran} scenarios ran");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    passed()
}

/// dpkg-deb reads the ipk; Python's tarfile sees exactly the planned
/// entries (names as bytes, modes, owners, link targets, sizes); GNU tar and
/// bsdtar list the same number of entries, and the same names where they
/// are printable.
fn check_with_independent_readers(ipk: &Path, plan: &Plan) -> Result<(), String> {
    use base64::Engine;
    use layerpack_core::model::FileKind;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    for flag in ["-c", "-I"] {
        let o = tool("dpkg-deb", &[flag, ipk.to_str().unwrap()]);
        if !o.status.success() {
            return Err(format!(
                "dpkg-deb {flag}: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
    }
    let data = unpack_ar(ipk).join("data.tar.gz");
    let expected: Vec<Value> = plan
        .entries()
        .map(|en| {
            let name = [b"./".as_slice(), en.path.as_bytes()].concat();
            let (ty, link) = match (en.hardlink_to(), en.kind()) {
                (Some(first), _) => ("1", [b"./".as_slice(), first.as_bytes()].concat()),
                (None, FileKind::Symlink) => ("2", en.link_target().unwrap().to_vec()),
                (None, FileKind::Dir) => ("5", vec![]),
                (None, FileKind::CharDevice) => ("3", vec![]),
                (None, FileKind::BlockDevice) => ("4", vec![]),
                (None, FileKind::Fifo) => ("6", vec![]),
                _ => ("0", vec![]),
            };
            let size = if ty == "0" { en.size() } else { 0 };
            serde_json::json!([b64(&name), en.mode, en.uid, en.gid, ty, b64(&link), size])
        })
        .collect();
    let py = python(
        "import tarfile,sys,json,base64,os\nout=[]\nfor m in tarfile.open(sys.argv[1], encoding='utf-8', errors='surrogateescape'):\n n=os.fsencode(m.name)\n n=n if n.startswith(b'./') else b'./'+n\n out.append([base64.b64encode(n).decode(), m.mode, m.uid, m.gid, m.type.decode(), base64.b64encode(os.fsencode(m.linkname)).decode(), m.size])\nprint(json.dumps(out))",
        &data,
    );
    let got: Vec<Value> = serde_json::from_str(&py).map_err(|x| x.to_string())?;
    if got != expected {
        return Err(format!(
            "python tarfile sees {got:?}, the plan is {expected:?}"
        ));
    }
    let printable = plan
        .entries()
        .all(|en| en.path.as_bytes().iter().all(|b| (0x21..0x7f).contains(b)));
    let data_arg = data.to_str().unwrap();
    for (cmd, args) in [
        ("tar", vec!["--quoting-style=escape", "-tzf", data_arg]),
        ("bsdtar", vec!["-tzf", data_arg]),
    ] {
        let o = tool(cmd, &args);
        if !o.status.success() {
            return Err(format!("{cmd}: {}", String::from_utf8_lossy(&o.stderr)));
        }
        let lines: Vec<&[u8]> = o
            .stdout
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        if lines.len() != plan.len() && printable {
            return Err(format!(
                "{cmd} lists {} entries, the plan has {}",
                lines.len(),
                plan.len()
            ));
        }
        if printable {
            for (l, en) in lines.iter().zip(plan.entries()) {
                let mut want = [b"./".as_slice(), en.path.as_bytes()].concat();
                if en.kind() == FileKind::Dir {
                    want.push(b'/');
                }
                if *l != want.as_slice() {
                    return Err(format!(
                        "{cmd} lists {:?}, expected {:?}",
                        String::from_utf8_lossy(l),
                        String::from_utf8_lossy(&want)
                    ));
                }
            }
        }
    }
    Ok(())
}

fn round_trip(
    backend: &dyn LayerBackend,
    sc: &scenarios::Scenario,
    dir: &Path,
) -> Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    for sub in ["base", "reference", "target", "session", "out"] {
        fs::create_dir_all(dir.join(sub)).map_err(|x| e(&x))?;
    }
    for sub in ["base", "reference", "target"] {
        (sc.setup)(&dir.join(sub)).map_err(|x| e(&x))?;
        backdate(&dir.join(sub)).map_err(|x| e(&x))?;
    }
    let spec = SessionSpec {
        package: "rt".into(),
        base: fs::canonicalize(dir.join("base")).map_err(|x| e(&x))?,
        dir: dir.join("session"),
        state: Default::default(),
    };
    let begun = backend.begin(&spec).map_err(|x| e(&x))?;
    let spec = SessionSpec {
        state: begun.state,
        ..spec
    };
    (sc.act)(&begun.merged).map_err(|x| e(&x))?;
    (sc.act)(&dir.join("reference")).map_err(|x| e(&x))?;
    backend.freeze(&spec).map_err(|x| e(&x))?;
    let merged = backend.content_root(&spec).map_err(|x| e(&x))?;
    let cs = backend
        .changes(&spec, &ChangeOptions::default())
        .map_err(|x| e(&x))?;
    let opts = PackOptions {
        owners: Owners::Keep,
        ..PackOptions::default()
    };
    let plan = Plan::new(&cs, &merged, &opts).map_err(|x| e(&x))?;
    let meta = PackageMeta::resolve(
        "rt",
        &MetaFields {
            version: Some("1".into()),
            ..MetaFields::default()
        },
    )
    .map_err(|x| e(&x))?;
    let ipk = pack::write_package(Format::Ipk, &meta, &plan, &opts, &dir.join("out"))
        .map_err(|x| e(&x))?;
    backend.move_down(&spec).map_err(|x| e(&x))?;
    check_with_independent_readers(&ipk, &plan)?;
    let a = apply::apply(&ipk, &dir.join("target")).map_err(|x| e(&x))?;
    if !a.refused.is_empty() {
        return Err(format!("refused: {:?}", a.refused));
    }
    compare_trees(&dir.join("reference"), &dir.join("target"))
}

/// (name, type, link target, data) of one crafted tar entry.
type Crafted<'a> = (&'a [u8], TarKind, &'a [u8], &'a [u8]);

fn hostile(name: &str, entries: &[Crafted<'_>]) -> PathBuf {
    let d = scratch(name);
    let mut w = TarWriter::new(Vec::new());
    for (path, kind, link, data) in entries {
        let h = TarHeader {
            name: path,
            kind: *kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: data.len() as u64,
            mtime: 0,
            link,
            dev: (0, 0),
        };
        w.header(&h).unwrap();
        if *kind == TarKind::File {
            w.data(*data, data.len() as u64).unwrap();
        }
    }
    let tar = w.finish().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let path = d.join("evil.tar.gz");
    fs::write(&path, gz.finish().unwrap()).unwrap();
    fs::create_dir(d.join("root")).unwrap();
    fs::create_dir(d.join("outside")).unwrap();
    path
}

fn hostile_archives_never_write_outside_the_root() -> Outcome {
    let outside_abs = |p: &Path| p.parent().unwrap().join("outside");
    let pkg = hostile(
        "hostile",
        &[
            (b"./ok", TarKind::File, b"", b"fine"),
            (b"../outside/dotdot", TarKind::File, b"", b"x"),
            (
                b"/tmp/absolute-from-layerpack-test",
                TarKind::File,
                b"",
                b"x",
            ),
            (b"./a/../../outside/sneaky", TarKind::File, b"", b"x"),
            (b"./esc", TarKind::Symlink, b"../outside", b""),
            (b"./esc/through-relative", TarKind::File, b"", b"x"),
            (b"./abs", TarKind::Symlink, b"/", b""),
            (b"./abs/tmp/through-absolute", TarKind::File, b"", b"x"),
            (b"./hl", TarKind::HardLink, b"../outside/victim", b""),
            (b"./esc", TarKind::File, b"", b"replaced the symlink"),
        ],
    );
    let d = pkg.parent().unwrap().to_path_buf();
    fs::write(d.join("outside/victim"), b"victim").unwrap();
    let root = d.join("root");
    let a = apply::apply(&pkg, &root).unwrap();
    let refused = a.refused.join("\n");
    for what in [
        "../outside/dotdot",
        "/tmp/absolute",
        "a/../../outside/sneaky",
        "esc/through-relative",
        "abs/tmp/through-absolute",
        "./hl",
    ] {
        assert!(refused.contains(what), "{what} not refused:\n{refused}");
    }
    assert_eq!(fs::read(root.join("ok")).unwrap(), b"fine");
    assert_eq!(fs::read(root.join("esc")).unwrap(), b"replaced the symlink");
    let outside: Vec<_> = fs::read_dir(outside_abs(&root))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(outside, ["victim"]);
    assert_eq!(fs::read(d.join("outside/victim")).unwrap(), b"victim");
    assert!(!Path::new("/tmp/absolute-from-layerpack-test").exists());
    assert!(!Path::new("/tmp/through-absolute").exists());
    // The command line reports it and fails.
    let o = lp(
        &d,
        &[
            "apply",
            pkg.to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("refused"));
    passed()
}

fn oci_layer_uses_whiteouts_and_refuses_wh_names() -> Outcome {
    if let Some(skip) = missing(READERS) {
        return skip;
    }
    let d = scratch("oci");
    let root = d.join("root");
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/gone"), b"g").unwrap();
    ok(&install(
        &d,
        "oo",
        &["--version", "1", "--format", "oci"],
        "rm \"$LAYERPACK_ROOT/etc/gone\"; echo n > \"$LAYERPACK_ROOT/etc/new\"",
    ));
    let layer = d.join("out/oo_1_all.oci-layer.tar");
    let list = ok(&tool("tar", &["-tf", layer.to_str().unwrap()]));
    assert_eq!(list, "etc/\netc/.wh.gone\netc/new\n");
    let o = install(
        &d,
        "ww",
        &["--version", "1", "--format", "oci"],
        "echo > \"$LAYERPACK_ROOT/etc/.wh.real\"",
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("etc/.wh.real"));
    ok(&lp(&d, &["abort", "ww"]));
    // apply honours the whiteout.
    let target = d.join("target");
    fs::create_dir_all(target.join("etc")).unwrap();
    fs::write(target.join("etc/gone"), b"g").unwrap();
    apply::apply(&layer, &target).unwrap();
    assert!(!target.join("etc/gone").exists());
    assert_eq!(fs::read(target.join("etc/new")).unwrap(), b"n\n");
    passed()
}

fn dpkg_extracts_the_deb_to_the_same_tree_as_apply() -> Outcome {
    if let Some(skip) = missing(READERS) {
        return skip;
    }
    let d = scratch("deb");
    fs::create_dir_all(d.join("root")).unwrap();
    ok(&install(&d, "tree", &["--version", "1.0", "--format", "deb"], "cd \"$LAYERPACK_ROOT\" && mkdir -p usr/lib usr/bin && echo lib > usr/lib/libx.so.1 && ln -s libx.so.1 usr/lib/libx.so && printf '#!/bin/sh\\n' > usr/bin/t && chmod 755 usr/bin/t && ln usr/bin/t usr/bin/t2"));
    let deb = d.join("out/tree_1.0_all.deb");
    ok(&tool(
        "dpkg-deb",
        &[
            "-x",
            deb.to_str().unwrap(),
            d.join("by-dpkg").to_str().unwrap(),
        ],
    ));
    fs::create_dir(d.join("by-apply")).unwrap();
    apply::apply(&deb, &d.join("by-apply")).unwrap();
    compare_trees(&d.join("by-dpkg"), &d.join("by-apply")).unwrap();
    compare_trees(&d.join("root"), &d.join("by-apply")).unwrap();
    passed()
}

/// Bytes a file occupies on disk.
fn on_disk(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(p).unwrap().blocks() * 512
}

fn sparse_files_stay_sparse_through_capture_packing_apply_and_gnu_tar() -> Outcome {
    if let Some(skip) = missing(READERS) {
        return skip;
    }
    let d = scratch("sparse");
    fs::create_dir_all(d.join("root")).unwrap();
    // 10 GiB, 8 KiB of data in the middle: offsets and the size need GNU
    // base-256 numbers.
    ok(&install(
        &d,
        "disk",
        &["--version", "1"],
        r#"set -e; mkdir -p "$LAYERPACK_ROOT/var"; f="$LAYERPACK_ROOT/var/disk.img"
           truncate -s 10G "$f"; printf '%8192s' data | dd of="$f" bs=4096 seek=2000000 conv=notrunc status=none"#,
    ));
    let src = d.join("root/var/disk.img");
    if on_disk(&src) > 1 << 20 {
        return Ok(layerpack_tests::Completion::ignored_with(
            "the scratch filesystem does not keep holes",
        ));
    }
    let ipk = d.join("out/disk_1_all.ipk");
    let size = fs::metadata(&ipk).unwrap().len();
    assert!(
        size < 64 * 1024,
        "the ipk holds the data, not the holes: {size} bytes"
    );
    let data = unpack_ar(&ipk).join("data.tar.gz");
    let check = |what: &str, f: &Path| {
        let md = fs::metadata(f).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(md.len(), 10 << 30, "{what}: size");
        assert!(
            on_disk(f) <= 1 << 20,
            "{what}: {} bytes on disk",
            on_disk(f)
        );
        let mut h = fs::File::open(f).unwrap();
        use std::io::{Read, Seek};
        h.seek(std::io::SeekFrom::Start(2_000_000 * 4096)).unwrap();
        let mut buf = vec![0u8; 8192];
        h.read_exact(&mut buf).unwrap();
        assert_eq!(&buf[8188..], b"data", "{what}: the data is where it was");
    };
    let by_tar = d.join("by-tar");
    fs::create_dir(&by_tar).unwrap();
    ok(&tool(
        "tar",
        &[
            "-xzf",
            data.to_str().unwrap(),
            "-C",
            by_tar.to_str().unwrap(),
        ],
    ));
    check("GNU tar", &by_tar.join("var/disk.img"));
    let listed = ok(&tool("bsdtar", &["-tvf", data.to_str().unwrap()]));
    assert!(listed.contains("10737418240"), "{listed}");
    let py = python(
        "import tarfile,sys\nm=tarfile.open(sys.argv[1]).getmember('./var/disk.img')\nprint(m.size, m.issparse())",
        &data,
    );
    assert_eq!(py.trim(), "10737418240 True");
    let by_apply = d.join("by-apply");
    fs::create_dir(&by_apply).unwrap();
    ok(&lp(
        &d,
        &[
            "apply",
            ipk.to_str().unwrap(),
            "--root",
            by_apply.to_str().unwrap(),
        ],
    ));
    check("apply", &by_apply.join("var/disk.img"));
    let doc: Value =
        serde_json::from_slice(&fs::read(d.join("out/disk.changes.json")).unwrap()).unwrap();
    let sha = python(
        "import hashlib,sys\nprint(hashlib.file_digest(open(sys.argv[1],'rb'),'sha256').hexdigest())",
        &src,
    );
    let rec = doc["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["path"] == "var/disk.img")
        .unwrap();
    assert_eq!(
        rec["sha256"].as_str().unwrap(),
        sha.split_whitespace().next().unwrap(),
        "the hash counts the holes as the zeros they read as"
    );
    passed()
}

layerpack_tests::test_main!(
    sparse_files_stay_sparse_through_capture_packing_apply_and_gnu_tar,
    hello_ipk_is_read_by_dpkg_deb_tar_bsdtar_and_python,
    same_layer_and_epoch_give_identical_bytes_across_roots,
    ipk_and_ipk_openwrt_together_are_refused,
    openwrt_ipk_is_a_gzipped_tar_of_the_three_members,
    missing_version_is_an_error_only_when_a_format_was_asked_for,
    names_outside_the_ipk_alphabet_are_mapped_and_said,
    deletions_go_into_postinst_and_the_postinst_removes_exactly_them,
    changes_to_another_packages_files_are_collisions,
    device_table_sets_modes_owners_and_adds_nodes,
    feed_index_matches_the_golden_file,
    apply_round_trip_for_every_expressible_scenario,
    hostile_archives_never_write_outside_the_root,
    oci_layer_uses_whiteouts_and_refuses_wh_names,
    dpkg_extracts_the_deb_to_the_same_tree_as_apply,
);
