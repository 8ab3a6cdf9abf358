//! The daemon that serves one session's mount, from `init` to `final`.
//!
//! [`start`] opens the layers' directory fds (before anything covers the
//! base), forks twice so the daemon belongs to no terminal and no parent,
//! and returns once the mount answers, with the daemon's pid. The daemon
//! keeps only the fds it needs (not the caller's pipes, whose readers
//! would otherwise wait for it). [`stop`] unmounts and waits until the
//! daemon is gone; a daemon that died is noticed ([`alive`]) and its
//! mount cleaned up. Nothing relies on fuser's `AutoUnmount`.

#![allow(unsafe_code)]

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use layerpack_core::{Error, ErrorKind, Result};
use rustix::fs::{Mode, OFlags};

use crate::glue::{self, Tuning};
use crate::union::{Options, Union};

/// What the daemon serves.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The base (lower layer).
    pub lower: PathBuf,
    /// The upper layer.
    pub upper: PathBuf,
    /// Where copy-ups are made before they are renamed into the upper.
    pub work: PathBuf,
    /// Where the union is mounted (the base itself when in place).
    pub mountpoint: PathBuf,
    /// The daemon's messages (stderr).
    pub log: PathBuf,
    /// Request counts, written when the daemon ends.
    pub counters: PathBuf,
    /// Filesystem behaviour.
    pub options: Options,
    /// Kernel settings.
    pub tuning: Tuning,
}

/// A running daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Started {
    /// Its pid.
    pub pid: u32,
    /// Its start time (`/proc/<pid>/stat` field 22), to tell it from a
    /// later process with the same pid.
    pub start_time: u64,
    /// The number of its fd for the lower layer (read through
    /// `/proc/<pid>/fd/<n>` while the mount covers the base).
    pub lower_fd: i32,
}

fn open_dir(p: &Path) -> Result<OwnedFd> {
    rustix::fs::open(
        p,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(p, "cannot open", e.into()))
}

/// `/proc/<pid>/stat` field 22, if the process exists.
pub fn start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count after its ')'.
    let rest = &s[s.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether the daemon `d` still runs (and is not a zombie).
pub fn alive(d: &Started) -> bool {
    if start_time(d.pid) != Some(d.start_time) {
        return false;
    }
    let state = std::fs::read_to_string(format!("/proc/{}/stat", d.pid)).unwrap_or_default();
    !state
        .rfind(')')
        .and_then(|i| state.get(i + 2..i + 3))
        .is_some_and(|s| s == "Z" || s == "X")
}

/// Start the daemon for `plan`; returns once the mount answers.
pub fn start(plan: &Plan) -> Result<Started> {
    let lower = open_dir(&plan.lower)?;
    let upper = open_dir(&plan.upper)?;
    let work = open_dir(&plan.work)?;
    let (mut rx, tx) = UnixStream::pair()
        .map_err(|e| Error::io(&plan.mountpoint, "cannot make a socket pair", e))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&plan.log)
        .map_err(|e| Error::io(&plan.log, "cannot open the daemon log", e))?;
    // SAFETY: the child only calls async-signal-safe functions until it
    // forks again and the intermediate process exits; the grandchild
    // closes every inherited fd it does not need and then runs on its own.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(Error::io(
            &plan.mountpoint,
            "cannot fork the daemon",
            e.into(),
        )),
        Ok(nix::unistd::ForkResult::Child) => {
            let _ = nix::unistd::setsid();
            // SAFETY: as above.
            match unsafe { nix::unistd::fork() } {
                Ok(nix::unistd::ForkResult::Child) => {}
                _ => exit_now(0),
            }
            let code = serve(plan, lower, upper, work, tx, log);
            exit_now(code)
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(tx);
            let _ = nix::sys::wait::waitpid(child, None);
            let mut msg = String::new();
            let _ = rx.read_to_string(&mut msg);
            let fail = |why: String| {
                let log = std::fs::read_to_string(&plan.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                let mut m = why;
                if !tail.is_empty() {
                    m.push_str(&format!(
                        " (daemon log {}: {})",
                        plan.log.display(),
                        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                    ));
                }
                Error::new(ErrorKind::Io, m).with_path(&plan.mountpoint)
            };
            let Some(rest) = msg.strip_prefix("ok ") else {
                return Err(fail(match msg.strip_prefix("err ") {
                    Some(e) => format!("cannot mount the FUSE layer: {}", e.trim()),
                    None => "the FUSE daemon ended before the mount was ready".into(),
                }));
            };
            let mut it = rest
                .split_whitespace()
                .map(|n| n.parse::<u64>().unwrap_or(0));
            let pid = it.next().unwrap_or(0) as u32;
            let lower_fd = it.next().unwrap_or(0) as i32;
            let started = Started {
                pid,
                start_time: start_time(pid).unwrap_or(0),
                lower_fd,
            };
            // The mount answers: a stat through it reaches the daemon.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match nix::sys::statfs::statfs(&plan.mountpoint) {
                    Ok(s) if s.filesystem_type().0 == FUSE_SUPER_MAGIC => break,
                    _ if Instant::now() > deadline => {
                        return Err(fail("the FUSE mount did not answer within 10 s".into()))
                    }
                    _ => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            Ok(started)
        }
    }
}

