//! FUSE specifics: the same layers as the snapshot backend (in place and
//! on a merged directory), the scenarios as an ordinary user, ownership
//! an unprivileged install asked for carried into the package, a killed
//! daemon, parallel writers, and a root filesystem's tar extracted through
//! the mount. Needs the fuse backend (and for some tests root, or a
//! `/dev/fuse` and `fusermount3` an ordinary user can use): ignored with
//! the reason otherwise, a failure when LAYERPACK_REQUIRE names it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use layerpack_backend_fuse::{FuseBackend, FuseConfig};
use layerpack_core::backend::{ChangeOptions, Health, LayerBackend, SessionSpec};
use layerpack_core::model::{ChangeKind, FileKind};
use layerpack_core::scenarios::compare_trees;
use layerpack_tests::{expect_ok, layerpack_bin, missing, passed, Need, Outcome};

use layerpack_tests::{as_nobody, give_to_nobody, unprivileged_fuse};

fn scratch(name: &str) -> PathBuf {
    layerpack_tests::scratch_dir(env!("CARGO_TARGET_TMPDIR"), "fuse", name)
}

fn backend(in_place: bool) -> FuseBackend {
    FuseBackend::new(FuseConfig {
        in_place,
        ..FuseConfig::default()
    })
}

/// Begin a session of `b` on `base` with its session directory in `d`:
/// the spec to go on with and the merged path.
fn open_session(b: &FuseBackend, d: &Path, base: &Path, package: &str) -> (SessionSpec, PathBuf) {
    fs::create_dir(d.join("session")).unwrap();
    let spec = SessionSpec {
        package: package.into(),
        base: fs::canonicalize(base).unwrap(),
        dir: d.join("session"),
        state: Default::default(),
    };
    let begun = b.begin(&spec).unwrap();
    (
        SessionSpec {
            state: begun.state,
            ..spec
        },
        begun.merged,
    )
}

fn no_mounts_below(d: &Path) {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let d = d.to_string_lossy();
    assert!(
        !mounts.lines().any(|l| l.contains(&*d)),
        "a mount is left below {d}:\n{mounts}"
    );
}

fn same_layers_as_snapshot(in_place: bool) -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("fuse")]) {
        return skip;
    }
    let work = scratch(if in_place {
        "differential-in-place"
    } else {
        "differential-merged"
    });
    let problems = layerpack_tests::differ_from_snapshot(&backend(in_place), &work);
    no_mounts_below(&work);
    fs::remove_dir_all(&work).unwrap();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    passed()
}

fn in_place_gives_the_same_layers_as_the_snapshot_backend() -> Outcome {
    same_layers_as_snapshot(true)
}

fn merged_gives_the_same_layers_as_the_snapshot_backend() -> Outcome {
    same_layers_as_snapshot(false)
}

/// Set in the copy of this test binary that runs as nobody.
const AS_NOBODY_ENV: &str = "LAYERPACK_TEST_FUSE_AS_NOBODY";

/// The differential check as an ordinary user, in place and merged: this
/// test binary runs itself as nobody, for the test below.
fn as_an_ordinary_user_the_layers_are_those_of_the_snapshot_backend() -> Outcome {
    if let Some(o) = unprivileged_fuse() {
        return o;
    }
    let d = scratch("differential-nobody");
    give_to_nobody(&d);
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "differential_as_nobody", "--include-ignored"])
        .env(AS_NOBODY_ENV, &d);
    let o = as_nobody(&mut cmd).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("1 passed"),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    no_mounts_below(&d);
    fs::remove_dir_all(&d).unwrap();
    passed()
}

