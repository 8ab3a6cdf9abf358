//! What the plugin boundary costs: one capture (begin, an install, reading
//! the change set, move-down) on the snapshot backend linked in, next to the
//! same backend built as a plugin and called through the ABI, and the
//! example copy plugin. The install adds many files so the change set that
//! crosses the boundary is large. Prints the median of three rounds per
//! step and the plugin / built-in ratios.
//!
//! `cargo bench -p layerpack-tests --bench plugin [-- BASE_ENTRIES NEW_FILES]`
//! (default 100000 20000).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use layerpack_core::backend::{ChangeOptions, LayerBackend, SessionSpec};
use layerpack_core::config::BackendConfig;
use layerpack_core::registry::Registry;
use layerpack_tests::build_plugin;

fn gen_base(root: &Path, n: usize) {
    let mut made = 0;
    'outer: for d in 0.. {
        let top = root.join(format!("d{d:04}"));
        fs::create_dir_all(&top).unwrap();
        made += 1;
        for f in 0..999 {
            if made >= n {
                break 'outer;
            }
            fs::write(top.join(format!("f{f:03}")), format!("{d}/{f}\n")).unwrap();
            made += 1;
        }
    }
}

fn install(merged: &Path, round: usize, new_files: usize) {
    let dir = merged.join(format!("pkg{round}"));
    fs::create_dir_all(&dir).unwrap();
    for i in 0..new_files {
        fs::write(dir.join(format!("n{i:06}")), format!("{round} {i}\n")).unwrap();
    }
    for i in 0..100 {
        let p = merged.join(format!("d0000/f{:03}", round * 100 + i));
        if p.exists() {
            fs::write(p, "rewritten\n").unwrap();
        }
    }
}

/// Seconds for (begin, changes, move_down) of one round.
fn round(b: &dyn LayerBackend, base: &Path, state: &Path, n: usize, new_files: usize) -> [f64; 3] {
    let dir = state.join(format!("s{n}"));
    fs::create_dir_all(&dir).unwrap();
    let spec = SessionSpec {
        package: "bench".into(),
        base: base.to_path_buf(),
        dir: dir.clone(),
        state: Default::default(),
    };
    let t = Instant::now();
    let begun = b.begin(&spec).unwrap();
    let t_begin = t.elapsed().as_secs_f64();
    let spec = SessionSpec {
        state: begun.state,
        ..spec
    };
    install(&begun.merged, n, new_files);
    let t = Instant::now();
    b.freeze(&spec).unwrap();
    let cs = b.changes(&spec, &ChangeOptions::default()).unwrap();
    let t_changes = t.elapsed().as_secs_f64();
    assert!(cs.len() >= new_files);
    let t = Instant::now();
    b.move_down(&spec).unwrap();
    let t_move = t.elapsed().as_secs_f64();
    fs::remove_dir_all(&dir).unwrap();
    [t_begin, t_changes, t_move]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let base_entries = args.first().copied().unwrap_or(100_000);
    let new_files = args.get(1).copied().unwrap_or(20_000);
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-plugin");
    let _ = fs::remove_dir_all(&work);

    let snapshot_plugin = build_plugin("layerpack-backend-snapshot", &["plugin"]);
    let copy_plugin = build_plugin("layerpack-backend-copy", &[]);
    let mut builtin = Registry::new();
    layerpack_backend_snapshot::register(&mut builtin).unwrap();
    let load = |p: &Path| {
        let mut r = Registry::new();
        layerpack_core::plugin::register_plugin(&mut r, p).unwrap();
        r
    };
    let cases: Vec<(&str, Registry, &str)> = vec![
        ("snapshot (built-in)", builtin, "snapshot"),
        ("snapshot (plugin)", load(&snapshot_plugin), "snapshot"),
        ("copy (plugin)", load(&copy_plugin), "copy"),
    ];
    println!(
        "base {base_entries} entries, install adds {new_files} files and rewrites 100; median of 3 rounds, seconds"
    );
    println!(
        "{:<20} {:>8} {:>8} {:>10} {:>8}",
        "backend", "begin", "changes", "move-down", "total"
    );
    // Every base first (and flushed, so writeback of the generated files
    // does not land in a timed step), then the rounds interleaved, so no
    // backend always runs on a warmer cache.
    let mut setups = Vec::new();
    for (i, (_, registry, name)) in cases.iter().enumerate() {
        let base = work.join(format!("base-{name}-{i}"));
        gen_base(&base, base_entries);
        let base = fs::canonicalize(&base).unwrap();
        let b = registry.create(name, &BackendConfig::empty(name)).unwrap();
        setups.push((base, work.join(format!("state-{i}")), b));
    }
    nix::unistd::sync();
    let mut runs: Vec<Vec<[f64; 3]>> = vec![Vec::new(); cases.len()];
    for n in 0..3 {
        for (i, (base, state, b)) in setups.iter().enumerate() {
            runs[i].push(round(&**b, base, state, n, new_files));
            nix::unistd::sync();
        }
    }
    let mut totals = Vec::new();
    for ((label, _, _), runs) in cases.iter().zip(&runs) {
        let col = |i: usize| median(runs.iter().map(|r| r[i]).collect());
        let total = median(runs.iter().map(|r| r.iter().sum()).collect());
        println!(
            "{label:<20} {:>8.3} {:>8.3} {:>10.3} {:>8.3}",
            col(0),
            col(1),
            col(2),
            total
        );
        totals.push((label.to_string(), col(1), total));
    }
    let (_, changes0, total0) = &totals[0];
    for (label, changes, total) in &totals[1..] {
        println!(
            "{label} / snapshot (built-in): changes {:.2}, total {:.2}",
            changes / changes0,
            total / total0
        );
    }
    let _ = fs::remove_dir_all(&work);
}
