//! What Buildroot knows of its packages, from `make show-info`: a JSON
//! object keyed by package name, each entry with `type`, `version`,
//! `licenses` (the package's `_LICENSE`, comma-separated) and `downloads`
//! (`source`, the archive's name, and `uris`, each `method+url` or
//! `method|options+url`). The hook runs it once, at post-build; `repack
//! --package-info` turns it into each package's License and Source fields.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use layerpack_core::pack::MetaFields;
use serde::Deserialize;

#[derive(Deserialize)]
struct Entry {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    licenses: String,
    #[serde(default)]
    downloads: Vec<Download>,
}

#[derive(Deserialize)]
struct Download {
    source: String,
    #[serde(default)]
    uris: Vec<String>,
}

/// The control fields `make show-info`'s output at `path` gives each
/// target package: License (its licenses, as Buildroot spells them) and
/// Source (where its first archive is fetched from). Host packages and
/// filesystems are left out.
pub fn read(path: &Path) -> Result<BTreeMap<String, MetaFields>> {
    let text = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let all: BTreeMap<String, Entry> = serde_json::from_slice(&text).with_context(|| {
        format!(
            "{} is not the output of Buildroot's `make show-info`",
            path.display()
        )
    })?;
    Ok(all
        .into_iter()
        .filter(|(_, e)| e.kind == "target")
        .map(|(name, e)| {
            let license = one_line(&e.licenses);
            let source = e.downloads.first().and_then(|d| {
                let uri = d.uris.first()?;
                // `https+https://host/dir`, `http|urlencode+http://...`:
                // the method, then the location.
                let url = match uri.split_once('+') {
                    Some((method, url)) if !method.contains('/') => url,
                    _ => uri.as_str(),
                };
                one_line(&format!("{}/{}", url.trim_end_matches('/'), d.source))
            });
            (
                name,
                MetaFields {
                    license,
                    source,
                    ..MetaFields::default()
                },
            )
        })
        .collect())
}

/// `s` on one line, or nothing when it is empty.
fn one_line(s: &str) -> Option<String> {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn license_and_source_of_target_packages() {
        let dir = std::env::temp_dir().join(format!("showinfo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("show-info.json");
        std::fs::write(
            &f,
            r#"{
  "busybox": {"type": "target", "name": "busybox", "virtual": false,
    "version": "1.36.1", "licenses": "GPL-2.0, bzip2-1.0.4",
    "dl_dir": "busybox",
    "downloads": [{"source": "busybox-1.36.1.tar.bz2",
      "uris": ["https+https://www.busybox.net/downloads", "http|urlencode+http://sources.buildroot.net/busybox"]}],
    "dependencies": ["host-skeleton"], "reverse_dependencies": []},
  "host-skeleton": {"type": "host", "virtual": false, "version": "", "licenses": "",
    "downloads": [], "dependencies": [], "reverse_dependencies": []},
  "local": {"type": "target", "virtual": false, "version": "1.0", "licenses": "",
    "downloads": [], "dependencies": [], "reverse_dependencies": []},
  "rootfs-tar": {"type": "rootfs", "dependencies": []}
}"#,
        )
        .unwrap();
        let got = read(&f).unwrap();
        assert_eq!(got.keys().collect::<Vec<_>>(), ["busybox", "local"]);
        assert_eq!(
            got["busybox"].license.as_deref(),
            Some("GPL-2.0, bzip2-1.0.4")
        );
        assert_eq!(
            got["busybox"].source.as_deref(),
            Some("https://www.busybox.net/downloads/busybox-1.36.1.tar.bz2")
        );
        assert_eq!(got["local"], MetaFields::default());
        std::fs::write(&f, "not json").unwrap();
        let e = read(&f).unwrap_err();
        assert!(format!("{e:#}").contains("show-info"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