/// Runs only as the copy started by the test above.
fn differential_as_nobody() -> Outcome {
    let Some(d) = std::env::var_os(AS_NOBODY_ENV).map(PathBuf::from) else {
        return Ok(layerpack_tests::libtest_mimic::Completion::ignored_with(
            "runs as nobody, started by as_an_ordinary_user_the_layers_are_those_of_the_snapshot_backend",
        ));
    };
    assert!(!nix::unistd::geteuid().is_root());
    let mut problems = Vec::new();
    for in_place in [true, false] {
        let work = d.join(if in_place { "in-place" } else { "merged" });
        fs::create_dir_all(&work).unwrap();
        problems.extend(layerpack_tests::differ_from_snapshot(
            &backend(in_place),
            &work,
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    passed()
}

fn the_scenarios_pass_as_an_ordinary_user_in_place_and_merged() -> Outcome {
    if let Some(o) = unprivileged_fuse() {
        return o;
    }
    let d = scratch("rootless");
    let cfg = d.join("merged.toml");
    fs::write(&cfg, "[backends.fuse]\nin_place = false\n").unwrap();
    for (label, config) in [("in-place", None), ("merged", Some(&cfg))] {
        let dir = d.join(label);
        fs::create_dir(&dir).unwrap();
        give_to_nobody(&d);
        let mut cmd = Command::new(layerpack_bin());
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        cmd.args(["selftest", "--backend", "fuse", "--dir"])
            .arg(&dir);
        let o = as_nobody(&mut cmd).output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{label}: {out}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let summary = out.lines().last().unwrap_or_default();
        assert!(
            summary.starts_with("fuse: ") && summary.contains(" 0 failed"),
            "{label}: {out}"
        );
        let n_passed: u32 = summary
            .trim_start_matches("fuse: ")
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        // All but the two that chown and mknod on the reference tree too,
        // and the keep variant (this backend discards).
        assert!(n_passed >= 23, "{label}: {out}");
    }
    no_mounts_below(&d);
    fs::remove_dir_all(&d).unwrap();
    passed()
}

fn an_unprivileged_install_gives_root_owned_setuid_files_and_devices() -> Outcome {
    if let Some(o) = unprivileged_fuse() {
        return o;
    }
    if let Some(skip) = missing(&[Need::Tool("dpkg-deb"), Need::Tool("setfattr")]) {
        return skip;
    }
    let d = scratch("fake-owner");
    let root = d.join("root");
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::create_dir_all(root.join("dev")).unwrap();
    fs::write(d.join("su"), b"#!/bin/sh\necho su\n").unwrap();
    give_to_nobody(&d);
    let lp = |args: &[&str]| {
        let mut cmd = Command::new(layerpack_bin());
        cmd.arg("--state-dir").arg(d.join("state")).args(args);
        as_nobody(&mut cmd).output().unwrap()
    };
    let init = lp(&[
        "init",
        "su",
        "--root",
        root.to_str().unwrap(),
        "--backend",
        "fuse",
        "--version",
        "1.0",
    ]);
    let merged = PathBuf::from(expect_ok(&init).trim().lines().last().unwrap());
    // Never leave the session's daemon behind, whatever fails below.
    struct Abort<'a>(&'a dyn Fn(&[&str]) -> std::process::Output);
    impl Drop for Abort<'_> {
        fn drop(&mut self) {
            let _ = (self.0)(&["abort", "su"]);
        }
    }
    let _abort = Abort(&lp);
    assert_eq!(
        merged,
        fs::canonicalize(&root).unwrap(),
        "in place by default"
    );
    let sh = |script: &str| {
        let mut cmd = Command::new("sh");
        cmd.arg("-ec").arg(script).current_dir(&merged);
        let o = as_nobody(&mut cmd).output().unwrap();
        expect_ok(&o)
    };
    let installed = sh(&format!(
        "install -o root -g root -m 4755 {} usr/bin/su; mkdir -p var/empty; chown root:root var/empty; \
         mkdir -p opt/plain; echo x > opt/plain/f; \
         if mknod dev/null c 1 3 2>/dev/null; then echo mknod-worked; fi; \
         : > dev/null; setfattr -n user.containers.override_stat -v 0:0:0666:char-1-3 dev/null",
        d.join("su").display()
    ));
    // The kernel refuses mknod of a device to an ordinary user before any
    // filesystem is asked; the record is the way to make one.
    assert_eq!(installed, "", "{installed}");
    // Through the mount the install sees what it asked for (a recorded
    // device shows as one once the kernel looks it up afresh: an inode's
    // type cannot change under it).
    let seen = sh("stat -c '%u:%g %a %F' usr/bin/su var/empty");
    assert_eq!(seen, "0:0 4755 regular file\n0:0 755 directory\n", "{seen}");
    let out = d.join("out");
    expect_ok(&lp(&["final", "su", "--out", out.to_str().unwrap()]));
    no_mounts_below(&d);
    let ipk = out.join("su_1.0_all.ipk");
    let list = expect_ok(
        &Command::new("dpkg-deb")
            .arg("-c")
            .arg(&ipk)
            .output()
            .unwrap(),
    );
    let line = |p: &str| {
        list.lines()
            .find(|l| l.ends_with(p))
            .unwrap_or_else(|| panic!("{p} not in the package:\n{list}"))
            .to_string()
    };
    // dpkg-deb prints the owner as the names in the archive, or numbers.
    let entry = |p: &str| -> (String, String, String) {
        let l = line(p);
        let f: Vec<&str> = l.split_whitespace().collect();
        (f[0].to_string(), f[1].to_string(), l.clone())
    };
    let root_owned = |o: &str| o == "root/root" || o == "0/0";
    let (mode, owner, l) = entry("./usr/bin/su");
    assert!(mode == "-rwsr-xr-x" && root_owned(&owner), "{l}");
    let (mode, owner, l) = entry("./dev/null");
    assert!(mode == "crw-rw-rw-" && root_owned(&owner), "{l}");
    assert!(l.contains(" 1,3 ") || l.contains(" 1, 3 "), "{l}");
    let (mode, owner, l) = entry("./var/empty/");
    assert!(mode == "drwxr-xr-x" && root_owned(&owner), "{l}");
    // What the install made without asking for an owner is root's too
    // (owners = auto, as Buildroot's image step does).
    for p in ["./opt/plain/", "./opt/plain/f"] {
        let (_, owner, l) = entry(p);
        assert!(root_owned(&owner), "{l}");
    }
    // The root keeps the record for every later reader (a repack, the
    // next capture): the folded placeholder says what it is.
    let rec = layerpack_core::tree::Record::read(
        &root.join("dev/null"),
        layerpack_core::model::RelPath::from("dev/null"),
        true,
    )
    .unwrap();
    assert_eq!(
        (rec.kind, rec.uid, rec.mode),
        (FileKind::CharDevice, 0, 0o666)
    );
    fs::remove_dir_all(&d).unwrap();
    passed()
}

fn a_killed_daemon_loses_no_base_data_and_final_packs_what_reached_the_layer() -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("fuse")]) {
        return skip;
    }
    let d = scratch("kill");
    let base = d.join("base");
    fs::create_dir_all(base.join("etc")).unwrap();
    fs::write(base.join("etc/keep"), b"keep").unwrap();
    fs::write(base.join("etc/old"), b"old").unwrap();
    let b = backend(true);
    let (spec, merged) = open_session(&b, &d, &base, "killed");
    fs::create_dir(merged.join("usr")).unwrap();
    fs::write(merged.join("usr/done"), b"written before the kill").unwrap();
    fs::remove_file(merged.join("etc/old")).unwrap();
    let daemon: serde_json::Value =
        serde_json::from_slice(&fs::read(d.join("session/daemon")).unwrap()).unwrap();
    let pid = daemon["pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // It is gone (a reaped orphan) and the mount answers ENOTCONN.
    for _ in 0..500 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let err = fs::metadata(merged.join("etc")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::ENOTCONN), "{err}");
    match b.health(&spec) {
        Health::MountLost(why) => assert!(why.contains("gone"), "{why}"),
        h => panic!("status after the kill: {h:?}"),
    }
    b.freeze(&spec).unwrap();
    let cs = b.changes(&spec, &ChangeOptions::default()).unwrap();
    let got: Vec<(String, char)> = cs
        .iter()
        .map(|c| (c.path.to_string(), c.kind.symbol()))
        .collect();
    assert!(got.contains(&("usr/done".into(), '+')), "{got:?}");
    assert!(got.contains(&("etc/old".into(), '-')), "{got:?}");
    b.move_down(&spec).unwrap();
    no_mounts_below(&d);
    assert_eq!(fs::read(base.join("etc/keep")).unwrap(), b"keep");
    assert_eq!(
        fs::read(base.join("usr/done")).unwrap(),
        b"written before the kill"
    );
    assert!(!base.join("etc/old").exists());
    fs::remove_dir_all(&d).unwrap();
    passed()
}

