//! Session handling through the library: every bad input gets its error
//! kind and leaves nothing half-done.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};

use layerpack_core::backend::ChangeOptions;
use layerpack_core::config::Config;
use layerpack_core::ops::{Context, Finish};
use layerpack_core::session::StateDir;
use layerpack_core::ErrorKind;
use layerpack_tests::builtin_registry;

struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("sessions-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("root/etc")).unwrap();
        fs::write(dir.join("root/etc/a.conf"), b"a").unwrap();
        Fixture { dir }
    }
    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }
    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn with_ctx<T>(state: &Path, f: impl FnOnce(&Context) -> T) -> T {
    let registry = builtin_registry();
    let config = Config::default();
    let ctx = Context {
        state: StateDir::open(state).unwrap(),
        registry: &registry,
        config: &config,
    };
    f(&ctx)
}

/// `final` of `pkg` with no outputs, expected to fail.
fn final_err(ctx: &Context, pkg: &str) -> layerpack_core::Error {
    ctx.finish(
        pkg,
        Finish::MoveDown,
        &ChangeOptions::default(),
        |_, _, _| Ok(()),
    )
    .err()
    .expect("final should fail")
}

/// Sorted listing of a tree with sizes, to prove it unchanged.
fn listing(root: &Path) -> Vec<(PathBuf, u64)> {
    let mut v = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let md = e.metadata().unwrap();
            if md.is_dir() {
                stack.push(e.path());
            }
            v.push((e.path(), if md.is_dir() { 0 } else { md.len() }));
        }
    }
    v.sort();
    v
}

fn session_dirs(state: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(state.join("sessions"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn init_and_final_capture_changes() {
    let fx = Fixture::new("basic");
    with_ctx(&fx.state(), |ctx| {
        let opened = ctx.init("hello", &fx.root(), None, Some("1.0")).unwrap();
        assert_eq!(opened.session.backend, "snapshot");
        assert_eq!(opened.session.merged, fs::canonicalize(fx.root()).unwrap());
        fs::write(fx.root().join("etc/new"), b"n").unwrap();
        let mut seen = 0;
        let done = ctx
            .finish(
                "hello",
                Finish::MoveDown,
                &ChangeOptions::default(),
                |_, cs, _| {
                    seen = cs.len();
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(seen, 1);
        assert_eq!(done.session.version.as_deref(), Some("1.0"));
    });
    assert!(session_dirs(&fx.state()).is_empty());
}

#[test]
fn missing_root_is_not_found() {
    let fx = Fixture::new("missing");
    with_ctx(&fx.state(), |ctx| {
        let e = ctx
            .init("p", &fx.dir.join("nope"), None, None)
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("nope"), "{e}");
    });
    assert!(session_dirs(&fx.state()).is_empty());
}

#[test]
fn root_that_is_a_file_is_invalid() {
    let fx = Fixture::new("file");
    let f = fx.root().join("etc/a.conf");
    with_ctx(&fx.state(), |ctx| {
        let e = ctx.init("p", &f, None, None).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("a.conf"), "{e}");
    });
    assert!(session_dirs(&fx.state()).is_empty());
}

#[test]
fn second_init_of_open_package_is_refused_and_keeps_the_session() {
    let fx = Fixture::new("twice");
    with_ctx(&fx.state(), |ctx| {
        ctx.init("p", &fx.root(), None, None).unwrap();
        let before = fs::read(fx.state().join("sessions/p/session.json")).unwrap();
        let e = ctx.init("p", &fx.root(), None, None).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::AlreadyOpen);
        assert_eq!(
            fs::read(fx.state().join("sessions/p/session.json")).unwrap(),
            before
        );
        ctx.finish(
            "p",
            Finish::MoveDown,
            &ChangeOptions::default(),
            |_, _, _| Ok(()),
        )
        .unwrap();
    });
}

#[test]
fn second_package_on_the_same_root_is_refused() {
    let fx = Fixture::new("sameroot");
    with_ctx(&fx.state(), |ctx| {
        ctx.init("p", &fx.root(), None, None).unwrap();
        let e = ctx.init("q", &fx.root(), None, None).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Busy);
        assert!(e.to_string().contains("'p'"), "{e}");
        assert_eq!(session_dirs(&fx.state()), ["p"]);
    });
}

#[test]
fn final_without_init_is_not_found() {
    let fx = Fixture::new("noinit");
    let before = listing(&fx.root());
    with_ctx(&fx.state(), |ctx| {
        let e = final_err(ctx, "p");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("layerpack init p"), "{e}");
    });
    assert_eq!(listing(&fx.root()), before);
}

