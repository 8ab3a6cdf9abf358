//! `apply`: install a package into a tree, deletions included — ipk (ar or
//! OpenWrt's gzip'd tar), a data tarball, or an OCI layer. The installer for
//! targets without opkg, and our round-trip check.
//!
//! Nothing is ever written outside the root: names that are absolute or
//! contain `..` are refused, parent directories are resolved one component
//! at a time without following a symlink whose target is absolute or climbs
//! out of the root, an existing symlink at an entry's own name is replaced,
//! never written through, and hard-link targets are checked the same way.
//! Every refusal is reported.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use flate2::read::GzDecoder;

use super::tarw::ar_members;
use crate::model::RelPath;
use crate::{Error, ErrorKind, Result};

/// What `apply` did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Entries written.
    pub installed: usize,
    /// Paths removed.
    pub deleted: usize,
    /// Entries refused, with the reason.
    pub refused: Vec<String>,
    /// The package format found.
    pub format: &'static str,
}

fn bad(path: &Path, what: &str) -> Error {
    Error::new(ErrorKind::InvalidInput, what.to_string()).with_path(path)
}

fn gunzip(data: &[u8], path: &Path, what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    GzDecoder::new(data)
        .read_to_end(&mut out)
        .map_err(|e| bad(path, &format!("{what} is not valid gzip data: {e}")))?;
    Ok(out)
}

/// Install `package` into `root`.
pub fn apply(package: &Path, root: &Path) -> Result<Applied> {
    let root = fs::canonicalize(root).map_err(|e| Error::io(root, "cannot resolve the root", e))?;
    let bytes = fs::read(package).map_err(|e| Error::io(package, "cannot read package", e))?;
    let mut out = Applied::default();
    let (data_tar, deletions, oci): (Vec<u8>, Vec<RelPath>, bool) = if bytes
        .starts_with(b"!<arch>\n")
    {
        out.format = "ipk";
        let members = ar_members(&bytes).ok_or_else(|| bad(package, "truncated ar archive"))?;
        let get = |n: &str| members.iter().find(|(m, _)| m == n).map(|(_, d)| *d);
        let data = get("data.tar.gz").ok_or_else(|| bad(package, "no data.tar.gz member"))?;
        let control =
            get("control.tar.gz").ok_or_else(|| bad(package, "no control.tar.gz member"))?;
        (
            gunzip(data, package, "data.tar.gz")?,
            deletions_from_control(&gunzip(control, package, "control.tar.gz")?, package)?,
            false,
        )
    } else if bytes.starts_with(&[0x1f, 0x8b]) {
        let inner = gunzip(&bytes, package, "the package")?;
        let names = tar_file_map(&inner, package)?;
        if let Some(data) = names
            .iter()
            .find(|(n, _)| n == b"./data.tar.gz" || n == b"data.tar.gz")
        {
            out.format = "ipk-openwrt";
            let control = names
                .iter()
                .find(|(n, _)| n == b"./control.tar.gz" || n == b"control.tar.gz")
                .ok_or_else(|| bad(package, "no control.tar.gz member"))?;
            (
                gunzip(&data.1, package, "data.tar.gz")?,
                deletions_from_control(&gunzip(&control.1, package, "control.tar.gz")?, package)?,
                false,
            )
        } else {
            out.format = "tar";
            (inner, Vec::new(), false)
        }
    } else {
        out.format = "oci";
        (bytes, Vec::new(), true)
    };
    for d in &deletions {
        remove_in_root(&root, d, &mut out)?;
    }
    extract(&data_tar, &root, oci, package, &mut out)?;
    Ok(out)
}

/// Regular-file members of a tar, by name.
fn tar_file_map(tar_bytes: &[u8], package: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut a = tar::Archive::new(tar_bytes);
    let mut out = Vec::new();
    for e in a
        .entries()
        .map_err(|e| bad(package, &format!("not a tar archive: {e}")))?
    {
        let mut e = e.map_err(|e| bad(package, &format!("broken tar archive: {e}")))?;
        let name = e.path_bytes().to_vec();
        let mut data = Vec::new();
        e.read_to_end(&mut data)
            .map_err(|e| bad(package, &format!("broken tar archive: {e}")))?;
        out.push((name, data));
    }
    Ok(out)
}

fn deletions_from_control(control_tar: &[u8], package: &Path) -> Result<Vec<RelPath>> {
    let files = tar_file_map(control_tar, package)?;
    Ok(files
        .iter()
        .find(|(n, _)| n == b"./layerpack.deletions" || n == b"layerpack.deletions")
        .map(|(_, d)| {
            d.split(|b| *b == 0)
                .filter(|p| !p.is_empty())
                .map(RelPath::from_bytes)
                .collect()
        })
        .unwrap_or_default())
}