fn eight_parallel_writers_lose_nothing() -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("fuse")]) {
        return skip;
    }
    let d = scratch("parallel");
    let base = d.join("base");
    fs::create_dir_all(base.join("shared")).unwrap();
    let b = backend(true);
    let (spec, merged) = open_session(&b, &d, &base, "parallel");
    std::thread::scope(|s| {
        for w in 0..8 {
            let m = merged.clone();
            s.spawn(move || {
                let own = m.join(format!("w{w}"));
                fs::create_dir(&own).unwrap();
                for i in 0..1000 {
                    // Half in a directory of its own, half in one they share.
                    let p = if i % 2 == 0 {
                        own.join(format!("f{i}"))
                    } else {
                        m.join(format!("shared/w{w}-f{i}"))
                    };
                    fs::write(&p, format!("{w} {i}")).unwrap();
                }
            });
        }
    });
    b.freeze(&spec).unwrap();
    let cs = b.changes(&spec, &ChangeOptions::default()).unwrap();
    let files = cs
        .iter()
        .filter(|c| c.kind == ChangeKind::Added && c.meta.kind == FileKind::File)
        .count();
    assert_eq!(files, 8000);
    b.move_down(&spec).unwrap();
    no_mounts_below(&d);
    for w in 0..8 {
        for i in 0..1000 {
            let p = if i % 2 == 0 {
                base.join(format!("w{w}/f{i}"))
            } else {
                base.join(format!("shared/w{w}-f{i}"))
            };
            assert_eq!(fs::read_to_string(&p).unwrap(), format!("{w} {i}"));
        }
    }
    fs::remove_dir_all(&d).unwrap();
    passed()
}

