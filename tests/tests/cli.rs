//! End-to-end tests of the `layerpack` binary: the command-line contract
//! of DESIGN.md, exit codes, outputs, and bad input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use layerpack_tests::{layerpack_bin, missing, passed, Need, Outcome};
use serde_json::Value;

struct Env {
    dir: PathBuf,
}

impl Env {
    fn new(name: &str) -> Env {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("cli-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("root")).unwrap();
        fs::create_dir_all(dir.join("out")).unwrap();
        Env { dir }
    }
    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }
    fn out(&self) -> PathBuf {
        self.dir.join("out")
    }
    fn cmd(&self) -> Command {
        let mut c = Command::new(layerpack_bin());
        c.current_dir(self.out())
            .env("LAYERPACK_STATE_DIR", self.dir.join("state"))
            .env_remove("LAYERPACK_CONFIG")
            .stdin(Stdio::null());
        c
    }
    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn session_count(e: &Env) -> usize {
    fs::read_dir(e.dir.join("state/sessions"))
        .map(|d| {
            d.filter(|x| x.as_ref().is_ok_and(|x| x.path().is_dir()))
                .count()
        })
        .unwrap_or(0)
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn root_arg(e: &Env) -> String {
    e.root().to_str().unwrap().to_string()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&fs::read(p).unwrap()).unwrap()
}

fn tree_listing(root: &Path) -> Vec<String> {
    let mut v = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
            let len = e.metadata().unwrap().len();
            v.push(format!("{} {len}", e.path().display()));
        }
    }
    v.sort();
    v
}

