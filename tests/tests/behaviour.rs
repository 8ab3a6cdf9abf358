//! The behaviour matrix: every scenario of SCENARIOS.md against every
//! registered backend, and against the snapshot and overlayfs backends
//! built as plugins and loaded through the ABI (`plugin-<name>::…`): the
//! same results are required either way. A backend or scenario that cannot
//! run here is reported as ignored with the reason (printed before the
//! run); for a backend named in `LAYERPACK_REQUIRE` that is a failure
//! instead.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use layerpack_core::config::BackendConfig;
use layerpack_core::registry::Registry;
use layerpack_core::scenarios;
use layerpack_tests::{
    build_plugin, builtin_registry, judge_skip, required_backends, SkipVerdict, REQUIRE_WORDS,
};

type MakeRegistry = Arc<dyn Fn() -> Registry + Send + Sync>;

/// Backends built as plugins and run through the ABI as well.
const AS_PLUGINS: &[&str] = &["snapshot", "overlayfs"];

/// Backends run a second time with other settings: (test-name prefix,
/// backend, settings as TOML).
const VARIANTS: &[(&str, &str, &str)] = &[("fuse-merged", "fuse", "in_place = false")];
use libtest_mimic::{Arguments, Failed, Trial};

/// The trial of a backend that cannot run here: a failure when
/// `LAYERPACK_REQUIRE` names it, else ignored with the reason.
fn unavailable(test_name: String, backend: &str, must_run: bool, why: &str) -> Trial {
    if must_run {
        let msg = format!("LAYERPACK_REQUIRE includes {backend}, but it cannot run here: {why}");
        Trial::test(test_name, move || Err(msg.into()))
    } else {
        ignored(test_name, format!("backend unavailable: {why}"))
    }
}

/// A trial that creates backend `name` from `make` and runs `check` on
/// it in the scratch directory `work`.
fn backend_trial(
    test_name: String,
    work: &std::path::Path,
    name: &str,
    cfg: &BackendConfig,
    make: &MakeRegistry,
    check: impl FnOnce(&dyn layerpack_core::backend::LayerBackend, &std::path::Path) -> Result<(), String>
        + Send
        + 'static,
) -> Trial {
    let (work, name, make, cfg) = (
        work.to_path_buf(),
        name.to_string(),
        make.clone(),
        cfg.clone(),
    );
    Trial::test(test_name, move || {
        let registry = make();
        let backend = registry
            .create(&name, &cfg)
            .map_err(|e| Failed::from(e.to_string()))?;
        std::fs::create_dir_all(&work).map_err(|e| Failed::from(e.to_string()))?;
        check(&*backend, &work).map_err(Failed::from)
    })
}

/// A trial that is ignored at run time with `why` as its reason.
fn ignored(name: String, why: String) -> Trial {
    Trial::ignorable_test(name, move || {
        Ok(libtest_mimic::Completion::ignored_with(why))
    })
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let required = required_backends();
    let registry = builtin_registry();
    let work: PathBuf = std::env::var_os("LAYERPACK_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("behaviour"));
    std::fs::create_dir_all(&work).expect("create test directory");

    for name in &required {
        if registry.origin(name).is_none() && !REQUIRE_WORDS.contains(&name.as_str()) {
            eprintln!(
                "LAYERPACK_REQUIRE names '{name}', which is neither a backend ({}) nor one of {}",
                registry.names().join(", "),
                REQUIRE_WORDS.join(", ")
            );
            return ExitCode::FAILURE;
        }
    }

    // (test-name prefix, backend name, how to get a registry holding it,
    // its settings)
    let mut sources: Vec<(String, String, MakeRegistry, BackendConfig)> = registry
        .names()
        .into_iter()
        .map(|n| {
            (
                n.to_string(),
                n.to_string(),
                Arc::new(builtin_registry) as MakeRegistry,
                BackendConfig::empty(n),
            )
        })
        .collect();
    for (label, name, toml_text) in VARIANTS {
        let mut cfg = BackendConfig::empty(name);
        cfg.table = toml_text.parse().expect("variant settings");
        sources.push((
            label.to_string(),
            name.to_string(),
            Arc::new(builtin_registry) as MakeRegistry,
            cfg,
        ));
    }
    for name in AS_PLUGINS {
        let so = build_plugin(&format!("layerpack-backend-{name}"), &["plugin"]);
        let make: MakeRegistry = Arc::new(move || {
            let mut r = Registry::new();
            layerpack_core::plugin::register_plugin(&mut r, &so).expect("load plugin");
            r
        });
        sources.push((
            format!("plugin-{name}"),
            name.to_string(),
            make,
            BackendConfig::empty(name),
        ));
    }

    let mut trials = Vec::new();
    for (label, name, make, cfg) in sources {
        let registry = make();
        let name = name.as_str();
        // A backend through the ABI is required with the backend itself,
        // by its test prefix, or by `plugins` (every plugin build).
        let must_run = required
            .iter()
            .any(|r| r == name || *r == label || (r == "plugins" && label.starts_with("plugin-")));
        let probe = registry
            .create(name, &cfg)
            .map(|b| (b.probe(), b.capabilities()));
        // The name-limit check, only where the backend declares a limit.
        if let Ok((probe, caps)) = &probe {
            if caps.max_name_len.is_some() {
                let test_name = format!("{label}::name_limit_refused");
                trials.push(match probe.reason() {
                    Some(why) => unavailable(test_name, name, must_run, &why),
                    None => {
                        backend_trial(test_name, &work.join(&label), name, &cfg, &make, |b, w| {
                            scenarios::check_name_limit(b, w)
                        })
                    }
                });
            }
        }
        for sc in scenarios::all() {
            let test_name = format!("{label}::{}", sc.test_name());
            let (probe, caps) = match &probe {
                Ok(p) => p.clone(),
                Err(e) => {
                    let msg = format!("cannot create backend: {e}");
                    trials.push(Trial::test(test_name, move || Err(msg.into())));
                    continue;
                }
            };
            if let Some(why) = probe.reason() {
                trials.push(unavailable(test_name, name, must_run, &why));
                continue;
            }
            if let Some(skip) = sc.skip_reason(&caps, &work) {
                // A backend cannot help a tmpfs that takes no user.* xattrs.
                match judge_skip(name, must_run, &skip, &required) {
                    SkipVerdict::Fail(msg) => {
                        trials.push(Trial::test(test_name, move || Err(msg.into())))
                    }
                    SkipVerdict::Ignore(why) => trials.push(ignored(test_name, why)),
                }
                continue;
            }
            trials.push(backend_trial(
                test_name,
                &work.join(&label),
                name,
                &cfg,
                &make,
                move |b, w| scenarios::run(b, &sc, w),
            ));
        }
    }
    libtest_mimic::run(&args, trials).exit_code()
}
