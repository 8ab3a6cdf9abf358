//! The behaviour suite as a library, for anyone who writes a backend: run
//! every scenario of SCENARIOS.md against a backend (linked in, or loaded
//! from a plugin file through the ABI) and get a report. This is the same
//! suite the project runs on its own backends and that `layerpack
//! selftest` runs.
//!
//! ```no_run
//! use layerpack_core::testkit;
//! # fn my_backend() -> Box<dyn layerpack_core::backend::LayerBackend> { unimplemented!() }
//! let work = std::env::temp_dir().join("my-backend-suite");
//! testkit::run_suite(&*my_backend(), &work, |_| None, |_| {}).assert_passed();
//! ```

use std::path::{Path, PathBuf};

use crate::backend::LayerBackend;
use crate::config::BackendConfig;
use crate::registry::Registry;
pub use crate::scenarios::Skip;
use crate::scenarios::{self, Scenario};
use crate::Result;

/// How one scenario went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every expectation held.
    Pass,
    /// What went wrong.
    Fail(String),
    /// Why it could not run here.
    Skip(Skip),
}

/// One scenario's result.
#[derive(Clone, Debug)]
pub struct ScenarioResult {
    /// `s01_add_file_in_new_dirs`-style name.
    pub name: String,
    /// What happened.
    pub outcome: Outcome,
}

/// The results of a whole run.
#[derive(Clone, Debug, Default)]
pub struct SuiteReport {
    /// Backend name.
    pub backend: String,
    /// One entry per scenario, in order.
    pub results: Vec<ScenarioResult>,
}

impl SuiteReport {
    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.results.iter().filter(|r| f(&r.outcome)).count()
    }

    /// Scenarios that passed.
    pub fn passed(&self) -> usize {
        self.count(|o| *o == Outcome::Pass)
    }

    /// Scenarios that failed.
    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Fail(_)))
    }

    /// Scenarios skipped.
    pub fn skipped(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Skip(_)))
    }

    /// `name: N passed, N failed, N skipped`.
    pub fn summary(&self) -> String {
        format!(
            "{}: {} passed, {} failed, {} skipped",
            self.backend,
            self.passed(),
            self.failed(),
            self.skipped()
        )
    }

    /// Panic with every failure (and the summary) unless all passed or
    /// were skipped; print the skips.
    pub fn assert_passed(&self) {
        for r in &self.results {
            if let Outcome::Skip(why) = &r.outcome {
                eprintln!("skipped {}: {why}", r.name);
            }
        }
        let failures: Vec<String> = self
            .results
            .iter()
            .filter_map(|r| match &r.outcome {
                Outcome::Fail(e) => Some(format!("{}: {e}", r.name)),
                _ => None,
            })
            .collect();
        assert!(
            failures.is_empty() && self.passed() > 0,
            "{}\n{}",
            self.summary(),
            failures.join("\n")
        );
    }
}

/// Run every scenario against `backend` in scratch directories below
/// `work`. `extra_skip` may skip a scenario with a reason (on top of the
/// scenario's own needs and the backend's capabilities); `on_result` sees
/// each result as it comes.
pub fn run_suite(
    backend: &dyn LayerBackend,
    work: &Path,
    extra_skip: impl Fn(&Scenario) -> Option<Skip>,
    mut on_result: impl FnMut(&ScenarioResult),
) -> SuiteReport {
    let mut report = SuiteReport {
        backend: backend.name().to_string(),
        results: Vec::new(),
    };
    let _ = std::fs::create_dir_all(work);
    for sc in scenarios::all() {
        let skip = extra_skip(&sc).or_else(|| sc.skip_reason(&backend.capabilities(), work));
        let outcome = match skip {
            Some(why) => Outcome::Skip(why),
            None => match scenarios::run(backend, &sc, work) {
                Ok(()) => Outcome::Pass,
                Err(e) => Outcome::Fail(e),
            },
        };
        let r = ScenarioResult {
            name: sc.test_name(),
            outcome,
        };
        on_result(&r);
        report.results.push(r);
    }
    if backend.capabilities().max_name_len.is_some() {
        let r = ScenarioResult {
            name: "name_limit_refused".into(),
            outcome: match scenarios::check_name_limit(backend, work) {
                Ok(()) => Outcome::Pass,
                Err(e) => Outcome::Fail(e),
            },
        };
        on_result(&r);
        report.results.push(r);
    }
    report
}

/// Load the plugin at `path` through the ABI (as `layerpack` does for a
/// `[[plugin]]` entry) and create its backend with the settings in
/// `toml_text` (the body of its `[backends.<name>]` table).
pub fn load_plugin_backend(path: &Path, toml_text: &str) -> Result<Box<dyn LayerBackend>> {
    let mut registry = Registry::new();
    let lib = crate::plugin::register_plugin(&mut registry, path)?;
    let cfg = BackendConfig::from_text(lib.name, toml_text, None)?;
    registry.create(lib.name, &cfg)
}

/// The shared library cargo built for the `cdylib` crate `crate_name`,
/// seen from a running test: `lib<crate_name>.so` next to the test
/// executable (`target/<profile>/deps/`, where `cargo test` leaves it), or
/// one directory up (where `cargo build` puts it).
pub fn cdylib_path(crate_name: &str) -> PathBuf {
    let file = format!("lib{}.so", crate_name.replace('-', "_"));
    let exe = std::env::current_exe().unwrap_or_default();
    let deps = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let beside = deps.join(&file);
    if beside.exists() {
        return beside;
    }
    deps.parent().map(|d| d.join(&file)).unwrap_or(beside)
}
