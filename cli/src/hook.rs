//! `layerpack-buildroot-hook`: Buildroot's instrumentation script.
//!
//! Set `BR2_INSTRUMENTATION_SCRIPTS` to this one path. Buildroot calls it
//! as `<hook> start|end <step> <pkg>` around every step of every package,
//! one process per call, with `TARGET_DIR`, `BASE_DIR`, `BUILD_DIR`,
//! `HOST_DIR`, `CONFIG_DIR` and `BR2_CONFIG` in the environment (and no
//! `PKG`, no version). Only `install-target` of a target package does
//! anything: `start` opens a capture session for the package on
//! `$TARGET_DIR`, `end` packages what the install did and folds it. Every
//! other call returns at once, before reading any file.
//!
//! The work is done by the `layerpack` binary next to this one (or on
//! `PATH`): `layerpack init` and `layerpack final`, with the session state
//! in `$BASE_DIR/layerpack/state` and the feed in `$BASE_DIR/layerpack/feed`
//! (`LAYERPACK_BUILDROOT_DIR` moves both). The config is
//! `LAYERPACK_CONFIG`, else `$CONFIG_DIR/layerpack.toml` when it exists.
//!
//! The version comes from the package's build directory,
//! `$BUILD_DIR/<pkg>-<version>/` (Buildroot's naming; the hook's
//! environment has no version): the candidate that is built and not yet
//! installed, newest `.stamp_built` first. A version that does not start
//! with a digit (a git hash, `custom`) becomes `0+<version>`, which opkg
//! and dpkg order below every release. `[packages.<pkg>] version` in the
//! config wins.
//!
//! A failure prints one line and exits non-zero: Buildroot stops the
//! build there.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The `layerpack` binary: next to this one, else on `PATH`.
fn layerpack_bin() -> PathBuf {
    if let Some(p) = env_path("LAYERPACK_BIN") {
        return p;
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("layerpack")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("layerpack"))
}

/// Where state and feed live: `LAYERPACK_BUILDROOT_DIR`, else
/// `$BASE_DIR/layerpack`.
fn layerpack_dir() -> Option<PathBuf> {
    env_path("LAYERPACK_BUILDROOT_DIR")
        .or_else(|| env_path("BASE_DIR").map(|b| b.join("layerpack")))
}

/// Whether `pkg` with this `TARGET_DIR` is a host package.
fn is_host(pkg: &str, target: &Path) -> bool {
    if pkg.starts_with("host-") {
        return true;
    }
    env_path("HOST_DIR").is_some_and(|h| target.starts_with(h))
}

/// The version of `pkg` from `$BUILD_DIR/<pkg>-<version>/`: among the
/// directories named so, the one built and not yet installed to the
/// target, newest `.stamp_built` first; else the newest built one.
pub fn version_from_build_dir(build: &Path, pkg: &str) -> Option<String> {
    let prefix = format!("{pkg}-");
    let mut found: Vec<(bool, std::time::SystemTime, String)> = Vec::new();
    for e in std::fs::read_dir(build).ok()?.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(version) = name.strip_prefix(&prefix) else {
            continue;
        };
        if version.is_empty() {
            continue;
        }
        let dir = e.path();
        let Ok(built) = std::fs::metadata(dir.join(".stamp_built")).and_then(|m| m.modified())
        else {
            continue;
        };
        let installed = dir.join(".stamp_target_installed").exists();
        found.push((!installed, built, version.to_string()));
    }
    found.sort();
    found.pop().map(|(_, _, v)| {
        if v.starts_with(|c: char| c.is_ascii_digit()) {
            v
        } else {
            format!("0+{v}")
        }
    })
}

/// `BR2_ARCH` from `$BR2_CONFIG` (the package architecture unless the
/// config sets one).
fn br2_arch() -> Option<String> {
    let text = std::fs::read_to_string(env_path("BR2_CONFIG")?).ok()?;
    text.lines().find_map(|l| {
        let v = l.strip_prefix("BR2_ARCH=")?.trim().trim_matches('"');
        (!v.is_empty()).then(|| v.to_string())
    })
}

