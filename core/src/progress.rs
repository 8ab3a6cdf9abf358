//! One progress facility for every long step — scans, reading an upper
//! layer, the fold, packing, `apply`, `index`. The library draws nothing:
//! each step counts what it did and hands the count to the reporter the
//! program installed ([`set_reporter`]); with none installed (tests,
//! plugins, `--json`), counting costs an atomic add.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// What a step counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Filesystem entries (or packages, for `index`).
    Entries,
    /// Bytes of file content.
    Bytes,
}

/// Receives `(label, done so far, unit)`; `done` is `None` when the step
/// ends (clear what was drawn).
pub type Reporter = Arc<dyn Fn(&str, Option<u64>, Unit) + Send + Sync>;

static REPORTER: RwLock<Option<Reporter>> = RwLock::new(None);

/// Install the reporter every later step reports to (`None`: report
/// nothing).
pub fn set_reporter(r: Option<Reporter>) {
    *REPORTER.write().unwrap_or_else(|p| p.into_inner()) = r;
}

/// One long step, from [`step`] until dropped.
pub struct Step {
    label: String,
    unit: Unit,
    done: AtomicU64,
    reporter: Option<Reporter>,
}

/// Begin a step called `label` (what a person watching should read:
/// "folding the layer into /x").
pub fn step(label: impl Into<String>, unit: Unit) -> Step {
    Step {
        label: label.into(),
        unit,
        done: AtomicU64::new(0),
        reporter: REPORTER.read().unwrap_or_else(|p| p.into_inner()).clone(),
    }
}

impl Step {
    /// Count `n` more.
    pub fn add(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(r) = &self.reporter {
            r(&self.label, Some(done), self.unit);
        }
    }

    /// The count so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if let Some(r) = &self.reporter {
            r(&self.label, None, self.unit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    type Seen = Arc<Mutex<Vec<(String, Option<u64>)>>>;

    #[test]
    fn a_step_reports_counts_and_its_end_to_the_reporter() {
        let seen: Seen = Arc::default();
        let s2 = seen.clone();
        set_reporter(Some(Arc::new(move |l: &str, n, _| {
            s2.lock().unwrap().push((l.to_string(), n))
        })));
        {
            let st = step("packing x", Unit::Bytes);
            st.add(10);
            st.add(5);
            assert_eq!(st.done(), 15);
        }
        set_reporter(None);
        let got = seen.lock().unwrap().clone();
        let mine: Vec<_> = got.into_iter().filter(|(l, _)| l == "packing x").collect();
        assert_eq!(
            mine,
            [
                ("packing x".to_string(), Some(10)),
                ("packing x".to_string(), Some(15)),
                ("packing x".to_string(), None)
            ]
        );
    }
}
