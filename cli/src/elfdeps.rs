//! Runtime dependencies from ELF: each package's executables and libraries
//! name the shared objects they need (`DT_NEEDED`); the package that ships
//! an object by that name (its `DT_SONAME`, or a file or symlink called
//! so) is a dependency.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use layerpack_core::ledger::Ledger;
use layerpack_core::model::RelPath;

/// What an ELF file says about shared objects.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ElfInfo {
    /// `DT_SONAME`.
    pub soname: Option<String>,
    /// `DT_NEEDED`, in order.
    pub needed: Vec<String>,
}

/// Read `path` if it is an ELF file (`None` otherwise, or when it cannot
/// be parsed: a stripped-down or foreign file is not an error here).
pub fn read(path: &Path) -> Option<ElfInfo> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic).ok()?;
    if &magic != b"\x7fELF" {
        return None;
    }
    let bytes = std::fs::read(path).ok()?;
    let elf = goblin::elf::Elf::parse(&bytes).ok()?;
    Some(ElfInfo {
        soname: elf.soname.map(str::to_string),
        needed: elf.libraries.iter().map(|s| s.to_string()).collect(),
    })
}

/// Per package of the ledger (by name), the packages it needs at run time
/// (their `Package:` names), from the ELF files it owns under `root`; and
/// the needs no package satisfies, as report lines.
pub fn resolve(ledger: &Ledger, root: &Path) -> (BTreeMap<String, BTreeSet<String>>, Vec<String>) {
    let mut provider: BTreeMap<String, String> = BTreeMap::new();
    let mut needs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in &ledger.packages {
        for f in p
            .files
            .iter()
            .filter(|f| f.kind != layerpack_core::model::FileKind::Dir)
        {
            let Ok(rel) = RelPath::parse(&f.path) else {
                continue;
            };
            let name = String::from_utf8_lossy(rel.file_name()).into_owned();
            if name.contains(".so") {
                provider.entry(name).or_insert_with(|| p.name.clone());
            }
            if f.kind != layerpack_core::model::FileKind::File {
                continue;
            }
            let Some(info) = read(&rel.under(root)) else {
                continue;
            };
            if let Some(so) = info.soname {
                provider.entry(so).or_insert_with(|| p.name.clone());
            }
            needs.entry(p.name.clone()).or_default().extend(info.needed);
        }
    }
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut unresolved = Vec::new();
    for (pkg, sonames) in needs {
        for so in sonames {
            match provider.get(&so) {
                Some(other) if *other == pkg => {}
                Some(other) => {
                    deps.entry(pkg.clone())
                        .or_default()
                        .insert(ledger.package_field(other));
                }
                None => unresolved.push(format!(
                    "needs: {pkg} needs {so}, which no captured package ships"
                )),
            }
        }
    }
    (deps, unresolved)
}