/// Whether a post-fakeroot call of this hook follows the post-build one:
/// `$BR2_CONFIG` enables a rootfs image (`BR2_TARGET_ROOTFS_*=y`) and
/// names this program in `BR2_ROOTFS_POST_FAKEROOT_SCRIPT`. Only then is
/// the post-build call provisional; otherwise it publishes.
fn image_follows() -> bool {
    let Some(text) = env_path("BR2_CONFIG").and_then(|c| std::fs::read_to_string(c).ok()) else {
        return false;
    };
    let image = text
        .lines()
        .any(|l| l.starts_with("BR2_TARGET_ROOTFS_") && l.ends_with("=y"));
    let us = std::env::current_exe()
        .ok()
        .and_then(|e| e.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "layerpack-buildroot-hook".into());
    let fakeroot_calls_us = text.lines().any(|l| {
        l.strip_prefix("BR2_ROOTFS_POST_FAKEROOT_SCRIPT=")
            .is_some_and(|v| {
                v.split_whitespace()
                    .any(|w| w.trim_matches('"').ends_with(&us))
            })
    });
    image && fakeroot_calls_us
}

/// `layerpack` with the config the hook uses.
fn layerpack() -> Command {
    let mut cmd = Command::new(layerpack_bin());
    let config = env_path("LAYERPACK_CONFIG").or_else(|| {
        env_path("CONFIG_DIR")
            .map(|c| c.join("layerpack.toml"))
            .filter(|c| c.is_file())
    });
    if let Some(c) = &config {
        cmd.arg("--config").arg(c);
    }
    cmd
}

fn run(mut cmd: Command, what: &str) -> ExitCode {
    match cmd.status() {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => fail(format!(
            "layerpack {what} failed ({s}); see the message above"
        )),
        Err(e) => fail(format!(
            "cannot run {}: {e}",
            cmd.get_program().to_string_lossy()
        )),
    }
}

/// Called as `BR2_ROOTFS_POST_BUILD_SCRIPT` (argument 1: the target
/// directory, after target-finalize) or `BR2_ROOTFS_POST_FAKEROOT_SCRIPT`
/// (argument 1: the image's copy, `FAKEROOTKEY` set): every captured
/// package is packed again from that tree, what no package installed goes
/// into `rootfs-extra`, and the feed is indexed.
fn post_script(tree: &Path) -> ExitCode {
    // As BR2_ROOTFS_POST_FAKEROOT_SCRIPT the tree is the image's copy,
    // inside fakeroot: the owners and modes it shows are the image's final
    // ones (the rootfs step's chown, _USERS, _PERMISSIONS, device tables).
    let in_image = std::env::var_os("FAKEROOTKEY").is_some();
    let Some(base) = layerpack_dir() else {
        return fail("neither LAYERPACK_BUILDROOT_DIR nor BASE_DIR is set");
    };
    let feed = base.join("feed");
    if !feed.join(LEDGER_FILE).is_file() {
        return fail(format!(
            "{} has no ledger: no package was captured (is BR2_INSTRUMENTATION_SCRIPTS set to this program?)",
            feed.display()
        ));
    }
    let mut cmd = layerpack();
    cmd.arg("repack").arg(&feed).arg("--root").arg(tree);
    if in_image {
        cmd.args(["--owners", "keep", "--opkg-db", "auto"]);
    } else if image_follows() {
        // The post-fakeroot call packs the final image; publish there.
        cmd.arg("--provisional");
    } else {
        cmd.args(["--opkg-db", "auto"]);
    }
    if let Some(a) = br2_arch() {
        cmd.arg("--default-arch").arg(a);
    }
    if let Some(info) = package_info(&base, in_image) {
        cmd.arg("--package-info").arg(info);
    }
    let done = run(cmd, "repack");
    if done != ExitCode::SUCCESS {
        return done;
    }
    let mut cmd = layerpack();
    cmd.arg("index").arg(&feed);
    run(cmd, "index")
}

