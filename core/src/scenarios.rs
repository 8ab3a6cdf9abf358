//! The behaviour scenarios of SCENARIOS.md as code: one suite that runs
//! against any [`LayerBackend`], used by the test matrix, by
//! `layerpack selftest` and by plugin authors.
//!
//! Each scenario builds a base, opens a session, acts through the merged
//! path, reads the layer and compares it with the expectation, then moves
//! down (the base must equal a reference tree built by applying the same
//! actions to a plain copy) or discards (the base must equal the original).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::backend::{Capabilities, ChangeOptions, LayerBackend, SessionSpec};
use crate::model::{ChangeSet, FileKind, RelPath};
use crate::tree::{hash_file, ScanOptions, TreeScan};

/// How a scenario ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Fold the layer; the base must equal the reference tree.
    MoveDown,
    /// The install failed; drop the layer; the base must be as before.
    Discard,
    /// The install failed and the backend cannot discard: the layer is
    /// kept and reported; release it.
    Keep,
}

/// What a scenario needs from the machine or the backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Needs {
    /// Must run as root (chown, mknod).
    pub root: bool,
    /// The filesystem must take `user.*` xattrs.
    pub user_xattrs: bool,
    /// The root holds names starting with `.wh.`: a backend that reserves
    /// them ([`Capabilities::reserves_wh_names`]) must refuse the session
    /// at `begin` with an error naming such a path.
    pub wh_names: bool,
}

type Act = fn(&Path) -> io::Result<()>;
type Check = fn(&ChangeSet) -> Result<(), String>;

/// One scenario.
pub struct Scenario {
    /// Number in SCENARIOS.md.
    pub id: u32,
    /// Short name, used in test names.
    pub name: &'static str,
    /// Machine requirements.
    pub needs: Needs,
    /// Builds the base.
    pub setup: Act,
    /// The install: acts on the merged path.
    pub act: Act,
    /// Expected (path, allowed symbols) pairs; `0` among the symbols means
    /// the path may also be absent.
    pub expect: fn() -> Vec<(Vec<u8>, &'static str)>,
    /// Further checks on fields.
    pub check: Option<Check>,
    /// How it ends.
    pub end: End,
}

impl Scenario {
    /// `s01_add_file_in_new_dirs`-style name.
    pub fn test_name(&self) -> String {
        format!("s{:02}_{}", self.id, self.name)
    }

    /// Why this scenario cannot run with this backend here, if it cannot.
    pub fn skip_reason(&self, caps: &Capabilities, work: &Path) -> Option<Skip> {
        if self.needs.root && !nix::unistd::geteuid().is_root() {
            return Some(Skip::NeedsRoot);
        }
        if self.needs.user_xattrs && !supports_user_xattrs(work) {
            return Some(Skip::NoUserXattrs(work.to_path_buf()));
        }
        match self.end {
            End::Discard if !caps.can_discard => Some(Skip::CannotDiscard),
            End::Keep if caps.can_discard => Some(Skip::DiscardsInstead),
            _ => None,
        }
    }
}

/// Why a scenario does not run. The same type everywhere: the matrix,
/// `layerpack selftest` and the test kit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// It needs real root (chown, mknod) and this process is not.
    NeedsRoot,
    /// The scratch filesystem takes no `user.*` xattrs (tmpfs before 6.6).
    NoUserXattrs(PathBuf),
    /// The backend cannot discard (it is the discard variant).
    CannotDiscard,
    /// The backend discards failed installs (it is the keep variant).
    DiscardsInstead,
    /// Anything a caller adds (e.g. `selftest` in a user namespace).
    Other(String),
}

impl Skip {
    /// True when the machine decides it, not the backend: such a skip of a
    /// required backend is a failure only when `LAYERPACK_REQUIRE` names
    /// [`Skip::requirement`] too.
    pub fn environmental(&self) -> bool {
        matches!(
            self,
            Skip::NeedsRoot | Skip::NoUserXattrs(_) | Skip::Other(_)
        )
    }

    /// The word of `LAYERPACK_REQUIRE` that makes this environment
    /// mandatory: `root`, `user-xattrs`.
    pub fn requirement(&self) -> Option<&'static str> {
        match self {
            Skip::NeedsRoot => Some("root"),
            Skip::NoUserXattrs(_) => Some("user-xattrs"),
            _ => None,
        }
    }
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::NeedsRoot => f.write_str("needs root (chown/mknod)"),
            Skip::NoUserXattrs(d) => write!(f, "{} does not take user.* xattrs", d.display()),
            Skip::CannotDiscard => f.write_str(
                "this backend cannot discard a layer (the install writes into the base)",
            ),
            Skip::DiscardsInstead => {
                f.write_str("this backend discards failed installs (see the discard variant)")
            }
            Skip::Other(s) => f.write_str(s),
        }
    }
}

fn supports_user_xattrs(dir: &Path) -> bool {
    let _ = fs::create_dir_all(dir);
    let probe = dir.join(format!(".xattr-probe-{}", std::process::id()));
    let ok = fs::write(&probe, b"").is_ok() && xattr::set(&probe, "user.layerpack", b"1").is_ok();
    let _ = fs::remove_file(&probe);
    ok
}

