//! Sessions tried as an attacker or a careless user would, through the
//! binary: one session per tree across state directories, nested roots
//! and aliases; abort of an unreadable in-place session; a state directory
//! moved away under an open session; a busy mount and a racing writer at
//! `final`; overlay markers on symlinks and symlinked ancestors in the
//! base. Each test has its own runtime directory (`LAYERPACK_RUNTIME_DIR`)
//! and state directories; those that need root or overlayfs are ignored
//! with the reason elsewhere.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use layerpack_core::scenarios::compare_trees;
use layerpack_tests::{layerpack_bin, missing, passed, Need, Outcome};
use serde_json::Value;

struct Env {
    dir: PathBuf,
    mounts: std::cell::RefCell<Vec<PathBuf>>,
}

impl Env {
    fn new(tag: &str) -> Env {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("safety-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("top/root/etc")).unwrap();
        fs::create_dir_all(dir.join("top/root/sub/inner")).unwrap();
        fs::write(dir.join("top/root/etc/a.conf"), b"a").unwrap();
        fs::write(dir.join("top/root/sub/inner/f"), b"f").unwrap();
        let dir = fs::canonicalize(&dir).unwrap();
        Env {
            dir,
            mounts: Default::default(),
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.join("top/root")
    }

    fn s(&self, p: &Path) -> String {
        p.to_str().unwrap().to_string()
    }

    /// `layerpack ARGS` with this test's runtime directory.
    fn lp(&self, args: &[&str]) -> Output {
        Command::new(layerpack_bin())
            .args(args)
            .current_dir(&self.dir)
            .env("LAYERPACK_RUNTIME_DIR", self.dir.join("run"))
            .env_remove("LAYERPACK_STATE_DIR")
            .env_remove("LAYERPACK_CONFIG")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// A config file making overlayfs mount on the root itself.
    fn in_place_config(&self) -> String {
        let cfg = self.dir.join("lp.toml");
        fs::write(&cfg, "[backends.overlayfs]\nin_place = true\n").unwrap();
        self.s(&cfg)
    }

    fn bind(&self, from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        nix::mount::mount(
            Some(from),
            to,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        self.mounts.borrow_mut().push(to.to_path_buf());
    }

    /// Mount lines that mention this test's directory.
    fn mounts_left(&self) -> Vec<String> {
        let d = self.dir.as_os_str().as_bytes();
        fs::read("/proc/self/mountinfo")
            .unwrap()
            .split(|b| *b == b'\n')
            .filter(|l| l.windows(d.len()).any(|w| w == d))
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Whatever a failing test left mounted goes too (innermost first),
        // so one failure does not leave mounts for the rest of the run.
        let left = layerpack_core::sys::mounts_referring_to(&self.dir).unwrap_or_default();
        for m in left {
            let at = PathBuf::from(std::ffi::OsStr::from_bytes(&m.mount_point));
            let _ = nix::mount::umount2(&at, nix::mount::MntFlags::MNT_DETACH);
        }
        for m in self.mounts.borrow().iter().rev() {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "exit {:?}: {}", o.status.code(), err(o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn refused(o: &Output, words: &[&str]) {
    assert_eq!(o.status.code(), Some(1), "{}", err(o));
    for w in words {
        assert!(err(o).contains(w), "{w:?} not in: {}", err(o));
    }
}

/// Finding 7: two state directories, nested roots and a symlinked alias
/// all reach the same tree; each second session is refused.
fn one_session_per_tree_across_state_dirs_nested_roots_and_aliases() -> Outcome {
    let e = Env::new("trees");
    let root = e.s(&e.root());
    ok(&e.lp(&["--state-dir", "s1", "init", "a", "--root", &root]));
    let same = e.lp(&["--state-dir", "s2", "init", "b", "--root", &root]);
    refused(&same, &["same tree", "layerpack final a"]);
    let inside = e.lp(&[
        "--state-dir",
        "s2",
        "init",
        "c",
        "--root",
        &format!("{root}/sub"),
    ]);
    refused(&inside, &["lies inside", "'a'"]);
    let top = e.s(&e.dir.join("top"));
    refused(
        &e.lp(&["--state-dir", "s2", "init", "d", "--root", &top]),
        &["contains"],
    );
    std::os::unix::fs::symlink(e.root(), e.dir.join("alias")).unwrap();
    refused(
        &e.lp(&["--state-dir", "s3", "init", "x", "--root", "alias"]),
        &["same tree"],
    );
    ok(&e.lp(&["--state-dir", "s1", "abort", "a"]));
    ok(&e.lp(&["--state-dir", "s2", "init", "b", "--root", &root]));
    ok(&e.lp(&["--state-dir", "s2", "abort", "b"]));
    passed()
}

/// Finding 7: a bind mount of a directory inside the root is the root's
/// tree, as a root and as a state directory.
fn bind_mount_aliases_of_a_root_are_caught() -> Outcome {
    if let Some(skip) = missing(&[Need::Root]) {
        return skip;
    }
    let e = Env::new("bind");
    let root = e.s(&e.root());
    let alias = e.dir.join("alias");
    e.bind(&e.root().join("sub"), &alias);
    ok(&e.lp(&["--state-dir", "s1", "init", "a", "--root", &root]));
    refused(
        &e.lp(&["--state-dir", "s2", "init", "b", "--root", &e.s(&alias)]),
        &["lies inside"],
    );
    ok(&e.lp(&["--state-dir", "s1", "abort", "a"]));
    // The state directory reached through the bind mount lies in the root.
    let o = e.lp(&[
        "--state-dir",
        &e.s(&alias.join("state")),
        "init",
        "c",
        "--root",
        &root,
    ]);
    refused(&o, &["is inside the root"]);
    assert!(
        !e.root().join("sub/state").exists(),
        "nothing created in the root"
    );
    passed()
}

/// Finding 5: `abort` of an in-place overlayfs session whose session.json
/// is corrupt deleted the base through the live bind mount. Now status,
/// final and abort all say what to do, abort unmounts, and the base is as
/// it was.
fn an_unreadable_in_place_session_is_unmounted_by_abort_and_the_base_kept() -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("overlayfs")]) {
        return skip;
    }
    let e = Env::new("corrupt");
    let reference = e.dir.join("reference");
    fs::create_dir_all(&reference).unwrap();
    Command::new("cp")
        .args(["-a", &format!("{}/.", e.s(&e.root())), &e.s(&reference)])
        .status()
        .unwrap();
    let c = e.in_place_config();
    let root = e.s(&e.root());
    let st = ["--config", c.as_str(), "--state-dir", "state"];
    let with = |args: &[&str]| e.lp(&[&st[..], args].concat());
    let merged = ok(&with(&[
        "init",
        "p",
        "--root",
        &root,
        "--backend",
        "overlayfs",
    ]));
    assert_eq!(merged.trim_end(), root);
    fs::write(e.root().join("etc/new"), b"through the overlay").unwrap();
    fs::write(e.dir.join("state/sessions/p/session.json"), b"{ not json").unwrap();

    let status = ok(&with(&["status"]));
    assert!(
        status.contains("broken") && status.contains("layerpack abort p"),
        "{status}"
    );
    refused(
        &with(&["final", "p", "--out", "out"]),
        &["layerpack abort p"],
    );
    let aborted = with(&["abort", "p"]);
    ok(&aborted);
    assert!(err(&aborted).contains("unmounted"), "{}", err(&aborted));
    assert!(e.mounts_left().is_empty(), "{:?}", e.mounts_left());
    compare_trees(&reference, &e.root()).unwrap();
    assert!(!e.dir.join("state/sessions/p").exists());
    // And the tree is free again.
    ok(&with(&["init", "q", "--root", &root]));
    ok(&with(&["abort", "q"]));
    passed()
}

/// Finding 5: a state directory moved away while an in-place session is
/// open left an overlay on the root and no hint; the next init names it.
fn a_state_dir_gone_under_an_open_session_is_named_at_the_next_init() -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("overlayfs")]) {
        return skip;
    }
    let e = Env::new("gone");
    let c = e.in_place_config();
    let root = e.s(&e.root());
    ok(&e.lp(&[
        "--config",
        &c,
        "--state-dir",
        "state",
        "init",
        "p",
        "--root",
        &root,
        "--backend",
        "overlayfs",
    ]));
    fs::rename(e.dir.join("state"), e.dir.join("moved")).unwrap();
    let o = e.lp(&["--state-dir", "state2", "init", "q", "--root", &root]);
    refused(&o, &["lost its state directory", "umount", &root]);
    // Clean up as the message says.
    nix::mount::umount2(&e.root(), nix::mount::MntFlags::empty()).unwrap();
    let lower = e.dir.join("moved/sessions/p/backend/lower");
    nix::mount::umount2(&lower, nix::mount::MntFlags::empty()).unwrap();
    ok(&e.lp(&["--state-dir", "state2", "init", "q", "--root", &root]));
    ok(&e.lp(&["--state-dir", "state2", "abort", "q"]));
    passed()
}

fn changes_json(out: &Path, pkg: &str) -> Vec<(String, String)> {
    let doc: Value =
        serde_json::from_slice(&fs::read(out.join(format!("{pkg}.changes.json"))).unwrap())
            .unwrap();
    doc["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["path"].as_str().unwrap().to_string(),
                c["change"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Finding 6: a file held open in the merged view makes `final` fail
/// before anything is written; the session stays open and usable.
fn final_refuses_a_busy_mount_before_writing_anything() -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("overlayfs")]) {
        return skip;
    }
    let e = Env::new("busy");
    let root = e.s(&e.root());
    let st = ["--state-dir", "state"];
    let with = |args: &[&str]| e.lp(&[&st[..], args].concat());
    let merged = PathBuf::from(
        ok(&with(&[
            "init",
            "pk",
            "--root",
            &root,
            "--backend",
            "overlayfs",
            "--version",
            "1",
        ]))
        .trim_end(),
    );
    let mut held = fs::File::create(merged.join("etc/held")).unwrap();
    std::io::Write::write_all(&mut held, b"written while held").unwrap();
    let out = e.dir.join("out");
    refused(
        &with(&["final", "pk", "--out", &e.s(&out)]),
        &["still uses it", "layerpack final pk"],
    );
    let written: Vec<_> = fs::read_dir(&out)
        .map(|d| d.map(|x| x.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(
        written.is_empty(),
        "written despite the refusal: {written:?}"
    );
    let status = ok(&with(&["status"]));
    assert!(
        status.contains("\topen\t") && status.ends_with("ok\n"),
        "{status}"
    );
    drop(held);
    ok(&with(&["final", "pk", "--out", &e.s(&out)]));
    assert_eq!(
        changes_json(&out, "pk"),
        [("etc/held".into(), "added".into())]
    );
    let unpacked = e.dir.join("unpacked");
    fs::create_dir(&unpacked).unwrap();
    ok(&e.lp(&[
        "apply",
        &e.s(&out.join("pk_1_all.ipk")),
        "--root",
        &e.s(&unpacked),
    ]));
    assert_eq!(
        fs::read(unpacked.join("etc/held")).unwrap(),
        b"written while held"
    );
    assert!(e.mounts_left().is_empty(), "{:?}", e.mounts_left());
    passed()
}

/// Finding 6: a writer that keeps creating files while `final` runs can
/// make it fail (busy) but never makes the package and the root differ.
fn a_writer_racing_final_never_makes_package_and_root_differ() -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("overlayfs")]) {
        return skip;
    }
    let e = Env::new("race");
    fs::create_dir_all(e.root().join("w")).unwrap();
    let root = e.s(&e.root());
    let st = ["--state-dir", "state"];
    let with = |args: &[&str]| e.lp(&[&st[..], args].concat());
    let merged = PathBuf::from(
        ok(&with(&[
            "init",
            "p",
            "--root",
            &root,
            "--backend",
            "overlayfs",
        ]))
        .trim_end(),
    );
    let mut writer = Command::new("sh")
        .args([
            "-c",
            "i=0; while [ $i -lt 3000 ]; do echo x > \"$1/w/f$i\" 2>/dev/null || exit 0; i=$((i+1)); done",
            "writer",
            &e.s(&merged),
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(30));
    let out = e.dir.join("out");
    let mut tries = 0;
    loop {
        let o = with(&["final", "p", "--out", &e.s(&out), "--format", "none"]);
        if o.status.success() {
            break;
        }
        assert!(err(&o).contains("still uses it"), "{}", err(&o));
        tries += 1;
        assert!(tries < 500, "final stayed busy");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    writer.wait().unwrap();
    let packaged: Vec<String> = changes_json(&out, "p")
        .into_iter()
        .map(|(p, c)| {
            assert_eq!(c, "added");
            p
        })
        .collect();
    let mut in_root: Vec<String> = fs::read_dir(e.root().join("w"))
        .unwrap()
        .map(|x| format!("w/{}", x.unwrap().file_name().to_string_lossy()))
        .collect();
    in_root.sort_by(|a, b| layerpack_core::model::path_cmp(a.as_bytes(), b.as_bytes()));
    assert!(!in_root.is_empty(), "the writer wrote nothing before final");
    assert_eq!(packaged, in_root, "after {tries} busy tries");
    assert!(e.mounts_left().is_empty(), "{:?}", e.mounts_left());
    passed()
}

/// Finding 9: after `touch -h` of a base symlink, the fold left
/// `trusted.overlay.*` on it; and a base symlink `lib -> usr/lib`
/// replaced by a real directory holding `lib/foo` made overlayfs report
/// `lib/foo` as modified where snapshot says added.
fn symlinks_lose_overlay_markers_and_symlinked_ancestors_are_not_followed() -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("overlayfs")]) {
        return skip;
    }
    let e = Env::new("links");
    let mut results = Vec::new();
    for backend in ["snapshot", "overlayfs"] {
        let root = e.dir.join(format!("root-{backend}"));
        fs::create_dir_all(root.join("usr/lib")).unwrap();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("usr/lib/foo"), b"old").unwrap();
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink("a.conf", root.join("etc/link")).unwrap();
        let out = e.dir.join(format!("out-{backend}"));
        ok(&e.lp(&[
            "--state-dir",
            "state",
            "run",
            "p",
            "--root",
            &e.s(&root),
            "--backend",
            backend,
            "--out",
            &e.s(&out),
            "--format",
            "none",
            "--",
            "sh",
            "-c",
            "cd \"$LAYERPACK_ROOT\" && touch -h -d @1000000000 etc/link && rm lib && mkdir lib && echo new > lib/foo",
        ]));
        let names: Vec<String> = xattr::list(root.join("etc/link"))
            .unwrap()
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with("trusted.overlay.")),
            "{backend}: {names:?} left on the symlink"
        );
        assert_eq!(fs::read(root.join("lib/foo")).unwrap(), b"new\n");
        results.push(changes_json(&out, "p"));
    }
    let want: Vec<(String, String)> = [
        ("etc/link", "modified"),
        ("lib", "modified"),
        ("lib/foo", "added"),
    ]
    .iter()
    .map(|(p, c)| (p.to_string(), c.to_string()))
    .collect();
    assert_eq!(results[0], want, "snapshot");
    assert_eq!(results[1], want, "overlayfs");
    passed()
}

