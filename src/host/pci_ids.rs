//! Vendor and device names from the host's own PCI ID database: the `pci.ids` file `lspci`
//! reads (`/usr/share/misc/pci.ids` on Debian and Ubuntu, `/usr/share/hwdata/pci.ids` on
//! RHEL-likes), under a host root. Streamed once, keeping only the IDs asked for; opened only
//! when names are asked for. Never writes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::model::PciId;

/// Where the file is, tried in this order under the host root.
pub const PATHS: [&str; 2] = ["usr/share/misc/pci.ids", "usr/share/hwdata/pci.ids"];

/// Errors from reading the host's `pci.ids`.
#[derive(Debug, thiserror::Error)]
pub enum PciIdsError {
    /// The file exists but could not be read.
    #[error("failed to read {path}")]
    Read {
        /// The full path, root included.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: io::Error,
    },
}

/// The names found for the IDs asked for (none when the host has no `pci.ids`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PciNames {
    vendors: BTreeMap<u16, String>,
    devices: BTreeMap<PciId, String>,
}

impl PciNames {
    /// The vendor's name, e.g. "NVIDIA Corporation".
    pub fn vendor(&self, vendor: u16) -> Option<&str> {
        self.vendors.get(&vendor).map(String::as_str)
    }

    /// The device's name, e.g. "GH100 [H100 SXM5 80GB]".
    pub fn device(&self, id: PciId) -> Option<&str> {
        self.devices.get(&id).map(String::as_str)
    }

    /// Reads a `pci.ids` from `r` (pure: no path, no host), keeping the names of `wanted`'s
    /// vendors and devices. Stops once every one is found, or at the class list (`C …`), which
    /// follows the vendors. Lines: `vvvv  Vendor`, `\tdddd  Device`, `\t\tssss ssss  Subsystem`
    /// (skipped), `#` comments; anything else is skipped as `lspci` skips it.
    pub fn parse(mut r: impl BufRead, wanted: &BTreeSet<PciId>) -> io::Result<Self> {
        let vendors: BTreeSet<u16> = wanted.iter().map(|id| id.vendor).collect();
        let mut names = Self::default();
        let mut line = Vec::new();
        // The vendor whose devices follow, when it is one asked for.
        let mut vendor: Option<u16> = None;
        while names.vendors.len() < vendors.len() || names.devices.len() < wanted.len() {
            line.clear();
            if r.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            match line.as_slice() {
                [b'C', b' ', ..] => break,
                [b'\t', b'\t', ..] | [b'#', ..] => {}
                [b'\t', rest @ ..] => {
                    if let (Some(v), Some((device, name))) = (vendor, id_and_name(rest)) {
                        let id = PciId { vendor: v, device };
                        if wanted.contains(&id) {
                            names.devices.insert(id, name);
                        }
                    }
                }
                _ => {
                    vendor = None;
                    if let Some((v, name)) = id_and_name(&line) {
                        if vendors.contains(&v) {
                            names.vendors.insert(v, name);
                            vendor = Some(v);
                        }
                    }
                }
            }
        }
        Ok(names)
    }
}

/// `xxxx  Name` → (0xxxxx, "Name"): four hex digits, white space, a name.
fn id_and_name(s: &[u8]) -> Option<(u16, String)> {
    let (id, rest) = s.split_at_checked(4)?;
    if !id.iter().all(u8::is_ascii_hexdigit) || !rest.first()?.is_ascii_whitespace() {
        return None;
    }
    let id = u16::from_str_radix(std::str::from_utf8(id).ok()?, 16).ok()?;
    let name = String::from_utf8_lossy(rest.trim_ascii());
    (!name.is_empty()).then(|| (id, name.into_owned()))
}

