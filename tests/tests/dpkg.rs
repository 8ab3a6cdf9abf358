//! Packages installed, upgraded and removed by a real package manager:
//! Debian's `dpkg` in an offline root (`dpkg --root=DIR
//! --force-script-chrootless`), which reads the ipk layout and applies
//! the file-ownership, `Replaces` and obsolete-file rules opkg inherited.
//! The device tree must follow the build tree through a re-capture, an
//! upgrade, a second package editing the same files, and removals that
//! restore what the packages edited.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use layerpack_tests::{
    assert_same_trees, dpkg_in, dpkg_skeleton, expect_ok, layerpack_bin, missing, passed,
    scratch_dir, tree_summary, Need, Outcome,
};

fn scratch(name: &str) -> PathBuf {
    scratch_dir(env!("CARGO_TARGET_TMPDIR"), "dpkg", name)
}

fn ok(o: &Output) -> String {
    expect_ok(o)
}

/// `layerpack run <pkg> --root root --out out <opts> -- sh -c <script>` in `dir`.
/// A `layerpack.toml` in `dir` is used when there is one.
fn capture(dir: &Path, pkg: &str, opts: &[&str], script: &str) -> String {
    let config = dir.join("layerpack.toml");
    let mut args = Vec::new();
    if config.exists() {
        args.extend(["--config", config.to_str().unwrap()]);
    }
    args.extend(["run", pkg, "--root", "root", "--out", "out"]);
    args.extend_from_slice(opts);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    ok(&Command::new(layerpack_bin())
        .args(&args)
        .current_dir(dir)
        .env("LAYERPACK_STATE_DIR", dir.join("state"))
        .env_remove("LAYERPACK_CONFIG")
        .env_remove("SOURCE_DATE_EPOCH")
        .stdin(Stdio::null())
        .output()
        .unwrap())
}

fn dpkg(device: &Path, args: &[&str]) -> Output {
    dpkg_in(device, args)
}

fn device_skeleton(at: &Path) {
    dpkg_skeleton(at)
}

/// The tree without dpkg's own database and layerpack's bookkeeping
/// (`var/lib/layerpack`, checked separately).
fn tree(root: &Path) -> BTreeMap<String, String> {
    tree_summary(root, |n| {
        n.starts_with("var/lib/dpkg/") || n.starts_with("var/lib/layerpack")
    })
}

fn same_tree(what: &str, want: &BTreeMap<String, String>, device: &Path) {
    assert_same_trees(what, want, &tree(device))
}

fn dpkg_deb_list(ipk: &Path) -> String {
    ok(&Command::new("dpkg-deb")
        .arg("-c")
        .arg(ipk)
        .output()
        .unwrap())
}

fn control_field(ipk: &Path, field: &str) -> Option<String> {
    let o = Command::new("dpkg-deb")
        .arg("-f")
        .arg(ipk)
        .arg(field)
        .output()
        .unwrap();
    let v = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (!v.is_empty()).then_some(v)
}