/// Python that walks (or makes) `sys.argv[1]` nested `dd` directories
/// below `$LAYERPACK_ROOT` through directory descriptors and then writes
/// (`w`) or checks (`r`) the file `sys.argv[3]` holding `deep`: no path
/// names something that deep, and shells cannot `cd` there.
const DEEP_PY: &str = "import os,sys\nfd=os.open(os.environ['LAYERPACK_ROOT'],os.O_RDONLY)\nfor i in range(int(sys.argv[1])):\n if sys.argv[2]=='make': os.mkdir('dd',dir_fd=fd)\n n=os.open('dd',os.O_RDONLY,dir_fd=fd); os.close(fd); fd=n\nif sys.argv[4]=='w':\n f=os.open(sys.argv[3],os.O_WRONLY|os.O_CREAT,0o644,dir_fd=fd); os.write(f,b'deep')\nelse:\n f=os.open(sys.argv[3],os.O_RDONLY,dir_fd=fd); assert os.read(f,10)==b'deep'\n";

fn deep(levels: usize, make: bool, name: &str, write: bool) -> Vec<String> {
    [
        "python3",
        "-c",
        DEEP_PY,
        &levels.to_string(),
        if make { "make" } else { "walk" },
        name,
        if write { "w" } else { "r" },
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run_deep(root: &Path, args: &[String]) -> bool {
    Command::new(&args[0])
        .args(&args[1..])
        .env("LAYERPACK_ROOT", root)
        .status()
        .unwrap()
        .success()
}

/// Finding 9: entries whose paths are longer than PATH_MAX made snapshot
/// `init` and `final` fail with "File name too long". Both backends now
/// capture, package and fold them, and `apply` installs them.
fn deep_tree_round_trip(backend: &str) -> Outcome {
    if let Some(skip) = missing(&[Need::Tool("python3")]) {
        return skip;
    }
    let e = Env::new(&format!("deep-{backend}"));
    // 1,400 levels of "dd/" are 4,200 bytes: past PATH_MAX whatever the prefix.
    const LEVELS: usize = 1400;
    {
        let root = e.dir.join(format!("r-{backend}"));
        fs::create_dir_all(&root).unwrap();
        // The base is deep already (snapshot scans it at init).
        assert!(run_deep(&root, &deep(LEVELS, true, "old", true)));
        let out = e.dir.join(format!("out-{backend}"));
        let (r, o) = (e.s(&root), e.s(&out));
        let mut args: Vec<&str> = vec![
            "--state-dir",
            "state",
            "run",
            "deep",
            "--root",
            &r,
            "--backend",
            backend,
            "--version",
            "1",
            "--out",
            &o,
            "--",
        ];
        let install = deep(LEVELS, false, "new", true);
        args.extend(install.iter().map(String::as_str));
        ok(&e.lp(&args));
        let changes = changes_json(&out, "deep");
        assert_eq!(changes.len(), 1, "{backend}: {changes:?}");
        assert_eq!(changes[0].0.matches("dd/").count(), LEVELS, "{backend}");
        assert!(changes[0].0.ends_with("/new") && changes[0].1 == "added");
        let target = e.dir.join(format!("t-{backend}"));
        fs::create_dir(&target).unwrap();
        ok(&e.lp(&[
            "apply",
            &e.s(&out.join("deep_1_all.ipk")),
            "--root",
            &e.s(&target),
        ]));
        assert!(
            run_deep(&target, &deep(LEVELS, false, "new", false)),
            "{backend}: the applied tree lacks the deep file"
        );
    }
    passed()
}

fn trees_deeper_than_path_max_with_snapshot() -> Outcome {
    deep_tree_round_trip("snapshot")
}

fn trees_deeper_than_path_max_with_overlayfs() -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("overlayfs")]) {
        return skip;
    }
    deep_tree_round_trip("overlayfs")
}