/// Fixed mtime given to every base entry, so that "touch" is visible.
pub const BASE_MTIME: i64 = 1_600_000_000;

fn p(root: &Path, rel: &[u8]) -> PathBuf {
    root.join(OsStr::from_bytes(rel))
}

fn mkdirs(root: &Path, rel: &str) -> io::Result<()> {
    fs::create_dir_all(root.join(rel))
}

fn write_mode(root: &Path, rel: &[u8], data: &[u8], mode: u32) -> io::Result<()> {
    let path = p(root, rel);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&path)?;
    f.write_all(data)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))
}

fn write(root: &Path, rel: &str, data: &[u8]) -> io::Result<()> {
    write_mode(root, rel.as_bytes(), data, 0o644)
}

fn set_mtime(path: &Path, secs: i64) -> io::Result<()> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::new(secs, 0);
    utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(io::Error::from)
}

/// Give every entry below `root` the mtime [`BASE_MTIME`].
pub fn backdate(root: &Path) -> io::Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            }
            set_mtime(&e.path(), BASE_MTIME)?;
        }
    }
    Ok(())
}

fn base_conf(root: &Path) -> io::Result<()> {
    mkdirs(root, "etc")?;
    write(root, "etc/a.conf", b"aaaa")
}

fn none(_: &Path) -> io::Result<()> {
    Ok(())
}