/// A root filesystem with what real ones have: devices, hard links,
/// setuid and setgid files, a sticky directory, fifos, symlinks, a sparse
/// file, xattrs, long and non-UTF-8 names.
fn rootfs(at: &Path) {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let sh = |script: &str| {
        expect_ok(
            &Command::new("sh")
                .arg("-ec")
                .arg(script)
                .current_dir(at)
                .output()
                .unwrap(),
        );
    };
    fs::create_dir_all(at).unwrap();
    sh("mkdir -p bin sbin usr/bin usr/lib/x86_64-linux-gnu etc/default dev var/tmp tmp run/lock \
        && for i in $(seq 1 300); do mkdir -p usr/share/doc/p$i; echo doc $i > usr/share/doc/p$i/copyright; done \
        && for i in $(seq 1 200); do head -c $((i * 37)) /dev/urandom > usr/lib/x86_64-linux-gnu/lib$i.so.1; ln -s lib$i.so.1 usr/lib/x86_64-linux-gnu/lib$i.so; done \
        && printf '#!/bin/sh\\n' > usr/bin/su && chmod 4755 usr/bin/su \
        && printf 'x' > usr/bin/wall && chgrp 5 usr/bin/wall && chmod 2755 usr/bin/wall \
        && echo gz > bin/gzip && ln bin/gzip bin/gunzip && ln bin/gzip bin/zcat \
        && chmod 1777 tmp var/tmp \
        && mknod dev/null c 1 3 && mknod dev/sda b 8 0 && mknod dev/tty c 5 0 && chmod 666 dev/null \
        && mkfifo run/initctl \
        && ln -s ../usr/bin/su bin/su \
        && truncate -s 16M var/sparse && printf data | dd of=var/sparse bs=1 seek=8388608 conv=notrunc 2>/dev/null \
        && setfattr -n user.note -v hello etc/default 2>/dev/null || true \
        && setcap cap_net_raw+ep usr/bin/wall 2>/dev/null || true \
        && echo root:x:0:0::/root:/bin/sh > etc/passwd");
    fs::write(at.join(OsStr::from_bytes(b"etc/caf\xe9")), b"latin-1 name").unwrap();
    fs::write(at.join(format!("etc/{}", "n".repeat(255))), b"long").unwrap();
    let mut deep = at.join("usr/share/deep");
    for i in 0..60 {
        deep.push(format!("level{i}"));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("leaf"), b"deep").unwrap();
}