/// Issue 16: a scratch filesystem without `user.*` xattrs (tmpfs before
/// 6.6; ramfs here) makes s07 a typed, environmental skip: ignored with
/// its reason for a required backend, a failure only when
/// `LAYERPACK_REQUIRE` names `user-xattrs` too.
fn a_scratch_without_user_xattrs_skips_s07_unless_that_is_required() -> Outcome {
    if let Some(skip) = missing(&[Need::Root]) {
        return skip;
    }
    use layerpack_core::scenarios::{self, Skip};
    use layerpack_tests::{judge_skip, SkipVerdict};
    let e = Env::new("ramfs");
    let scratch = e.dir.join("ramfs");
    fs::create_dir(&scratch).unwrap();
    nix::mount::mount(
        Some("ramfs"),
        &scratch,
        Some("ramfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    e.mounts.borrow_mut().push(scratch.clone());
    let s07 = scenarios::all().into_iter().find(|s| s.id == 7).unwrap();
    let caps = layerpack_core::backend::Capabilities::default();
    let skip = s07
        .skip_reason(&caps, &scratch)
        .expect("ramfs takes no user.* xattrs");
    assert_eq!(skip, Skip::NoUserXattrs(scratch.clone()));
    let req = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    match judge_skip("snapshot", true, &skip, &req(&["snapshot"])) {
        SkipVerdict::Ignore(why) => assert!(why.contains("user.* xattrs"), "{why}"),
        v => panic!("{v:?}"),
    }
    assert!(matches!(
        judge_skip("snapshot", true, &skip, &req(&["snapshot", "user-xattrs"])),
        SkipVerdict::Fail(_)
    ));
    // A skip the backend decides is never a failure.
    assert!(matches!(
        judge_skip(
            "snapshot",
            true,
            &Skip::CannotDiscard,
            &req(&["snapshot", "root"])
        ),
        SkipVerdict::Ignore(_)
    ));
    passed()
}

layerpack_tests::test_main!(
    a_scratch_without_user_xattrs_skips_s07_unless_that_is_required,
    trees_deeper_than_path_max_with_snapshot,
    trees_deeper_than_path_max_with_overlayfs,
    one_session_per_tree_across_state_dirs_nested_roots_and_aliases,
    bind_mount_aliases_of_a_root_are_caught,
    an_unreadable_in_place_session_is_unmounted_by_abort_and_the_base_kept,
    a_state_dir_gone_under_an_open_session_is_named_at_the_next_init,
    final_refuses_a_busy_mount_before_writing_anything,
    a_writer_racing_final_never_makes_package_and_root_differ,
    symlinks_lose_overlay_markers_and_symlinked_ancestors_are_not_followed,
);