/// Buildroot's `make show-info` (licenses and download locations of every
/// package), saved as `show-info.json` next to the feed. It is run once per
/// build, by the post-build call, in the Buildroot tree (the script's
/// working directory) for the output directory `$O`; the post-fakeroot call
/// reuses it. The make that runs the script holds the jobserver, so the
/// inner one gets none of its flags. Without it (no `make`, an error) the
/// packages go without License and Source, and the hook says so.
fn package_info(base: &Path, in_image: bool) -> Option<PathBuf> {
    let saved = base.join("show-info.json");
    if in_image && saved.is_file() {
        return Some(saved);
    }
    let out = env_path("O").or_else(|| env_path("BASE_DIR"))?;
    let ran = Command::new("make")
        .args(["-s", "--no-print-directory"])
        .arg(format!("O={}", out.display()))
        .arg("show-info")
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("MAKELEVEL")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output();
    let why = match ran {
        Ok(o) if o.status.success() => {
            match serde_json::from_slice::<serde_json::Value>(&o.stdout) {
                Ok(v) if v.is_object() => match std::fs::write(&saved, &o.stdout) {
                    Ok(()) => return Some(saved),
                    Err(e) => format!("cannot write {}: {e}", saved.display()),
                },
                _ => "its output is not a JSON object".to_string(),
            }
        }
        Ok(o) => format!(
            "it failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("cannot run make: {e}"),
    };
    eprintln!(
        "layerpack-buildroot-hook: `make show-info` gave nothing ({why}); the packages have no License or Source field"
    );
    None
}

/// The ledger's file name (as `layerpack_core::ledger::LEDGER_FILE`).
const LEDGER_FILE: &str = "layerpack-ledger.json";

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("layerpack-buildroot-hook: error: {msg}");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if let Some(first) = args.first() {
        if first != "start" && first != "end" {
            return post_script(Path::new(first));
        }
    }
    let [when, step, pkg] = &args[..] else {
        return fail(
            "expected `start|end <step> <package>` (set BR2_INSTRUMENTATION_SCRIPTS to this program)",
        );
    };
    // Everything but install-target returns here, before any file is read.
    if step != "install-target" {
        return ExitCode::SUCCESS;
    }
    let (Some(when), Some(pkg)) = (when.to_str(), pkg.to_str()) else {
        return fail("the step and package name must be text");
    };
    let Some(target) = env_path("TARGET_DIR") else {
        return fail("TARGET_DIR is not set: this program is called by Buildroot");
    };
    if is_host(pkg, &target) {
        return ExitCode::SUCCESS;
    }
    let Some(base) = layerpack_dir() else {
        return fail("neither LAYERPACK_BUILDROOT_DIR nor BASE_DIR is set");
    };
    let mut cmd = layerpack();
    cmd.arg("--state-dir").arg(base.join("state"));
    match when {
        "start" => {
            // A session left by an interrupted install of this package
            // (the build was killed): Buildroot runs the whole install
            // again, into the same capture.
            let session = base.join("state/sessions").join(pkg).join("session.json");
            if session.is_file() {
                eprintln!(
                    "layerpack-buildroot-hook: {pkg}: continuing the capture an interrupted install left open"
                );
                return ExitCode::SUCCESS;
            }
            if !target.is_dir() {
                if let Err(e) = std::fs::create_dir_all(&target) {
                    return fail(format!("cannot create {}: {e}", target.display()));
                }
            }
            cmd.args(["init", pkg, "--root"]).arg(&target);
            if let Some(v) = env_path("BUILD_DIR").and_then(|b| version_from_build_dir(&b, pkg)) {
                cmd.arg("--version").arg(v);
            }
            // init prints the merged path, which Buildroot has no use for.
            cmd.stdout(std::process::Stdio::null());
        }
        "end" => {
            cmd.args(["final", pkg, "--out"]).arg(base.join("feed"));
            if let Some(a) = br2_arch() {
                cmd.arg("--default-arch").arg(a);
            }
            cmd.stdout(std::process::Stdio::null());
        }
        other => return fail(format!("unknown phase '{other}' (expected start or end)")),
    }
    run(cmd, if when == "start" { "init" } else { "final" })
}
