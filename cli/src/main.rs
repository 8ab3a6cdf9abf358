//! `layerpack`: capture what a package's install step does to a root tree
//! as a layer, and turn it into packages.
//!
//! One exit point: 0 success, 1 failure, 2 usage; `run` exits with the
//! command's status when the command failed. Errors print their whole chain
//! on one line. `--json` makes stdout JSON Lines.

mod elfdeps;
mod manifest;
mod packaging;
mod progress;
mod showinfo;

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use layerpack_core::backend::ChangeOptions;
use layerpack_core::config::Config;
use layerpack_core::jsonbytes::to_json;
use layerpack_core::ops::{self, Finish};
use layerpack_core::registry::{Origin, Registry};
use layerpack_core::session::{validate_package_name, StateDir};
use layerpack_core::tree::ScanOptions;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(
    name = "layerpack",
    version,
    about = "Capture what a package's install does to a root tree, as a layer, and package it",
    after_help = "Environment: LAYERPACK_CONFIG, LAYERPACK_STATE_DIR; `run` sets LAYERPACK_ROOT and LAYERPACK_PACKAGE for the command."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct Global {
    /// Config file (default: none; built-in defaults).
    #[arg(long, global = true, env = "LAYERPACK_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print JSON Lines on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Where sessions live (default: $XDG_STATE_HOME/layerpack or ~/.local/state/layerpack).
    #[arg(long, global = true, env = "LAYERPACK_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Print only warnings and errors on stderr (no progress, no summaries).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Also print every change of a capture and how long each step took.
    #[arg(short, long, global = true)]
    verbose: bool,
}

/// How much goes to stderr besides warnings and errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Verbosity {
    /// `-q`: nothing else.
    Quiet = 0,
    /// Summaries and what was done.
    Normal = 1,
    /// `-v`: also every change and each step's time.
    Verbose = 2,
}

static VERBOSITY: std::sync::atomic::AtomicU8 =
    std::sync::atomic::AtomicU8::new(Verbosity::Normal as u8);

fn verbosity() -> Verbosity {
    match VERBOSITY.load(std::sync::atomic::Ordering::Relaxed) {
        0 => Verbosity::Quiet,
        1 => Verbosity::Normal,
        _ => Verbosity::Verbose,
    }
}

/// A line for the user on stderr that `-q` silences.
macro_rules! info {
    ($($arg:tt)*) => {
        if verbosity() >= Verbosity::Normal {
            eprintln!($($arg)*);
        }
    };
}