fn run_hello_writes_manifest_and_file_list() -> Outcome {
    let e = Env::new("hello");
    let o = e.run(&[
        "run",
        "hello",
        "--root",
        &root_arg(&e),
        "--",
        "sh",
        "-c",
        r#"mkdir -p "$LAYERPACK_ROOT/usr/bin" && echo hi > "$LAYERPACK_ROOT/usr/bin/hello" && test "$LAYERPACK_PACKAGE" = hello"#,
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let doc = read_json(&e.out().join("hello.changes.json"));
    let changes = doc["changes"].as_array().unwrap();
    let got: Vec<(&str, &str)> = changes
        .iter()
        .map(|c| (c["path"].as_str().unwrap(), c["change"].as_str().unwrap()))
        .collect();
    assert_eq!(
        got,
        [
            ("usr", "added"),
            ("usr/bin", "added"),
            ("usr/bin/hello", "added")
        ]
    );
    assert_eq!(
        changes[2]["sha256"],
        "98ea6e4f216f2fb4b69fff9b3a44842c38686ca685f3f55dc48c5d3fb1107be4"
    );
    assert_eq!(changes[2]["type"], "file");
    assert_eq!(changes[0]["type"], "dir");
    let list = fs::read_to_string(e.out().join("packages-file-list.txt")).unwrap();
    assert_eq!(list, "hello,./usr/bin/hello\n");
    passed()
}

fn init_and_final_survive_a_killed_install() -> Outcome {
    let e = Env::new("kill");
    let o = e.run(&["init", "pkg", "--root", &root_arg(&e)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let merged = String::from_utf8(o.stdout).unwrap().trim_end().to_string();
    assert_eq!(Path::new(&merged), fs::canonicalize(e.root()).unwrap());
    let mut install = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "mkdir -p '{merged}/opt' && echo partial > '{merged}/opt/f' && touch '{merged}/ready' && sleep 60"
        ))
        .spawn()
        .unwrap();
    while !e.root().join("ready").exists() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    install.kill().unwrap(); // SIGKILL
    install.wait().unwrap();
    let o = e.run(&["--json", "final", "pkg"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let line: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(line["type"], "final");
    assert_eq!(line["summary"]["added"], 3);
    // The session is gone: a second final fails cleanly.
    let o = e.run(&["final", "pkg"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("no open session"), "{}", stderr(&o));
    passed()
}

fn failed_command_exits_with_its_status_and_keeps_the_layer() -> Outcome {
    let e = Env::new("fail");
    fs::create_dir(e.root().join("opt")).unwrap();
    let o = e.run(&[
        "run",
        "broken",
        "--root",
        &root_arg(&e),
        "--",
        "sh",
        "-c",
        r#"for f in f1 f2 f3; do echo $f > "$LAYERPACK_ROOT/opt/$f"; done; exit 3"#,
    ]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("cannot discard"), "{err}");
    assert!(err.contains("3 changes"), "{err}");
    for f in ["opt/f1", "opt/f2", "opt/f3"] {
        assert!(err.contains(f), "{err}");
    }
    assert!(!e.out().join("broken.changes.json").exists());
    let o = e.run(&["status"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("broken\tsnapshot\topen"));
    let o = e.run(&["final", "broken"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let doc = read_json(&e.out().join("broken.changes.json"));
    assert_eq!(doc["changes"].as_array().unwrap().len(), 3);
    passed()
}

fn missing_command_is_status_127_and_the_session_is_kept() -> Outcome {
    let e = Env::new("nocmd");
    let o = e.run(&[
        "run",
        "p",
        "--root",
        &root_arg(&e),
        "--",
        "/nonexistent/cmd",
    ]);
    assert_eq!(code(&o), 127, "{}", stderr(&o));
    assert!(stderr(&o).contains("/nonexistent/cmd"));
    assert_eq!(code(&e.run(&["abort", "p"])), 0);
    passed()
}

fn usage_errors_exit_2() -> Outcome {
    let e = Env::new("usage");
    for args in [
        vec!["init", "a/b", "--root", "x"],
        vec!["init", "..", "--root", "x"],
        vec!["final", "../x"],
        vec!["init", "p"],
        vec!["frobnicate"],
        vec!["run", "p", "--root", "x"],
        vec!["final", "p", "--keep", "--discard"],
    ] {
        let o = e.run(&args);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
    }
    assert_eq!(session_count(&e), 0);
    passed()
}

fn bad_roots_exit_1_and_name_the_path() -> Outcome {
    let e = Env::new("roots");
    fs::write(e.dir.join("file"), b"x").unwrap();
    for (root, what) in [
        (e.dir.join("missing"), "missing"),
        (e.dir.join("file"), "not a directory"),
    ] {
        let o = e.run(&["init", "p", "--root", root.to_str().unwrap()]);
        assert_eq!(code(&o), 1);
        let err = stderr(&o);
        assert!(
            err.contains(root.to_str().unwrap()) && err.contains(what) || err.contains("missing"),
            "{err}"
        );
    }
    assert_eq!(session_count(&e), 0);
    passed()
}

fn unreadable_root_exits_1() -> Outcome {
    let e = Env::new("unreadable");
    let locked = e.dir.join("locked");
    fs::create_dir(&locked).unwrap();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    let state = e.dir.join("state-nobody");
    fs::create_dir(&state).unwrap();
    fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).unwrap();
    let mut cmd = e.cmd();
    cmd.args(["init", "p", "--root", locked.to_str().unwrap()])
        .env("LAYERPACK_STATE_DIR", &state)
        .current_dir("/");
    if nix::unistd::geteuid().is_root() {
        // Root reads anything: check as an unprivileged user.
        use std::os::unix::process::CommandExt;
        fs::set_permissions(&e.dir, fs::Permissions::from_mode(0o755)).unwrap();
        cmd.uid(65534).gid(65534);
    }
    let o = cmd.output().unwrap();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("locked"), "{}", stderr(&o));
    assert!(stderr(&o).contains("ermission denied"), "{}", stderr(&o));
    passed()
}

fn second_init_and_final_without_init_exit_1() -> Outcome {
    let e = Env::new("twice");
    assert_eq!(code(&e.run(&["init", "p", "--root", &root_arg(&e)])), 0);
    let o = e.run(&["init", "p", "--root", &root_arg(&e)]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("already has an open session"),
        "{}",
        stderr(&o)
    );
    let o = e.run(&["final", "q"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("layerpack init q"), "{}", stderr(&o));
    assert_eq!(code(&e.run(&["abort", "p"])), 0);
    passed()
}

fn corrupt_session_exits_1_and_abort_recovers() -> Outcome {
    let e = Env::new("corrupt");
    assert_eq!(code(&e.run(&["init", "p", "--root", &root_arg(&e)])), 0);
    let file = e.dir.join("state/sessions/p/session.json");
    let text = fs::read(&file).unwrap();
    fs::write(&file, &text[..text.len() / 3]).unwrap();
    let before = tree_listing(&e.root());
    let o = e.run(&["final", "p"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("corrupt"), "{}", stderr(&o));
    assert!(stderr(&o).contains("session.json"), "{}", stderr(&o));
    assert_eq!(tree_listing(&e.root()), before);
    assert!(!e.out().join("p.changes.json").exists());
    let o = e.run(&["--json", "status"]);
    let lines: Vec<Value> = o
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(lines[0]["type"], "status");
    assert_eq!(lines[1]["kind"], "corrupt");
    assert_eq!(code(&e.run(&["abort", "p"])), 0);
    assert_eq!(code(&e.run(&["init", "p", "--root", &root_arg(&e)])), 0);
    passed()
}

/// A misspelt backend section or key used to be ignored (a typo in
/// `[backends.overlay]` silently gave a merged directory) or reported at
/// the section's header; each now fails at its own line, whichever command
/// runs and whichever backend it uses.
fn misspelt_backend_sections_and_keys_fail_at_their_line() -> Outcome {
    let e = Env::new("config-typos");
    let cfg = e.dir.join("layerpack.toml");
    for (text, words) in [
        (
            "backend = \"snapshot\"\n\n[backends.overlay]\nin_place = true\n",
            &[
                "line 3",
                "[backends.overlay]",
                "did you mean 'overlayfs'",
                "known backends",
            ][..],
        ),
        (
            "[backends.nonesuch]\n",
            &[
                "line 1",
                "no backend is called 'nonesuch'",
                "snapshot, overlayfs",
            ][..],
        ),
        (
            "[backends.overlayfs]\nin_place = true\nin_plase = false\n",
            &["line 3", "[backends.overlayfs]", "in_plase"][..],
        ),
        (
            "[backends.snapshot]\nhash_all = true\n\nxatrs = false\n",
            &["line 4", "xatrs"][..],
        ),
        (
            "[packages.foo]\nversion = \"1\"\nverison = \"2\"\n",
            &["line 3", "verison"][..],
        ),
    ] {
        fs::write(&cfg, text).unwrap();
        // Even a command that uses no backend section reads them all.
        for args in [vec!["status"], vec!["init", "p", "--root", &root_arg(&e)]] {
            let mut all = vec!["--config", cfg.to_str().unwrap()];
            all.extend(args.iter().copied());
            let o = e.run(&all);
            assert_eq!(code(&o), 1, "{text:?} {args:?}: {}", stderr(&o));
            for w in words {
                assert!(
                    stderr(&o).contains(w),
                    "{text:?}: {w:?} not in {}",
                    stderr(&o)
                );
            }
        }
    }
    assert_eq!(session_count(&e), 0);
    passed()
}

/// Limits are stated up front: a long name says the limit is its length
/// (not the alphabet), a name and version that cannot fit in a package
/// file name are refused at init and run (not at the end of final), and
/// `--arch` is checked like the other fields, and so is a name the
/// package's format cannot carry.
fn name_version_and_arch_limits_are_checked_before_anything_runs() -> Outcome {
    let e = Env::new("limits");
    let long = "a".repeat(240);
    let o = e.run(&["init", &long, "--root", &root_arg(&e)]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("240 bytes; at most 200"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("use letters"), "{}", stderr(&o));
    let name = "b".repeat(180);
    let version = format!("1{}", "0".repeat(62));
    for cmd in ["init", "run"] {
        let mut args = vec![cmd, &name, "--root", "root", "--version", &version];
        if cmd == "run" {
            args.extend(["--", "sh", "-c", "touch \"$LAYERPACK_ROOT/ran\""]);
        }
        let root = root_arg(&e);
        args[3] = &root;
        let o = e.run(&args);
        assert_eq!(code(&o), 1, "{cmd}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("at most 225 fit"),
            "{cmd}: {}",
            stderr(&o)
        );
    }
    assert!(!e.root().join("ran").exists(), "the install ran anyway");
    let o = e.run(&[
        "run",
        "ok1",
        "--root",
        &root_arg(&e),
        "--version",
        "1",
        "--arch",
        "arm/x",
        "--",
        "true",
    ]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not an opkg architecture"),
        "{}",
        stderr(&o)
    );
    // A name no package can carry is refused at init once a version says
    // a package will be written, and at run unless it writes none.
    for cmd in ["init", "run"] {
        let root = root_arg(&e);
        let mut args = vec![cmd, "t", "--root", &root, "--version", "1"];
        if cmd == "run" {
            args.extend(["--", "sh", "-c", "touch \"$LAYERPACK_ROOT/ran\""]);
        }
        let o = e.run(&args);
        assert_eq!(code(&o), 1, "{cmd}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("'t' cannot be mapped to an ipk name"),
            "{cmd}: {}",
            stderr(&o)
        );
    }
    assert!(!e.root().join("ran").exists(), "the install ran anyway");
    assert_eq!(session_count(&e), 0);
    let o = e.run(&[
        "run",
        "t",
        "--root",
        &root_arg(&e),
        "--version",
        "1",
        "--format",
        "none",
        "--out",
        "out",
        "--",
        "true",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(session_count(&e), 0);
    passed()
}

/// Lock files piled up in the state directory (one per name ever tried,
/// refused ones too) and one was left in every output directory.
fn no_lock_files_are_left_behind() -> Outcome {
    let e = Env::new("locks");
    let names = |d: &Path| -> Vec<String> {
        fs::read_dir(d)
            .map(|r| {
                r.map(|x| x.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".lock") && n != "state.lock")
                    .collect()
            })
            .unwrap_or_default()
    };
    for pkg in ["one", "two"] {
        let o = e.run(&[
            "run",
            pkg,
            "--root",
            &root_arg(&e),
            "--version",
            "1",
            "--out",
            "out",
            "--",
            "sh",
            "-c",
            &format!("echo {pkg} > \"$LAYERPACK_ROOT/{pkg}\""),
        ]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
    }
    let missing = e.dir.join("missing");
    for pkg in ["refused1", "refused2"] {
        let o = e.run(&["init", pkg, "--root", missing.to_str().unwrap()]);
        assert_eq!(code(&o), 1);
    }
    // An open session keeps its lock file; it goes with the session.
    let o = e.run(&["init", "open", "--root", &root_arg(&e)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(names(&e.dir.join("state/sessions")), ["open.lock"]);
    let o = e.run(&["abort", "open"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(names(&e.dir.join("state/sessions")).is_empty());
    let mut out = names(&e.out());
    out.extend(
        fs::read_dir(e.out())
            .unwrap()
            .map(|x| x.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.')),
    );
    assert!(out.is_empty(), "left in the output directory: {out:?}");
    passed()
}

/// JSON Lines on stdout: a `type` on every line, the schema `version` on
/// the first, for every command, whether it succeeds or fails (an error
/// is an object too), and `run --json` keeps a chatty install's output
/// off stdout.
fn every_command_speaks_json_lines_on_success_and_failure() -> Outcome {
    let e = Env::new("json");
    let root = root_arg(&e);
    fs::create_dir_all(e.dir.join("a")).unwrap();
    fs::create_dir_all(e.dir.join("b/x")).unwrap();
    fs::write(e.dir.join("nopkg"), b"not a package").unwrap();
    let out = e.out();
    let ipk = out.join("chatty_1_all.ipk");
    let at = |p: &str| e.dir.join(p).to_str().unwrap().to_string();
    let (a, b, nopkg, missing, outs) = (at("a"), at("b"), at("nopkg"), at("missing"), at("out"));
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (vec!["backends".into()], 0, "backend"),
        (vec!["status".into()], 0, "status"),
        (
            [
                "run",
                "chatty",
                "--root",
                &root,
                "--version",
                "1",
                "--out",
                &outs,
                "--",
                "sh",
                "-c",
                "echo hello-from-cmd; echo \"{not json\"; touch \"$LAYERPACK_ROOT/f\"",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            0,
            "final",
        ),
        (
            [
                "run",
                "failing",
                "--root",
                &root,
                "--",
                "sh",
                "-c",
                "echo chatty; exit 3",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            3,
            "run",
        ),
        (vec!["abort".into(), "failing".into()], 0, "abort"),
        (
            vec!["init".into(), "p".into(), "--root".into(), root.clone()],
            0,
            "init",
        ),
        (
            vec!["init".into(), "p".into(), "--root".into(), root.clone()],
            1,
            "error",
        ),
        (
            vec!["final".into(), "p".into(), "--out".into(), outs.clone()],
            0,
            "final",
        ),
        (vec!["final".into(), "p".into()], 1, "error"),
        (vec!["abort".into(), "nothing".into()], 1, "error"),
        (
            vec!["index".into(), out.to_str().unwrap().into()],
            0,
            "index",
        ),
        (vec!["index".into(), missing.clone()], 1, "error"),
        (
            vec![
                "apply".into(),
                ipk.to_str().unwrap().into(),
                "--root".into(),
                b.clone(),
            ],
            0,
            "apply",
        ),
        (
            vec!["apply".into(), nopkg, "--root".into(), b.clone()],
            1,
            "error",
        ),
        (vec!["diff".into(), a.clone(), b], 0, "change"),
        (vec!["diff".into(), a, missing], 1, "error"),
        (
            vec!["selftest".into(), "--backend".into(), "nonesuch".into()],
            1,
            "error",
        ),
        (vec!["frobnicate".into()], 2, "error"),
    ];
    for (args, want, last_type) in cases {
        let mut all = vec!["--json"];
        all.extend(args.iter().map(String::as_str));
        let o = e.run(&all);
        assert_eq!(code(&o), want, "{args:?}: {}", stderr(&o));
        let lines: Vec<Value> = o
            .stdout
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                serde_json::from_slice(l).unwrap_or_else(|err| {
                    panic!("{args:?}: not JSON ({err}): {}", String::from_utf8_lossy(l))
                })
            })
            .collect();
        assert!(!lines.is_empty(), "{args:?}: nothing on stdout");
        for l in &lines {
            assert!(l["type"].is_string(), "{args:?}: no type in {l}");
        }
        assert_eq!(lines[0]["version"], 1, "{args:?}: {}", lines[0]);
        let last = lines.last().unwrap();
        assert_eq!(last["type"], last_type, "{args:?}: {last}");
        if last_type == "error" {
            assert!(
                last["kind"].is_string() && last["message"].is_string(),
                "{last}"
            );
        }
        if args[0] == "run" {
            assert!(stderr(&o).contains("chatty") || stderr(&o).contains("hello-from-cmd"));
        }
    }
    passed()
}

/// `changes.json` is what `docs/changes.schema.json` says, checked by an
/// independent validator (Python's `jsonschema`) on a capture with every
/// kind of change and entry the machine allows: non-UTF-8 and newline
/// names, a symlink, a hard-link group, a fifo, an xattr, a modification,
/// a metadata-only change and a deletion (devices too, as root).
fn changes_json_follows_its_published_schema() -> Outcome {
    if let Some(skip) = missing(&[Need::Tool("python3")]) {
        return skip;
    }
    let e = Env::new("schema");
    fs::create_dir_all(e.root().join("etc")).unwrap();
    fs::write(e.root().join("etc/a"), b"old").unwrap();
    fs::write(e.root().join("etc/b"), b"b").unwrap();
    fs::write(e.root().join("etc/gone"), b"x").unwrap();
    let devices = if nix::unistd::geteuid().is_root() {
        "mknod \"$R/c\" c 1 3;"
    } else {
        ""
    };
    let script = format!(
        "R=$LAYERPACK_ROOT; echo new > \"$R/etc/a\"; chmod 600 \"$R/etc/b\"; rm \"$R/etc/gone\"; \
         printf x > \"$R/$(printf 'bad\\377name')\"; printf y > \"$R/new\nline\"; \
         ln -s etc/a \"$R/link\"; echo h > \"$R/h1\"; ln \"$R/h1\" \"$R/h2\"; mkfifo \"$R/fifo\"; {devices} \
         python3 -c \"import os; os.setxattr('$R/h1', 'user.test', b'1')\" 2>/dev/null; true"
    );
    let o = e.run(&[
        "run",
        "schema",
        "--root",
        &root_arg(&e),
        "--out",
        e.out().to_str().unwrap(),
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let doc = e.out().join("schema.changes.json");
    let schema = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/changes.schema.json");
    let check = Command::new("python3")
        .args([
            "-c",
            "import json,sys\ntry:\n import jsonschema\nexcept ImportError:\n sys.exit(77)\n\
             s=json.load(open(sys.argv[1])); d=json.load(open(sys.argv[2]))\n\
             jsonschema.Draft202012Validator.check_schema(s)\n\
             jsonschema.Draft202012Validator(s).validate(d)\nprint(len(d['changes']))",
            schema.to_str().unwrap(),
            doc.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    if check.status.code() == Some(77) {
        let required = layerpack_tests::required_backends();
        assert!(
            !required.iter().any(|r| r == "python3"),
            "LAYERPACK_REQUIRE includes python3, but its jsonschema module is missing"
        );
        return Ok(libtest_mimic::Completion::ignored_with(
            "python3 has no jsonschema module",
        ));
    }
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let n: usize = String::from_utf8_lossy(&check.stdout)
        .trim()
        .parse()
        .unwrap();
    assert!(n >= 10, "only {n} changes");
    // The schema's own claims, on the real output.
    let v = read_json(&doc);
    assert_eq!(v["schema_version"], 1);
    let kinds: Vec<&str> = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    for k in ["file", "symlink", "fifo"] {
        assert!(kinds.contains(&k), "{k} missing: {kinds:?}");
    }
    passed()
}

/// On a terminal (a pty made by `script`), every long step of a 200k-file
/// overlayfs capture shows its progress with its own label — reading the
/// layer (and hashing it), packing and compressing, folding; under
/// `--json` or `CI=true` the same capture draws nothing.
fn progress_is_drawn_on_a_terminal_for_each_step_and_never_in_json_or_ci() -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("overlayfs"), Need::Tool("script")]) {
        return skip;
    }
    let e = Env::new("progress");
    const FILES: usize = 200_000;
    let install = format!("cd \"$LAYERPACK_ROOT\" && mkdir d && cd d && seq 1 {FILES} | xargs touch && head -c 3000000 /dev/urandom > blob");
    for (mode, draws) in [("terminal", true), ("json", false), ("ci", false)] {
        let pkg = format!("p{mode}");
        let json = if mode == "json" { "--json" } else { "" };
        let line = format!(
            "{} {json} run {pkg} --root {} --backend overlayfs --version 1 --out {} -- sh -c '{install}'",
            layerpack_bin().display(),
            e.root().display(),
            e.out().display()
        );
        let mut cmd = Command::new("script");
        cmd.args(["-qec", &line, "/dev/null"])
            .env("LAYERPACK_STATE_DIR", e.dir.join("state"))
            .env("LAYERPACK_PROGRESS_DELAY_MS", "0")
            .env_remove("CI");
        if mode == "ci" {
            cmd.env("CI", "true");
        }
        let o = cmd.output().unwrap();
        assert!(
            o.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        let transcript = String::from_utf8_lossy(&o.stdout).replace('\r', "\n");
        for label in [
            "reading the layer".to_string(),
            format!("packing {} entries", FILES + 2),
            "folding the layer into".to_string(),
        ] {
            assert_eq!(
                transcript.contains(&format!("layerpack: {label}")),
                draws,
                "{mode}: {label}:\n{transcript}"
            );
        }
        // Whatever was drawn is cleared again.
        assert_eq!(transcript.contains("\x1b[K"), draws, "{mode}");
        fs::remove_dir_all(e.root().join("d")).unwrap();
    }
    passed()
}

fn config_errors_name_file_line_and_key() -> Outcome {
    let e = Env::new("config");
    let cfg = e.dir.join("layerpack.toml");
    fs::write(&cfg, "backend = \"snapshot\"\n\nhash_everything = true\n").unwrap();
    let o = e.run(&[
        "--config",
        cfg.to_str().unwrap(),
        "init",
        "p",
        "--root",
        &root_arg(&e),
    ]);
    assert_eq!(code(&o), 1);
    let err = stderr(&o);
    assert!(err.contains("layerpack.toml"), "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("hash_everything"), "{err}");
    fs::write(&cfg, "[backends.snapshot]\nracy = 1\n").unwrap();
    let o = e.run(&[
        "--config",
        cfg.to_str().unwrap(),
        "init",
        "p",
        "--root",
        &root_arg(&e),
    ]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("racy"), "{}", stderr(&o));
    assert!(stderr(&o).contains("[backends.snapshot]"), "{}", stderr(&o));
    let o = e.run(&["--config", "/nonexistent.toml", "status"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("/nonexistent.toml"));
    assert_eq!(session_count(&e), 0);
    passed()
}

fn example_config_is_valid() -> Outcome {
    let e = Env::new("example");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../layerpack.toml.example");
    let o = e.run(&["--config", example.to_str().unwrap(), "backends"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    passed()
}

fn unknown_backend_lists_known_ones() -> Outcome {
    let e = Env::new("backend");
    let o = e.run(&["init", "p", "--root", &root_arg(&e), "--backend", "zfs"]);
    assert_eq!(code(&o), 1);
    let err = stderr(&o);
    assert!(err.contains("unknown backend 'zfs'"), "{err}");
    assert!(err.contains("snapshot, overlayfs, fuse, aufs"), "{err}");
    passed()
}

fn backends_lists_every_backend_with_a_reason() -> Outcome {
    let e = Env::new("backends");
    let o = e.run(&["--json", "backends"]);
    assert_eq!(code(&o), 0);
    let lines: Vec<Value> = o
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let names: Vec<&str> = lines.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["snapshot", "overlayfs", "fuse", "aufs"]);
    assert_eq!(lines[0]["available"], true);
    for l in &lines {
        if l["available"] == false {
            assert!(!l["reason"].as_str().unwrap().is_empty());
        }
    }
    let kernel_has_aufs = fs::read_to_string("/proc/filesystems")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().last() == Some("aufs"));
    if !kernel_has_aufs {
        assert_eq!(lines[3]["available"], false);
        assert_eq!(lines[3]["reason"], "aufs not in /proc/filesystems");
    }
    passed()
}

fn diff_reports_changes_between_two_trees() -> Outcome {
    let e = Env::new("diff");
    let (a, b) = (e.dir.join("a"), e.dir.join("b"));
    fs::create_dir_all(a.join("etc")).unwrap();
    fs::create_dir_all(b.join("etc")).unwrap();
    fs::write(a.join("etc/same"), b"x").unwrap();
    fs::write(b.join("etc/same"), b"x").unwrap();
    let t = fs::metadata(a.join("etc/same"))
        .unwrap()
        .modified()
        .unwrap();
    fs::File::options()
        .write(true)
        .open(b.join("etc/same"))
        .unwrap()
        .set_modified(t)
        .unwrap();
    fs::write(a.join("etc/gone"), b"g").unwrap();
    fs::write(b.join("etc/new"), b"n").unwrap();
    let o = e.run(&["diff", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        String::from_utf8(o.stdout).unwrap(),
        "- etc/gone\n+ etc/new\n"
    );
    let o = e.run(&["--json", "diff", a.to_str().unwrap(), b.to_str().unwrap()]);
    let first: Value =
        serde_json::from_slice(o.stdout.split(|c| *c == b'\n').next().unwrap()).unwrap();
    assert_eq!(first["change"], "deleted");
    passed()
}

fn non_utf8_paths_are_exact_in_the_manifest() -> Outcome {
    use std::os::unix::ffi::OsStrExt;
    let e = Env::new("bytes");
    let o = e.run(&[
        "run",
        "bytes",
        "--root",
        &root_arg(&e),
        "--",
        "sh",
        "-c",
        r#"printf x > "$LAYERPACK_ROOT/$(printf 'a\377b')"; printf y > "$LAYERPACK_ROOT/$(printf 'new\nline')""#,
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let doc = read_json(&e.out().join("bytes.changes.json"));
    let paths: Vec<Vec<u8>> = doc["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| layerpack_core::jsonbytes::from_json(&c["path"]).unwrap())
        .collect();
    assert_eq!(paths, [b"a\xffb".to_vec(), b"new\nline".to_vec()]);
    assert!(fs::symlink_metadata(e.root().join(std::ffi::OsStr::from_bytes(b"a\xffb"))).is_ok());
    let list = fs::read(e.out().join("packages-file-list.txt")).unwrap();
    assert_eq!(list, b"bytes,./a\xffb\n");
    assert!(stderr(&o).contains("newline"), "{}", stderr(&o));
    passed()
}

fn file_list_replaces_a_packages_old_lines() -> Outcome {
    let e = Env::new("filelist");
    fs::write(
        e.out().join("packages-file-list.txt"),
        "other,./x\np,./stale\n",
    )
    .unwrap();
    let o = e.run(&[
        "run",
        "p",
        "--root",
        &root_arg(&e),
        "--",
        "sh",
        "-c",
        r#"echo > "$LAYERPACK_ROOT/f""#,
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let list = fs::read_to_string(e.out().join("packages-file-list.txt")).unwrap();
    assert_eq!(list, "other,./x\np,./f\n");
    passed()
}

fn parallel_finals_sharing_an_output_directory_keep_every_line() -> Outcome {
    let e = Env::new("parallel");
    let children: Vec<_> = (0..6)
        .map(|i| {
            let root = e.dir.join(format!("root{i}"));
            fs::create_dir_all(&root).unwrap();
            e.cmd()
                .args([
                    "run",
                    &format!("pkg{i}"),
                    "--root",
                    root.to_str().unwrap(),
                    "--",
                    "sh",
                    "-c",
                ])
                .arg(format!(
                    "for f in a b c; do echo > \"$LAYERPACK_ROOT/{i}$f\"; done"
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let list = fs::read_to_string(e.out().join("packages-file-list.txt")).unwrap();
    let mut lines: Vec<&str> = list.lines().collect();
    lines.sort();
    assert_eq!(lines.len(), 18, "{list}");
    for i in 0..6 {
        for f in ["a", "b", "c"] {
            assert!(
                lines.contains(&format!("pkg{i},./{i}{f}").as_str()),
                "{list}"
            );
        }
    }
    passed()
}

fn overlayfs_session_survives_a_lost_mount() -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("overlayfs")]) {
        return skip;
    }
    let e = Env::new("ovl-lost");
    fs::create_dir_all(e.root().join("etc")).unwrap();
    fs::write(e.root().join("etc/old"), b"old").unwrap();
    let o = e.run(&[
        "init",
        "ovl",
        "--root",
        &root_arg(&e),
        "--backend",
        "overlayfs",
        "--version",
        "1",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let merged = PathBuf::from(String::from_utf8(o.stdout).unwrap().trim_end());
    assert_ne!(merged, fs::canonicalize(e.root()).unwrap());
    fs::write(merged.join("etc/new"), b"new").unwrap();
    fs::remove_file(merged.join("etc/old")).unwrap();
    assert!(
        e.root().join("etc/old").exists(),
        "the root is untouched while mounted"
    );
    // A reboot loses the mount; the upper layer stays on disk.
    nix::mount::umount2(&merged, nix::mount::MntFlags::empty()).unwrap();
    let o = e.run(&["status"]);
    let status = String::from_utf8_lossy(&o.stdout);
    assert!(
        status.contains("mount lost") && status.contains("layerpack final ovl"),
        "{status}"
    );
    // final reads the upper layer directly and packages it.
    let o = e.run(&["final", "ovl"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let unpacked = e.dir.join("unpacked");
    fs::create_dir_all(&unpacked).unwrap();
    let ipk = e.out().join("ovl_1_all.ipk");
    let o = e.run(&[
        "apply",
        ipk.to_str().unwrap(),
        "--root",
        unpacked.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(fs::read(unpacked.join("etc/new")).unwrap(), b"new");
    assert_eq!(fs::read(e.root().join("etc/new")).unwrap(), b"new");
    assert!(!e.root().join("etc/old").exists());
    let doc = read_json(&e.out().join("ovl.changes.json"));
    let got: Vec<(&str, &str)> = doc["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["path"].as_str().unwrap(), c["change"].as_str().unwrap()))
        .collect();
    assert_eq!(got, [("etc/new", "added"), ("etc/old", "deleted")]);
    // A failed command under run discards: the root is as before.
    let o = e.run(&[
        "run",
        "bad",
        "--root",
        &root_arg(&e),
        "--backend",
        "overlayfs",
        "--",
        "sh",
        "-c",
        "echo x > \"$LAYERPACK_ROOT/etc/junk\"; exit 3",
    ]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("layer discarded"), "{}", stderr(&o));
    assert!(!e.root().join("etc/junk").exists());
    assert_eq!(session_count(&e), 0);
    passed()
}

/// `-q` leaves warnings and errors only; `-v` adds every change and the
/// time of each step; neither touches stdout (the paths written).
fn quiet_and_verbose_set_how_much_goes_to_stderr() -> Outcome {
    let e = Env::new("verbosity");
    let install =
        r#"d="$LAYERPACK_ROOT/$LAYERPACK_PACKAGE/bin" && mkdir -p "$d" && echo hi > "$d/x""#;
    let run = |flag: &str, pkg: &str| {
        let mut args = vec![];
        if !flag.is_empty() {
            args.push(flag);
        }
        let root = root_arg(&e);
        args.extend([
            "run",
            pkg,
            "--root",
            &root,
            "--version",
            "1",
            "--",
            "sh",
            "-c",
            install,
        ]);
        let o = e.run(&args);
        assert_eq!(code(&o), 0, "{flag}: {}", stderr(&o));
        o
    };
    // A capital letter in the name gives a warning: the package is
    // written as 'quiet'.
    let quiet = run("-q", "Quiet");
    let err = stderr(&quiet);
    assert!(
        err.contains("warning: package name 'Quiet' is written as 'quiet'"),
        "{err}"
    );
    assert!(
        !err.contains("added"),
        "-q still printed the summary:\n{err}"
    );
    assert!(
        !err.contains("folded"),
        "-q still printed the result:\n{err}"
    );
    assert!(String::from_utf8_lossy(&quiet.stdout).contains("quiet_1_all.ipk"));

    let normal = stderr(&run("", "normal"));
    assert!(
        normal.contains("layerpack: normal: 3 added, 0 modified"),
        "{normal}"
    );
    assert!(!normal.contains("  + normal/bin/x"), "{normal}");

    let verbose = stderr(&run("--verbose", "loud"));
    assert!(
        verbose.contains("layerpack: loud: 3 added, 0 modified"),
        "{verbose}"
    );
    assert!(verbose.contains("\n  + loud/bin/x\n"), "{verbose}");
    assert!(
        verbose
            .lines()
            .any(|l| l.starts_with("layerpack: packing 3 entries: ") && l.ends_with(" s")),
        "no step time:\n{verbose}"
    );
    let o = e.run(&["-q", "-v", "status"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    passed()
}

layerpack_tests::test_main!(
    quiet_and_verbose_set_how_much_goes_to_stderr,
    progress_is_drawn_on_a_terminal_for_each_step_and_never_in_json_or_ci,
    changes_json_follows_its_published_schema,
    every_command_speaks_json_lines_on_success_and_failure,
    no_lock_files_are_left_behind,
    name_version_and_arch_limits_are_checked_before_anything_runs,
    misspelt_backend_sections_and_keys_fail_at_their_line,
    run_hello_writes_manifest_and_file_list,
    init_and_final_survive_a_killed_install,
    failed_command_exits_with_its_status_and_keeps_the_layer,
    missing_command_is_status_127_and_the_session_is_kept,
    usage_errors_exit_2,
    bad_roots_exit_1_and_name_the_path,
    unreadable_root_exits_1,
    second_init_and_final_without_init_exit_1,
    corrupt_session_exits_1_and_abort_recovers,
    config_errors_name_file_line_and_key,
    example_config_is_valid,
    unknown_backend_lists_known_ones,
    backends_lists_every_backend_with_a_reason,
    diff_reports_changes_between_two_trees,
    non_utf8_paths_are_exact_in_the_manifest,
    file_list_replaces_a_packages_old_lines,
    parallel_finals_sharing_an_output_directory_keep_every_line,
    overlayfs_session_survives_a_lost_mount,
);
