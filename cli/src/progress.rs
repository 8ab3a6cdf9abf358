//! Progress on stderr for every step that takes more than a second (scans
//! through the snapshot backend's callback, and every step of the library
//! through the reporter installed in `layerpack_core::progress`). Whether
//! to draw at all is one pure function of (terminal, CI, --json, -q).
//! With `-v`, each step's count and time are printed when it ends, drawn
//! or not. `LAYERPACK_PROGRESS_DELAY_MS` changes the one-second delay
//! (tests).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use layerpack_core::tree::Progress as Callback;

/// Draw progress only for a person watching a terminal who did not ask
/// for quiet.
pub fn should_draw(stderr_is_terminal: bool, is_ci: bool, json: bool, quiet: bool) -> bool {
    stderr_is_terminal && !is_ci && !json && !quiet
}

/// How long a step runs before its progress is drawn.
fn delay() -> Duration {
    std::env::var("LAYERPACK_PROGRESS_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(1))
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} bytes"),
    }
}

struct State {
    label: Mutex<String>,
    started: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
    drawn: AtomicBool,
    count: AtomicU64,
}

impl State {
    /// Erase the progress line, if one is drawn.
    fn clear(&self) {
        if self.drawn.swap(false, Ordering::Relaxed) {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}

/// Progress reporting for one process.
#[derive(Clone)]
pub struct Progress {
    enabled: bool,
    verbose: bool,
    state: Arc<State>,
}

/// Clears the progress line when dropped.
pub struct Bar {
    verbose: bool,
    state: Arc<State>,
}

impl Progress {
    /// Decide once, from the environment and the flags.
    pub fn new(json: bool, quiet: bool, verbose: bool) -> Progress {
        let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
        Progress {
            enabled: should_draw(std::io::stderr().is_terminal(), ci, json, quiet),
            verbose,
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
            verbose: self.verbose,
            state: self.state.clone(),
        }
    }

    /// The callback scans report to.
    pub fn callback(&self) -> Callback {
        let enabled = self.enabled;
        let state = self.state.clone();
        Arc::new(move |n| {
            state.count.store(n, Ordering::Relaxed);
            if !enabled {
                return;
            }
            let now = Instant::now();
            let started = state.started.lock().ok().and_then(|s| *s);
            if started.is_none_or(|s| now - s < delay()) {
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

impl Progress {
    /// The reporter for the library's steps: each step's label and count
    /// on one line, redrawn at most ten times a second, cleared at its end.
    pub fn reporter(&self) -> layerpack_core::progress::Reporter {
        use layerpack_core::progress::Unit;
        let enabled = self.enabled;
        let verbose = self.verbose;
        let state = self.state.clone();
        let count = move |n: u64, unit: Unit| match unit {
            Unit::Entries => format!("{n} entries"),
            Unit::Bytes => human_bytes(n),
        };
        Arc::new(move |label: &str, done: Option<u64>, unit: Unit| {
            let now = Instant::now();
            if verbose {
                // Every step is timed from its first count to its end.
                let mut l = state.label.lock().unwrap_or_else(|p| p.into_inner());
                let mut s = state.started.lock().unwrap_or_else(|p| p.into_inner());
                match done {
                    Some(n) => {
                        if *l != label {
                            *l = label.to_string();
                            *s = Some(now);
                        }
                        state.count.store(n, Ordering::Relaxed);
                    }
                    None => {
                        let (n, secs) = if *l == label {
                            let secs = s.map_or(0.0, |s| (now - s).as_secs_f64());
                            (state.count.load(Ordering::Relaxed), secs)
                        } else {
                            (0, 0.0)
                        };
                        state.clear();
                        eprintln!("layerpack: {label}: {} in {secs:.3} s", count(n, unit));
                        l.clear();
                        *s = None;
                        return;
                    }
                }
            }
            if !enabled {
                return;
            }
            let Some(n) = done else {
                state.clear();
                if let Ok(mut l) = state.label.lock() {
                    l.clear();
                }
                return;
            };
            let mut new_step = false;
            if let (Ok(mut l), Ok(mut s)) = (state.label.lock(), state.started.lock()) {
                if *l != label || s.is_none() {
                    *l = label.to_string();
                    *s = Some(now);
                    new_step = true;
                }
                if s.is_some_and(|s| now - s < delay()) {
                    return;
                }
            }
            if let Ok(mut last) = state.last.lock() {
                // A new step is drawn at once; then ten times a second.
                if !new_step && last.is_some_and(|l| now - l < Duration::from_millis(100)) {
                    return;
                }
                *last = Some(now);
            }
            let shown = count(n, unit);
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[Klayerpack: {label}: {shown}");
            let _ = err.flush();
            state.drawn.store(true, Ordering::Relaxed);
        })
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.state.clear();
        if let Ok(mut s) = self.state.started.lock() {
            if self.verbose {
                if let (Some(start), Ok(label)) = (*s, self.state.label.lock()) {
                    let n = self.state.count.load(Ordering::Relaxed);
                    if n > 0 {
                        eprintln!(
                            "layerpack: {label}: {n} entries in {:.3} s",
                            start.elapsed().as_secs_f64()
                        );
                    }
                }
            }
            *s = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::should_draw;

    #[test]
    fn draws_only_for_a_person_at_a_terminal() {
        assert!(should_draw(true, false, false, false));
        assert!(!should_draw(false, false, false, false));
        assert!(!should_draw(true, true, false, false));
        assert!(!should_draw(true, false, true, false));
        assert!(!should_draw(true, false, false, true));
    }
}
