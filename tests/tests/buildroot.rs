//! The Buildroot hook against a miniature Buildroot
//! (`tests/buildroot-double/br`), which makes the calls, sets the
//! environment and handles target directories the way Buildroot 2023.02
//! does (`BUILDROOT-NOTES.md`): classic mode and per-package directories.
//! Oracles: every target package has an ipk; the feed installed onto an
//! empty directory with `layerpack apply`, and with real dpkg, reproduces
//! the target the build made.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use layerpack_tests::{
    as_nobody, assert_same_trees, dpkg_in, dpkg_skeleton, expect_ok, give_to_nobody, hook_bin,
    layerpack_bin, missing, passed, scratch_dir, tree_summary, unprivileged_fuse, Need, Outcome,
};

fn scratch(name: &str) -> PathBuf {
    scratch_dir(env!("CARGO_TARGET_TMPDIR"), "br", name)
}

fn ok(o: &Output) -> String {
    expect_ok(o)
}

/// The packages of the test build: a library installed to staging too,
/// an application linking it (setuid binary, a hard link, a conffile-like
/// file), a package that edits the application's file in place, a host
/// tool, a package versioned by a git hash, and two packages whose names
/// share a prefix.
fn packages(at: &Path) -> PathBuf {
    let p = at.join("package");
    let pkg = |name: &str, version: &str, deps: &[&str], install: &str| {
        let d = p.join(name);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("version"), version).unwrap();
        fs::write(d.join("install"), install).unwrap();
        if !deps.is_empty() {
            fs::write(d.join("deps"), deps.join("\n") + "\n").unwrap();
        }
        d
    };
    // A real shared library, built with symbols: target-finalize strips
    // it, so the final bytes differ from what the install wrote.
    let lib = pkg(
        "libfoo",
        "1.2.3",
        &[],
        r#"set -e; mkdir -p "$TARGET_DIR/usr/lib" "$TARGET_DIR/usr/include" "$TARGET_DIR/usr/share/doc/libfoo"
           printf 'int foo(int x) { return x * 2; }\n' > foo.c
           cc -g -shared -fPIC -Wl,-soname,libfoo.so.1 -o "$TARGET_DIR/usr/lib/libfoo.so.1" foo.c
           ln -sf libfoo.so.1 "$TARGET_DIR/usr/lib/libfoo.so"
           echo "int foo(int);" > "$TARGET_DIR/usr/include/foo.h"
           echo docs > "$TARGET_DIR/usr/share/doc/libfoo/README""#,
    );
    fs::write(lib.join("staging"), "").unwrap();
    pkg(
        "app",
        "2.0",
        &["libfoo"],
        r#"set -e; mkdir -p "$TARGET_DIR/usr/bin" "$TARGET_DIR/etc"
           printf 'int foo(int); int main(void) { return foo(1) - 2; }\n' > app.c
           cc -o "$TARGET_DIR/usr/bin/app" app.c -L"$TARGET_DIR/usr/lib" -lfoo
           chmod 4755 "$TARGET_DIR/usr/bin/app"
           ln -f "$TARGET_DIR/usr/bin/app" "$TARGET_DIR/usr/bin/app-alias"
           echo "conf=1" > "$TARGET_DIR/etc/app.conf""#,
    );
    // Its _LICENSE, as `make show-info` reports it.
    fs::write(p.join("app/license"), "GPL-2.0+, BSD-3-Clause").unwrap();
    // Its _PERMISSIONS: the image makes the binary setuid-group 100 only.
    fs::write(
        p.join("app/permissions"),
        "/usr/bin/app f 4750 0 100 - - - - -\n",
    )
    .unwrap();
    fs::write(
        p.join("device_table.txt"),
        "# the default device table\n/dev/console c 600 0 0 5 1 - - -\n",
    )
    .unwrap();
    pkg(
        "tweak",
        "1",
        &["app"],
        r#"set -e; echo "tweaked=1" >> "$TARGET_DIR/etc/app.conf""#,
    );
    let host = pkg(
        "host-tool",
        "1",
        &[],
        r#"set -e; mkdir -p "$HOST_DIR/bin"; echo tool > "$HOST_DIR/bin/tool""#,
    );
    fs::write(host.join("host"), "").unwrap();
    pkg(
        "gitpkg",
        "a1b2c3d",
        &[],
        r#"set -e; mkdir -p "$TARGET_DIR/usr/share/git"; echo g > "$TARGET_DIR/usr/share/git/g""#,
    );
    // A virtual package (installs nothing), a local one (rsync step), and
    // one that sed -i's and deletes its dependencies' files: in PPD mode
    // both are undone by the merge (a new inode, and a file the
    // dependency's tree still has), in classic mode both stick; the feed
    // follows the image either way.
    pkg("zlib", "1", &[], "true");
    let local = pkg(
        "localpkg",
        "1.0",
        &[],
        r#"set -e; mkdir -p "$TARGET_DIR/usr/share/local"; echo l > "$TARGET_DIR/usr/share/local/l""#,
    );
    fs::write(local.join("local"), "").unwrap();
    pkg(
        "cleaner",
        "1",
        &["foo-bar", "foo"],
        r#"set -e; sed -i 's/fb/FB/' "$TARGET_DIR/usr/share/foo-bar/x"; rm "$TARGET_DIR/usr/share/foo/x""#,
    );
    fs::write(
        p.join("app/users"),
        "appuser -1 appgroup -1 * /var/app /bin/false - App user\n",
    )
    .unwrap();
    // The package manager itself: its presence in the image asks for the
    // opkg database.
    pkg(
        "opkg",
        "0.6.3",
        &[],
        r#"set -e; mkdir -p "$TARGET_DIR/usr/bin"; printf '#!/bin/sh\n' > "$TARGET_DIR/usr/bin/opkg"; chmod 755 "$TARGET_DIR/usr/bin/opkg""#,
    );
    pkg(
        "foo-bar",
        "3.0",
        &[],
        r#"set -e; mkdir -p "$TARGET_DIR/usr/share/foo-bar"; echo fb > "$TARGET_DIR/usr/share/foo-bar/x""#,
    );
    pkg(
        "foo",
        "1.0",
        &[],
        r#"set -e; mkdir -p "$TARGET_DIR/usr/share/foo"; echo f > "$TARGET_DIR/usr/share/foo/x""#,
    );
    p
}