fn tar_of(src: &Path, tarball: &Path) {
    expect_ok(
        &Command::new("tar")
            .args(["--xattrs", "--xattrs-include=*", "--sparse", "-cpf"])
            .arg(tarball)
            .arg("-C")
            .arg(src)
            .arg(".")
            .output()
            .unwrap(),
    );
}

/// Extract `tarball` into `dir` with GNU tar as root would (owners, modes,
/// xattrs); stderr must stay empty.
fn extract(tarball: &Path, dir: &Path) {
    let o = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf"])
        .arg(tarball)
        .arg("-C")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "tar -x through the mount: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn extract_through_the_mount(tarball: &Path, d: &Path, base_setup: impl Fn(&Path)) {
    let base = d.join("base");
    let reference = d.join("reference");
    for t in [&base, &reference] {
        fs::create_dir_all(t).unwrap();
        base_setup(t);
    }
    extract(tarball, &reference);
    let b = backend(true);
    let (spec, merged) = open_session(&b, d, &base, "rootfs");
    extract(tarball, &merged);
    b.freeze(&spec).unwrap();
    b.changes(&spec, &ChangeOptions::default()).unwrap();
    b.move_down(&spec).unwrap();
    no_mounts_below(d);
    compare_trees(&reference, &base).unwrap();
}

fn a_root_filesystem_tar_extracts_through_the_mount_without_errors() -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("fuse"), Need::Tool("tar")]) {
        return skip;
    }
    let d = scratch("rootfs-tar");
    let src = d.join("src");
    rootfs(&src);
    let tarball = d.join("rootfs.tar");
    tar_of(&src, &tarball);
    // Into an empty root, then over the same tree (every file replaced).
    extract_through_the_mount(&tarball, &d.join("fresh"), |_| {});
    extract_through_the_mount(&tarball, &d.join("over"), |t| extract(&tarball, t));
    fs::remove_dir_all(&d).unwrap();
    passed()
}

fn a_debian_minbase_tar_extracts_through_the_mount_without_errors() -> Outcome {
    // Made by .ci/run with debootstrap (the archive must be reachable).
    let Some(tarball) = std::env::var_os("LAYERPACK_MINBASE_TAR").map(PathBuf::from) else {
        if layerpack_tests::required_backends()
            .iter()
            .any(|r| r == "minbase")
        {
            return Err(
                "LAYERPACK_REQUIRE includes minbase, but LAYERPACK_MINBASE_TAR is not set".into(),
            );
        }
        return Ok(layerpack_tests::libtest_mimic::Completion::ignored_with(
            "no Debian minbase: set LAYERPACK_MINBASE_TAR to a tar of one (.ci/run makes it with debootstrap)",
        ));
    };
    if let Some(skip) = missing(&[Need::Root, Need::Backend("fuse"), Need::Tool("tar")]) {
        return skip;
    }
    let d = scratch("minbase");
    extract_through_the_mount(&tarball, &d.join("fresh"), |_| {});
    extract_through_the_mount(&tarball, &d.join("over"), |t| extract(&tarball, t));
    fs::remove_dir_all(&d).unwrap();
    passed()
}