/// A line on stderr that only `-v` asks for.
macro_rules! detail {
    ($($arg:tt)*) => {
        if verbosity() >= Verbosity::Verbose {
            eprintln!($($arg)*);
        }
    };
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Open a capture session for a package; prints the path to install into.
    Init {
        #[arg(value_parser = package_name)]
        package: String,
        #[command(flatten)]
        opts: InitOpts,
    },
    /// Read the package's layer, write its outputs, and fold it into the root.
    Final {
        #[arg(value_parser = package_name)]
        package: String,
        /// Package version (default: the one given to init).
        #[arg(long = "version", value_name = "V")]
        pkg_version: Option<String>,
        #[command(flatten)]
        opts: FinalOpts,
    },
    /// init, run a command with LAYERPACK_ROOT set, then final.
    Run {
        #[arg(value_parser = package_name)]
        package: String,
        #[command(flatten)]
        init: InitOpts,
        #[command(flatten)]
        fin: FinalOpts,
        /// The install command and its arguments.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Drop a package's session (discarding the layer where the backend can).
    Abort {
        #[arg(value_parser = package_name)]
        package: String,
    },
    /// List open sessions, their backend and state.
    Status,
    /// List every backend: available or why not, and its capabilities.
    Backends,
    /// Write Packages and Packages.gz for the ipk files in a feed directory.
    Index {
        /// The feed directory.
        feed: PathBuf,
    },
    /// Rewrite every package a feed's ledger knows from a finished tree
    /// (Buildroot's target after target-finalize, or the image's copy):
    /// the same paths with their final bytes and owners, what the tree
    /// lost dropped, and what no package installed in one extra package.
    Repack {
        /// The feed directory (holding layerpack-ledger.json).
        feed: PathBuf,
        /// The finished tree.
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        /// Package for the paths no package installed.
        #[arg(long, value_name = "NAME", default_value = "rootfs-extra")]
        extra: String,
        /// Its version.
        #[arg(long = "extra-version", value_name = "V", default_value = "1")]
        extra_version: String,
        /// Write the packages without publishing them (no revision bump,
        /// nothing recorded): a later repack of the final tree publishes.
        #[arg(long)]
        provisional: bool,
        /// Write opkg's database (var/lib/opkg/status, info/<pkg>.control
        /// and .list) into the tree: yes, no, or auto (when the tree
        /// holds opkg).
        #[arg(long = "opkg-db", value_name = "WHEN", default_value = "no", value_parser = ["auto", "yes", "no"])]
        opkg_db: String,
        /// Buildroot's `make show-info` output: each package's License and
        /// Source fields are taken from it.
        #[arg(long = "package-info", value_name = "FILE")]
        package_info: Option<PathBuf>,
        #[command(flatten)]
        pack: packaging::PackArgs,
    },
    /// Install a package (ipk, OpenWrt ipk, tar.gz, OCI layer) into a tree, deletions included.
    Apply {
        /// The package file.
        package: PathBuf,
        /// The tree to install into.
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
    },
    /// Run the behaviour scenarios against one backend on this machine.
    Selftest {
        /// Backend to test (default: snapshot).
        #[arg(long, value_name = "NAME", default_value = "snapshot")]
        backend: String,
        /// Scratch directory (default: a new directory under the system's temporary directory).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Apply the change rules to two trees.
    Diff {
        /// The tree before.
        before: PathBuf,
        /// The tree after.
        after: PathBuf,
    },
}

#[derive(Args, Debug)]
struct InitOpts {
    /// The tree the package installs into.
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// Backend name, or `auto` for the best available (default: snapshot).
    #[arg(long, value_name = "NAME")]
    backend: Option<String>,
    /// Package version, kept for `final`.
    #[arg(long = "version", value_name = "V")]
    pkg_version: Option<String>,
}

#[derive(Args, Debug)]
struct FinalOpts {
    #[command(flatten)]
    pack: packaging::PackArgs,
    /// Where to write outputs (default: out_dir from the config, else the current directory).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Keep the layer and the session open after writing outputs.
    #[arg(long, conflicts_with = "discard")]
    keep: bool,
    /// Drop the layer after writing outputs; the root is as before init.
    #[arg(long)]
    discard: bool,
    /// Hash every candidate file instead of trusting stat data.
    #[arg(long)]
    hash_all: bool,
}

fn package_name(s: &str) -> Result<String, String> {
    validate_package_name(s)
        .map(|()| s.to_string())
        .map_err(|e| e.message().to_string())
}

/// Everything a command needs.
struct App {
    global: Global,
    config: Config,
    registry: Registry,
    progress: progress::Progress,
}

fn main() -> ExitCode {
    layerpack_core::sys::map_large_allocations();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // `--json` asked for, even if the rest did not parse: say it on
            // stdout too, so a script reading JSON Lines sees the failure.
            if e.use_stderr() && std::env::args_os().any(|a| a == "--json") {
                let text = e.to_string();
                let first = text
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("error: ");
                let _ = print_json(&json!({"type": "error", "kind": "usage", "message": first}));
            }
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let json = cli.global.json;
    match run_cli(cli) {
        Ok(code) => code,
        Err(e) => {
            if is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            eprintln!("layerpack: error: {}", error_chain(&e));
            if json {
                let _ = print_json(&error_json(&e));
            }
            ExitCode::FAILURE
        }
    }
}

/// An error as a JSON object: its kind, message, the path at fault and
/// the chain of causes.
fn error_json(e: &anyhow::Error) -> Value {
    let core = e
        .chain()
        .find_map(|c| c.downcast_ref::<layerpack_core::Error>());
    let causes: Vec<String> = e.chain().skip(1).map(|c| c.to_string()).collect();
    json!({
        "type": "error",
        "kind": core.map_or("error", |c| c.kind().as_str()),
        "message": error_chain(e),
        "path": core.and_then(|c| c.path()).map(path_json),
        "causes": causes,
    })
}

/// The error and every cause behind it, on one line; a cause whose text
/// the line already holds is not repeated.
fn error_chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": caused by: ");
        }
        line.push_str(&text);
    }
    line
}

