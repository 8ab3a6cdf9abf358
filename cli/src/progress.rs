//! Progress on stderr for scans that take more than a second. Whether to
//! draw at all is one pure function of (terminal, CI, --json).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use layerpack_core::tree::Progress as Callback;

/// Draw progress only for a person watching a terminal.
pub fn should_draw(stderr_is_terminal: bool, is_ci: bool, json: bool) -> bool {
    stderr_is_terminal && !is_ci && !json
}

struct State {
    label: Mutex<String>,
    started: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
    drawn: AtomicBool,
    count: AtomicU64,
}

/// Progress reporting for one process.
#[derive(Clone)]
pub struct Progress {
    enabled: bool,
    state: Arc<State>,
}

/// Clears the progress line when dropped.
pub struct Bar {
    state: Arc<State>,
}

impl Progress {
    /// Decide once, from the environment.
    pub fn new(json: bool) -> Progress {
        let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
        Progress {
            enabled: should_draw(std::io::stderr().is_terminal(), ci, json),
            state: Arc::new(State {
                label: Mutex::new(String::new()),
                started: Mutex::new(None),
                last: Mutex::new(None),
                drawn: AtomicBool::new(false),
                count: AtomicU64::new(0),
            }),
        }
    }

    /// Start a phase called `label`.
    pub fn start(&self, label: &str) -> Bar {
        if let Ok(mut l) = self.state.label.lock() {
            *l = label.to_string();
        }
        if let Ok(mut s) = self.state.started.lock() {
            *s = Some(Instant::now());
        }
        self.state.count.store(0, Ordering::Relaxed);
        Bar {
            state: self.state.clone(),
        }
    }

    /// The callback scans report to.
    pub fn callback(&self) -> Callback {
        let enabled = self.enabled;
        let state = self.state.clone();
        Arc::new(move |n| {
            if !enabled {
                return;
            }
            state.count.store(n, Ordering::Relaxed);
            let now = Instant::now();
            let started = state.started.lock().ok().and_then(|s| *s);
            if started.is_none_or(|s| now - s < Duration::from_secs(1)) {
                return;
            }
            if let Ok(mut last) = state.last.lock() {
                if last.is_some_and(|l| now - l < Duration::from_millis(100)) {
                    return;
                }
                *last = Some(now);
            }
            let label = state.label.lock().map(|l| l.clone()).unwrap_or_default();
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[Klayerpack: {label}: {n} entries");
            let _ = err.flush();
            state.drawn.store(true, Ordering::Relaxed);
        })
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if self.state.drawn.swap(false, Ordering::Relaxed) {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
        if let Ok(mut s) = self.state.started.lock() {
            *s = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::should_draw;

    #[test]
    fn draws_only_for_a_person_at_a_terminal() {
        assert!(should_draw(true, false, false));
        assert!(!should_draw(false, false, false));
        assert!(!should_draw(true, true, false));
        assert!(!should_draw(true, false, true));
    }
}
