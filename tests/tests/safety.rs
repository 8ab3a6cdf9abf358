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
    let cfg = e.dir.join("lp.toml");
    fs::write(&cfg, "[backends.overlayfs]\nin_place = true\n").unwrap();
    let c = e.s(&cfg);
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
    let cfg = e.dir.join("lp.toml");
    fs::write(&cfg, "[backends.overlayfs]\nin_place = true\n").unwrap();
    let root = e.s(&e.root());
    ok(&e.lp(&[
        "--config",
        &e.s(&cfg),
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

layerpack_tests::test_main!(
    one_session_per_tree_across_state_dirs_nested_roots_and_aliases,
    bind_mount_aliases_of_a_root_are_caught,
    an_unreadable_in_place_session_is_unmounted_by_abort_and_the_base_kept,
    a_state_dir_gone_under_an_open_session_is_named_at_the_next_init,
    final_refuses_a_busy_mount_before_writing_anything,
    a_writer_racing_final_never_makes_package_and_root_differ,
    symlinks_lose_overlay_markers_and_symlinked_ancestors_are_not_followed,
);
