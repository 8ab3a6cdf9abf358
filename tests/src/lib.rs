//! layerpack-tests: shared helpers for the behaviour matrix and the
//! end-to-end tests of the `layerpack` binary.

use layerpack_core::registry::Registry;

/// A registry with every built-in backend, as the binary has it.
pub fn builtin_registry() -> Registry {
    let mut r = Registry::new();
    layerpack_backend_snapshot::register(&mut r).expect("register snapshot");
    layerpack_backend_overlayfs::register(&mut r).expect("register overlayfs");
    layerpack_backend_fuse::register(&mut r).expect("register fuse");
    layerpack_backend_aufs::register(&mut r).expect("register aufs");
    r
}

/// Backends named in `LAYERPACK_REQUIRE` (comma-separated): for these a
/// skip is a failure.
pub fn required_backends() -> Vec<String> {
    std::env::var("LAYERPACK_REQUIRE")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The `layerpack` binary of this workspace: `$LAYERPACK_BIN`, or the one
/// next to the test executable (built with `cargo build -p layerpack` if it
/// is not there yet).
pub fn layerpack_bin() -> std::path::PathBuf {
    use std::path::PathBuf;
    use std::sync::OnceLock;
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("LAYERPACK_BIN") {
            return PathBuf::from(p);
        }
        cargo_in_profile(&["build", "--quiet", "-p", "layerpack", "--bin", "layerpack"]);
        profile_dir().join("layerpack")
    })
    .clone()
}

/// The `layerpack-buildroot-hook` binary (built once per test process), or
/// `LAYERPACK_HOOK_BIN`.
pub fn hook_bin() -> std::path::PathBuf {
    use std::path::PathBuf;
    use std::sync::OnceLock;
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("LAYERPACK_HOOK_BIN") {
            return PathBuf::from(p);
        }
        layerpack_bin();
        cargo_in_profile(&[
            "build",
            "--quiet",
            "-p",
            "layerpack",
            "--bin",
            "layerpack-buildroot-hook",
        ]);
        profile_dir().join("layerpack-buildroot-hook")
    })
    .clone()
}

/// The target directory of the profile the running test was built with
/// (`target/<profile>/deps/<test>` → `target/<profile>`).
fn profile_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target directory")
        .to_path_buf()
}

/// Run `cargo ARGS` for the running test's profile; panic if it fails.
fn cargo_in_profile(args: &[&str]) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(args);
    if profile_dir().file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo");
    assert!(status.success(), "cargo {} failed", args.join(" "));
}

/// Build `package` as a plugin (`cargo rustc --crate-type cdylib` with
/// `features`) and return a copy of the library under a name of its own
/// (`target/<profile>/plugins/<package>[-<features>].so`), so builds with
/// different features do not overwrite each other.
pub fn build_plugin(package: &str, features: &[&str]) -> std::path::PathBuf {
    use std::sync::Mutex;
    static BUILD: Mutex<()> = Mutex::new(());
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let profile_dir = profile_dir();
    let name = [&[package], features].concat().join("-");
    let out = profile_dir.join("plugins").join(format!("{name}.so"));
    let joined = features.join(",");
    let mut args = vec!["rustc", "--quiet", "-p", package, "--crate-type", "cdylib"];
    if !features.is_empty() {
        args.extend(["--features", &joined]);
    }
    cargo_in_profile(&args);
    let built = profile_dir.join(format!("lib{}.so", package.replace('-', "_")));
    std::fs::create_dir_all(out.parent().expect("plugins directory")).expect("create plugins dir");
    // Copy to a new inode: the loader caches libraries by path, and a
    // library in use must not be overwritten in place.
    let tmp = out.with_extension("so.tmp");
    std::fs::copy(&built, &tmp).expect("copy plugin");
    std::fs::rename(&tmp, &out).expect("install plugin");
    out
}

pub use libtest_mimic::{Completion, Failed};

/// What a test returns: passed, ignored with the reason, or failed.
pub type Outcome = Result<Completion, Failed>;

/// The test ran to the end.
pub fn passed() -> Outcome {
    Ok(Completion::Completed)
}