#[test]
fn corrupt_or_truncated_session_file_is_reported_and_abort_clears_it() {
    let fx = Fixture::new("corrupt");
    with_ctx(&fx.state(), |ctx| {
        ctx.init("p", &fx.root(), None, None).unwrap();
        let file = fx.state().join("sessions/p/session.json");
        let full = fs::read(&file).unwrap();
        for broken in [&full[..full.len() / 2], b"{not json" as &[u8], b""] {
            fs::write(&file, broken).unwrap();
            let e = final_err(ctx, "p");
            assert_eq!(e.kind(), ErrorKind::Corrupt);
            assert!(e.to_string().contains("session.json"), "{e}");
            assert!(e.to_string().contains("layerpack abort p"), "{e}");
        }
        let e = ctx.init("p", &fx.root(), None, None).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::AlreadyOpen);
        ctx.abort("p").unwrap();
        assert!(session_dirs(&fx.state()).is_empty());
        ctx.init("p", &fx.root(), None, None).unwrap();
    });
}

#[test]
fn corrupt_snapshot_index_is_reported() {
    let fx = Fixture::new("index");
    with_ctx(&fx.state(), |ctx| {
        ctx.init("p", &fx.root(), None, None).unwrap();
        let idx = fx.state().join("sessions/p/backend/snapshot.idx");
        let full = fs::read(&idx).unwrap();
        fs::write(&idx, &full[..full.len() - 3]).unwrap();
        let e = final_err(ctx, "p");
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(session_dirs(&fx.state()), ["p"], "session kept for abort");
    });
}

#[test]
fn unknown_backend_lists_the_known_ones() {
    let fx = Fixture::new("unknown");
    with_ctx(&fx.state(), |ctx| {
        let e = ctx
            .init("p", &fx.root(), Some("btrfs"), None)
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        let msg = e.to_string();
        for known in ["snapshot", "overlayfs", "fuse", "aufs", "auto"] {
            assert!(msg.contains(known), "{msg}");
        }
    });
    assert!(session_dirs(&fx.state()).is_empty());
}

/// A backend that never runs: it probes unavailable, and any call beyond
/// the probe is a failure of the test.
struct Never;

impl layerpack_core::backend::LayerBackend for Never {
    fn name(&self) -> &str {
        "never"
    }
    fn capabilities(&self) -> layerpack_core::backend::Capabilities {
        Default::default()
    }
    fn probe(&self) -> layerpack_core::backend::Probe {
        layerpack_core::backend::Probe::Unavailable(layerpack_core::backend::Unavailable::Missing {
            what: "/dev/never".into(),
            hint: "nothing to do".into(),
        })
    }
    fn begin(
        &self,
        _: &layerpack_core::backend::SessionSpec,
    ) -> layerpack_core::Result<layerpack_core::backend::Begun> {
        panic!("begin called on a backend that probes unavailable")
    }
    fn changes(
        &self,
        _: &layerpack_core::backend::SessionSpec,
        _: &ChangeOptions,
    ) -> layerpack_core::Result<layerpack_core::model::ChangeSet> {
        panic!("changes called")
    }
    fn move_down(&self, _: &layerpack_core::backend::SessionSpec) -> layerpack_core::Result<()> {
        panic!("move_down called")
    }
}

