//! `layerpack index`: the `Packages` and `Packages.gz` files of an opkg
//! feed. One stanza per package name and architecture (the newest version
//! wins), control fields as the package has them plus `Filename` (relative
//! to the feed), `Size`, `SHA256sum` and `MD5Sum`; stanzas sorted by name
//! then architecture, so the output depends only on the packages.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use md5::Md5;
use sha2::{Digest, Sha256};

use super::tarw::ar_members;
use super::version::compare_versions;
use crate::tree::hex;
use crate::{Error, ErrorKind, Result};

/// One package of a feed.
#[derive(Clone, Debug)]
pub struct FeedEntry {
    /// Control fields in file order (continuation lines kept in values).
    pub fields: Vec<(String, String)>,
    /// Path relative to the feed directory.
    pub filename: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 hex.
    pub sha256: String,
    /// MD5 hex.
    pub md5: String,
}

impl FeedEntry {
    fn field(&self, k: &str) -> &str {
        self.fields
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }
}

/// Fields `layerpack index` writes itself from the package file: a control
/// file that carries one would put a second, attacker-chosen value in the
/// feed.
pub const INDEX_FIELDS: &[&str] = &["Filename", "Size", "SHA256sum", "MD5Sum", "MD5sum", "SHA1"];

/// Parse a control file into ordered fields, refusing what would change
/// the meaning of a feed built from it: a blank (or whitespace-only) line,
/// which starts a second stanza; a line that is neither `Name: value` nor
/// a continuation; a field name outside `[A-Za-z0-9-]` or given twice; a
/// field the index writes itself ([`INDEX_FIELDS`]); a NUL or CR byte.
pub fn parse_control(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let body = text.strip_suffix('\n').unwrap_or(text);
    if body.contains(['\0', '\r']) {
        return Err("the control file contains a NUL or CR byte".into());
    }
    for (i, line) in body.split('\n').enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            return Err(format!(
                "line {n} is blank: a blank line starts a second stanza (write ' .' for an empty line of a description)"
            ));
        }
        if line.starts_with([' ', '\t']) {
            match out.last_mut() {
                Some(last) => {
                    last.1.push('\n');
                    last.1.push_str(line);
                }
                None => return Err(format!("line {n} continues a field that does not exist")),
            }
            continue;
        }
        let Some((k, v)) = line.split_once(':') else {
            return Err(format!("line {n} is not 'Field: value'"));
        };
        let ok_name = !k.is_empty()
            && !k.starts_with('-')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !ok_name {
            return Err(format!("line {n}: '{k}' is not a field name"));
        }
        if INDEX_FIELDS.iter().any(|f| f.eq_ignore_ascii_case(k)) {
            return Err(format!(
                "line {n}: the field {k} is written by the feed index, not by a package"
            ));
        }
        if out.iter().any(|(o, _)| o.eq_ignore_ascii_case(k)) {
            return Err(format!("line {n}: the field {k} is given twice"));
        }
        out.push((k.to_string(), v.trim().to_string()));
    }
    Ok(out)
}

fn inner_file(tar_gz: &[u8], want: &str) -> Option<Vec<u8>> {
    let mut a = tar::Archive::new(GzDecoder::new(tar_gz));
    for e in a.entries().ok()? {
        let mut e = e.ok()?;
        let name = e.path_bytes().to_vec();
        if name == want.as_bytes() || name.strip_prefix(b"./") == Some(want.as_bytes()) {
            let mut v = Vec::new();
            e.read_to_end(&mut v).ok()?;
            return Some(v);
        }
    }
    None
}

/// The control file of an ipk (either form).
pub fn read_control(bytes: &[u8]) -> Option<String> {
    let control_tar = if bytes.starts_with(b"!<arch>\n") {
        ar_members(bytes)?
            .into_iter()
            .find(|(n, _)| n == "control.tar.gz")
            .map(|(_, d)| d.to_vec())?
    } else {
        let mut outer = Vec::new();
        GzDecoder::new(bytes).read_to_end(&mut outer).ok()?;
        let mut a = tar::Archive::new(&outer[..]);
        let mut found = None;
        for e in a.entries().ok()? {
            let mut e = e.ok()?;
            let name = e.path_bytes().to_vec();
            if name == b"./control.tar.gz" || name == b"control.tar.gz" {
                let mut v = Vec::new();
                e.read_to_end(&mut v).ok()?;
                found = Some(v);
            }
        }
        found?
    };
    String::from_utf8(inner_file(&control_tar, "control")?).ok()
}