/// Words of `LAYERPACK_REQUIRE` that are not backend names: the
/// environment (`root`, `user-xattrs`, `plugins`) and the tools the tests
/// use as independent oracles.
pub const REQUIRE_WORDS: &[&str] = &[
    "root",
    "user-xattrs",
    "plugins",
    "dpkg-deb",
    "dpkg",
    "bsdtar",
    "python3",
    "tar",
    "script",
    "setcap",
    "getcap",
    "fakeroot",
    "cc",
    "bash",
    "fusermount3",
    "setfattr",
    "minbase",
];

/// What to make of a scenario the machine or the backend cannot run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipVerdict {
    /// Report it as ignored, with this reason.
    Ignore(String),
    /// Report it as failed, with this message.
    Fail(String),
}

/// The one rule for skipped scenarios, used by the matrix and the aufs
/// branch tests: a skip the backend decides is always ignored; one the
/// machine decides fails a required backend (`must_run`) only when
/// `LAYERPACK_REQUIRE` names the environment too (`root`, `user-xattrs`).
pub fn judge_skip(
    backend: &str,
    must_run: bool,
    skip: &layerpack_core::scenarios::Skip,
    required: &[String],
) -> SkipVerdict {
    let env_required = skip
        .requirement()
        .is_some_and(|r| required.iter().any(|x| x == r));
    if must_run && skip.environmental() && env_required {
        SkipVerdict::Fail(format!(
            "LAYERPACK_REQUIRE includes {backend} and {}, but: {skip}",
            skip.requirement().unwrap_or("?")
        ))
    } else {
        SkipVerdict::Ignore(skip.to_string())
    }
}

/// Something a test needs from the machine it runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Real root (uid 0).
    Root,
    /// A built-in backend that probes available.
    Backend(&'static str),
    /// A program on `PATH`.
    Tool(&'static str),
}

impl Need {
    /// The word of `LAYERPACK_REQUIRE` that makes this need mandatory.
    pub fn requirement(&self) -> &'static str {
        match self {
            Need::Root => "root",
            Need::Backend(b) => b,
            Need::Tool(t) => t,
        }
    }

    /// `Err(why)` when the machine lacks it.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Need::Root => {
                if nix::unistd::geteuid().is_root() {
                    Ok(())
                } else {
                    Err("needs real root".into())
                }
            }
            Need::Backend(name) => {
                let r = builtin_registry();
                let b = r
                    .create(name, &layerpack_core::config::BackendConfig::empty(name))
                    .map_err(|e| format!("backend {name}: {e}"))?;
                match b.probe().reason() {
                    None => Ok(()),
                    Some(why) => Err(format!("backend {name} unavailable: {why}")),
                }
            }
            Need::Tool(t) => {
                let found = std::env::var_os("PATH")
                    .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()));
                if found {
                    Ok(())
                } else {
                    Err(format!("{t} is not installed"))
                }
            }
        }
    }
}

/// `Some(outcome)` to return at once when a need is not met: the test is
/// ignored with the reason, or fails when `LAYERPACK_REQUIRE` names what
/// is missing. `None` when everything is there.
///
/// ```ignore
/// if let Some(skip) = missing(&[Need::Backend("overlayfs")]) { return skip; }
/// ```
pub fn missing(needs: &[Need]) -> Option<Outcome> {
    let required = required_backends();
    for n in needs {
        if let Err(why) = n.check() {
            if required.iter().any(|r| r == n.requirement()) {
                return Some(Err(format!(
                    "LAYERPACK_REQUIRE includes {}, but: {why}",
                    n.requirement()
                )
                .into()));
            }
            return Some(Ok(Completion::ignored_with(why)));
        }
    }
    None
}

/// `main` for a test file whose tests return [`Outcome`]: each named
/// function becomes one trial, ignored at run time with its reason when
/// it says so.
#[macro_export]
macro_rules! test_main {
    ($($f:ident),* $(,)?) => {
        fn main() -> std::process::ExitCode {
            let args = $crate::libtest_mimic::Arguments::from_args();
            let trials = vec![$($crate::libtest_mimic::Trial::ignorable_test(stringify!($f), $f)),*];
            $crate::libtest_mimic::run(&args, trials).exit_code()
        }
    };
}

#[doc(hidden)]
pub use libtest_mimic;