/// Check an archive name: relative, no `..`. Returns the clean path.
fn clean_name(name: &[u8]) -> std::result::Result<RelPath, String> {
    if name.starts_with(b"/") {
        return Err("absolute path".into());
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for comp in name.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("path contains '..'".into()),
            c => parts.push(c),
        }
    }
    Ok(RelPath::from_bytes(&parts.join(&b'/')))
}

/// Resolve `dir` (relative) inside `root`, following symlinks only while
/// they stay inside; creates missing directories when `create`.
fn resolve_dir(root: &Path, dir: &RelPath, create: bool) -> std::result::Result<PathBuf, String> {
    let mut cur = root.to_path_buf();
    let mut pending: Vec<Vec<u8>> = dir
        .as_bytes()
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .rev()
        .map(<[u8]>::to_vec)
        .collect();
    let mut hops = 0;
    while let Some(comp) = pending.pop() {
        if comp == b"." {
            continue;
        }
        if comp == b".." {
            if cur == root {
                return Err("a symlink climbs out of the root".into());
            }
            cur.pop();
            continue;
        }
        let next = cur.join(OsStr::from_bytes(&comp));
        match fs::symlink_metadata(&next) {
            Ok(md) if md.file_type().is_symlink() => {
                hops += 1;
                let target = fs::read_link(&next).map_err(|e| e.to_string())?;
                if target.is_absolute() || hops > 40 {
                    return Err(format!(
                        "{} is a symlink pointing outside the root ({})",
                        next.strip_prefix(root).unwrap_or(&next).display(),
                        target.display()
                    ));
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push(n.as_bytes().to_vec()),
                        Component::ParentDir => pending.push(b"..".to_vec()),
                        _ => {}
                    }
                }
            }
            Ok(md) if md.is_dir() => cur = next,
            Ok(_) => return Err(format!("{} is not a directory", next.display())),
            Err(_) if create => {
                fs::create_dir(&next)
                    .map_err(|e| format!("cannot create {}: {e}", next.display()))?;
                cur = next;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(cur)
}

fn remove_in_root(root: &Path, path: &RelPath, out: &mut Applied) -> Result<()> {
    let Some(parent) = path.parent() else {
        return Ok(());
    };
    let dir = match resolve_dir(root, &parent, false) {
        Ok(d) => d,
        Err(_) => return Ok(()), // parent gone: nothing to delete
    };
    let target = dir.join(OsStr::from_bytes(path.file_name()));
    let res = match fs::symlink_metadata(&target) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(&target),
        Ok(_) => fs::remove_file(&target),
        Err(_) => return Ok(()),
    };
    res.map_err(|e| Error::io(&target, "cannot delete", e))?;
    out.deleted += 1;
    Ok(())
}

fn extract(
    tar_bytes: &[u8],
    root: &Path,
    oci: bool,
    package: &Path,
    out: &mut Applied,
) -> Result<()> {
    let mut a = tar::Archive::new(tar_bytes);
    let is_root = nix::unistd::geteuid().is_root();
    let mut dirs: Vec<(PathBuf, u32, i64, u32, u32)> = Vec::new();
    let mut seen: BTreeSet<RelPath> = BTreeSet::new();
    for e in a
        .entries()
        .map_err(|e| bad(package, &format!("not a tar archive: {e}")))?
    {
        let mut e = e.map_err(|e| bad(package, &format!("broken tar archive: {e}")))?;
        let raw = e.path_bytes().to_vec();
        let shown = crate::model::escape_bytes(&raw);
        let path = match clean_name(&raw) {
            Ok(p) if p.is_root() => continue,
            Ok(p) => p,
            Err(why) => {
                out.refused.push(format!("{shown}: {why}"));
                continue;
            }
        };
        let parent = path.parent().unwrap_or_default();
        let dir = match resolve_dir(root, &parent, true) {
            Ok(d) => d,
            Err(why) => {
                out.refused.push(format!("{shown}: {why}"));
                continue;
            }
        };
        let name = path.file_name();
        if oci && name.starts_with(b".wh.") {
            if name == b".wh..wh..opq" {
                // Opaque: what the lower layers had here is gone; entries of
                // this layer that came before the marker stay.
                if let Ok(rd) = fs::read_dir(&dir) {
                    for ent in rd.flatten() {
                        let rel = parent.join(ent.file_name().as_bytes());
                        if !seen.contains(&rel) {
                            remove_in_root(root, &rel, out)?;
                        }
                    }
                }
            } else {
                remove_in_root(root, &parent.join(&name[4..]), out)?;
            }
            continue;
        }
        let target = dir.join(OsStr::from_bytes(name));
        let h = e.header().clone();
        let mode = h.mode().unwrap_or(0o644) & 0o7777;
        let mtime = h.mtime().unwrap_or(0) as i64;
        let kind = h.entry_type();
        let existing = fs::symlink_metadata(&target).ok();
        // Never write through what is there: replace it (a directory stays
        // a directory when the entry is one).
        if let Some(md) = &existing {
            let keep_dir = md.is_dir() && kind.is_dir();
            if !keep_dir {
                let r = if md.is_dir() {
                    fs::remove_dir_all(&target)
                } else {
                    fs::remove_file(&target)
                };
                r.map_err(|e| Error::io(&target, "cannot replace", e))?;
            }
        }
        let written: std::io::Result<()> = (|| {
            if kind.is_dir() {
                if !target.is_dir() {
                    fs::create_dir(&target)?;
                }
                dirs.push((
                    target.clone(),
                    mode,
                    mtime,
                    h.uid().unwrap_or(0) as u32,
                    h.gid().unwrap_or(0) as u32,
                ));
                return Ok(());
            } else if kind.is_symlink() {
                let link = e.link_name_bytes().map(|l| l.to_vec()).unwrap_or_default();
                std::os::unix::fs::symlink(OsStr::from_bytes(&link), &target)?;
            } else if kind.is_hard_link() {
                let link = e.link_name_bytes().map(|l| l.to_vec()).unwrap_or_default();
                let src = clean_name(&link)
                    .map_err(|w| std::io::Error::other(format!("hard link target: {w}")))?;
                let src_dir = resolve_dir(root, &src.parent().unwrap_or_default(), false)
                    .map_err(std::io::Error::other)?;
                fs::hard_link(src_dir.join(OsStr::from_bytes(src.file_name())), &target)?;
                return Ok(());
            } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
                use nix::sys::stat::{mknod, Mode, SFlag};
                let (flag, dev) = if kind.is_fifo() {
                    (SFlag::S_IFIFO, 0)
                } else {
                    let major = h.device_major().ok().flatten().unwrap_or(0);
                    let minor = h.device_minor().ok().flatten().unwrap_or(0);
                    let f = if kind.is_character_special() {
                        SFlag::S_IFCHR
                    } else {
                        SFlag::S_IFBLK
                    };
                    (f, nix::sys::stat::makedev(major as u64, minor as u64))
                };
                mknod(&target, flag, Mode::from_bits_truncate(mode), dev)
                    .map_err(std::io::Error::from)?;
            } else {
                let mut f = fs::File::create(&target)?;
                std::io::copy(&mut e, &mut f)?;
            }
            if is_root {
                let uid = h.uid().unwrap_or(0) as u32;
                let gid = h.gid().unwrap_or(0) as u32;
                std::os::unix::fs::lchown(&target, Some(uid), Some(gid))?;
            }
            if !kind.is_symlink() {
                fs::set_permissions(&target, fs::Permissions::from_mode(mode))?;
            }
            set_mtime(&target, mtime)
        })();
        match written {
            Ok(()) => {
                out.installed += 1;
                seen.insert(path);
            }
            Err(err)
                if err.kind() == std::io::ErrorKind::PermissionDenied
                    || err.raw_os_error() == Some(libc::EPERM) =>
            {
                out.refused
                    .push(format!("{shown}: {err} (device nodes need root)"))
            }
            Err(err) => out.refused.push(format!("{shown}: {err}")),
        }
    }
    // Directory metadata last: creating children bumps a directory's mtime.
    for (d, mode, mtime, uid, gid) in dirs.into_iter().rev() {
        if is_root {
            std::os::unix::fs::lchown(&d, Some(uid), Some(gid))
                .map_err(|e| Error::io(&d, "cannot set directory owner", e))?;
        }
        fs::set_permissions(&d, fs::Permissions::from_mode(mode))
            .and_then(|()| set_mtime(&d, mtime))
            .map_err(|e| Error::io(&d, "cannot set directory metadata", e))?;
        out.installed += 1;
    }
    Ok(())
}

fn set_mtime(path: &Path, secs: i64) -> std::io::Result<()> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::new(secs, 0);
    utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_escape_are_refused() {
        assert!(clean_name(b"/etc/passwd").is_err());
        assert!(clean_name(b"./a/../../x").is_err());
        assert_eq!(clean_name(b"./usr//bin/").unwrap().as_bytes(), b"usr/bin");
    }
}