#[test]
fn a_backend_that_cannot_run_here_is_refused_before_anything_happens() {
    let fx = Fixture::new("unavailable");
    let mut registry = builtin_registry();
    registry
        .register(
            "never",
            layerpack_core::registry::Origin::BuiltIn,
            Box::new(|_| Ok(Box::new(Never))),
        )
        .unwrap();
    let config = Config::default();
    let ctx = Context {
        state: StateDir::open(&fx.state()).unwrap(),
        registry: &registry,
        config: &config,
    };
    let e = ctx
        .init("p", &fx.root(), Some("never"), None)
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("/dev/never is missing"), "{e}");
    assert!(session_dirs(&fx.state()).is_empty());
}

#[test]
fn auto_says_why_it_skipped_backends() {
    let fx = Fixture::new("auto");
    with_ctx(&fx.state(), |ctx| {
        let opened = ctx.init("p", &fx.root(), Some("auto"), None).unwrap();
        let names: Vec<&str> = opened.skipped.iter().map(|(n, _)| n.as_str()).collect();
        let chosen = opened.session.backend.clone();
        assert!(!names.contains(&chosen.as_str()));
        assert!(opened.skipped.iter().all(|(_, why)| !why.is_empty()));
        ctx.abort("p").unwrap();
    });
}

#[test]
fn bad_package_names_are_refused() {
    let fx = Fixture::new("names");
    with_ctx(&fx.state(), |ctx| {
        for bad in ["a/b", "..", "../etc", "x/../y"] {
            let e = ctx.init(bad, &fx.root(), None, None).err().unwrap();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
        }
    });
    assert!(session_dirs(&fx.state()).is_empty());
}

#[test]
fn state_dir_inside_the_root_is_refused() {
    let fx = Fixture::new("inside");
    let state = fx.root().join("var/lib/layerpack");
    let before = listing(&fx.root());
    with_ctx(&state, |ctx| {
        let e = ctx.init("p", &fx.root(), None, None).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("state directory"), "{e}");
    });
    assert_eq!(listing(&fx.root()), before, "nothing created in the root");
}

#[test]
fn a_locked_package_is_busy() {
    let fx = Fixture::new("locked");
    with_ctx(&fx.state(), |ctx| {
        ctx.init("p", &fx.root(), None, None).unwrap();
        let other = StateDir::open(&fx.state()).unwrap();
        let _held = other.lock_package("p").unwrap();
        let e = final_err(ctx, "p");
        assert_eq!(e.kind(), ErrorKind::Busy);
    });
}

#[test]
fn failed_output_keeps_the_session_for_a_rerun() {
    let fx = Fixture::new("rerun");
    with_ctx(&fx.state(), |ctx| {
        ctx.init("p", &fx.root(), None, None).unwrap();
        fs::write(fx.root().join("etc/new"), b"n").unwrap();
        let e = ctx
            .finish(
                "p",
                Finish::MoveDown,
                &ChangeOptions::default(),
                |_, _, _| Err(layerpack_core::Error::new(ErrorKind::Io, "disk full")),
            )
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::Io);
        let mut n = 0;
        ctx.finish(
            "p",
            Finish::MoveDown,
            &ChangeOptions::default(),
            |_, cs, _| {
                n = cs.len();
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(n, 1);
    });
}

#[test]
fn discard_is_refused_by_snapshot_before_anything_is_written() {
    let fx = Fixture::new("discard");
    with_ctx(&fx.state(), |ctx| {
        ctx.init("p", &fx.root(), None, None).unwrap();
        let mut called = false;
        let e = ctx
            .finish(
                "p",
                Finish::Discard,
                &ChangeOptions::default(),
                |_, _, _| {
                    called = true;
                    Ok(())
                },
            )
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(!called);
        assert_eq!(session_dirs(&fx.state()), ["p"]);
    });
}