/// A fresh scratch directory `<kind>-<name>-<pid>` under `tmp` (a test's
/// `CARGO_TARGET_TMPDIR`).
pub fn scratch_dir(tmp: &str, kind: &str, name: &str) -> std::path::PathBuf {
    let d = std::path::PathBuf::from(tmp).join(format!("{kind}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch directory");
    d
}

/// Panic with the output unless the command succeeded; its stdout and
/// stderr.
pub fn expect_ok(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// What an install can change in a tree, per path (relative, text): type
/// bits and mode, owner, group, and the content, link target or device
/// numbers. Directory times are not compared (every package manager
/// touches them); paths for which `skip` says so are left out.
pub fn tree_summary(
    root: &std::path::Path,
    skip: impl Fn(&str) -> bool,
) -> std::collections::BTreeMap<String, String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = std::collections::BTreeMap::new();
    for e in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let e = e.expect("walk");
        let name = e
            .path()
            .strip_prefix(root)
            .expect("under the root")
            .to_string_lossy()
            .into_owned();
        if skip(&name) {
            continue;
        }
        let md = e.path().symlink_metadata().expect("lstat");
        let ft = md.file_type();
        let what = if ft.is_symlink() {
            format!(
                "-> {}",
                std::fs::read_link(e.path()).expect("readlink").display()
            )
        } else if ft.is_char_device() || ft.is_block_device() {
            format!("dev {},{}", md.rdev() >> 8 & 0xfff, md.rdev() & 0xff)
        } else if md.is_file() {
            format!(
                "{:?}",
                String::from_utf8_lossy(&std::fs::read(e.path()).expect("read"))
            )
        } else {
            "dir".into()
        };
        out.insert(
            name,
            format!("{:o} {}:{} {what}", md.mode(), md.uid(), md.gid()),
        );
    }
    out
}

/// Panic, listing every difference, unless the two summaries are equal.
pub fn assert_same_trees(
    what: &str,
    want: &std::collections::BTreeMap<String, String>,
    got: &std::collections::BTreeMap<String, String>,
) {
    let mut diff = Vec::new();
    for (k, v) in want {
        match got.get(k) {
            Some(g) if g == v => {}
            Some(g) => diff.push(format!("{k}: want {v}, got {g}")),
            None => diff.push(format!("{k}: want {v}, missing")),
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            diff.push(format!("{k}: unexpected ({g})"));
        }
    }
    assert!(diff.is_empty(), "{what}:\n{}", diff.join("\n"));
}

/// `dpkg --root=<root> --force-script-chrootless --no-triggers <args>`
/// (`--force-architecture` too: dpkg calls x86_64 amd64).
pub fn dpkg_in(root: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-architecture",
            "--no-triggers",
        ])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("dpkg (declared as needed)")
}

/// A root dpkg can install into: its database directories, nothing else.
pub fn dpkg_skeleton(at: &std::path::Path) {
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        std::fs::create_dir_all(at.join(d)).expect("dpkg database directory");
    }
    std::fs::write(at.join("var/lib/dpkg/status"), b"").expect("dpkg status");
}