/// The order the test build builds its packages in.
const ORDER: &[&str] = &[
    "zlib",
    "localpkg",
    "opkg",
    "host-tool",
    "libfoo",
    "app",
    "tweak",
    "gitpkg",
    "foo-bar",
    "foo",
    "cleaner",
];

/// The packages in the feed, in the order a device installs them: the
/// target packages in build order, then rootfs-extra.
fn all() -> Vec<&'static str> {
    ORDER
        .iter()
        .copied()
        .filter(|p| !p.starts_with("host-"))
        .chain(["rootfs-extra"])
        .collect()
}

fn br(o: &Path, pkgs: &Path, ppd: bool, extra: &[&str], names: &[&str]) -> String {
    br_with(o, pkgs, ppd, extra, names, true)
}

/// [`br`], the hook set as post-fakeroot script too or not.
fn br_with(
    o: &Path,
    pkgs: &Path,
    ppd: bool,
    extra: &[&str],
    names: &[&str],
    fakeroot_hook: bool,
) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("buildroot-double/br");
    let mut cmd = Command::new("bash");
    cmd.arg(script);
    if ppd {
        cmd.arg("--ppd");
    }
    cmd.args(extra)
        .arg(o)
        .arg(pkgs)
        .args(names)
        .env("BR2_INSTRUMENTATION_SCRIPTS", hook_bin())
        .env("BR2_ROOTFS_POST_BUILD_SCRIPT", hook_bin())
        .env(
            "BR2_ROOTFS_POST_FAKEROOT_SCRIPT",
            if fakeroot_hook {
                hook_bin().into_os_string()
            } else {
                "".into()
            },
        )
        .env("LAYERPACK_BIN", layerpack_bin())
        .env_remove("LAYERPACK_CONFIG")
        .env_remove("LAYERPACK_STATE_DIR")
        .stdin(Stdio::null());
    if BUILD_USER.get() == User::Nobody {
        as_nobody(&mut cmd);
    }
    ok(&cmd.output().unwrap())
}