fn e(list: &[(&str, &'static str)]) -> Vec<(Vec<u8>, &'static str)> {
    list.iter()
        .map(|(p, s)| (p.as_bytes().to_vec(), *s))
        .collect()
}

fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn find(cs: &ChangeSet, path: &str) -> Result<crate::model::Change, String> {
    cs.get(&RelPath::from(path))
        .ok_or_else(|| format!("{path} not reported"))
}

fn deep_path(n: usize) -> String {
    (0..n)
        .map(|i| format!("n{i:02}"))
        .collect::<Vec<_>>()
        .join("/")
}

/// `NAME_MAX` of Linux filesystems: the longest name scenario 20 uses
/// unless the backend declares a shorter limit.
pub const NAME_MAX: usize = 255;

thread_local! {
    /// The longest name the backend under test can hold
    /// ([`Capabilities::max_name_len`]); set by [`run`] for the scenario's
    /// actions and expectations, which run on this thread.
    static NAME_LIMIT: std::cell::Cell<usize> = const { std::cell::Cell::new(NAME_MAX) };
}

/// The length of scenario 20's long name for a backend with `caps`.
pub fn long_name_len(caps: &Capabilities) -> usize {
    caps.max_name_len
        .map_or(NAME_MAX, |l| usize::from(l).min(NAME_MAX))
}

fn awkward_names() -> Vec<Vec<u8>> {
    let mut long = b"d/".to_vec();
    long.extend(std::iter::repeat_n(b'L', NAME_LIMIT.with(|l| l.get())));
    vec![
        b"d/new\nline".to_vec(),
        b"d/with space".to_vec(),
        b"d/\xff\xfe".to_vec(),
        long,
    ]
}

/// Every scenario of SCENARIOS.md, in order. 24 comes in two variants.
pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            id: 1,
            name: "add_file_in_new_dirs",
            needs: Needs::default(),
            setup: none,
            act: |m| {
                mkdirs(m, "usr/bin")?;
                write_mode(m, b"usr/bin/hello", b"hello\n", 0o755)
            },
            expect: || e(&[("usr", "+"), ("usr/bin", "+"), ("usr/bin/hello", "+")]),
            check: Some(|cs| {
                let c = find(cs, "usr/bin/hello")?;
                if c.meta.kind != FileKind::File || c.meta.mode != 0o755 || c.meta.size != 6 {
                    return Err(format!("usr/bin/hello has wrong metadata: {:?}", c.meta));
                }
                if c.meta.sha256 != Some(sha(b"hello\n")) {
                    return Err("usr/bin/hello has a wrong sha256".into());
                }
                if find(cs, "usr")?.meta.kind != FileKind::Dir {
                    return Err("usr is not reported as a directory".into());
                }
                Ok(())
            }),
            end: End::MoveDown,
        },
        Scenario {
            id: 2,
            name: "add_into_existing_dir",
            needs: Needs::default(),
            setup: |b| mkdirs(b, "usr/bin"),
            act: |m| write(m, "usr/bin/x", b"x"),
            expect: || e(&[("usr/bin/x", "+")]),
            check: None,
            end: End::MoveDown,
        },
        Scenario {
            id: 3,
            name: "rewrite_same_size",
            needs: Needs::default(),
            setup: base_conf,
            act: |m| {
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .open(m.join("etc/a.conf"))?;
                f.write_all(b"bbbb")
            },
            expect: || e(&[("etc/a.conf", "~")]),
            check: Some(|cs| {
                let c = find(cs, "etc/a.conf")?;
                if c.meta.sha256 != Some(sha(b"bbbb")) {
                    return Err("etc/a.conf: sha256 is not that of the new bytes".into());
                }
                Ok(())
            }),
            end: End::MoveDown,
        },
        Scenario {
            id: 4,
            name: "rewrite_size_and_mtime_restored",
            needs: Needs::default(),
            setup: base_conf,
            act: |m| {
                let path = m.join("etc/a.conf");
                let mut f = fs::OpenOptions::new().write(true).open(&path)?;
                f.write_all(b"bbbb")?;
                drop(f);
                set_mtime(&path, BASE_MTIME)
            },
            expect: || e(&[("etc/a.conf", "~")]),
            check: None,
            end: End::MoveDown,
        },
        Scenario {
            id: 5,
            name: "chmod_only",
            needs: Needs::default(),
            setup: base_conf,
            act: |m| fs::set_permissions(m.join("etc/a.conf"), fs::Permissions::from_mode(0o600)),
            expect: || e(&[("etc/a.conf", "m")]),
            check: Some(|cs| {
                let c = find(cs, "etc/a.conf")?;
                if c.meta.mode != 0o600 {
                    return Err(format!("etc/a.conf: mode {:o}, expected 600", c.meta.mode));
                }
                Ok(())
            }),
            end: End::MoveDown,
        },
        Scenario {
            id: 6,
            name: "chown_only",
            needs: Needs {
                root: true,
                ..Needs::default()
            },
            setup: base_conf,
            act: |m| std::os::unix::fs::lchown(m.join("etc/a.conf"), Some(1000), Some(1000)),
            expect: || e(&[("etc/a.conf", "m")]),
            check: Some(|cs| {
                let c = find(cs, "etc/a.conf")?;
                if (c.meta.uid, c.meta.gid) != (1000, 1000) {
                    return Err(format!("etc/a.conf: owner {}:{}", c.meta.uid, c.meta.gid));
                }
                Ok(())
            }),
            end: End::MoveDown,
        },
        Scenario {
            id: 7,
            name: "xattr_only",
            needs: Needs {
                user_xattrs: true,
                ..Needs::default()
            },
            setup: base_conf,
            act: |m| xattr::set(m.join("etc/a.conf"), "user.test", b"1"),
            expect: || e(&[("etc/a.conf", "m")]),
            check: Some(|cs| {
                let c = find(cs, "etc/a.conf")?;
                if c.meta.xattrs.get(&b"user.test"[..]).map(|v| &v[..]) != Some(b"1") {
                    return Err(format!("etc/a.conf: xattrs {:?}", c.meta.xattrs));
                }
                Ok(())
            }),
            end: End::MoveDown,
        },
        Scenario {
            id: 8,
            name: "open_for_write_nothing_written",
            needs: Needs::default(),
            setup: base_conf,
            act: |m| {
                fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(m.join("etc/a.conf"))
                    .map(drop)
            },
            expect: Vec::new,
            check: None,
            end: End::MoveDown,
        },
        Scenario {
            id: 9,
            name: "delete_file",
            needs: Needs::default(),
            setup: base_conf,
            act: |m| fs::remove_file(m.join("etc/a.conf")),
            expect: || e(&[("etc/a.conf", "-")]),
            check: None,
            end: End::MoveDown,
        },
        Scenario {
            id: 10,
            name: "delete_tree",
            needs: Needs::default(),
            setup: |b| {
                mkdirs(b, "usr/share/doc/foo/examples")?;
                write(b, "usr/share/doc/foo/README", b"r")?;
                write(b, "usr/share/doc/foo/NEWS", b"n")?;
                write(b, "usr/share/doc/foo/examples/ex.c", b"c")
            },
            act: |m| fs::remove_dir_all(m.join("usr/share/doc/foo")),
            expect: || {
                e(&[
                    ("usr/share/doc/foo", "-"),
                    ("usr/share/doc/foo/NEWS", "-"),
                    ("usr/share/doc/foo/README", "-"),
                    ("usr/share/doc/foo/examples", "-"),
                    ("usr/share/doc/foo/examples/ex.c", "-"),
                ])
            },
            check: None,
            end: End::MoveDown,
        },
        Scenario {
            id: 11,
            name: "dir_replaced_by_file",
            needs: Needs::default(),
            setup: |b| {
                mkdirs(b, "etc/x.d")?;
                write(b, "etc/x.d/a.conf", b"a")?;
                write(b, "etc/x.d/b.conf", b"b")
            },
            act: |m| {
                fs::remove_dir_all(m.join("etc/x.d"))?;
                write(m, "etc/x.d", b"now a file")
            },
            expect: || {
                e(&[
                    ("etc/x.d", "~"),
                    ("etc/x.d/a.conf", "-"),
                    ("etc/x.d/b.conf", "-"),
                ])
            },
            check: Some(|cs| match find(cs, "etc/x.d")?.meta.kind {
                FileKind::File => Ok(()),
                k => Err(format!("etc/x.d reported as {k:?}, expected a file")),
            }),
            end: End::MoveDown,
        },
        Scenario {
            id: 12,
            name: "file_replaced_by_dir",
            needs: Needs::default(),
            setup: |b| {
                mkdirs(b, "etc")?;
                write(b, "etc/y", b"file")
            },
            act: |m| {
                fs::remove_file(m.join("etc/y"))?;
                mkdirs(m, "etc/y")?;
                write(m, "etc/y/z", b"z")
            },
            expect: || e(&[("etc/y", "~"), ("etc/y/z", "+")]),
            check: Some(|cs| match find(cs, "etc/y")?.meta.kind {
                FileKind::Dir => Ok(()),
                k => Err(format!("etc/y reported as {k:?}, expected a directory")),
            }),
            end: End::MoveDown,
        },
        Scenario {
            id: 13,
            name: "dir_recreated_opaque",
            needs: Needs::default(),
            setup: |b| {
                mkdirs(b, "opt/app")?;
                write(b, "opt/app/a", b"a")?;
                write(b, "opt/app/b", b"b")
            },
            act: |m| {
                fs::remove_dir_all(m.join("opt/app"))?;
                fs::create_dir(m.join("opt/app"))?;
                write(m, "opt/app/c", b"c")
            },
            expect: || e(&[("opt/app/a", "-"), ("opt/app/b", "-"), ("opt/app/c", "+")]),
            check: None,
            end: End::MoveDown,
        },
        Scenario {
            id: 14,
            name: "new_empty_dir",
            needs: Needs::default(),
            setup: |b| mkdirs(b, "var"),
            act: |m| fs::create_dir(m.join("var/empty")),
            expect: || e(&[("var/empty", "+")]),
            check: None,
            end: End::MoveDown,
        },
        Scenario {
            id: 15,
            name: "symlinks",
            needs: Needs::default(),
            setup: |b| {
                mkdirs(b, "lib")?;
                symlink("aa", b.join("lib/m"))
            },
            act: |m| {
                symlink("x", m.join("lib/l"))?;
                fs::remove_file(m.join("lib/m"))?;
                symlink("bb", m.join("lib/m"))
            },
            expect: || e(&[("lib/l", "+"), ("lib/m", "~")]),
            check: Some(|cs| {
                let l = find(cs, "lib/l")?;
                let m = find(cs, "lib/m")?;
                if l.meta.link_target.as_deref() != Some(b"x")
                    || m.meta.link_target.as_deref() != Some(b"bb")
                {
                    return Err("symlink targets not reported".into());
                }
                Ok(())
            }),
            end: End::MoveDown,
        },
        Scenario {
            id: 16,
            name: "hard_links",
            needs: Needs::default(),
            setup: |b| mkdirs(b, "bin"),
            act: |m| {
                write_mode(m, b"bin/a", b"#!/bin/sh\n", 0o755)?;
                fs::hard_link(m.join("bin/a"), m.join("bin/b"))
            },
            expect: || e(&[("bin/a", "+"), ("bin/b", "+")]),
            check: Some(|cs| {
                let a = find(cs, "bin/a")?.meta.link_group;
                let b = find(cs, "bin/b")?.meta.link_group;
                if a.is_none() || a != b {
                    return Err(format!(
                        "bin/a and bin/b not one hard-link group ({a:?}, {b:?})"
                    ));
                }
                Ok(())
            }),
            end: End::MoveDown,
        },
        Scenario {
            id: 17,
            name: "rename_file",
            needs: Needs::default(),
            setup: |b| {
                mkdirs(b, "etc")?;
                write(b, "etc/old", b"content")
            },
            act: |m| fs::rename(m.join("etc/old"), m.join("etc/new")),
            expect: || e(&[("etc/new", "+"), ("etc/old", "-")]),
            check: None,
            end: End::MoveDown,
        },
        Scenario {
            id: 18,
            name: "rename_dir",
            needs: Needs::default(),
            setup: |b| {
                mkdirs(b, "share/one")?;
                write(b, "share/one/f1", b"1")?;
                write(b, "share/one/f2", b"2")
            },
            act: |m| move_like_mv(&m.join("share/one"), &m.join("share/two")),
            expect: || {
                e(&[
                    ("share/one", "-"),
                    ("share/one/f1", "-"),
                    ("share/one/f2", "-"),
                    ("share/two", "+"),
                    ("share/two/f1", "+"),
                    ("share/two/f2", "+"),
                ])
            },
            check: None,
            end: End::MoveDown,
        },
        Scenario {
            id: 19,
            name: "special_files",
            needs: Needs {
                root: true,
                ..Needs::default()
            },
            setup: |b| {
                mkdirs(b, "run")?;
                mkdirs(b, "dev")
            },
            act: |m| {
                use nix::sys::stat::{mknod, Mode, SFlag};
                let mode = Mode::from_bits_truncate(0o644);
                let err = |e: nix::errno::Errno| io::Error::from(e);
                nix::unistd::mkfifo(&m.join("run/f"), mode).map_err(err)?;
                mknod(
                    &m.join("dev/c"),
                    SFlag::S_IFCHR,
                    mode,
                    nix::sys::stat::makedev(1, 3),
                )
                .map_err(err)?;
                mknod(
                    &m.join("dev/b"),
                    SFlag::S_IFBLK,
                    mode,
                    nix::sys::stat::makedev(7, 0),
                )
                .map_err(err)
            },
            expect: || e(&[("dev/b", "+"), ("dev/c", "+"), ("run/f", "+")]),
            check: Some(|cs| {
                let f = find(cs, "run/f")?;
                let c = find(cs, "dev/c")?;
                let b = find(cs, "dev/b")?;
                if f.meta.kind != FileKind::Fifo
                    || c.meta.kind != FileKind::CharDevice
                    || c.meta.rdev != Some((1, 3))
                    || b.meta.kind != FileKind::BlockDevice
                    || b.meta.rdev != Some((7, 0))
                {
                    return Err(format!("special files wrong: {f:?} {c:?} {b:?}"));
                }
                Ok(())
            }),
            end: End::MoveDown,
        },
        Scenario {
            id: 20,
            name: "awkward_names",
            needs: Needs::default(),
            setup: none,
            act: |m| {
                mkdirs(m, "d")?;
                for n in awkward_names() {
                    write_mode(m, &n, &n, 0o644)?;
                }
                let deep = deep_path(40);
                fs::create_dir_all(m.join(&deep))?;
                write(m, &format!("{deep}/f"), b"deep")
            },
            expect: || {
                let mut v: Vec<(Vec<u8>, &'static str)> = vec![(b"d".to_vec(), "+")];
                v.extend(awkward_names().into_iter().map(|n| (n, "+")));
                for i in 1..=40 {
                    v.push((deep_path(i).into_bytes(), "+"));
                }
                v.push((format!("{}/f", deep_path(40)).into_bytes(), "+"));
                v
            },
            check: Some(|cs| {
                for n in awkward_names() {
                    let p = RelPath::parse(&n).map_err(|e| e.to_string())?;
                    let c = cs.get(&p).ok_or_else(|| format!("{p:?} missing"))?;
                    if c.meta.sha256 != Some(sha(&n)) {
                        return Err(format!("{:?}: wrong content hash", c.path));
                    }
                }
                Ok(())
            }),
            end: End::MoveDown,
        },
        Scenario {
            id: 21,
            name: "touch_only",
            needs: Needs::default(),
            setup: base_conf,
            act: |m| set_mtime(&m.join("etc/a.conf"), BASE_MTIME + 1000),
            expect: || e(&[("etc/a.conf", "~m")]),
            check: None,
            end: End::MoveDown,
        },
        Scenario {
            id: 22,
            name: "delete_and_recreate_identical",
            needs: Needs::default(),
            setup: base_conf,
            act: |m| {
                fs::remove_file(m.join("etc/a.conf"))?;
                write(m, "etc/a.conf", b"aaaa")
            },
            expect: || e(&[("etc/a.conf", "~m0")]),
            check: None,
            end: End::MoveDown,
        },
        Scenario {
            id: 23,
            name: "many_files",
            needs: Needs::default(),
            setup: none,
            act: |m| {
                for d in 0..100 {
                    let dir = format!("many{d:02}");
                    fs::create_dir(m.join(&dir))?;
                    for f in 0..100 {
                        fs::write(m.join(format!("{dir}/f{f:03}")), format!("{d}-{f}"))?;
                    }
                }
                Ok(())
            },
            expect: || {
                let mut v = Vec::new();
                for d in 0..100 {
                    v.push((format!("many{d:02}").into_bytes(), "+"));
                    for f in 0..100 {
                        v.push((format!("many{d:02}/f{f:03}").into_bytes(), "+"));
                    }
                }
                v
            },
            check: Some(|cs| {
                let all = cs.to_vec();
                let sorted = all.windows(2).all(|w| w[0].path < w[1].path);
                if cs.len() != 10_100 || !sorted {
                    return Err(format!("{} entries, sorted: {sorted}", cs.len()));
                }
                Ok(())
            }),
            end: End::MoveDown,
        },
        Scenario {
            id: 24,
            name: "failed_install_discard",
            needs: Needs::default(),
            setup: |b| mkdirs(b, "opt"),
            act: failed_install,
            expect: failed_install_expect,
            check: None,
            end: End::Discard,
        },
        Scenario {
            id: 24,
            name: "failed_install_keep",
            needs: Needs::default(),
            setup: |b| mkdirs(b, "opt"),
            act: failed_install,
            expect: failed_install_expect,
            check: None,
            end: End::Keep,
        },
        Scenario {
            id: 25,
            name: "whiteout_looking_names",
            needs: Needs {
                wh_names: true,
                ..Needs::default()
            },
            setup: |b| {
                mkdirs(b, "etc")?;
                write(b, "etc/.wh.keep", b"keep")
            },
            act: |m| write(m, "etc/.wh.new", b"new"),
            expect: || e(&[("etc/.wh.new", "+")]),
            check: None,
            end: End::MoveDown,
        },
    ]
}