/// Run every move-down scenario `backend` can run here on it and on the
/// snapshot backend, each on a fresh base below `work`: the change sets
/// must agree (where a scenario allows either of two symbols, either
/// will do) and the bases after move-down must be the same. Returns the
/// differences.
pub fn differ_from_snapshot(
    backend: &dyn layerpack_core::backend::LayerBackend,
    work: &std::path::Path,
) -> Vec<String> {
    use layerpack_core::backend::{ChangeOptions, SessionSpec};
    use layerpack_core::scenarios::{self, backdate, compare_trees};
    use std::fs;
    let registry = builtin_registry();
    let snap = registry
        .create(
            "snapshot",
            &layerpack_core::config::BackendConfig::empty("snapshot"),
        )
        .expect("snapshot backend");
    let mut problems = Vec::new();
    for sc in scenarios::all() {
        if sc.end != scenarios::End::MoveDown
            || sc.skip_reason(&backend.capabilities(), work).is_some()
        {
            continue;
        }
        let mut sets = Vec::new();
        let mut bases = Vec::new();
        for (i, b) in [&*snap, backend].into_iter().enumerate() {
            let d = work.join(format!("{}-{i}", sc.test_name()));
            for sub in ["base", "session"] {
                fs::create_dir_all(d.join(sub)).expect("scratch");
            }
            (sc.setup)(&d.join("base")).expect("setup");
            backdate(&d.join("base")).expect("backdate");
            let spec = SessionSpec {
                package: "diff".into(),
                base: fs::canonicalize(d.join("base")).expect("canonical base"),
                dir: d.join("session"),
                state: Default::default(),
            };
            let begun = match b.begin(&spec) {
                Ok(x) => x,
                Err(e) => {
                    problems.push(format!("{}: {}: begin: {e}", sc.test_name(), b.name()));
                    continue;
                }
            };
            let spec = SessionSpec {
                state: begun.state,
                ..spec
            };
            let step = (sc.act)(&begun.merged)
                .map_err(|e| e.to_string())
                .and_then(|()| b.freeze(&spec).map_err(|e| e.to_string()))
                .and_then(|()| {
                    b.changes(&spec, &ChangeOptions::default())
                        .map_err(|e| e.to_string())
                })
                .and_then(|cs| b.move_down(&spec).map(|()| cs).map_err(|e| e.to_string()));
            match step {
                Ok(cs) => sets.push(cs),
                Err(e) => {
                    let _ = layerpack_core::backend::abandon(b, &spec);
                    problems.push(format!("{}: {}: {e}", sc.test_name(), b.name()));
                    continue;
                }
            }
            bases.push(d.join("base"));
        }
        if sets.len() != 2 {
            continue;
        }
        let allowed: std::collections::BTreeMap<Vec<u8>, &str> =
            (sc.expect)().into_iter().collect();
        let symbols =
            |cs: &layerpack_core::model::ChangeSet| -> std::collections::BTreeMap<Vec<u8>, char> {
                cs.iter()
                    .map(|c| (c.path.as_bytes().to_vec(), c.kind.symbol()))
                    .collect()
            };
        let (a, b) = (symbols(&sets[0]), symbols(&sets[1]));
        for path in a.keys().chain(b.keys()) {
            let (x, y) = (
                a.get(path).copied().unwrap_or('0'),
                b.get(path).copied().unwrap_or('0'),
            );
            let ok = x == y
                || allowed
                    .get(path)
                    .is_some_and(|s| s.contains(x) && s.contains(y));
            if !ok {
                problems.push(format!(
                    "{}: {:?}: snapshot {x}, {} {y}",
                    sc.test_name(),
                    String::from_utf8_lossy(path),
                    backend.name()
                ));
            }
        }
        if let Err(e) = compare_trees(&bases[0], &bases[1]) {
            problems.push(format!(
                "{}: bases differ after move-down: {e}",
                sc.test_name()
            ));
        }
    }
    problems
}

/// The ordinary user the unprivileged tests run as: `nobody`, which every
/// Debian system has (`fusermount3` refuses a uid without a name).
pub const NOBODY: u32 = 65534;

/// Give `p` (and everything below) to [`NOBODY`].
pub fn give_to_nobody(p: &std::path::Path) {
    for e in walkdir::WalkDir::new(p) {
        let e = e.expect("walk the scratch tree");
        std::os::unix::fs::lchown(e.path(), Some(NOBODY), Some(NOBODY)).expect("chown to nobody");
    }
}

/// Run `cmd` as [`NOBODY`], without root's supplementary groups or home.
pub fn as_nobody(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    cmd.uid(NOBODY)
        .gid(NOBODY)
        .env("HOME", "/nonexistent")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("XDG_STATE_HOME")
}

/// `None` when an ordinary user can mount FUSE here; else the outcome.
pub fn unprivileged_fuse() -> Option<Outcome> {
    if let Some(skip) = missing(&[Need::Root, Need::Backend("fuse"), Need::Tool("fusermount3")]) {
        return Some(skip);
    }
    let mode = std::fs::metadata("/dev/fuse")
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
        .unwrap_or(0);
    let why = if mode & 0o006 != 0o006 {
        Some(format!(
            "/dev/fuse is mode {:o}: an ordinary user cannot open it (a stock system has 0666)",
            mode & 0o777
        ))
    } else if nix::unistd::User::from_uid(NOBODY.into())
        .ok()
        .flatten()
        .is_none()
    {
        Some("there is no user nobody (uid 65534)".to_string())
    } else {
        None
    };
    let why = why?;
    if crate::required_backends().iter().any(|r| r == "fuse") {
        return Some(Err(
            format!("LAYERPACK_REQUIRE includes fuse, but: {why}").into()
        ));
    }
    Some(Ok(crate::libtest_mimic::Completion::ignored_with(why)))
}