/// The tree as a device sees it, without the package managers' databases
/// (dpkg's, opkg's) and layerpack's own bookkeeping (the saved and new
/// copies of edited files), which only an installed system has.
fn tree(root: &Path) -> BTreeMap<String, String> {
    tree_summary(root, |n| {
        ["var/lib/dpkg", "var/lib/opkg", "var/lib/layerpack"]
            .iter()
            .any(|p| n.starts_with(p))
    })
}

fn assert_same(what: &str, want: &BTreeMap<String, String>, got: &BTreeMap<String, String>) {
    assert_same_trees(what, want, got)
}

/// The feed's file for package `p`.
fn ipk_of(feed: &Path, p: &str) -> PathBuf {
    feed.join(
        ipks(feed)
            .into_iter()
            .find(|n| n.starts_with(&format!("{p}_")))
            .unwrap_or_else(|| panic!("no ipk for {p}")),
    )
}

fn ipks(feed: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(feed)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".ipk"))
        .collect();
    v.sort();
    v
}

/// What a test build needs: root (the oracles install owners and device
/// nodes: dpkg, apply, the image's tar), the double's tools, and dpkg.
const BUILD_NEEDS: &[Need] = &[
    Need::Root,
    Need::Tool("bash"),
    Need::Tool("dpkg"),
    Need::Tool("fakeroot"),
    Need::Tool("tar"),
    Need::Tool("cc"),
];

/// Who runs the build: root, or an ordinary user (as Buildroot wants).
#[derive(Clone, Copy, PartialEq, Eq)]
enum User {
    Root,
    Nobody,
}

thread_local! {
    /// Who the [`br`] calls of the current test run as.
    static BUILD_USER: std::cell::Cell<User> = const { std::cell::Cell::new(User::Root) };
}