/// End this (forked) process at once: no exit handlers, no flushing of
/// buffers copied from the parent.
fn exit_now(code: i32) -> ! {
    // SAFETY: _exit is async-signal-safe and takes no pointers.
    unsafe { libc::_exit(code) }
}

/// `statfs` magic of FUSE mounts.
pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Close every fd but `keep`.
fn close_others(keep: &[i32]) {
    let fds: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => d
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
            .collect(),
        Err(_) => (3..1024).collect(),
    };
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            let _ = nix::unistd::close(fd);
        }
    }
}

/// The daemon's body; returns its exit code.
fn serve(
    plan: &Plan,
    lower: OwnedFd,
    upper: OwnedFd,
    work: OwnedFd,
    mut tx: UnixStream,
    log: std::fs::File,
) -> i32 {
    let lower_fd = lower.as_raw_fd();
    close_others(&[
        lower_fd,
        upper.as_raw_fd(),
        work.as_raw_fd(),
        tx.as_raw_fd(),
        log.as_raw_fd(),
    ]);
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
        let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
    }
    let _ = nix::unistd::dup2(log.as_raw_fd(), 2);
    drop(log);
    let _ = std::env::set_current_dir("/");
    rustix::process::umask(Mode::empty());
    // The mount's fd and fusermount's socket are opened from here on:
    // nothing of ours may take the numbers the parent was told about.
    let u = Arc::new(Union::new(lower, upper, work, plan.options.clone()));
    let run = match glue::mount(u.clone(), &plan.mountpoint, plan.tuning, "layerpack") {
        Ok(run) => run,
        Err(e) => {
            let _ = writeln!(tx, "err {e}");
            return 1;
        }
    };
    let _ = writeln!(tx, "ok {} {lower_fd}", std::process::id());
    drop(tx);
    let result = run();
    let counts: Vec<String> = u
        .counters
        .snapshot()
        .into_iter()
        .map(|(op, n)| format!("{op} {n}"))
        .collect();
    let _ = std::fs::write(&plan.counters, counts.join("\n") + "\n");
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("layerpack FUSE daemon: {e}");
            1
        }
    }
}

/// Unmount `mountpoint` (`umount2` as root, `fusermount3 -u` otherwise);
/// `lazy` detaches a mount whose daemon is gone.
pub fn unmount(mountpoint: &Path, lazy: bool) -> std::io::Result<()> {
    if rustix::process::geteuid().is_root() {
        let flags = if lazy {
            nix::mount::MntFlags::MNT_DETACH
        } else {
            nix::mount::MntFlags::empty()
        };
        return nix::mount::umount2(mountpoint, flags).map_err(std::io::Error::from);
    }
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg(if lazy { "-uz" } else { "-u" })
        .arg("--")
        .arg(mountpoint);
    let out = cmd.output()?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if text.contains("busy") {
        return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
    }
    Err(std::io::Error::other(format!("fusermount3: {text}")))
}

/// Wait up to `limit` for daemon `d` to end.
pub fn wait_gone(d: &Started, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while alive(d) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    true
}
