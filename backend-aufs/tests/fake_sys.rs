//! The aufs backend against a recording fake of the syscalls: mount
//! options, the ioctl request and argument, the exact sequence of calls for
//! a scenario-rich upper branch laid out in aufs's on-disk format, and the
//! tree the move-down leaves. No aufs kernel needed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use layerpack_backend_aufs::{mvdown, AufsBackend, AufsConfig};
use layerpack_core::backend::{Health, LayerBackend, Probe, SessionSpec, Unavailable};
use layerpack_core::model::RelPath;
use layerpack_core::scenarios::{aufs_branch_fixture, compare_trees};
use layerpack_core::sys::{Call, FakeSys, MountFlags, Sys};
use layerpack_core::tree::fold::{fold, FoldOptions};
use layerpack_core::tree::upper::WhiteoutFormat;

struct Fx {
    root: PathBuf,
    spec: SessionSpec,
}

impl Drop for Fx {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// A fake /proc with aufs, an empty base and an empty session directory.
fn setup(tag: &str) -> Fx {
    let root = std::env::temp_dir().join(format!("lp-aufs-fake-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(root.join("proc")).unwrap();
    fs::write(root.join("proc/filesystems"), "nodev\taufs\n").unwrap();
    fs::create_dir_all(root.join("base")).unwrap();
    fs::create_dir_all(root.join("session")).unwrap();
    let spec = SessionSpec {
        package: "fake".into(),
        base: fs::canonicalize(root.join("base")).unwrap(),
        dir: fs::canonicalize(root.join("session")).unwrap(),
        state: Default::default(),
    };
    Fx { root, spec }
}

/// `begin`, keeping the state it returns in the spec, as core does.
fn begin(fx: &mut Fx, b: &AufsBackend) -> PathBuf {
    let begun = b.begin(&fx.spec).unwrap();
    fx.spec.state = begun.state;
    begun.merged
}

fn backend(fx: &Fx, cfg: AufsConfig, fake: &Arc<FakeSys>) -> AufsBackend {
    AufsBackend::new(cfg, &fx.root).with_sys(fake.clone())
}

/// Copy the fixture's upper branch into the session (as if aufs had
/// written it during the install) and its base into the base.
fn install(fx: &Fx) -> PathBuf {
    let src = fx.root.join("fixture");
    aufs_branch_fixture(&src).unwrap();
    for (from, to) in [
        ("base", fx.spec.base.clone()),
        ("upper", fx.spec.dir.join("upper")),
    ] {
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", src.join(from).display()))
            .arg(&to)
            .status()
            .unwrap();
        assert!(status.success());
    }
    // The reference: the same branch folded offline.
    let reference = fx.root.join("reference");
    aufs_branch_fixture(&reference).unwrap();
    fold(
        &reference.join("upper"),
        &reference.join("base"),
        WhiteoutFormat::Aufs,
        FoldOptions::default(),
    )
    .unwrap();
    reference.join("base")
}

/// Plays the kernel's part of a successful move-down: the file goes from
/// the upper branch to the base, parents created, `ROLOWER_R` set.
fn kernel(merged: PathBuf, upper: PathBuf, base: PathBuf) -> layerpack_core::sys::IoctlResponder {
    Box::new(move |path: &Path, request: u64, arg: &mut [u8]| {
        assert_eq!(request, mvdown::AUFS_CTL_MVDOWN);
        let rel = path.strip_prefix(&merged).unwrap();
        fs::create_dir_all(base.join(rel).parent().unwrap())?;
        fs::rename(upper.join(rel), base.join(rel))?;
        arg[..4].copy_from_slice(&(mvdown::ROLOWER | mvdown::ROLOWER_R).to_ne_bytes());
        Ok(())
    })
}

fn ioctl_paths(calls: &[Call]) -> Vec<PathBuf> {
    calls
        .iter()
        .filter_map(|c| match c {
            Call::Ioctl { path, request, arg } => {
                assert_eq!(*request, mvdown::AUFS_CTL_MVDOWN);
                assert_eq!(arg.as_slice(), mvdown::encode().as_slice());
                Some(path.clone())
            }
            _ => None,
        })
        .collect()
}

#[test]
fn mount_options_name_both_branches_and_the_xino_file() {
    let o =
        AufsBackend::mount_options(Path::new("/s/upper"), Path::new("/r"), Path::new("/s/xino"))
            .unwrap();
    assert_eq!(o, "br=/s/upper=rw:/r=ro,udba=reval,noplink,xino=/s/xino");
    let err = AufsBackend::mount_options(Path::new("/s/up=per"), Path::new("/r"), Path::new("/x"))
        .unwrap_err();
    assert!(err.to_string().contains("/s/up=per"), "{err}");
}

#[test]
fn probe_reads_the_given_proc_filesystems() {
    let fx = setup("probe");
    fs::write(fx.root.join("proc/filesystems"), "nodev\tproc\n\text4\n").unwrap();
    let b = AufsBackend::new(AufsConfig::default(), &fx.root);
    assert!(matches!(
        b.probe(),
        Probe::Unavailable(Unavailable::NoFilesystem { ref fs, .. }) if fs == "aufs"
    ));
    assert_eq!(b.probe().reason().unwrap(), "aufs not in /proc/filesystems");
}

#[test]
fn online_move_down_makes_exactly_these_calls_and_gives_the_merged_view() {
    let mut fx = setup("seq");
    let fake = Arc::new(FakeSys::new());
    let b = backend(&fx, AufsConfig::default(), &fake);
    let merged = begin(&mut fx, &b);
    assert_eq!(merged, fx.spec.dir.join("merged"));
    assert_eq!(b.health(&fx.spec), Health::Ok);
    let reference = install(&fx);
    let upper = fx.spec.dir.join("upper");
    fake.on_ioctl(kernel(merged.clone(), upper.clone(), fx.spec.base.clone()));
    // As `final` does: unmount before reading, then move down.
    b.freeze(&fx.spec).unwrap();
    assert!(matches!(b.health(&fx.spec), Health::MountLost(_)));
    let report = b.move_down_report(&fx.spec).unwrap();

    let calls = fake.calls();
    let mount = Call::Mount {
        source: Some(PathBuf::from("none")),
        target: merged.clone(),
        fstype: Some("aufs".into()),
        flags: MountFlags::default(),
        data: Some(format!(
            "br={}=rw:{}=ro,udba=reval,noplink,xino={}",
            upper.display(),
            fx.spec.base.display(),
            fx.spec.dir.join("xino").display()
        )),
    };
    let umount = Call::Umount {
        target: merged.clone(),
    };
    // begin's mount, freeze's umount, then move-down's own private mount.
    assert_eq!(calls[..3], [mount.clone(), umount.clone(), mount]);
    // Only new single-link regular files outside opaque directories go
    // through the ioctl: not the rewrite, the hard links, the symlink, the
    // fifo (never opened), whiteouts or aufs's own files.
    assert_eq!(
        ioctl_paths(&calls),
        [merged.join("etc/new"), merged.join("usr/lib/new.so")]
    );
    assert_eq!(calls.last(), Some(&umount));
    assert_eq!(calls.len(), 6, "{calls:?}");
    assert_eq!(
        report.moved_online,
        [RelPath::from("etc/new"), RelPath::from("usr/lib/new.so")]
    );
    assert!(report.declined.is_empty() && report.stopped.is_none());
    compare_trees(&reference, &fx.spec.base).unwrap();
    assert_eq!(fs::read_dir(&fx.spec.dir).unwrap().count(), 0);
}

/// A busy mount fails the freeze, before anything is read or written, and
/// the session stays mounted.
#[test]
fn a_busy_mount_fails_the_freeze_and_stays_mounted() {
    let mut fx = setup("busy");
    let fake = Arc::new(FakeSys::new());
    fake.fail_at(1, libc::EBUSY);
    let b = backend(&fx, AufsConfig::default(), &fake);
    begin(&mut fx, &b);
    let err = b.freeze(&fx.spec).unwrap_err();
    assert_eq!(err.kind(), layerpack_core::ErrorKind::Busy);
    assert!(err.to_string().contains("layerpack final fake"), "{err}");
    assert_eq!(b.health(&fx.spec), Health::Ok);
}

#[test]
fn declined_and_unsupported_ioctls_fall_back_to_the_fold() {
    for (errno, au_errno, stops) in [
        (libc::EEXIST, 0, false),
        (libc::EBUSY, 0, false),
        (libc::EINVAL, 1, false),
        // Seen on a real aufs: a name past AUFS_MAX_NAMELEN, and a
        // directory with children on two branches.
        (libc::ENAMETOOLONG, 0, false),
        (libc::EXDEV, 0, false),
        (libc::ENOTTY, 0, true),
    ] {
        let mut fx = setup(&format!("decline{errno}-{au_errno}"));
        let fake = Arc::new(FakeSys::new());
        let b = backend(&fx, AufsConfig::default(), &fake);
        begin(&mut fx, &b);
        let reference = install(&fx);
        fake.on_ioctl(Box::new(move |_, _, arg: &mut [u8]| {
            arg[mvdown::OFFSET_AU_ERRNO] = au_errno as u8;
            Err(io::Error::from_raw_os_error(errno))
        }));
        let report = b.move_down_report(&fx.spec).unwrap();
        let tried = ioctl_paths(&fake.calls()).len();
        if stops {
            assert_eq!(tried, 1);
            assert!(report.stopped.unwrap().contains("not an aufs mount"));
        } else {
            assert_eq!(tried, 2);
            assert_eq!(report.declined.len(), 2);
        }
        assert!(report.moved_online.is_empty());
        compare_trees(&reference, &fx.spec.base).unwrap();
    }
}

#[test]
fn an_io_error_stops_the_move_down_with_nothing_lost_and_a_rerun_finishes() {
    let mut fx = setup("eio");
    let fake = Arc::new(FakeSys::new());
    let b = backend(&fx, AufsConfig::default(), &fake);
    let merged = begin(&mut fx, &b);
    let reference = install(&fx);
    fake.on_ioctl(Box::new(|_, _, _| {
        Err(io::Error::from_raw_os_error(libc::EIO))
    }));
    b.freeze(&fx.spec).unwrap();
    let err = b.move_down(&fx.spec).unwrap_err();
    assert!(err.to_string().contains("etc/new"), "{err}");
    // The private mount was undone and the layer is intact.
    assert!(!fake.is_mounted(&merged, None).unwrap());
    assert!(fx.spec.dir.join("upper/etc/new").exists());
    fake.on_ioctl(kernel(
        merged,
        fx.spec.dir.join("upper"),
        fx.spec.base.clone(),
    ));
    b.move_down(&fx.spec).unwrap();
    compare_trees(&reference, &fx.spec.base).unwrap();
}

#[test]
fn offline_mode_never_calls_the_ioctl() {
    let mut fx = setup("offline");
    let fake = Arc::new(FakeSys::new());
    let cfg = AufsConfig {
        offline: true,
        ..AufsConfig::default()
    };
    let b = backend(&fx, cfg, &fake);
    assert!(!b.capabilities().online_move_down);
    begin(&mut fx, &b);
    let reference = install(&fx);
    b.move_down(&fx.spec).unwrap();
    assert!(ioctl_paths(&fake.calls()).is_empty());
    compare_trees(&reference, &fx.spec.base).unwrap();
}

#[test]
fn in_place_session_binds_the_root_and_mounts_on_it() {
    let mut fx = setup("inplace");
    let fake = Arc::new(FakeSys::new());
    let cfg = AufsConfig {
        in_place: true,
        ..AufsConfig::default()
    };
    let b = backend(&fx, cfg, &fake);
    assert_eq!(begin(&mut fx, &b), fx.spec.base);
    let lower = fx.spec.dir.join("lower");
    let calls = fake.calls();
    assert_eq!(
        calls[..2],
        [
            Call::bind(&fx.spec.base, &lower),
            Call::make_private(&lower),
        ]
    );
    match &calls[2] {
        Call::Mount { target, data, .. } => {
            assert_eq!(target, &fx.spec.base);
            let want = format!("{}=ro,", lower.display());
            assert!(data.as_deref().unwrap().contains(&want), "{data:?}");
        }
        c => panic!("{c:?}"),
    }
    b.discard(&fx.spec).unwrap();
    assert_eq!(
        fake.calls()[3..],
        [
            Call::Umount {
                target: fx.spec.base.clone()
            },
            Call::Umount { target: lower }
        ]
    );
    assert_eq!(fs::read_dir(&fx.spec.dir).unwrap().count(), 0);
}

#[test]
fn a_root_holding_wh_names_is_refused_naming_the_path() {
    let fx = setup("whname");
    fs::create_dir_all(fx.spec.base.join("etc")).unwrap();
    fs::write(fx.spec.base.join("etc/.wh.keep"), b"keep").unwrap();
    let fake = Arc::new(FakeSys::new());
    let b = backend(&fx, AufsConfig::default(), &fake);
    let err = b.begin(&fx.spec).unwrap_err();
    assert!(err.to_string().contains("etc/.wh.keep"), "{err}");
    assert!(fake.calls().is_empty());
    assert_eq!(fs::read_dir(&fx.spec.dir).unwrap().count(), 0);
}

/// aufs holds names of at most 242 bytes (AUFS_MAX_NAMELEN): the backend
/// declares it, scenario 20 uses it, and a root holding a longer name is
/// refused at begin naming the path and the limit, before any mount.
#[test]
fn a_root_holding_a_name_past_aufs_s_limit_is_refused_naming_it() {
    let fx = setup("namelen");
    let fake = Arc::new(FakeSys::new());
    let b = backend(&fx, AufsConfig::default(), &fake);
    assert_eq!(b.capabilities().max_name_len, Some(242));
    assert_eq!(
        layerpack_core::scenarios::long_name_len(&b.capabilities()),
        242
    );
    layerpack_core::scenarios::check_name_limit(&b, &fx.root.join("work")).unwrap();
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    // A name of exactly 242 bytes is fine.
    fs::write(fx.spec.base.join("n".repeat(242)), b"x").unwrap();
    let mut fx = fx;
    begin(&mut fx, &b);
    b.discard(&fx.spec).unwrap();
}

#[test]
fn a_failed_mount_undoes_everything() {
    let fx = setup("fail");
    let fake = Arc::new(FakeSys::new());
    fake.fail_at(0, libc::EINVAL);
    let b = backend(&fx, AufsConfig::default(), &fake);
    let err = b.begin(&fx.spec).unwrap_err();
    assert!(err.to_string().contains("cannot mount aufs"), "{err}");
    assert_eq!(fs::read_dir(&fx.spec.dir).unwrap().count(), 0);
}

#[test]
fn a_move_down_killed_at_any_fold_step_is_finished_by_a_rerun() {
    for n in 0.. {
        let mut fx = setup(&format!("kill{n}"));
        let fake = Arc::new(FakeSys::new());
        let b = backend(&fx, AufsConfig::default(), &fake).with_fold(FoldOptions {
            fail_after: Some(n),
        });
        let merged = begin(&mut fx, &b);
        let reference = install(&fx);
        fake.on_ioctl(kernel(
            merged,
            fx.spec.dir.join("upper"),
            fx.spec.base.clone(),
        ));
        let first = b.move_down(&fx.spec);
        backend(&fx, AufsConfig::default(), &fake)
            .move_down(&fx.spec)
            .unwrap();
        compare_trees(&reference, &fx.spec.base).unwrap();
        assert_eq!(fs::read_dir(&fx.spec.dir).unwrap().count(), 0);
        if first.is_ok() {
            assert!(n > 10, "only {n} fold steps");
            break;
        }
    }
}
