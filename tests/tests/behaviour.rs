//! The behaviour matrix: every scenario of SCENARIOS.md against every
//! registered backend. A backend or scenario that cannot run here is
//! reported as ignored with the reason (printed before the run); for a
//! backend named in `LAYERPACK_REQUIRE` that is a failure instead.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::ExitCode;

use layerpack_core::config::BackendConfig;
use layerpack_core::scenarios;
use layerpack_tests::{builtin_registry, required_backends};
use libtest_mimic::{Arguments, Failed, Trial};

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let required = required_backends();
    let registry = builtin_registry();
    let work: PathBuf = std::env::var_os("LAYERPACK_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("behaviour"));
    std::fs::create_dir_all(&work).expect("create test directory");

    for name in &required {
        if registry.origin(name).is_none() {
            eprintln!("LAYERPACK_REQUIRE names unknown backend '{name}'");
            return ExitCode::FAILURE;
        }
    }

    let mut trials = Vec::new();
    for name in registry.names() {
        let must_run = required.iter().any(|r| r == name);
        let probe = registry
            .create(name, &BackendConfig::empty(name))
            .map(|b| (b.probe(), b.capabilities()));
        for sc in scenarios::all() {
            let test_name = format!("{name}::{}", sc.test_name());
            let (probe, caps) = match &probe {
                Ok(p) => p.clone(),
                Err(e) => {
                    let msg = format!("cannot create backend: {e}");
                    trials.push(Trial::test(test_name, move || Err(msg.into())));
                    continue;
                }
            };
            if let Some(why) = probe.reason() {
                if must_run {
                    let msg =
                        format!("LAYERPACK_REQUIRE includes {name}, but it cannot run here: {why}");
                    trials.push(Trial::test(test_name, move || Err(msg.into())));
                } else {
                    eprintln!("ignored {test_name}: backend unavailable: {why}");
                    trials.push(Trial::test(test_name, || Ok(())).with_ignored_flag(true));
                }
                continue;
            }
            if let Some(why) = sc.skip_reason(&caps, &work) {
                let environmental = !why.contains("cannot discard") && !why.contains("discards");
                if must_run && environmental {
                    let msg = format!("LAYERPACK_REQUIRE includes {name}, but: {why}");
                    trials.push(Trial::test(test_name, move || Err(msg.into())));
                } else {
                    eprintln!("ignored {test_name}: {why}");
                    trials.push(Trial::test(test_name, || Ok(())).with_ignored_flag(true));
                }
                continue;
            }
            let work = work.join(name);
            let name = name.to_string();
            trials.push(Trial::test(test_name, move || {
                let registry = builtin_registry();
                let backend = registry
                    .create(&name, &BackendConfig::empty(&name))
                    .map_err(|e| Failed::from(e.to_string()))?;
                std::fs::create_dir_all(&work).map_err(|e| Failed::from(e.to_string()))?;
                scenarios::run(&*backend, &sc, &work).map_err(Failed::from)
            }));
        }
    }
    libtest_mimic::run(&args, trials).exit_code()
}