/// What `status` says of an open session: its phase and health, and the
/// command that moves it on.
fn session_state(ctx: &ops::Context<'_>, s: &layerpack_core::session::SessionFile) -> String {
    use layerpack_core::session::Phase;
    let pkg = &s.package;
    match s.phase {
        Phase::Starting => {
            return format!("`layerpack init {pkg}` did not finish; run it again or `layerpack abort {pkg}`")
        }
        Phase::Frozen => {
            return format!("`final` was interrupted after it unmounted the layer; run `layerpack final {pkg}` to finish")
        }
        Phase::MovingDown => {
            return format!("the fold into the root was interrupted; run `layerpack final {pkg}` to finish it")
        }
        Phase::Discarding => {
            return format!("the discard was interrupted; run `layerpack final {pkg} --discard` or `layerpack abort {pkg}`")
        }
        Phase::Open => {}
    }
    match ctx.backend(&s.backend) {
        Ok(b) => b.health(&ctx.state.spec(s)).describe(),
        Err(e) => format!("backend unavailable: {e}"),
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run_cli(cli: Cli) -> Result<ExitCode> {
    let config = match &cli.global.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let level = match (cli.global.quiet, cli.global.verbose) {
        (true, _) => Verbosity::Quiet,
        (_, true) => Verbosity::Verbose,
        _ => Verbosity::Normal,
    };
    VERBOSITY.store(level as u8, std::sync::atomic::Ordering::Relaxed);
    let progress = progress::Progress::new(cli.global.json, cli.global.quiet, cli.global.verbose);
    layerpack_core::progress::set_reporter(Some(progress.reporter()));
    let userns = rootless_run(&cli.command, &config)?;
    let mut registry = Registry::new();
    layerpack_backend_snapshot::register_with_progress(&mut registry, Some(progress.callback()))?;
    layerpack_backend_overlayfs::register_in_user_namespace(&mut registry, userns)?;
    layerpack_backend_fuse::register(&mut registry)?;
    layerpack_backend_aufs::register(&mut registry)?;
    for p in &config.plugin {
        layerpack_core::plugin::register_plugin(&mut registry, &p.path)?;
    }
    config.check_backends(&registry)?;
    let app = App {
        global: cli.global,
        config,
        registry,
        progress,
    };
    match cli.command {
        Command::Init { package, opts } => app.init(&package, &opts).map(|_| ExitCode::SUCCESS),
        Command::Final {
            package,
            pkg_version,
            opts,
        } => app
            .finish(&package, pkg_version.as_deref(), &opts)
            .map(|()| ExitCode::SUCCESS),
        Command::Index { feed } => app.index(&feed).map(|()| ExitCode::SUCCESS),
        Command::Repack {
            feed,
            root,
            extra,
            extra_version,
            provisional,
            opkg_db,
            package_info,
            pack,
        } => app
            .repack(
                &feed,
                &root,
                &RepackOpts {
                    extra: &extra,
                    extra_version: &extra_version,
                    provisional,
                    opkg_db: &opkg_db,
                    package_info: package_info.as_deref(),
                },
                &pack,
            )
            .map(|()| ExitCode::SUCCESS),
        Command::Selftest { backend, dir } => app.selftest(&backend, dir.as_deref(), userns),
        Command::Apply { package, root } => app.apply(&package, &root).map(|()| ExitCode::SUCCESS),
        Command::Run {
            package,
            init,
            fin,
            command,
        } => app.run(&package, &init, &fin, &command),
        Command::Abort { package } => app.abort(&package).map(|()| ExitCode::SUCCESS),
        Command::Status => app.status().map(|()| ExitCode::SUCCESS),
        Command::Backends => app.backends().map(|()| ExitCode::SUCCESS),
        Command::Diff { before, after } => app.diff(&before, &after).map(|()| ExitCode::SUCCESS),
    }
}

/// `run` of an unprivileged user with the overlayfs backend: enter a user
/// and mount namespace first, so init, the command and final all run in
/// it (the mount dies with the process, which `run` outlives anyway).
fn rootless_run(cmd: &Command, config: &Config) -> Result<bool> {
    let choice = match cmd {
        Command::Run { init, .. } => init
            .backend
            .as_deref()
            .or(config.backend.as_deref())
            .unwrap_or("snapshot"),
        Command::Selftest { backend, .. } => backend.as_str(),
        _ => return Ok(false),
    };
    if choice != layerpack_backend_overlayfs::NAME || nix::unistd::geteuid().is_root() {
        return Ok(false);
    }
    // Inside the namespace this process is uid 0: the per-user registry of
    // open roots is the real user's, so fix its place first. Still one
    // thread here, so setting the variable races with nothing.
    if std::env::var_os("LAYERPACK_RUNTIME_DIR").is_none() {
        std::env::set_var(
            "LAYERPACK_RUNTIME_DIR",
            layerpack_core::roots::default_runtime_dir(),
        );
    }
    layerpack_backend_overlayfs::enter_user_namespace()?;
    Ok(true)
}

/// The version of the JSON Lines schema, given on the first line printed.
const JSON_SCHEMA_VERSION: u32 = 1;

fn print_json(v: &Value) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static FIRST: AtomicBool = AtomicBool::new(true);
    debug_assert!(v.get("type").is_some(), "a JSON line without type: {v}");
    if FIRST.swap(false, Ordering::Relaxed) {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.insert("version".into(), json!(JSON_SCHEMA_VERSION));
        }
        return print_json_line(&v);
    }
    print_json_line(v)
}

fn print_json_line(v: &Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, v)?;
    out.write_all(b"\n")?;
    Ok(())
}

fn print_line(s: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())?;
    out.write_all(b"\n")?;
    Ok(())
}

fn path_json(p: &Path) -> Value {
    to_json(p.as_os_str().as_encoded_bytes())
}