fn collect(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(|e| Error::io(dir, "cannot list feed directory", e))?
        .filter_map(|e| e.ok())
        .collect();
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let ft = e
            .file_type()
            .map_err(|err| Error::io(e.path(), "cannot stat", err))?;
        let r = rel.join(e.file_name());
        if ft.is_dir() {
            collect(&e.path(), &r, out)?;
        } else if ft.is_file() && r.extension().is_some_and(|x| x == "ipk") {
            out.push(r);
        }
    }
    Ok(())
}

/// Read every `.ipk` below `dir` and keep the newest per name+arch.
pub fn scan_feed(dir: &Path) -> Result<Vec<FeedEntry>> {
    let mut files = Vec::new();
    collect(dir, Path::new(""), &mut files)?;
    let mut best: BTreeMap<(String, String), FeedEntry> = BTreeMap::new();
    let progress = crate::progress::step(
        format!("indexing {}", dir.display()),
        crate::progress::Unit::Entries,
    );
    for rel in files {
        progress.add(1);
        let abs = dir.join(&rel);
        let bytes = fs::read(&abs).map_err(|e| Error::io(&abs, "cannot read package", e))?;
        let control = read_control(&bytes).ok_or_else(|| {
            Error::new(ErrorKind::InvalidInput, "not an ipk: no control file found").with_path(&abs)
        })?;
        let fields = parse_control(&control).map_err(|why| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("the control file is not acceptable in a feed: {why}"),
            )
            .with_path(&abs)
        })?;
        let filename = rel
            .to_str()
            .filter(|n| !n.chars().any(|c| c.is_control() || c.is_whitespace()))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidInput,
                    "a feed file name must be UTF-8 without spaces or control characters",
                )
                .with_path(&abs)
            })?
            .to_string();
        let entry = FeedEntry {
            fields,
            filename,
            size: bytes.len() as u64,
            sha256: hex(&Sha256::digest(&bytes)),
            md5: hex(&Md5::digest(&bytes)),
        };
        let key = (
            entry.field("Package").to_string(),
            entry.field("Architecture").to_string(),
        );
        if key.0.is_empty() {
            return Err(
                Error::new(ErrorKind::InvalidInput, "control file has no Package field")
                    .with_path(&abs),
            );
        }
        match best.get(&key) {
            Some(old) if compare_versions(old.field("Version"), entry.field("Version")).is_ge() => {
            }
            _ => {
                best.insert(key, entry);
            }
        }
    }
    Ok(best.into_values().collect())
}

/// The text of `Packages`.
pub fn packages_text(entries: &[FeedEntry]) -> String {
    let mut s = String::new();
    for e in entries {
        for (k, v) in e.fields.iter().filter(|(k, _)| k != "Description") {
            s.push_str(&format!("{k}: {v}\n"));
        }
        s.push_str(&format!(
            "Filename: {}\nSize: {}\nSHA256sum: {}\nMD5Sum: {}\n",
            e.filename, e.size, e.sha256, e.md5
        ));
        if let Some((_, d)) = e.fields.iter().find(|(k, _)| k == "Description") {
            s.push_str(&format!("Description: {d}\n"));
        }
        s.push('\n');
    }
    s
}

/// Write `Packages` and `Packages.gz` into `dir`; returns the entries.
pub fn write_index(dir: &Path) -> Result<Vec<FeedEntry>> {
    let entries = scan_feed(dir)?;
    let text = packages_text(&entries);
    crate::session::write_atomic(&dir.join("Packages"), text.as_bytes())?;
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(3)
        .write(Vec::new(), flate2::Compression::best());
    gz.write_all(text.as_bytes())
        .map_err(|e| Error::io(dir, "cannot compress Packages", e))?;
    let gz = gz
        .finish()
        .map_err(|e| Error::io(dir, "cannot compress Packages", e))?;
    crate::session::write_atomic(&dir.join("Packages.gz"), &gz)?;
    Ok(entries)
}