fn upgrade_and_remove_follow_the_build_and_restore_edited_files() -> Outcome {
    if let Some(skip) = missing(&[Need::Root, Need::Tool("dpkg"), Need::Tool("dpkg-deb")]) {
        return skip;
    }
    let d = scratch("upgrade");
    let root = d.join("root");
    let device = d.join("device");
    for r in [&root, &device] {
        device_skeleton(r);
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::write(r.join("etc/shells"), "/bin/sh\n").unwrap();
    }
    let before = tree(&device);
    fs::write(
        d.join("layerpack.toml"),
        "[packages.pkga]\nconffiles = [\"/etc/a.conf\"]\n",
    )
    .unwrap();

    capture(
        &d,
        "pkga",
        &["--version", "1.0"],
        r#"set -e; r="$LAYERPACK_ROOT"; mkdir -p "$r/usr/bin" "$r/usr/share/doc/a"
           echo a1 > "$r/usr/bin/a"; chmod 755 "$r/usr/bin/a"; echo readme > "$r/usr/share/doc/a/README"
           echo "setting=1" > "$r/etc/a.conf"; echo /bin/zsh >> "$r/etc/shells""#,
    );
    ok(&dpkg(
        &device,
        &["-i", d.join("out/pkga_1.0_all.ipk").to_str().unwrap()],
    ));
    same_tree("after installing pkga 1.0", &tree(&root), &device);
    // The device's owner edits the configuration file.
    fs::write(device.join("etc/a.conf"), "setting=local\n").unwrap();

    // make pkga-rebuild: the install rewrites only the binary.
    let out = capture(
        &d,
        "pkga",
        &["--version", "1.1"],
        r#"echo a2 > "$LAYERPACK_ROOT/usr/bin/a""#,
    );
    assert!(out.contains("kept from its earlier capture"), "{out}");
    let ipk11 = d.join("out/pkga_1.1_all.ipk");
    let list = dpkg_deb_list(&ipk11);
    assert!(
        list.contains("./usr/share/doc/a/README"),
        "1.1 ships pkga whole:\n{list}"
    );
    let file_list = fs::read_to_string(d.join("out/packages-file-list.txt")).unwrap();
    assert_eq!(
        file_list, "pkga,./etc/a.conf\npkga,./usr/bin/a\npkga,./usr/share/doc/a/README\n",
        "the file list names every file pkga owns"
    );
    ok(&dpkg(&device, &["-i", ipk11.to_str().unwrap()]));
    // The conffile the package did not change keeps the local edit.
    let mut want = tree(&root);
    let local = tree(&device)["etc/a.conf"].clone();
    assert!(local.contains("setting=local"), "{local}");
    want.insert("etc/a.conf".into(), local);
    same_tree("after upgrading to pkga 1.1", &want, &device);
    // From here on the build's configuration again.
    fs::write(device.join("etc/a.conf"), "setting=1\n").unwrap();

    // A second package edits the base file pkga edited, and one of
    // pkga's own files.
    let before_b = tree(&root);
    let out = capture(
        &d,
        "pkgb",
        &["--version", "1"],
        r#"set -e; r="$LAYERPACK_ROOT"; echo /bin/bash >> "$r/etc/shells"; echo "more" >> "$r/usr/share/doc/a/README"
           mkdir -p "$r/usr/bin"; echo b > "$r/usr/bin/b""#,
    );
    assert!(
        out.contains("usr/share/doc/a/README: touched by more than one package (pkga installed it, pkgb changed it)"),
        "{out}"
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&fs::read(d.join("out/pkgb.changes.json")).unwrap()).unwrap();
    let routes: BTreeMap<&str, &str> = doc["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["path"].as_str().unwrap(), c["route"].as_str().unwrap()))
        .collect();
    assert_eq!(routes["etc/shells"], "divert", "{routes:?}");
    assert_eq!(routes["usr/share/doc/a/README"], "divert", "{routes:?}");
    assert_eq!(routes["usr/bin/b"], "owned", "{routes:?}");
    let ipkb = d.join("out/pkgb_1_all.ipk");
    assert_eq!(control_field(&ipkb, "Replaces").as_deref(), Some("pkga"));
    assert_eq!(control_field(&ipkb, "Depends").as_deref(), Some("pkga"));
    // No --force-overwrite: nothing pkgb ships is another package's file.
    ok(&dpkg(&device, &["-i", ipkb.to_str().unwrap()]));
    same_tree("after installing pkgb", &tree(&root), &device);

    ok(&dpkg(&device, &["-r", "pkgb"]));
    same_tree("after removing pkgb", &before_b, &device);
    // Purge: a plain remove keeps conffiles, as opkg and dpkg do.
    ok(&dpkg(&device, &["-P", "pkga"]));
    same_tree("after purging pkga", &before, &device);
    assert!(
        !device.join("var/lib/layerpack").exists(),
        "the packages' bookkeeping is gone with them"
    );
    passed()
}

fn setgid_group_and_file_capabilities_survive_every_installer() -> Outcome {
    if let Some(skip) = missing(&[
        Need::Root,
        Need::Tool("dpkg"),
        Need::Tool("dpkg-deb"),
        Need::Tool("tar"),
        Need::Tool("setcap"),
        Need::Tool("getcap"),
    ]) {
        return skip;
    }
    let d = scratch("caps");
    fs::create_dir_all(d.join("root")).unwrap();
    capture(
        &d,
        "plocate",
        &["--version", "1", "--format", "ipk,deb"],
        r#"set -e; r="$LAYERPACK_ROOT"; mkdir -p "$r/usr/bin"; echo bin > "$r/usr/bin/plocate"
           chgrp 101 "$r/usr/bin/plocate"; chmod 2755 "$r/usr/bin/plocate"
           setcap cap_net_raw+ep "$r/usr/bin/plocate""#,
    );
    let ipk = d.join("out/plocate_1_all.ipk");
    let check = |what: &str, root: &Path, with_cap: bool| {
        let f = root.join("usr/bin/plocate");
        let md = fs::symlink_metadata(&f).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(
            (md.uid(), md.gid(), md.mode() & 0o7777),
            (0, 101, 0o2755),
            "{what}: owner, group, mode"
        );
        let caps = ok(&Command::new("getcap").arg(&f).output().unwrap());
        assert_eq!(
            caps.contains("cap_net_raw=ep"),
            with_cap,
            "{what}: getcap says {caps:?}"
        );
    };

    // GNU tar restores the PAX xattr records.
    let parts = d.join("parts");
    fs::create_dir(&parts).unwrap();
    ok(&Command::new("ar")
        .current_dir(&parts)
        .arg("x")
        .arg(&ipk)
        .output()
        .unwrap());
    let by_tar = d.join("by-tar");
    fs::create_dir(&by_tar).unwrap();
    ok(&Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--same-owner", "-xpzf"])
        .arg(parts.join("data.tar.gz"))
        .arg("-C")
        .arg(&by_tar)
        .output()
        .unwrap());
    check("GNU tar --xattrs", &by_tar, true);

    // A client built without xattr support (Buildroot's opkg) restores
    // none: the ipk's postinst sets the capability, run as opkg runs it
    // offline (PKG_ROOT with a trailing slash).
    let no_xattrs = d.join("no-xattrs");
    fs::create_dir(&no_xattrs).unwrap();
    ok(&Command::new("tar")
        .args(["--no-xattrs", "--same-owner", "-xpzf"])
        .arg(parts.join("data.tar.gz"))
        .arg("-C")
        .arg(&no_xattrs)
        .output()
        .unwrap());
    check("tar without xattrs", &no_xattrs, false);
    ok(&Command::new("tar")
        .args(["-xzf"])
        .arg(parts.join("control.tar.gz"))
        .arg("-C")
        .arg(&parts)
        .output()
        .unwrap());
    ok(&Command::new("sh")
        .arg(parts.join("postinst"))
        .arg("configure")
        .env("PKG_ROOT", format!("{}/", no_xattrs.display()))
        .env("IPKG_INSTROOT", "")
        .env("OFFLINE_ROOT", "")
        .output()
        .unwrap());
    check("tar without xattrs, then the postinst", &no_xattrs, true);

    // apply restores them itself.
    let by_apply = d.join("by-apply");
    fs::create_dir(&by_apply).unwrap();
    ok(&Command::new(layerpack_bin())
        .args(["apply"])
        .arg(&ipk)
        .arg("--root")
        .arg(&by_apply)
        .output()
        .unwrap());
    check("layerpack apply", &by_apply, true);

    // dpkg refuses PAX headers, so the deb carries no xattrs; its
    // postinst sets the capability.
    let device = d.join("device");
    device_skeleton(&device);
    ok(&dpkg(
        &device,
        &["-i", d.join("out/plocate_1_all.deb").to_str().unwrap()],
    ));
    check("dpkg -i of the deb", &device, true);
    passed()
}

layerpack_tests::test_main!(
    upgrade_and_remove_follow_the_build_and_restore_edited_files,
    setgid_group_and_file_capabilities_survive_every_installer,
);