impl App {
    fn context(&self) -> Result<ops::Context<'_>> {
        let dir = self
            .global
            .state_dir
            .clone()
            .or_else(|| self.config.state_dir.clone())
            .unwrap_or_else(StateDir::default_location);
        Ok(ops::Context {
            state: StateDir::open(&dir)?,
            registry: &self.registry,
            config: &self.config,
        })
    }

    fn out_dir(&self, opts: &FinalOpts) -> Result<PathBuf> {
        let out = opts
            .out
            .clone()
            .or_else(|| self.config.out_dir.clone())
            .unwrap_or_else(|| PathBuf::from("."));
        std::fs::create_dir_all(&out)
            .with_context(|| format!("cannot create output directory {}", out.display()))?;
        Ok(out)
    }

    /// Open the session; say which backends `auto` skipped and why.
    /// `formats`: the package formats the command line gives (`run
    /// --format`), if any.
    fn open_session(
        &self,
        package: &str,
        opts: &InitOpts,
        formats: &[String],
    ) -> Result<ops::Opened> {
        let ctx = self.context()?;
        let _bar = self
            .progress
            .start(&format!("scanning {}", opts.root.display()));
        let opened = ctx.init_for(
            package,
            &opts.root,
            opts.backend.as_deref(),
            opts.pkg_version.as_deref(),
            formats,
        )?;
        if !self.global.json {
            for (name, why) in &opened.skipped {
                info!("layerpack: auto: skipped {name}: {why}");
            }
            let s = &opened.session;
            detail!(
                "layerpack: {}: backend {}, root {}, install into {}",
                s.package,
                s.backend,
                s.base.display(),
                s.merged.display()
            );
        }
        Ok(opened)
    }

    fn init(&self, package: &str, opts: &InitOpts) -> Result<PathBuf> {
        let opened = self.open_session(package, opts, &[])?;
        let s = &opened.session;
        if self.global.json {
            let skipped: Vec<Value> = opened
                .skipped
                .iter()
                .map(|(n, w)| json!({"backend": n, "reason": w}))
                .collect();
            print_json(&json!({
                "type": "init",
                "package": s.package,
                "backend": s.backend,
                "root": path_json(&s.base),
                "merged": path_json(&s.merged),
                "skipped": skipped,
            }))?;
        } else {
            let mut out = std::io::stdout().lock();
            out.write_all(s.merged.as_os_str().as_encoded_bytes())?;
            out.write_all(b"\n")?;
        }
        Ok(s.merged.clone())
    }

    fn finish(&self, package: &str, version: Option<&str>, opts: &FinalOpts) -> Result<()> {
        let ctx = self.context()?;
        let out = self.out_dir(opts)?;
        let how = if opts.keep {
            Finish::Keep
        } else if opts.discard {
            Finish::Discard
        } else {
            Finish::MoveDown
        };
        let copts = ChangeOptions {
            hash_all: opts.hash_all || self.config.hash_all,
        };
        let mut written: Vec<PathBuf> = Vec::new();
        let mut notes: Vec<String> = Vec::new();
        let bar = self
            .progress
            .start(&format!("reading the layer of {package}"));
        let mut counts = None;
        let done = ctx.finish(package, how, &copts, |s, cs, content| {
            let mut packaging = packaging::Packaging::decide(
                &opts.pack,
                version,
                &self.config,
                &packaging::Subject::of_session(s),
            )
            .map_err(core_err)?;
            let w = packaging.write(s, cs, content, &out).map_err(core_err)?;
            notes.append(&mut packaging.notes);
            let path =
                manifest::write_changes_json(&out, &s.package, &s.backend, &s.base, cs, &w.routes)
                    .map_err(core_err)?;
            written.extend(w.paths);
            written.push(path);
            counts = Some(w.counts);
            Ok(())
        })?;
        drop(bar);
        for n in &notes {
            eprintln!("layerpack: {package}: warning: {n}");
        }
        let what = match (&done.changes, how) {
            (None, _) => "resumed an interrupted fold; finished",
            (Some(_), Finish::Keep) => "layer kept; session still open",
            (Some(_), Finish::Discard) => "layer discarded",
            (Some(_), Finish::MoveDown) => "layer folded into the root",
        };
        if self.global.json {
            print_json(&json!({
                "type": "final",
                "package": package,
                "backend": done.session.backend,
                "summary": done.changes.as_ref().map(manifest::summary),
                "contents": counts.as_ref().map(|c| json!({
                    "from_layer": c.from_layer, "kept": c.kept, "dropped": c.dropped,
                    "diverted": c.diverted, "shipped_foreign": c.shipped, "skipped_foreign": c.skipped})),
                "outputs": written.iter().map(|p| path_json(p)).collect::<Vec<_>>(),
                "result": what,
                "warnings": notes,
            }))?;
        } else {
            if let Some(cs) = &done.changes {
                if verbosity() >= Verbosity::Verbose {
                    for c in cs {
                        detail!("  {} {}", c.kind.symbol(), c.path);
                    }
                }
                let s = manifest::summary(cs);
                info!(
                    "layerpack: {package}: {} added, {} modified, {} metadata only, {} deleted",
                    s["added"], s["modified"], s["metadata_only"], s["deleted"]
                );
            }
            if let Some(c) = &counts {
                if c.kept + c.dropped + c.diverted + c.shipped + c.skipped > 0 {
                    info!(
                        "layerpack: {package}: the package holds {} entries from this install and {} kept from its earlier capture; {} dropped; {} edits of files it does not own carried by scripts, {} shipped as its own, {} left out",
                        c.from_layer, c.kept, c.dropped, c.diverted, c.shipped, c.skipped
                    );
                }
            }
            for p in &written {
                print_line(&p.display().to_string())?;
            }
            info!("layerpack: {package}: {what}");
        }
        Ok(())
    }

    fn run(
        &self,
        package: &str,
        init: &InitOpts,
        fin: &FinalOpts,
        command: &[OsString],
    ) -> Result<ExitCode> {
        // Everything the package file's name depends on is known here:
        // refuse before the install runs rather than at its end.
        layerpack_core::pack::check_file_name_fields(
            package,
            init.pkg_version.as_deref(),
            fin.pack.arch.as_deref(),
        )?;
        let merged = self
            .open_session(package, init, &fin.pack.format)?
            .session
            .merged;
        let (prog, args) = command
            .split_first()
            .ok_or_else(|| anyhow!("no command given after --"))?;
        let mut cmd = std::process::Command::new(prog);
        cmd.args(args)
            .env("LAYERPACK_ROOT", &merged)
            .env("LAYERPACK_PACKAGE", package);
        if self.global.json {
            // stdout is JSON Lines: what the install prints goes to stderr.
            use std::os::fd::AsFd;
            let err = std::io::stderr().as_fd().try_clone_to_owned()?;
            cmd.stdout(std::process::Stdio::from(err));
        }
        let status = cmd.status();
        let code = match status {
            Ok(s) if s.success() => {
                return self.finish(package, None, fin).map(|()| ExitCode::SUCCESS)
            }
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                s.code()
                    .or_else(|| s.signal().map(|sig| 128 + sig))
                    .unwrap_or(1)
            }
            Err(e) => {
                eprintln!(
                    "layerpack: error: cannot run {}: {e}",
                    Path::new(prog).display()
                );
                127
            }
        };
        self.after_failed_command(package, code)?;
        Ok(ExitCode::from(code.clamp(1, 255) as u8))
    }

    /// The install failed: discard the layer where the backend can, keep
    /// it (and say what it holds) otherwise.
    fn after_failed_command(&self, package: &str, code: i32) -> Result<()> {
        let ctx = self.context()?;
        let (s, backend) = ctx.open(package)?;
        if backend.capabilities().can_discard {
            ctx.abort(package)?;
            eprintln!(
                "layerpack: {package}: command failed (status {code}); layer discarded, {} is as before",
                s.base.display()
            );
            if self.global.json {
                print_json(&json!({"type": "run", "package": package, "status": code,
                    "result": "discarded", "root": path_json(&s.base)}))?;
            }
        } else {
            let (_, cs) = ctx.changes(package, &ChangeOptions::default())?;
            if self.global.json {
                print_json(&json!({"type": "run", "package": package, "status": code,
                    "result": "kept", "root": path_json(&s.base),
                    "summary": manifest::summary(&cs)}))?;
            }
            eprintln!(
                "layerpack: {package}: command failed (status {code}); backend '{}' cannot discard, so the layer is kept: {} changes so far in {}",
                s.backend,
                cs.len(),
                s.base.display()
            );
            for c in cs.iter().take(20) {
                eprintln!("  {} {}", c.kind.symbol(), c.path);
            }
            if cs.len() > 20 {
                eprintln!("  ... and {} more", cs.len() - 20);
            }
            eprintln!(
                "layerpack: run `layerpack final {package}` to package it or `layerpack abort {package}` to drop the session"
            );
        }
        Ok(())
    }

    fn abort(&self, package: &str) -> Result<()> {
        let ctx = self.context()?;
        let a = ctx.abort(package)?;
        if self.global.json {
            print_json(
                &json!({"type": "abort", "package": package, "backend": a.backend, "restored": a.restored,
                        "unmounted": a.unmounted.iter().map(|p| path_json(p)).collect::<Vec<_>>()}),
            )?;
        } else if a.restored {
            info!("layerpack: {package}: session dropped; layer discarded, the root is as before init");
        } else if a.backend.is_none() {
            for m in &a.unmounted {
                info!("layerpack: {package}: unmounted {}", m.display());
            }
            info!(
                "layerpack: {package}: the unreadable session was dropped; the root holds what the install wrote through the mount, if anything"
            );
        } else {
            info!(
                "layerpack: {package}: session dropped; what the install wrote stays in the root"
            );
        }
        Ok(())
    }

    fn status(&self) -> Result<()> {
        let ctx = self.context()?;
        let sessions = ctx.state.list()?;
        if self.global.json {
            print_json(&json!({"type": "status", "sessions": sessions.len(),
                "state_dir": path_json(ctx.state.path())}))?;
        } else if sessions.is_empty() {
            info!(
                "layerpack: no open sessions in {}",
                ctx.state.path().display()
            );
        }
        for (name, loaded) in sessions {
            let (obj, line) = match loaded {
                Ok(s) => {
                    let health = session_state(&ctx, &s);
                    let line = format!(
                        "{}\t{}\t{}\t{}\t{}",
                        s.package,
                        s.backend,
                        s.phase.as_str(),
                        s.base.display(),
                        health
                    );
                    (
                        json!({"type": "session", "package": s.package, "backend": s.backend,
                               "phase": s.phase.as_str(), "root": path_json(&s.base),
                               "merged": path_json(&s.merged), "health": health}),
                        line,
                    )
                }
                Err(e) => (
                    json!({"type": "session", "package": name, "error": e.to_string(), "kind": e.kind().as_str(),
                           "health": format!("broken: {e}; `layerpack abort {name}` unmounts what it left and drops it")}),
                    format!("{name}\t?\tbroken\t-\t{e}; `layerpack abort {name}` unmounts what it left and drops it"),
                ),
            };
            if self.global.json {
                print_json(&obj)?;
            } else {
                print_line(&line)?;
            }
        }
        Ok(())
    }

    fn backends(&self) -> Result<()> {
        for name in self.registry.names() {
            let b = self
                .registry
                .create(name, &self.config.backend_config(name));
            let origin = match self.registry.origin(name) {
                Some(Origin::Plugin { path, abi }) => {
                    format!("plugin {} (ABI {abi})", path.display())
                }
                _ => "built-in".to_string(),
            };
            let details = b.as_ref().map(|b| b.details()).unwrap_or_default();
            let (probe, caps) = match &b {
                Ok(b) => (b.probe(), Some(b.capabilities())),
                Err(e) => (
                    layerpack_core::backend::Probe::Unavailable(
                        layerpack_core::backend::Unavailable::Other(e.to_string()),
                    ),
                    None,
                ),
            };
            if self.global.json {
                let caps: serde_json::Map<String, Value> = caps
                    .map(|c| {
                        let mut m: serde_json::Map<String, Value> = c
                            .list()
                            .iter()
                            .map(|(k, v)| (k.to_string(), Value::Bool(*v)))
                            .collect();
                        m.insert("max_name_len".into(), json!(c.max_name_len));
                        m
                    })
                    .unwrap_or_default();
                let plugin = match self.registry.origin(name) {
                    Some(Origin::Plugin { path, abi }) => {
                        json!({"path": path.to_string_lossy(), "abi": abi})
                    }
                    _ => Value::Null,
                };
                let details: serde_json::Map<String, Value> = details
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect();
                print_json(&json!({"type": "backend", "name": name, "origin": origin,
                    "plugin": plugin, "available": probe.is_available(), "reason": probe.reason(),
                    "capabilities": caps, "details": details}))?;
            } else {
                let state = match probe.reason() {
                    None => "available".to_string(),
                    Some(r) => format!("unavailable: {r}"),
                };
                let caps = caps
                    .map(|c| {
                        let mut words: Vec<String> = c
                            .list()
                            .iter()
                            .filter(|(_, v)| *v)
                            .map(|(k, _)| k.to_string())
                            .collect();
                        if let Some(n) = c.max_name_len {
                            words.push(format!("max_name_len={n}"));
                        }
                        words.join(",")
                    })
                    .unwrap_or_default();
                print_line(&format!("{name:<10} {origin:<9} {state}"))?;
                if !caps.is_empty() {
                    print_line(&format!("{:<10} {:<9} capabilities: {caps}", "", ""))?;
                }
                for (k, v) in &details {
                    print_line(&format!("{:<10} {:<9} {k}: {v}", "", ""))?;
                }
            }
        }
        Ok(())
    }

    fn selftest(&self, name: &str, dir: Option<&Path>, userns: bool) -> Result<ExitCode> {
        use layerpack_core::testkit;
        let backend = self
            .registry
            .create(name, &self.config.backend_config(name))?;
        if let Some(why) = backend.probe().reason() {
            bail!("backend '{name}' cannot run here: {why}");
        }
        let scratch = match dir {
            Some(d) => d.to_path_buf(),
            None => std::env::temp_dir().join(format!("layerpack-selftest-{}", std::process::id())),
        };
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("cannot create {}", scratch.display()))?;
        let json = self.global.json;
        let mut out_err: Option<anyhow::Error> = None;
        let report = testkit::run_suite(
            &*backend,
            &scratch,
            |sc| {
                (userns && sc.needs.root).then(|| {
                    testkit::Skip::Other(
                        "needs real root (chown and mknod of ids outside the user namespace)"
                            .to_string(),
                    )
                })
            },
            |r| {
                let (status, detail) = match &r.outcome {
                    testkit::Outcome::Pass => ("pass", String::new()),
                    testkit::Outcome::Fail(e) => ("FAIL", e.clone()),
                    testkit::Outcome::Skip(why) => ("skip", why.to_string()),
                };
                let printed = if json {
                    print_json(
                        &json!({"type": "scenario", "backend": name, "scenario": r.name,
                        "result": status.to_lowercase(), "detail": detail}),
                    )
                } else if detail.is_empty() {
                    print_line(&format!("{status} {}", r.name))
                } else {
                    print_line(&format!("{status} {}: {detail}", r.name))
                };
                if let Err(e) = printed {
                    out_err.get_or_insert(e);
                }
            },
        );
        if let Some(e) = out_err {
            return Err(e);
        }
        let (passed, failed, skipped) = (report.passed(), report.failed(), report.skipped());
        if dir.is_none() {
            let _ = std::fs::remove_dir_all(&scratch);
        }
        if self.global.json {
            print_json(
                &json!({"type": "summary", "backend": name, "passed": passed, "failed": failed, "skipped": skipped}),
            )?;
        } else {
            print_line(&format!(
                "{name}: {passed} passed, {failed} failed, {skipped} skipped"
            ))?;
        }
        Ok(if failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }

    fn index(&self, feed: &Path) -> Result<()> {
        let entries = layerpack_core::pack::feed::write_index(feed)?;
        if self.global.json {
            for e in &entries {
                print_json(
                    &json!({"type": "package", "filename": e.filename, "size": e.size, "sha256": e.sha256}),
                )?;
            }
            print_json(&json!({"type": "index", "packages": entries.len(),
                "index": path_json(&feed.join("Packages"))}))?;
        } else {
            info!(
                "layerpack: {} packages indexed in {}",
                entries.len(),
                feed.join("Packages").display()
            );
        }
        Ok(())
    }

    fn repack(
        &self,
        feed: &Path,
        root: &Path,
        o: &RepackOpts<'_>,
        pack: &packaging::PackArgs,
    ) -> Result<()> {
        let (extra, extra_version, provisional) = (o.extra, o.extra_version, o.provisional);
        let opkg_db = match o.opkg_db {
            "yes" => true,
            "auto" => ["usr/bin/opkg", "bin/opkg"]
                .iter()
                .any(|p| root.join(p).symlink_metadata().is_ok()),
            _ => false,
        };
        use layerpack_core::ledger::{Ledger, OwnedPath, PackageRecord};
        use std::os::unix::ffi::OsStrExt;
        layerpack_core::session::validate_package_name(extra)?;
        let root = std::fs::canonicalize(root)
            .with_context(|| format!("cannot resolve the tree {}", root.display()))?;
        let mut ledger = Ledger::open(feed, &root)?;
        // What no package owns or edits goes into the extra package.
        let mut claimed: std::collections::BTreeSet<Vec<u8>> = std::collections::BTreeSet::new();
        for p in ledger.packages.iter().filter(|p| p.name != extra) {
            claimed.extend(p.files.iter().map(|f| f.path));
            claimed.extend(p.edits.iter().map(|e| e.path.clone()));
        }
        let mut unclaimed = Vec::new();
        for e in walkdir::WalkDir::new(&root)
            .min_depth(1)
            .sort_by_file_name()
        {
            let e = e.with_context(|| format!("cannot walk {}", root.display()))?;
            if e.file_type().is_dir() {
                continue;
            }
            let rel = e.path().strip_prefix(&root).unwrap_or(e.path());
            let bytes = rel.as_os_str().as_bytes().to_vec();
            if opkg_db && bytes.starts_with(b"var/lib/opkg/") {
                // What this command writes itself.
                continue;
            }
            if !claimed.contains(&bytes) {
                unclaimed.push(OwnedPath {
                    path: bytes,
                    kind: if e.path_is_symlink() {
                        layerpack_core::model::FileKind::Symlink
                    } else {
                        layerpack_core::model::FileKind::File
                    },
                    sha256: None,
                });
            }
        }
        let mut report: Vec<String> = Vec::new();
        for u in &unclaimed {
            report.push(format!(
                "extra: {} (installed by no package; in {extra})",
                layerpack_core::model::escape_bytes(&u.path)
            ));
        }
        if !unclaimed.is_empty() || ledger.get(extra).is_some() {
            ledger.set(PackageRecord {
                name: extra.to_string(),
                version: Some(extra_version.to_string()),
                files: layerpack_core::ledger::FileList::from_vec(unclaimed),
                ..ledger.get(extra).cloned().unwrap_or_default()
            });
        }
        let info = match o.package_info {
            Some(f) => showinfo::read(f)?,
            None => Default::default(),
        };
        let (needs, unresolved) = elfdeps::resolve(&ledger, &root);
        report.extend(unresolved);
        let mut written = Vec::new();
        let names: Vec<String> = ledger.packages.iter().map(|p| p.name.clone()).collect();
        let empty = layerpack_core::model::ChangeSet::default();
        for name in &names {
            let version = ledger.get(name).and_then(|p| p.version.clone());
            let subject = packaging::Subject {
                package: name,
                version: version.as_deref(),
                installer: Some((
                    nix::unistd::geteuid().as_raw(),
                    nix::unistd::getegid().as_raw(),
                )),
                info: info.get(name.as_str()),
            };
            let mut p = packaging::Packaging::decide(pack, None, &self.config, &subject)?;
            p.publish = !provisional;
            if let Some(deps) = needs.get(name) {
                p.add_depends(deps);
            }
            let w = p.compose_and_emit(&mut ledger, name, &empty, &root, &root, feed)?;
            written.extend(w.paths);
            for n in p.notes {
                report.push(format!("{name}: {n}"));
            }
        }
        for r in &ledger.packages {
            for e in &r.edits {
                report.push(format!(
                    "edit: {} {} {} (owned by {}; carried by its maintainer scripts)",
                    r.name,
                    if e.deleted { "deletes" } else { "changes" },
                    layerpack_core::model::escape_bytes(&e.path),
                    e.owner.as_deref().unwrap_or("the base")
                ));
            }
        }
        let mut p = packaging::Packaging::decide(
            pack,
            None,
            &self.config,
            &packaging::Subject {
                package: extra,
                version: Some(extra_version),
                installer: None,
                info: None,
            },
        )?;
        // Provisional: the ledger stays as the captures left it, so the
        // final repack sees (and reports) everything again.
        if !provisional {
            p.save(
                &ledger,
                feed,
                packaging::Written {
                    paths: Vec::new(),
                    counts: Default::default(),
                    routes: Default::default(),
                },
            )?;
        }
        if opkg_db {
            write_opkg_db(&root, &ledger, &written)?;
            report.push("opkg: var/lib/opkg/status and info/ written into the tree".into());
        }
        let mut text = report.join("\n");
        text.push('\n');
        let report_path = feed.join("report.txt");
        layerpack_core::session::write_atomic(&report_path, text.as_bytes())?;
        if self.global.json {
            print_json(
                &json!({"type": "repack", "root": path_json(&root), "packages": names.len(),
                "outputs": written.iter().map(|p| path_json(p)).collect::<Vec<_>>(),
                "report": report}),
            )?;
        } else {
            for line in &report {
                info!("layerpack: {line}");
            }
            info!(
                "layerpack: repacked {} packages from {}; report in {}",
                names.len(),
                root.display(),
                report_path.display()
            );
        }
        Ok(())
    }

    fn apply(&self, package: &Path, root: &Path) -> Result<()> {
        let a = layerpack_core::pack::apply::apply(package, root)?;
        if self.global.json {
            let scripts: Vec<Value> = a
                .scripts
                .iter()
                .map(|(n, g)| json!({"name": n, "generated": g, "run": false}))
                .collect();
            print_json(
                &json!({"type": "apply", "format": a.format, "installed": a.installed,
                "deleted": a.deleted, "edits": a.edits, "refused": a.refused,
                "notes": a.notes, "scripts": scripts}),
            )?;
        } else {
            for r in &a.refused {
                eprintln!("layerpack: refused: {r}");
            }
            for n in &a.notes {
                eprintln!("layerpack: warning: {n}");
            }
            let own: Vec<&str> = a
                .scripts
                .iter()
                .filter(|s| !s.1)
                .map(|s| s.0.as_str())
                .collect();
            if !own.is_empty() {
                eprintln!(
                    "layerpack: {}: maintainer scripts not run: {} (apply runs no package's scripts)",
                    package.display(),
                    own.join(", ")
                );
            }
            if a.scripts.iter().any(|s| s.1) {
                info!(
                    "layerpack: {}: the steps of the scripts layerpack generated were carried out ({} deletions, {} edits of files the package does not own)",
                    package.display(),
                    a.deleted,
                    a.edits
                );
            }
            info!(
                "layerpack: {}: {} ({}) installed {} entries, deleted {}, refused {}",
                package.display(),
                root.display(),
                a.format,
                a.installed,
                a.deleted,
                a.refused.len()
            );
        }
        if a.refused.is_empty() {
            Ok(())
        } else {
            bail!(
                "{} entries of {} were refused",
                a.refused.len(),
                package.display()
            )
        }
    }

    fn diff(&self, before: &Path, after: &Path) -> Result<()> {
        for p in [before, after] {
            if !p.is_dir() {
                bail!("{} is not a directory", p.display());
            }
        }
        let _bar = self.progress.start("comparing trees");
        let cs = layerpack_core::tree::diff_trees(before, after, &ScanOptions::default())?;
        drop(_bar);
        for c in &cs {
            if self.global.json {
                print_json(&manifest::change_line(&c))?;
            } else {
                print_line(&format!("{} {}", c.kind.symbol(), c.path))?;
            }
        }
        Ok(())
    }
}