/// `mv`: rename, or copy and delete where the filesystem refuses the
/// rename (overlayfs without `redirect_dir` answers EXDEV for directories
/// that come from the lower layer).
fn move_like_mv(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            copy_tree(from, to)?;
            fs::remove_dir_all(from)
        }
        r => r,
    }
}

fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let md = fs::symlink_metadata(from)?;
    if md.is_dir() {
        fs::create_dir(to)?;
        for e in fs::read_dir(from)? {
            let e = e?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
        fs::set_permissions(to, md.permissions())
    } else {
        fs::copy(from, to).map(drop)
    }
}

fn failed_install(m: &Path) -> io::Result<()> {
    for f in ["opt/f1", "opt/f2", "opt/f3"] {
        write(m, f, f.as_bytes())?;
    }
    Ok(())
}

fn failed_install_expect() -> Vec<(Vec<u8>, &'static str)> {
    e(&[("opt/f1", "+"), ("opt/f2", "+"), ("opt/f3", "+")])
}

/// Compare a change set with a scenario's expectation; the messages list
/// every difference.
pub fn check_expectation(sc: &Scenario, cs: &ChangeSet) -> Result<(), String> {
    let mut problems = Vec::new();
    let expected: BTreeMap<RelPath, &str> = (sc.expect)()
        .into_iter()
        .map(|(p, s)| (RelPath::from_normalized(p), s))
        .collect();
    for c in cs {
        match expected.get(&c.path) {
            None => problems.push(format!("unexpected {} {}", c.kind.symbol(), c.path)),
            Some(allowed) if !allowed.contains(c.kind.symbol()) => problems.push(format!(
                "{}: got {}, expected one of {allowed}",
                c.path,
                c.kind.symbol()
            )),
            _ => {}
        }
    }
    for (path, allowed) in &expected {
        if cs.get(path).is_none() && !allowed.contains('0') {
            problems.push(format!("missing {allowed} {path}"));
        }
    }
    if problems.is_empty() {
        if let Some(check) = sc.check {
            check(cs)?;
        }
        Ok(())
    } else {
        problems.truncate(20);
        Err(problems.join("; "))
    }
}