fn a_busy_mount_is_not_unmounted_and_final_can_be_run_again() -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("fuse")]) {
        return skip;
    }
    let d = scratch("busy");
    let base = d.join("base");
    fs::create_dir_all(&base).unwrap();
    let b = backend(false);
    let (spec, merged) = open_session(&b, &d, &base, "busy");
    let open = fs::File::create(merged.join("held")).unwrap();
    let err = b.freeze(&spec).unwrap_err();
    assert_eq!(err.kind(), layerpack_core::ErrorKind::Busy, "{err}");
    assert!(err.to_string().contains("still uses it"), "{err}");
    assert_eq!(b.health(&spec), Health::Ok);
    drop(open);
    b.freeze(&spec).unwrap();
    b.move_down(&spec).unwrap();
    assert!(base.join("held").exists());
    no_mounts_below(&d);
    let _ = fs::set_permissions(&d, fs::Permissions::from_mode(0o755));
    fs::remove_dir_all(&d).unwrap();
    passed()
}

fn a_base_hard_link_stays_one_file_when_written_through_one_name() -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("fuse")]) {
        return skip;
    }
    let d = scratch("hardlink");
    let base = d.join("base");
    fs::create_dir_all(base.join("bin")).unwrap();
    fs::create_dir_all(base.join("usr/bin")).unwrap();
    fs::write(base.join("bin/gzip"), b"old").unwrap();
    fs::hard_link(base.join("bin/gzip"), base.join("usr/bin/gunzip")).unwrap();
    fs::hard_link(base.join("bin/gzip"), base.join("bin/zcat")).unwrap();
    let b = backend(true);
    let (spec, merged) = open_session(&b, &d, &base, "gzip");
    // Only one name is ever looked up.
    fs::write(merged.join("bin/gzip"), b"new version").unwrap();
    let m = fs::metadata(merged.join("bin/gzip")).unwrap();
    assert_eq!(m.nlink(), 3);
    assert_eq!(
        fs::read(merged.join("usr/bin/gunzip")).unwrap(),
        b"new version"
    );
    assert_eq!(
        fs::metadata(merged.join("usr/bin/gunzip")).unwrap().ino(),
        m.ino()
    );
    b.freeze(&spec).unwrap();
    let cs = b.changes(&spec, &ChangeOptions::default()).unwrap();
    let groups: Vec<_> = cs
        .iter()
        .filter(|c| c.meta.kind == FileKind::File)
        .map(|c| c.meta.link_group)
        .collect();
    assert_eq!(groups.len(), 3, "{:?}", cs);
    assert!(
        groups.iter().all(|g| g.is_some() && *g == groups[0]),
        "{groups:?}"
    );
    b.move_down(&spec).unwrap();
    let ino = fs::metadata(base.join("bin/gzip")).unwrap().ino();
    for p in ["bin/zcat", "usr/bin/gunzip"] {
        assert_eq!(fs::metadata(base.join(p)).unwrap().ino(), ino, "{p}");
        assert_eq!(fs::read(base.join(p)).unwrap(), b"new version", "{p}");
    }
    no_mounts_below(&d);
    fs::remove_dir_all(&d).unwrap();
    passed()
}

layerpack_tests::test_main!(
    as_an_ordinary_user_the_layers_are_those_of_the_snapshot_backend,
    differential_as_nobody,
    a_base_hard_link_stays_one_file_when_written_through_one_name,
    in_place_gives_the_same_layers_as_the_snapshot_backend,
    merged_gives_the_same_layers_as_the_snapshot_backend,
    the_scenarios_pass_as_an_ordinary_user_in_place_and_merged,
    an_unprivileged_install_gives_root_owned_setuid_files_and_devices,
    a_killed_daemon_loses_no_base_data_and_final_packs_what_reached_the_layer,
    eight_parallel_writers_lose_nothing,
    a_root_filesystem_tar_extracts_through_the_mount_without_errors,
    a_debian_minbase_tar_extracts_through_the_mount_without_errors,
    a_busy_mount_is_not_unmounted_and_final_can_be_run_again,
);