/// A whole build with the hook, on `backend` (`None`: no config, the
/// hook's default), run by `user`, checked (as root) against the image and
/// by installing the feed, then reinstalled.
fn build_and_check(ppd: bool, backend: Option<&'static str>, user: User) -> Outcome {
    if let Some(skip) = missing(BUILD_NEEDS) {
        return skip;
    }
    if let Some(b) = backend {
        if let Some(skip) = missing(&[Need::Backend(b)]) {
            return skip;
        }
    }
    if user == User::Nobody && backend == Some("fuse") {
        if let Some(skip) = unprivileged_fuse() {
            return skip;
        }
    }
    BUILD_USER.set(user);
    let d = scratch(&format!(
        "{}-{}{}",
        if ppd { "ppd" } else { "classic" },
        backend.unwrap_or("default"),
        if user == User::Nobody { "-nobody" } else { "" }
    ));
    let pkgs = packages(&d);
    let o = d.join("output");
    if let Some(b) = backend {
        // $(CONFIG_DIR)/layerpack.toml, next to .config.
        fs::create_dir_all(&o).unwrap();
        fs::write(o.join("layerpack.toml"), format!("backend = \"{b}\"\n")).unwrap();
    }
    if user == User::Nobody {
        give_to_nobody(&d);
    }
    br(&o, &pkgs, ppd, &[], ORDER);
    let feed = o.join("layerpack/feed");
    if let Some(b) = backend {
        let manifest = fs::read_to_string(feed.join("app.changes.json"))
            .or_else(|_| fs::read_to_string(o.join("layerpack/app.changes.json")))
            .expect("app's changes.json");
        assert!(
            manifest.contains(&format!("\"backend\": \"{b}\"")),
            "app was not captured with {b}: {manifest}"
        );
    }
    assert_eq!(
        ipks(&feed),
        [
            "app_2.0_x86_64.ipk",
            "cleaner_1_x86_64.ipk",
            "foo-bar_3.0_x86_64.ipk",
            "foo_1.0_x86_64.ipk",
            "gitpkg_0+a1b2c3d_x86_64.ipk",
            "libfoo_1.2.3_x86_64.ipk",
            "localpkg_1.0_x86_64.ipk",
            "opkg_0.6.3_x86_64.ipk",
            "rootfs-extra_1_x86_64.ipk",
            "tweak_1_x86_64.ipk",
            "zlib_1_x86_64.ipk",
        ],
        "one ipk per target package, versions from the build directories, architecture from BR2_ARCH; none for host-tool; what finalize made in rootfs-extra"
    );
    let app_ipk = feed.join("app_2.0_x86_64.ipk");
    let depends = String::from_utf8_lossy(
        &Command::new("dpkg-deb")
            .arg("-f")
            .arg(&app_ipk)
            .arg("Depends")
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .to_string();
    assert_eq!(
        depends, "libfoo",
        "app's ELF needs libfoo.so.1, which libfoo ships"
    );
    // License and Source from `make show-info`, run once by the post-build
    // call; a local package has no download, so no Source.
    let field = |ipk: &Path, f: &str| {
        let o = Command::new("dpkg-deb")
            .arg("-f")
            .arg(ipk)
            .arg(f)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(field(&app_ipk, "License"), "GPL-2.0+, BSD-3-Clause");
    assert_eq!(
        field(&app_ipk, "Source"),
        "https://example.org/app/app-2.0.tar.gz"
    );
    let local = feed.join("localpkg_1.0_x86_64.ipk");
    assert_eq!(field(&local, "Source"), "");
    assert!(o.join("layerpack/show-info.json").is_file());
    let report = fs::read_to_string(feed.join("report.txt")).unwrap();
    for line in [
        "extra: etc/hostname",
        "extra: etc/shells",
        "extra: etc/passwd",
        "edit: tweak changes etc/app.conf (owned by app",
        "needs: app needs libc.so.6, which no captured package ships",
        "libfoo: usr/include/foo.h: owned by libfoo but no longer in the root",
        "libfoo: usr/share/doc/libfoo/README: owned by libfoo but no longer in the root",
    ] {
        assert!(report.contains(line), "report lacks {line:?}:\n{report}");
    }
    assert!(feed.join("Packages").is_file(), "the feed is indexed");
    let sessions = o.join("layerpack/state/sessions");
    assert!(
        fs::read_dir(&sessions).map(|r| r.count()).unwrap_or(0) == 0,
        "no session is left open"
    );
    let target = image_tree(&o, &d);
    assert!(target["etc/app.conf"].contains("tweaked=1"), "{target:?}");
    assert!(
        target["usr/bin/app"].starts_with("104750 0:100 "),
        "the image's owners and modes: {}",
        target["usr/bin/app"]
    );
    assert!(
        target["dev/console"].starts_with("20600 0:0 dev 5,1"),
        "{target:?}"
    );

    // The image holds opkg's database: every package installed.
    let image = d.join("image");
    let status = fs::read_to_string(image.join("var/lib/opkg/status")).unwrap();
    for p in all() {
        assert!(
            status.contains(&format!("Package: {p}\n")),
            "{p} not in the image's opkg status:\n{status}"
        );
    }
    assert!(
        status.contains("Status: install user installed"),
        "{status}"
    );
    let list = fs::read_to_string(image.join("var/lib/opkg/info/app.list")).unwrap();
    assert!(list.contains("/usr/bin/app\n"), "{list}");

    // The feed, installed in build order onto an empty tree, is the image.
    let by_apply = d.join("by-apply");
    fs::create_dir(&by_apply).unwrap();
    for p in all() {
        ok(&Command::new(layerpack_bin())
            .arg("apply")
            .arg(ipk_of(&feed, p))
            .arg("--root")
            .arg(&by_apply)
            .output()
            .unwrap());
    }
    assert_same("layerpack apply of the feed", &target, &tree(&by_apply));

    // The root check above makes these run.
    let device = d.join("by-dpkg");
    dpkg_skeleton(&device);
    for p in all() {
        ok(&dpkg_in(
            &device,
            &["-i", ipk_of(&feed, p).to_str().unwrap()],
        ));
    }
    {
        assert_same("dpkg -i of the feed", &target, &tree(&device));
    }

    // make app-reinstall: the install runs again over its old files; the
    // package stays whole.
    let first = feed_bytes(&feed);
    br(&o, &pkgs, ppd, &["--reinstall"], &["app"]);
    let app = ipks(&feed)
        .into_iter()
        .find(|n| n.starts_with("app_"))
        .unwrap();
    let listed = String::from_utf8_lossy(
        &Command::new("dpkg-deb")
            .arg("-c")
            .arg(feed.join(&app))
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    for f in ["./usr/bin/app", "./usr/bin/app-alias", "./etc/app.conf"] {
        assert!(listed.contains(f), "{f} missing after reinstall:\n{listed}");
    }

    // A source change in one package no other package touches, then make
    // gitpkg-rebuild: exactly that package gets a new version (same
    // upstream version, next revision); every other package keeps its
    // version and bytes. (A rebuild of a package another one edits can
    // change that one too: foo's rebuild brings back the file cleaner
    // deleted, in classic mode.)
    let before = feed_bytes(&feed);
    fs::write(
        pkgs.join("gitpkg/install"),
        r#"set -e; mkdir -p "$TARGET_DIR/usr/share/git"; echo g2 > "$TARGET_DIR/usr/share/git/g""#,
    )
    .unwrap();
    br(&o, &pkgs, ppd, &["--reinstall"], &["gitpkg"]);
    let after = feed_bytes(&feed);
    let changed: Vec<&String> = after
        .iter()
        .filter(|(n, b)| before.get(*n) != Some(b))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        changed,
        ["gitpkg_0+a1b2c3d+lp1_x86_64.ipk"],
        "only gitpkg changed"
    );
    assert!(
        !after.contains_key("gitpkg_0+a1b2c3d_x86_64.ipk"),
        "the feed serves one gitpkg"
    );
    assert_eq!(after.len(), before.len());
    // Nothing changed: nothing new.
    br(&o, &pkgs, ppd, &["--reinstall"], &["gitpkg"]);
    assert_eq!(
        feed_bytes(&feed),
        after,
        "an unchanged rebuild publishes nothing new"
    );

    // The device made from the first feed, upgraded with what changed,
    // is the new target.
    {
        for (name, bytes) in &after {
            if first.get(name) != Some(bytes) {
                ok(&dpkg_in(
                    &device,
                    &["-i", feed.join(name).to_str().unwrap()],
                ));
            }
        }
        assert_same(
            "the first feed's device upgraded",
            &image_tree(&o, &d),
            &tree(&device),
        );
    }
    passed()
}

/// The image the build wrote (`images/rootfs.tar`, made inside
/// fakeroot), extracted with its owners.
fn image_tree(o: &Path, d: &Path) -> BTreeMap<String, String> {
    let at = d.join("image");
    let _ = fs::remove_dir_all(&at);
    fs::create_dir(&at).unwrap();
    ok(&Command::new("tar")
        .args(["--same-owner", "--numeric-owner", "-xpf"])
        .arg(o.join("images/rootfs.tar"))
        .arg("-C")
        .arg(&at)
        .output()
        .unwrap());
    tree(&at)
}

/// Every ipk of the feed and its bytes.
fn feed_bytes(feed: &Path) -> BTreeMap<String, Vec<u8>> {
    ipks(feed)
        .into_iter()
        .map(|n| {
            let b = fs::read(feed.join(&n)).unwrap();
            (n, b)
        })
        .collect()
}

/// With the hook as post-build script only (an image is still built), the
/// post-build call publishes: a complete, indexed feed with rootfs-extra,
/// owners from the target directory.
fn post_build_alone_publishes_a_complete_feed() -> Outcome {
    if let Some(skip) = missing(BUILD_NEEDS) {
        return skip;
    }
    let d = scratch("postbuild");
    let pkgs = packages(&d);
    let o = d.join("output");
    br_with(&o, &pkgs, false, &[], ORDER, false);
    let feed = o.join("layerpack/feed");
    let names = ipks(&feed);
    assert!(
        names.iter().any(|n| n.starts_with("rootfs-extra_1_")),
        "{names:?}"
    );
    assert!(feed.join("Packages").is_file());
    let ledger = fs::read_to_string(feed.join("layerpack-ledger.json")).unwrap();
    assert!(
        ledger.contains("\"published\""),
        "the post-build call published"
    );
    // Without the image step's tables, app keeps the target's mode.
    let by_apply = d.join("by-apply");
    fs::create_dir(&by_apply).unwrap();
    ok(&Command::new(layerpack_bin())
        .arg("apply")
        .arg(ipk_of(&feed, "app"))
        .arg("--root")
        .arg(&by_apply)
        .output()
        .unwrap());
    assert!(tree(&by_apply)["usr/bin/app"].starts_with("104755 0:0 "));
    passed()
}

fn classic_build_gives_a_feed_that_reproduces_the_target() -> Outcome {
    build_and_check(false, None, User::Root)
}

fn per_package_directories_give_a_feed_that_reproduces_the_merged_target() -> Outcome {
    build_and_check(true, None, User::Root)
}

/// The same build captured by the FUSE backend, mounted over each
/// package's target directory in place.
fn classic_build_on_fuse_gives_the_same_feed_checks() -> Outcome {
    build_and_check(false, Some("fuse"), User::Root)
}

fn per_package_directories_on_fuse_give_the_same_feed_checks() -> Outcome {
    build_and_check(true, Some("fuse"), User::Root)
}

/// What FUSE is for: the build of an ordinary user, captured in place by
/// the FUSE backend with no privilege, gives the same feed checks.
/// The build of an ordinary user on the default backend (snapshot, no
/// config), as most Buildroot users run it.
fn an_ordinary_users_build_gives_the_same_feed_checks() -> Outcome {
    build_and_check(false, None, User::Nobody)
}

fn an_ordinary_users_per_package_build_gives_the_same_feed_checks() -> Outcome {
    build_and_check(true, None, User::Nobody)
}

fn an_ordinary_users_build_on_fuse_gives_the_same_feed_checks() -> Outcome {
    build_and_check(false, Some("fuse"), User::Nobody)
}

fn an_ordinary_users_per_package_build_on_fuse_gives_the_same_feed_checks() -> Outcome {
    build_and_check(true, Some("fuse"), User::Nobody)
}

fn ignored_calls_read_nothing_and_fail_nothing() -> Outcome {
    // No environment at all: a call for any step but install-target, or
    // for a host package, must still succeed at once.
    for args in [
        ["start", "download", "foo"],
        ["end", "build", "foo"],
        ["start", "install-staging", "foo"],
    ] {
        let o = Command::new(hook_bin())
            .args(args)
            .env_clear()
            .output()
            .unwrap();
        ok(&o);
    }
    let o = Command::new(hook_bin())
        .args(["start", "install-target", "host-foo"])
        .env_clear()
        .env("TARGET_DIR", "/nonexistent")
        .output()
        .unwrap();
    ok(&o);
    // Misuse gets one clear line and a failure (Buildroot stops there).
    let o = Command::new(hook_bin())
        .args(["start", "install-target", "foo"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("TARGET_DIR is not set"), "{err}");
    let o = Command::new(hook_bin()).arg("oops").output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    passed()
}

layerpack_tests::test_main!(
    post_build_alone_publishes_a_complete_feed,
    classic_build_gives_a_feed_that_reproduces_the_target,
    per_package_directories_give_a_feed_that_reproduces_the_merged_target,
    classic_build_on_fuse_gives_the_same_feed_checks,
    per_package_directories_on_fuse_give_the_same_feed_checks,
    an_ordinary_users_build_gives_the_same_feed_checks,
    an_ordinary_users_per_package_build_gives_the_same_feed_checks,
    an_ordinary_users_build_on_fuse_gives_the_same_feed_checks,
    an_ordinary_users_per_package_build_on_fuse_gives_the_same_feed_checks,
    ignored_calls_read_nothing_and_fail_nothing,
);