/// Compare two trees entry by entry: type, content, mode, owner, symlink
/// target, device number, xattrs and hard-link groups (not times). Returns
/// the differences found.
pub fn compare_trees(a: &Path, b: &Path) -> Result<(), String> {
    let scan = |root: &Path| -> Result<Vec<crate::tree::Record>, String> {
        TreeScan::start(root, ScanOptions::default())
            .map_err(|e| e.to_string())?
            .collect::<crate::Result<Vec<_>>>()
            .map_err(|e| e.to_string())
    };
    let (ra, rb) = (scan(a)?, scan(b)?);
    let mut problems = Vec::new();
    let ma: BTreeMap<&RelPath, &crate::tree::Record> = ra.iter().map(|r| (&r.path, r)).collect();
    let mb: BTreeMap<&RelPath, &crate::tree::Record> = rb.iter().map(|r| (&r.path, r)).collect();
    // Hard-link groups: the first path of each inode, per tree.
    let first_link = |rs: &[crate::tree::Record]| {
        let mut first: BTreeMap<(u64, u64), RelPath> = BTreeMap::new();
        let mut of: BTreeMap<RelPath, RelPath> = BTreeMap::new();
        for r in rs.iter().filter(|r| r.kind != FileKind::Dir) {
            let f = first
                .entry((r.dev, r.ino))
                .or_insert_with(|| r.path.clone());
            of.insert(r.path.clone(), f.clone());
        }
        of
    };
    let (la, lb) = (first_link(&ra), first_link(&rb));
    for (path, x) in &ma {
        let Some(y) = mb.get(path) else {
            problems.push(format!("{path} only in {}", a.display()));
            continue;
        };
        let same = x.kind == y.kind
            && x.mode == y.mode
            && x.uid == y.uid
            && x.gid == y.gid
            && x.link_target == y.link_target
            && x.rdev == y.rdev
            && x.xattrs == y.xattrs
            && (x.kind != FileKind::File || x.size == y.size);
        if !same {
            problems.push(format!("{path} differs: {x:?} vs {y:?}"));
        } else if x.kind == FileKind::File {
            let ha = hash_file(&path.under(a)).map_err(|e| e.to_string())?;
            let hb = hash_file(&path.under(b)).map_err(|e| e.to_string())?;
            if ha != hb {
                problems.push(format!("{path}: content differs"));
            }
        }
        if la.get(*path) != lb.get(*path) {
            problems.push(format!("{path}: hard-link group differs"));
        }
    }
    for path in mb.keys() {
        if !ma.contains_key(path) {
            problems.push(format!("{path} only in {}", b.display()));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        problems.truncate(20);
        Err(problems.join("; "))
    }
}

/// Where a scenario runs: `work/base`, `work/reference`, `work/session`.
pub struct Workdir {
    /// Scratch directory owned by this run.
    pub root: PathBuf,
}

impl Workdir {
    /// A fresh scratch directory under `parent`.
    pub fn new(parent: &Path, name: &str) -> io::Result<Workdir> {
        let root = parent.join(format!("{name}-{}", std::process::id()));
        if root.exists() {
            fs::remove_dir_all(&root)?;
        }
        fs::create_dir_all(&root)?;
        Ok(Workdir { root })
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Run one scenario against `backend` in a scratch directory below
/// `parent`. `Ok` means every expectation held.
pub fn run(backend: &dyn LayerBackend, sc: &Scenario, parent: &Path) -> Result<(), String> {
    let work = Workdir::new(parent, &sc.test_name()).map_err(|e| e.to_string())?;
    let base = work.root.join("base");
    let reference = work.root.join("reference");
    let original = work.root.join("original");
    for dir in [&base, &reference, &original] {
        fs::create_dir(dir).map_err(|e| e.to_string())?;
        (sc.setup)(dir).map_err(|e| format!("setup: {e}"))?;
        backdate(dir).map_err(|e| format!("setup: {e}"))?;
    }
    let base = fs::canonicalize(&base).map_err(|e| e.to_string())?;
    let mut spec = SessionSpec {
        package: sc.test_name().replace('_', "-"),
        base: base.clone(),
        dir: work.root.join("session"),
        state: Default::default(),
    };
    fs::create_dir(&spec.dir).map_err(|e| e.to_string())?;
    if sc.needs.wh_names && backend.capabilities().reserves_wh_names {
        return match backend.begin(&spec) {
            Err(e) if e.to_string().contains("/.wh.") => {
                compare_trees(&original, &base).map_err(|e| format!("after refusal: {e}"))
            }
            Err(e) => Err(format!(
                "begin refused the root, but without naming the .wh. path: {e}"
            )),
            Ok(begun) => {
                spec.state = begun.state;
                let _ = crate::backend::abandon(backend, &spec);
                Err("begin accepted a root holding .wh. names, which this backend reserves".into())
            }
        };
    }
    NAME_LIMIT.with(|l| l.set(long_name_len(&backend.capabilities())));
    let begun = backend.begin(&spec).map_err(|e| format!("begin: {e}"))?;
    spec.state = begun.state;
    let result = run_open(backend, sc, &spec, &begun.merged, &reference);
    if result.is_err() {
        // Never leave a mount or a half-open layer behind.
        let _ = crate::backend::abandon(backend, &spec);
        return result;
    }
    match sc.end {
        End::MoveDown => {
            compare_trees(&reference, &base).map_err(|e| format!("after move-down: {e}"))
        }
        End::Discard => compare_trees(&original, &base).map_err(|e| format!("after discard: {e}")),
        // Kept and released: what the install wrote stays, nothing else.
        End::Keep => compare_trees(&reference, &base).map_err(|e| format!("after keep: {e}")),
    }
}

fn run_open(
    backend: &dyn LayerBackend,
    sc: &Scenario,
    spec: &SessionSpec,
    merged: &Path,
    reference: &Path,
) -> Result<(), String> {
    (sc.act)(merged).map_err(|e| format!("actions through {}: {e}", merged.display()))?;
    (sc.act)(reference).map_err(|e| format!("actions on the reference: {e}"))?;
    // As `final` does: nothing can change the layer while it is read.
    backend.freeze(spec).map_err(|e| format!("freeze: {e}"))?;
    let cs = backend
        .changes(spec, &ChangeOptions::default())
        .map_err(|e| format!("changes: {e}"))?;
    check_expectation(sc, &cs)?;
    check_content_root(backend, spec, &cs)?;
    let again = backend
        .changes(spec, &ChangeOptions { hash_all: true })
        .map_err(|e| format!("changes (hash all): {e}"))?;
    if again != cs {
        let differ: Vec<String> = cs
            .iter()
            .zip(again.iter())
            .filter(|(a, b)| a != b)
            .map(|(a, b)| {
                format!(
                    "{} {} vs {} {}",
                    a.kind.symbol(),
                    a.path,
                    b.kind.symbol(),
                    b.path
                )
            })
            .take(5)
            .collect();
        return Err(format!(
            "reading the layer twice gave different results ({} vs {} changes): {}",
            cs.len(),
            again.len(),
            differ.join("; ")
        ));
    }
    match sc.end {
        End::MoveDown => backend
            .move_down(spec)
            .map_err(|e| format!("move-down: {e}")),
        End::Discard => backend.discard(spec).map_err(|e| format!("discard: {e}")),
        End::Keep => backend.release(spec).map_err(|e| format!("release: {e}")),
    }
}

/// Every present entry of the change set can be read at the backend's
/// content root with the type and (for files) the bytes it reports.
fn check_content_root(
    backend: &dyn LayerBackend,
    spec: &SessionSpec,
    cs: &ChangeSet,
) -> Result<(), String> {
    let root = backend
        .content_root(spec)
        .map_err(|e| format!("content_root: {e}"))?;
    for c in cs.present() {
        let abs = c.path.under(&root);
        // As every reader sees it (recorded ownership applied).
        let rec = crate::tree::Record::read(&abs, c.path.clone(), true)
            .map_err(|e| format!("content root: {} unreadable: {e}", abs.display()))?;
        if rec.kind != c.meta.kind {
            return Err(format!("content root: {} has another type", c.path));
        }
        if c.meta.kind == FileKind::File
            && c.meta.sha256.is_some()
            && hash_file(&abs).ok() != c.meta.sha256
        {
            return Err(format!("content root: {} has other bytes", c.path));
        }
    }
    Ok(())
}

/// For a backend that declares [`Capabilities::max_name_len`]: a root
/// holding a name one byte past the limit is refused at `begin` with an
/// error that names the path and the limit, and `begin` leaves nothing
/// behind. (A backend without a limit has nothing to check.)
pub fn check_name_limit(backend: &dyn LayerBackend, parent: &Path) -> Result<(), String> {
    let Some(limit) = backend.capabilities().max_name_len else {
        return Ok(());
    };
    let work = Workdir::new(parent, "name_limit").map_err(|e| e.to_string())?;
    let base = work.root.join("base");
    let name = "N".repeat(usize::from(limit) + 1);
    fs::create_dir_all(base.join("d")).map_err(|e| e.to_string())?;
    fs::write(base.join("d").join(&name), b"x").map_err(|e| e.to_string())?;
    let spec = SessionSpec {
        package: "name-limit".into(),
        base: fs::canonicalize(&base).map_err(|e| e.to_string())?,
        dir: work.root.join("session"),
        state: Default::default(),
    };
    fs::create_dir(&spec.dir).map_err(|e| e.to_string())?;
    match backend.begin(&spec) {
        Ok(begun) => {
            let spec = SessionSpec {
                state: begun.state,
                ..spec
            };
            let _ = crate::backend::abandon(backend, &spec);
            Err(format!(
                "begin accepted a root holding a {}-byte name, past the declared limit of {limit}",
                name.len()
            ))
        }
        Err(e) => {
            let text = e.to_string();
            if !text.contains(&name) || !text.contains(&limit.to_string()) {
                return Err(format!(
                    "begin refused the root, but without naming the path and the limit {limit}: {text}"
                ));
            }
            let left = fs::read_dir(&spec.dir).map_err(|e| e.to_string())?.count();
            if left != 0 {
                return Err(format!(
                    "begin left {left} entries in the session directory"
                ));
            }
            Ok(())
        }
    }
}

/// Build, under `root`, a base and an upper branch laid out the way aufs
/// writes one after an install (see AUFS-NOTES.md): whiteouts and opaque
/// markers that are hard links of `.wh..wh.aufs`, aufs's own directories
/// and a temporary one, a rewrite, new files (one in a new directory),
/// a content hard link, a symlink, a fifo, a deleted directory, an opaque
/// directory and a new directory carrying a marker that hides nothing.
/// Returns `(base, upper)`.
pub fn aufs_branch_fixture(root: &Path) -> io::Result<(PathBuf, PathBuf)> {
    let (base, upper) = (root.join("base"), root.join("upper"));
    let put = |root: &Path, rel: &str, data: &[u8]| -> io::Result<()> {
        let p = root.join(rel);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d)?;
        }
        fs::write(p, data)
    };
    for (rel, data) in [
        ("etc/a.conf", &b"old"[..]),
        ("etc/gone", b"gone"),
        ("opt/app/x", b"x"),
        ("opt/app/sub/y", b"y"),
        ("usr/keep", b"keep"),
        ("var/olddir/f", b"f"),
    ] {
        put(&base, rel, data)?;
    }
    fs::create_dir_all(&upper)?;
    let wh = upper.join(".wh..wh.aufs");
    fs::write(&wh, b"")?;
    fs::set_permissions(&wh, fs::Permissions::from_mode(0o444))?;
    for d in [".wh..wh.plnk", ".wh..wh.orph", "usr/.wh..wh.olddir.1f2e"] {
        fs::create_dir_all(upper.join(d))?;
    }
    put(&upper, "usr/.wh..wh.olddir.1f2e/leftover", b"junk")?;
    put(&upper, "etc/a.conf", b"new contents")?;
    put(&upper, "etc/new", b"new")?;
    fs::hard_link(&wh, upper.join("etc/.wh.gone"))?;
    fs::create_dir_all(upper.join("opt/app"))?;
    fs::hard_link(&wh, upper.join("opt/app/.wh..wh..opq"))?;
    put(&upper, "opt/app/z", b"z")?;
    fs::create_dir_all(upper.join("var"))?;
    fs::hard_link(&wh, upper.join("var/.wh.olddir"))?;
    fs::create_dir_all(upper.join("srv/new"))?;
    fs::hard_link(&wh, upper.join("srv/new/.wh..wh..opq"))?;
    put(&upper, "srv/new/f", b"f")?;
    put(&upper, "bin/hl1", b"linked")?;
    fs::hard_link(upper.join("bin/hl1"), upper.join("bin/hl2"))?;
    put(&upper, "usr/lib/new.so", b"\x7fELF")?;
    symlink("lib/new.so", upper.join("usr/link"))?;
    nix::unistd::mkfifo(
        &upper.join("usr/fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .map_err(io::Error::from)?;
    // Directory metadata as in the base, so only content is reported.
    for d in ["etc", "opt", "opt/app", "usr", "var"] {
        fs::set_permissions(upper.join(d), fs::metadata(base.join(d))?.permissions())?;
    }
    Ok((base, upper))
}
