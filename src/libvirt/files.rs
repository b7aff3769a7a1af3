//! Who holds which PCI device, read from libvirt's own files under the host root, for code that
//! must never call libvirt (the qemu hook, where a call back into the daemon can deadlock):
//! `run/libvirt/qemu/<name>.xml` is each running domain's live XML (inside `<domstatus>`),
//! `etc/libvirt/qemu/<name>.xml` each defined domain's persistent XML. Read-only.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::alloc::plan::Holdings;
use crate::xml::domain;

/// Running domains' status XML, relative to the host root.
pub const STATUS_DIR: &str = "run/libvirt/qemu";
/// Defined domains' XML, relative to the host root.
pub const CONFIG_DIR: &str = "etc/libvirt/qemu";

/// Errors from reading libvirt's files.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// A directory could not be listed.
    #[error("failed to read {path}")]
    Read {
        /// The directory.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: io::Error,
    },
}

fn xml_files(dir: &Path) -> Result<Vec<PathBuf>, FilesError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(FilesError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "xml") && p.is_file())
        .collect();
    out.sort();
    Ok(out)
}

fn add_from(dir: &Path, running: bool, skip: &str, h: &mut Holdings) -> Result<(), FilesError> {
    for path in xml_files(dir)? {
        let Ok(text) = fs::read_to_string(&path) else {
            tracing::warn!(path = %path.display(), "cannot read libvirt domain file; skipped");
            continue;
        };
        // Most domains have no hostdev: skip parsing them.
        if !text.contains("<hostdev") {
            continue;
        }
        match domain::parse(&text) {
            Ok(facts) if facts.name != skip => {
                h.set_owner(&facts.name, facts.owner.as_deref());
                for a in facts.pci_hostdevs {
                    h.add(a, &facts.name, running);
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "malformed libvirt domain file; skipped")
            }
        }
    }
    Ok(())
}

/// Holdings of running domains only (`run/libvirt/qemu`), leaving out domain `skip`.
pub fn running_holdings(root: &Path, skip: &str) -> Result<Holdings, FilesError> {
    let mut h = Holdings::default();
    add_from(&root.join(STATUS_DIR), true, skip, &mut h)?;
    Ok(h)
}

/// Holdings of running and defined domains, leaving out domain `skip`.
pub fn all_holdings(root: &Path, skip: &str) -> Result<Holdings, FilesError> {
    let mut h = running_holdings(root, skip)?;
    add_from(&root.join(CONFIG_DIR), false, skip, &mut h)?;
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_and_config_files_and_skips_the_domain_itself() {
        let root = tempfile::tempdir().unwrap();
        let run = root.path().join(STATUS_DIR);
        let etc = root.path().join(CONFIG_DIR);
        fs::create_dir_all(&run).unwrap();
        fs::create_dir_all(&etc).unwrap();
        let dom = |name: &str, bus: &str| {
            format!("<domain type='kvm'><name>{name}</name><devices><hostdev mode='subsystem' type='pci'><source><address domain='0' bus='{bus}' slot='0' function='0'/></source></hostdev></devices></domain>")
        };
        fs::write(
            run.join("a.xml"),
            format!(
                "<domstatus state='running'>{}</domstatus>",
                dom("a", "0x18")
            ),
        )
        .unwrap();
        fs::write(etc.join("a.xml"), dom("a", "0x18")).unwrap();
        fs::write(etc.join("b.xml"), dom("b", "0x2a")).unwrap();
        fs::write(etc.join("broken.xml"), "<domain><hostdev>").unwrap();
        fs::write(etc.join("self.xml"), dom("self", "0x3a")).unwrap();
        let all = all_holdings(root.path(), "self").unwrap();
        let h18 = all.holders(&["0000:18:00.0".parse().unwrap()]);
        assert_eq!(h18.len(), 1);
        assert!(h18[0].running && h18[0].domain == "a");
        assert_eq!(
            all.holders(&["0000:2a:00.0".parse().unwrap()])[0].domain,
            "b"
        );
        assert!(all.holders(&["0000:3a:00.0".parse().unwrap()]).is_empty());
        let running = running_holdings(root.path(), "self").unwrap();
        assert!(running
            .holders(&["0000:2a:00.0".parse().unwrap()])
            .is_empty());
        assert!(all_holdings(&root.path().join("none"), "x")
            .unwrap()
            .holders(&[])
            .is_empty());
    }
}