/// The names of `wanted` from the first of [`PATHS`] under `root` that exists; none when no
/// file exists or nothing is wanted (the file is then not opened).
pub fn read(root: &Path, wanted: &BTreeSet<PciId>) -> Result<PciNames, PciIdsError> {
    if wanted.is_empty() {
        return Ok(PciNames::default());
    }
    for rel in PATHS {
        let path = root.join(rel);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(PciIdsError::Read { path, source }),
        };
        return PciNames::parse(BufReader::with_capacity(64 * 1024, file), wanted)
            .map_err(|source| PciIdsError::Read { path, source });
    }
    Ok(PciNames::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: &str = "# pci.ids\n#\tVersion: 2025.07.11\n\n\
        1000  Broadcom / LSI\n\
        \tc030  PEX890xx PCIe Gen 5 Switch\n\
        10de  NVIDIA Corporation\n\
        \t2330  GH100 [H100 SXM5 80GB]\n\
        \t\t10de 16c1  H100 SXM5 80GB\n\
        # a comment between devices\n\
        \t2331  GH100 [H100 PCIe]\n\
        15b3  Mellanox Technologies  \r\n\
        \t1021  MT2910 Family [ConnectX-7]\n\
        \n\
        C 03  Display controller\n\
        \t02  3D controller\n\
        2330  Not a vendor: after the class list\n";

    fn id(s: &str) -> PciId {
        s.parse().unwrap()
    }

    fn parse(wanted: &[&str]) -> PciNames {
        let wanted = wanted.iter().map(|s| id(s)).collect();
        PciNames::parse(IDS.as_bytes(), &wanted).unwrap()
    }

    #[test]
    fn vendors_and_devices_asked_for_are_named() {
        let n = parse(&["10de:2330", "15b3:1021", "10de:2331"]);
        assert_eq!(n.vendor(0x10de), Some("NVIDIA Corporation"));
        assert_eq!(n.device(id("10de:2330")), Some("GH100 [H100 SXM5 80GB]"));
        assert_eq!(n.device(id("10de:2331")), Some("GH100 [H100 PCIe]"));
        assert_eq!(
            n.vendor(0x15b3),
            Some("Mellanox Technologies"),
            "trailing white space and CR trimmed"
        );
        assert_eq!(
            n.device(id("15b3:1021")),
            Some("MT2910 Family [ConnectX-7]")
        );
        assert_eq!(n.vendor(0x1000), None, "not asked for");
    }

    #[test]
    fn unknown_ids_have_no_name_and_the_class_list_is_not_vendors() {
        let n = parse(&["10de:ffff", "2330:0000", "1000:2330"]);
        assert_eq!(n.vendor(0x10de), Some("NVIDIA Corporation"));
        assert_eq!(n.device(id("10de:ffff")), None);
        assert_eq!(n.vendor(0x2330), None, "a line after `C ` is a class");
        assert_eq!(
            n.device(id("1000:2330")),
            None,
            "a device of another vendor"
        );
        assert_eq!(
            n.device(id("10de:16c1")),
            None,
            "subsystem lines are not devices"
        );
    }

    #[test]
    fn a_host_without_the_file_gives_no_names_and_the_first_path_wins() {
        let t = tempfile::tempdir().unwrap();
        let wanted: BTreeSet<PciId> = [id("10de:2330")].into();
        assert_eq!(read(t.path(), &wanted).unwrap(), PciNames::default());
        let hwdata = t.path().join(PATHS[1]);
        std::fs::create_dir_all(hwdata.parent().unwrap()).unwrap();
        std::fs::write(&hwdata, "10de  From hwdata\n\t2330  H100\n").unwrap();
        assert_eq!(
            read(t.path(), &wanted).unwrap().vendor(0x10de),
            Some("From hwdata")
        );
        let misc = t.path().join(PATHS[0]);
        std::fs::create_dir_all(misc.parent().unwrap()).unwrap();
        std::fs::write(&misc, "10de  From misc\n").unwrap();
        let n = read(t.path(), &wanted).unwrap();
        assert_eq!(n.vendor(0x10de), Some("From misc"));
        assert_eq!(
            n.device(id("10de:2330")),
            None,
            "only the first file is read"
        );
        // A path that is a directory cannot be read: an error, not "no names".
        std::fs::remove_file(&misc).unwrap();
        std::fs::create_dir(&misc).unwrap();
        assert!(matches!(
            read(t.path(), &wanted),
            Err(PciIdsError::Read { .. })
        ));
    }
}
