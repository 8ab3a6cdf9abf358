//! Hostile packages: whatever an archive, a deletion list or a whiteout
//! says, `apply` creates, changes and removes nothing outside the root. A
//! canary tree beside the root (files, a directory, a setuid-able
//! directory, with recorded modes, owners, times and bytes) is compared
//! after every case, and so is the list of what sits beside the root.
//! Ends with a fuzz target: generated archives in every format, some cut
//! short or with a flipped byte, applied and indexed for
//! `LAYERPACK_FUZZ_SECONDS` (default 15).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use layerpack_core::pack::apply;
use layerpack_core::pack::tarw::{ar_archive, TarHeader, TarKind, TarWriter};
use layerpack_core::ErrorKind;
use layerpack_tests::{layerpack_bin, passed, Outcome};

/// A directory holding `root/` and, beside it, `canary/` and `victim`;
/// packages are written next to it, not in it.
struct Sandbox {
    dir: PathBuf,
    pkgs: PathBuf,
}

type Snapshot = BTreeMap<PathBuf, (u32, u32, u32, i64, Vec<u8>)>;

impl Sandbox {
    fn new(tag: &str) -> Sandbox {
        let top = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("hostile-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&top);
        let (dir, pkgs) = (top.join("box"), top.join("pkgs"));
        fs::create_dir_all(&pkgs).unwrap();
        fs::create_dir_all(dir.join("root")).unwrap();
        fs::create_dir_all(dir.join("canary/sub/deep")).unwrap();
        fs::write(dir.join("canary/file"), b"canary").unwrap();
        fs::write(dir.join("canary/sub/deep/leaf"), b"leaf").unwrap();
        fs::write(dir.join("victim"), b"victim").unwrap();
        fs::set_permissions(dir.join("canary/file"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(dir.join("victim"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(dir.join("canary/sub"), fs::Permissions::from_mode(0o700)).unwrap();
        Sandbox { dir, pkgs }
    }

    fn remove(&self) {
        fs::remove_dir_all(self.dir.parent().unwrap()).unwrap();
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// Everything in the sandbox but the root: type+mode, owner, mtime, bytes.
    fn snapshot(&self) -> Snapshot {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.dir.clone()];
        while let Some(d) = stack.pop() {
            let md = fs::symlink_metadata(&d).unwrap();
            // The sandbox's own mtime moves when a case recreates the root.
            let mtime = if d == self.dir { 0 } else { md.mtime() };
            out.insert(
                d.clone(),
                (md.mode(), md.uid(), md.gid(), mtime, Vec::new()),
            );
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p == self.root() {
                    continue;
                }
                let md = fs::symlink_metadata(&p).unwrap();
                if md.is_dir() {
                    stack.push(p);
                } else {
                    let bytes = if md.is_file() {
                        fs::read(&p).unwrap()
                    } else {
                        Vec::new()
                    };
                    out.insert(p, (md.mode(), md.uid(), md.gid(), md.mtime(), bytes));
                }
            }
        }
        out
    }

    /// The canary and the sandbox's own listing are as recorded, and the
    /// root itself still exists.
    fn assert_untouched(&self, before: &Snapshot, what: &str) {
        let after = self.snapshot();
        assert!(self.root().is_dir(), "{what}: the root itself is gone");
        if &after != before {
            let changed: Vec<_> = before
                .keys()
                .chain(after.keys())
                .filter(|k| before.get(*k) != after.get(*k))
                .collect();
            panic!("{what}: changed outside the root: {changed:?}");
        }
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.pkgs.join(name);
        fs::write(&p, bytes).unwrap();
        p
    }
}

/// One archive member for the builders below.
#[derive(Clone, Debug)]
struct Member {
    name: Vec<u8>,
    kind: TarKind,
    mode: u32,
    link: Vec<u8>,
    data: Vec<u8>,
}

fn file(name: &[u8], data: &[u8]) -> Member {
    Member {
        name: name.to_vec(),
        kind: TarKind::File,
        mode: 0o644,
        link: Vec::new(),
        data: data.to_vec(),
    }
}

fn node(name: &[u8], kind: TarKind, mode: u32, link: &[u8]) -> Member {
    Member {
        name: name.to_vec(),
        kind,
        mode,
        link: link.to_vec(),
        data: Vec::new(),
    }
}

fn tar_of(members: &[Member]) -> Vec<u8> {
    let mut w = TarWriter::new(Vec::new());
    for m in members {
        let h = TarHeader {
            name: &m.name,
            kind: m.kind,
            mode: m.mode,
            uid: 0,
            gid: 0,
            size: m.data.len() as u64,
            mtime: 1_000_000,
            link: &m.link,
            dev: (0, 0),
        };
        w.header(&h).unwrap();
        if m.kind == TarKind::File {
            w.data(&m.data[..], m.data.len() as u64).unwrap();
        }
    }
    w.finish().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

fn control_tar_gz(deletions: &[&[u8]]) -> Vec<u8> {
    let mut list = Vec::new();
    for d in deletions {
        list.extend_from_slice(d);
        list.push(0);
    }
    gzip(&tar_of(&[
        file(
            b"./control",
            b"Package: evil\nVersion: 1\nArchitecture: all\n",
        ),
        file(b"./layerpack.deletions", &list),
    ]))
}

fn ipk(deletions: &[&[u8]], data: &[Member]) -> Vec<u8> {
    ar_archive(&[
        ("debian-binary", b"2.0\n"),
        ("control.tar.gz", &control_tar_gz(deletions)),
        ("data.tar.gz", &gzip(&tar_of(data))),
    ])
}

fn ipk_openwrt(deletions: &[&[u8]], data: &[Member]) -> Vec<u8> {
    gzip(&tar_of(&[
        file(b"./debian-binary", b"2.0\n"),
        file(b"./data.tar.gz", &gzip(&tar_of(data))),
        file(b"./control.tar.gz", &control_tar_gz(deletions)),
    ]))
}

fn lp_apply(pkg: &Path, root: &Path) -> std::process::Output {
    Command::new(layerpack_bin())
        .args([
            "apply",
            pkg.to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
        ])
        .env_remove("LAYERPACK_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

const ESCAPING_PATHS: &[&[u8]] = &[
    b"..",
    b"sub/..",
    b"x/../..",
    b".",
    b"./",
    b"/",
    b"../canary",
    b"../victim",
    b"sub/../../canary/file",
];

/// Finding 1: `..` in a deletion list removed the parent of the root.
fn deletions_that_climb_out_delete_nothing_outside() -> Outcome {
    let s = Sandbox::new("deletions");
    fs::create_dir_all(s.root().join("sub")).unwrap();
    fs::write(s.root().join("keep"), b"k").unwrap();
    let before = s.snapshot();
    for (i, p) in ESCAPING_PATHS.iter().enumerate() {
        for (form, bytes) in [
            ("ar", ipk(&[p], &[file(b"./ok", b"ok")])),
            ("openwrt", ipk_openwrt(&[p], &[file(b"./ok", b"ok")])),
        ] {
            let pkg = s.write(&format!("del-{i}-{form}.ipk"), &bytes);
            let a = apply::apply(&pkg, &s.root()).unwrap();
            s.assert_untouched(&before, &format!("deletion {:?} ({form})", p));
            assert_eq!(a.deleted, 0, "{p:?}");
            assert_eq!(a.refused.len(), 1, "{p:?} not refused: {:?}", a.refused);
            assert_eq!(fs::read(s.root().join("keep")).unwrap(), b"k");
            let o = lp_apply(&pkg, &s.root());
            assert_eq!(o.status.code(), Some(1), "{p:?}: the command must fail");
        }
    }
    s.remove();
    passed()
}

/// Finding 1, OCI form: `.wh...` removed the parent, `.wh..` the root.
fn oci_whiteouts_of_dot_and_dotdot_delete_nothing() -> Outcome {
    let s = Sandbox::new("oci-wh");
    fs::create_dir_all(s.root().join("sub")).unwrap();
    fs::write(s.root().join("keep"), b"k").unwrap();
    let before = s.snapshot();
    for name in [&b"./.wh..."[..], b"./.wh..", b"./sub/.wh...", b"./.wh."] {
        let pkg = s.write(
            "layer.tar",
            &tar_of(&[node(name, TarKind::File, 0o644, b"")]),
        );
        let a = apply::apply(&pkg, &s.root()).unwrap();
        s.assert_untouched(&before, &String::from_utf8_lossy(name));
        assert_eq!(a.deleted, 0);
        assert_eq!(a.refused.len(), 1, "{:?}", a.refused);
        assert!(s.root().join("keep").exists() && s.root().join("sub").is_dir());
        let o = lp_apply(&pkg, &s.root());
        assert_eq!(
            o.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(name)
        );
    }
    s.remove();
    passed()
}

/// Finding 2: a directory entry followed by a symlink of the same name
/// made the late metadata pass chmod the link's target.
fn directory_metadata_never_follows_a_later_symlink() -> Outcome {
    let s = Sandbox::new("dirmeta");
    let victim = s.dir.join("victim");
    let canary_dir = s.dir.join("canary/sub");
    let before = s.snapshot();
    let pkg = s.write(
        "dirmeta.tar.gz",
        &gzip(&tar_of(&[
            node(b"./d/", TarKind::Dir, 0o777, b""),
            node(
                b"./d",
                TarKind::Symlink,
                0o777,
                victim.to_str().unwrap().as_bytes(),
            ),
            node(b"./e/", TarKind::Dir, 0o4777, b""),
            node(
                b"./e",
                TarKind::Symlink,
                0o777,
                canary_dir.to_str().unwrap().as_bytes(),
            ),
            node(b"./r/", TarKind::Dir, 0o777, b""),
            node(b"./r", TarKind::Symlink, 0o777, b"../victim"),
        ])),
    );
    let a = apply::apply(&pkg, &s.root()).unwrap();
    s.assert_untouched(&before, "directory then symlink");
    assert_eq!(fs::metadata(&victim).unwrap().mode() & 0o7777, 0o600);
    assert_eq!(fs::metadata(&canary_dir).unwrap().mode() & 0o7777, 0o700);
    assert!(fs::symlink_metadata(s.root().join("d"))
        .unwrap()
        .is_symlink());
    assert_eq!(a.refused.len(), 3, "{:?}", a.refused);
    s.remove();
    passed()
}

/// Finding 3: a header claiming 8 GiB for a 10-byte member left a partial
/// file in the root.
fn a_member_shorter_than_its_header_leaves_nothing() -> Outcome {
    let s = Sandbox::new("short");
    let mut tar = tar_of(&[file(b"./big", &[b'x'; 10])]);
    // Size field: 12 bytes at offset 124, base-256 for 8 GiB.
    let mut size = [0u8; 12];
    size[0] = 0x80;
    size[4..].copy_from_slice(&(8u64 << 30).to_be_bytes());
    tar[124..136].copy_from_slice(&size);
    let sum: u32 = tar[..512]
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                *b as u32
            }
        })
        .sum();
    tar[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    tar.truncate(512 + 512);
    let before = s.snapshot();
    let pkg = s.write("short.tar.gz", &gzip(&tar));
    let r = apply::apply(&pkg, &s.root());
    s.assert_untouched(&before, "short member");
    match r {
        Ok(a) => assert_eq!(a.refused.len(), 1, "{:?}", a.refused),
        Err(e) => assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}"),
    }
    let left: Vec<_> = fs::read_dir(s.root()).unwrap().collect();
    assert!(left.is_empty(), "left in the root: {left:?}");
    assert_eq!(lp_apply(&pkg, &s.root()).status.code(), Some(1));
    s.remove();
    passed()
}

/// Finding 3: 256 MiB that compress to a few hundred KB are streamed,
/// not held: the `layerpack apply` process stays far below the size.
fn apply_memory_does_not_grow_with_the_package() -> Outcome {
    let s = Sandbox::new("bomb");
    let size: u64 = 256 << 20;
    let mut w = TarWriter::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    w.header(&TarHeader {
        name: b"./zeros",
        kind: TarKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        size,
        mtime: 0,
        link: b"",
        dev: (0, 0),
    })
    .unwrap();
    w.data(std::io::repeat(0).take_bytes(size), size).unwrap();
    let data = w.finish().unwrap().finish().unwrap();
    let pkg = s.write(
        "zeros.ipk",
        &ar_archive(&[
            ("debian-binary", b"2.0\n"),
            ("control.tar.gz", &control_tar_gz(&[])),
            ("data.tar.gz", &data),
        ]),
    );
    let mut child = Command::new(layerpack_bin())
        .args([
            "apply",
            pkg.to_str().unwrap(),
            "--root",
            s.root().to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The peak resident size of this child alone, from /proc while it runs.
    let pid = child.id();
    let mut peak_kb = 0u64;
    let status = loop {
        if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(kb) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak_kb = peak_kb.max(kb);
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(status.success());
    assert_eq!(fs::metadata(s.root().join("zeros")).unwrap().len(), size);
    assert!(peak_kb > 0, "never saw the process");
    assert!(
        peak_kb < 64 * 1024,
        "apply of a 256 MiB member peaked at {peak_kb} kB"
    );
    s.remove();
    passed()
}

trait TakeBytes: std::io::Read + Sized {
    fn take_bytes(self, n: u64) -> std::io::Take<Self> {
        self.take(n)
    }
}
impl<R: std::io::Read> TakeBytes for R {}

/// A file that is no package is refused, not applied as an empty layer.
fn a_file_that_is_no_package_is_refused() -> Outcome {
    let s = Sandbox::new("nopkg");
    for (name, bytes) in [
        ("empty", &b""[..]),
        ("text", b"hello, I am not a package\n"),
    ] {
        let pkg = s.write(name, bytes);
        let e = apply::apply(&pkg, &s.root()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains(name), "{e}");
        assert_eq!(lp_apply(&pkg, &s.root()).status.code(), Some(1));
    }
    s.remove();
    passed()
}

fn ipk_with_control(control: &[u8]) -> Vec<u8> {
    ar_archive(&[
        ("debian-binary", b"2.0\n"),
        (
            "control.tar.gz",
            &gzip(&tar_of(&[file(b"./control", control)])),
        ),
        ("data.tar.gz", &gzip(&tar_of(&[file(b"./ok", b"ok")]))),
    ])
}

/// Finding 4: `index` copied control fields verbatim, so a package could
/// put its own `Filename:`/`SHA256sum:` first, or start a second stanza.
fn index_refuses_control_files_that_would_forge_the_feed() -> Outcome {
    let s = Sandbox::new("index");
    let good = b"Package: good\nVersion: 1\nArchitecture: all\nDescription: fine\n";
    let forged: &[(&str, &[u8])] = &[
        (
            "fields",
            b"Package: evil\nVersion: 1\nFilename: http://evil.example/x.ipk\nSHA256sum: 00\nArchitecture: all\n",
        ),
        (
            "stanza",
            b"Package: evil\nVersion: 1\nArchitecture: all\n\nPackage: injected\nFilename: x\n",
        ),
        ("blank-continuation", b"Package: evil\nVersion: 1\nDescription: a\n \n b\n"),
        ("twice", b"Package: evil\nVersion: 1\nPackage: other\n"),
    ];
    for (tag, control) in forged {
        let feed = s.pkgs.join(format!("feed-{tag}"));
        fs::create_dir_all(&feed).unwrap();
        fs::write(feed.join("good_1_all.ipk"), ipk_with_control(good)).unwrap();
        fs::write(feed.join("evil_1_all.ipk"), ipk_with_control(control)).unwrap();
        let e = layerpack_core::pack::feed::write_index(&feed).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{tag}: {e}");
        assert!(e.to_string().contains("evil_1_all.ipk"), "{tag}: {e}");
        assert!(!feed.join("Packages").exists(), "{tag}: Packages written");
        let o = Command::new(layerpack_bin())
            .args(["index", feed.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{tag}");
    }
    s.remove();
    passed()
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

    /// Names an attacker would try, and ordinary ones to collide with.
    fn name_pool(abs: &str) -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = [
            "./a",
            "./b",
            "./a/b",
            "./d",
            "./d/x",
            "./d/x/y",
            "..",
            ".",
            "./",
            "../canary/file",
            "../canary",
            "./x/../../canary/file",
            "./.wh...",
            "./.wh..",
            "./.wh.a",
            "./d/.wh.x",
            "./d/.wh..wh..opq",
            "./sub/..",
            "./l/escape",
            "./l",
            "./up/victim",
            "./up",
            "a\0b",
            "./e/",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        v.push(abs.as_bytes().to_vec());
        v
    }

    fn link_pool(sandbox: &Path) -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = [
            "..",
            "../..",
            "../canary",
            "../victim",
            "/",
            "a",
            "d",
            "./d/x",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        for p in ["canary", "canary/file", "victim", "canary/sub"] {
            v.push(sandbox.join(p).to_str().unwrap().as_bytes().to_vec());
        }
        v
    }

    #[derive(Clone, Debug)]
    struct Case {
        members: Vec<Member>,
        deletions: Vec<Vec<u8>>,
        form: u8,
        /// 0: as built; 1: cut at `at`; 2: byte at `at` flipped.
        damage: u8,
        at: usize,
    }

    fn case(sandbox: &Path) -> impl Strategy<Value = Case> {
        let names = name_pool(&sandbox.join("victim").to_string_lossy());
        let links = link_pool(sandbox);
        let member = (
            prop::sample::select(names.clone()),
            0u8..6,
            prop::sample::select(vec![0o644u32, 0o777, 0o4777, 0o2755, 0o600]),
            prop::sample::select(links.clone()),
            prop::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(name, k, mode, link, data)| {
                let kind = match k {
                    0 | 1 => TarKind::File,
                    2 => TarKind::Dir,
                    3 => TarKind::Symlink,
                    4 => TarKind::HardLink,
                    _ => TarKind::Fifo,
                };
                let link = if kind == TarKind::HardLink {
                    // Hard links name archive paths.
                    let mut l = link;
                    if l.starts_with(b"/") || l.len() < 3 {
                        l.insert(0, b'.');
                    }
                    l
                } else {
                    link
                };
                Member {
                    name,
                    kind,
                    mode,
                    link,
                    data: if kind == TarKind::File {
                        data
                    } else {
                        Vec::new()
                    },
                }
            });
        (
            prop::collection::vec(member, 1..12),
            prop::collection::vec(prop::sample::select(names), 0..4),
            0u8..4,
            0u8..3,
            any::<usize>(),
        )
            .prop_map(|(members, deletions, form, damage, at)| Case {
                members,
                deletions,
                form,
                damage,
                at,
            })
    }

    fn build(c: &Case) -> Vec<u8> {
        let dels: Vec<&[u8]> = c.deletions.iter().map(Vec::as_slice).collect();
        let mut bytes = match c.form {
            0 => ipk(&dels, &c.members),
            1 => ipk_openwrt(&dels, &c.members),
            2 => gzip(&tar_of(&c.members)),
            _ => tar_of(&c.members),
        };
        if !bytes.is_empty() {
            let at = c.at % bytes.len();
            match c.damage {
                1 => bytes.truncate(at.max(1)),
                2 => bytes[at] ^= 0x5a,
                _ => {}
            }
        }
        bytes
    }

    pub fn apply_never_touches_anything_outside_the_root() -> Outcome {
        let secs: u64 = std::env::var("LAYERPACK_FUZZ_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(15);
        let s = Sandbox::new("fuzz");
        let before = s.snapshot();
        let seed: u64 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let mut seed_bytes = [0u8; 32];
        seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes);
        let mut runner = TestRunner::new_with_rng(Config::default(), rng);
        let strategy = case(&s.dir);
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut cases = 0u64;
        let mut applied = 0u64;
        while Instant::now() < deadline {
            let c = strategy.new_tree(&mut runner).unwrap().current();
            let bytes = build(&c);
            let pkg = s.write("case", &bytes);
            let root = s.root();
            if fs::symlink_metadata(&root).is_ok() {
                fs::remove_dir_all(&root).unwrap();
            }
            fs::create_dir(&root).unwrap();
            fs::create_dir_all(root.join("sub/inner")).unwrap();
            fs::write(root.join("sub/inner/f"), b"f").unwrap();
            let result = std::panic::catch_unwind(|| apply::apply(&pkg, &root));
            let what = format!("seed {seed}, case {cases}: {c:?}");
            match result {
                Err(_) => panic!("apply panicked: {what}"),
                Ok(Ok(_)) => applied += 1,
                Ok(Err(_)) => {}
            }
            // The feed index reads the same bytes through its own ar, tar
            // and control readers: an error or an index, never a panic.
            let feed = s.pkgs.join("feed");
            let _ = fs::create_dir_all(&feed);
            fs::write(feed.join("case.ipk"), &bytes).unwrap();
            if std::panic::catch_unwind(|| layerpack_core::pack::feed::write_index(&feed)).is_err()
            {
                panic!("index panicked: {what}");
            }
            s.assert_untouched(&before, &what);
            for abs in [
                s.dir.join("victim").with_extension("x"),
                PathBuf::from("/victim"),
            ] {
                assert!(!abs.exists(), "{} created: {what}", abs.display());
            }
            cases += 1;
        }
        eprintln!("fuzz: {cases} archives ({applied} applied without error), seed {seed}");
        assert!(cases > 0);
        s.remove();
        passed()
    }
}

use fuzz::apply_never_touches_anything_outside_the_root;

layerpack_tests::test_main!(
    deletions_that_climb_out_delete_nothing_outside,
    oci_whiteouts_of_dot_and_dotdot_delete_nothing,
    directory_metadata_never_follows_a_later_symlink,
    a_member_shorter_than_its_header_leaves_nothing,
    apply_memory_does_not_grow_with_the_package,
    a_file_that_is_no_package_is_refused,
    index_refuses_control_files_that_would_forge_the_feed,
    apply_never_touches_anything_outside_the_root,
);