/// Carry an output error through the core's error type.
/// How `repack` treats what is not a captured package.
struct RepackOpts<'a> {
    extra: &'a str,
    extra_version: &'a str,
    provisional: bool,
    opkg_db: &'a str,
    package_info: Option<&'a Path>,
}

/// opkg's database for the packages just written, as if opkg had
/// installed them into `root`: `var/lib/opkg/status` (each package's
/// control stanza marked installed) and `var/lib/opkg/info/<pkg>.control`
/// and `.list` (the paths it installed, one per line).
fn write_opkg_db(
    root: &Path,
    ledger: &layerpack_core::ledger::Ledger,
    written: &[PathBuf],
) -> Result<()> {
    use layerpack_core::model::RelPath;
    let tree = layerpack_core::beneath::Beneath::open(root)?;
    let installed_at = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    let mut status = String::new();
    for ipk in written
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "ipk"))
    {
        let bytes = std::fs::read(ipk).with_context(|| format!("cannot read {}", ipk.display()))?;
        let control = layerpack_core::pack::feed::read_control(&bytes)
            .ok_or_else(|| anyhow!("{}: no control file", ipk.display()))?;
        let fields = layerpack_core::pack::feed::parse_control(&control)
            .map_err(|why| anyhow!("{}: {why}", ipk.display()))?;
        let Some(package) = fields
            .iter()
            .find(|(k, _)| k == "Package")
            .map(|f| f.1.clone())
        else {
            continue;
        };
        let mut stanza = control.trim_end().to_string();
        stanza.push_str(&format!(
            "\nStatus: install user installed\nInstalled-Time: {installed_at}\n\n"
        ));
        status.push_str(&stanza);
        let info =
            |ext: &str| RelPath::parse(format!("var/lib/opkg/info/{package}.{ext}").as_bytes());
        let write = |rel: std::result::Result<RelPath, _>, data: &[u8]| -> Result<()> {
            let rel = rel.map_err(|why| anyhow!("{package}: {why}"))?;
            tree.write_file(&rel, data, 0o644)
                .with_context(|| format!("cannot write {}", rel.under(root).display()))
        };
        write(info("control"), control.as_bytes())?;
        let mut list = Vec::new();
        if let Some(rec) = ledger
            .packages
            .iter()
            .find(|r| r.package.as_deref() == Some(&package))
        {
            for f in rec
                .files
                .iter()
                .filter(|f| f.kind != layerpack_core::model::FileKind::Dir)
            {
                list.push(b'/');
                list.extend_from_slice(&f.path);
                list.push(b'\n');
            }
            for e in rec.edits.iter().filter(|e| !e.deleted) {
                if let Ok(p) = RelPath::parse(&e.path) {
                    list.push(b'/');
                    list.extend_from_slice(
                        layerpack_core::pack::private_path(&package, &p).as_bytes(),
                    );
                    list.push(b'\n');
                }
            }
        }
        write(info("list"), &list)?;
    }
    tree.write_file(
        &RelPath::from("var/lib/opkg/status"),
        status.as_bytes(),
        0o644,
    )
    .with_context(|| format!("cannot write {}/var/lib/opkg/status", root.display()))?;
    Ok(())
}

fn core_err(e: anyhow::Error) -> layerpack_core::Error {
    layerpack_core::Error::new(layerpack_core::ErrorKind::Io, format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn readme_cargo_run_picks_layerpack() {
        // The README's first command is `cargo run -p layerpack -- …`: with
        // two binaries in the package, cargo needs to be told which.
        let manifest = include_str!("../Cargo.toml");
        assert!(
            manifest.contains("default-run = \"layerpack\""),
            "cli/Cargo.toml must set default-run"
        );
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
