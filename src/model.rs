//! Plain data shared by every module: PCI addresses, IDs and classes, GPUs and their functions.
//! Owns parsing and printing of these values; never touches the host or libvirt.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

mod class_names;

/// Errors from parsing user-supplied identifiers.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    /// A PCI address did not have the `DDDD:BB:SS.F` shape or was out of range.
    #[error("invalid PCI address '{input}': {reason} (expected DDDD:BB:SS.F, e.g. 0000:61:00.0)")]
    InvalidPciAddress {
        /// What the user gave (shortened when long).
        input: String,
        /// Which part is wrong.
        reason: &'static str,
    },
    /// A vendor:device pair did not have the `VVVV:DDDD` shape.
    #[error("invalid PCI ID '{input}': expected VVVV:DDDD in hex, e.g. 10de:2330")]
    InvalidPciId {
        /// What the user gave (shortened when long).
        input: String,
    },
    /// A driver or kernel module name with characters a kernel module name never has.
    #[error("invalid driver name '{input}': expected 1 to {DRIVER_NAME_MAX} of A-Z a-z 0-9 _ -, e.g. vfio-pci")]
    InvalidDriverName {
        /// What was given (shortened when long).
        input: String,
    },
    /// A mediated device's UUID did not have the 8-4-4-4-12 hex shape.
    #[error("invalid mdev UUID '{input}': expected 8-4-4-4-12 hex digits, e.g. 4b20d080-1b54-4048-85b3-a6a62d165c01")]
    InvalidMdevUuid {
        /// What was given (shortened when long).
        input: String,
    },
}

/// Keeps error messages one readable line even for hostile input.
fn shown(input: &str) -> String {
    let mut s: String = input.chars().take(64).collect();
    if input.chars().count() > 64 {
        s.push('…');
    }
    s.escape_debug().to_string()
}

/// A PCI function address: `domain:bus:slot.function`, shown as `0000:61:00.0`.
///
/// Parsing accepts only hex digits and the two separators, so a value that parsed can be
/// joined to a sysfs path without reaching anything but `devices/<address>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// PCI segment (domain). Usually 0; VMD and multi-segment hosts use others (up to 0xffffffff).
    pub domain: u32,
    /// Bus number.
    pub bus: u8,
    /// Device (slot) number, 0..=31.
    pub slot: u8,
    /// Function number, 0..=7.
    pub function: u8,
}

impl PciAddress {
    /// Builds an address, checking the slot and function ranges.
    pub fn new(domain: u32, bus: u8, slot: u8, function: u8) -> Option<Self> {
        (slot <= 0x1f && function <= 7).then_some(Self {
            domain,
            bus,
            slot,
            function,
        })
    }

    /// True when `other` is in the same domain:bus:slot (another function of the same device).
    pub fn same_slot(&self, other: &PciAddress) -> bool {
        self.domain == other.domain && self.bus == other.bus && self.slot == other.slot
    }
}

impl fmt::Display for PciAddress {
    /// `{:04x}:{:02x}:{:02x}.{:x}`, written by hand into a buffer: the hook joins addresses to
    /// sysfs paths dozens of times per call, and `write!`'s padded hex showed in its profile.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 18];
        let mut n = put_hex(&mut buf, 0, self.domain, 4);
        buf[n] = b':';
        n = put_hex(&mut buf, n + 1, self.bus.into(), 2);
        buf[n] = b':';
        n = put_hex(&mut buf, n + 1, self.slot.into(), 2);
        buf[n] = b'.';
        n = put_hex(&mut buf, n + 1, self.function.into(), 1);
        f.write_str(std::str::from_utf8(&buf[..n]).map_err(|_| fmt::Error)?)
    }
}

/// Writes `v` in lowercase hex, at least `min` digits, at `buf[at..]`; returns the end.
fn put_hex(buf: &mut [u8], at: usize, v: u32, min: u32) -> usize {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (32 - v.leading_zeros()).div_ceil(4).max(min);
    let mut n = at;
    for i in (0..digits).rev() {
        buf[n] = HEX[((v >> (4 * i)) & 0xf) as usize];
        n += 1;
    }
    n
}

fn hex_field(s: &str, max_digits: usize) -> Option<u32> {
    if s.is_empty() || s.len() > max_digits || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

impl FromStr for PciAddress {
    type Err = ModelError;

    /// Parses `DDDD:BB:SS.F` (domain of 4 to 8 hex digits) or the short `BB:SS.F` that
    /// `lspci` prints, which means domain 0000.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let bad = |reason| ModelError::InvalidPciAddress {
            input: shown(input),
            reason,
        };
        let (head, function) = input
            .rsplit_once('.')
            .ok_or_else(|| bad("missing '.function'"))?;
        // Three or two fields, without collecting them (every sysfs name is parsed).
        let mut parts = head.split(':');
        let fields = (parts.next(), parts.next(), parts.next(), parts.next());
        let (domain, bus, slot) = match fields {
            (Some(d), Some(b), Some(s), None) => {
                if d.len() < 4 {
                    return Err(bad("domain must have 4 to 8 hex digits"));
                }
                (
                    hex_field(d, 8).ok_or_else(|| bad("domain must have 4 to 8 hex digits"))?,
                    b,
                    s,
                )
            }
            (Some(b), Some(s), None, None) => (0, b, s),
            _ => return Err(bad("expected domain:bus:slot.function")),
        };
        let bus = hex_field(bus, 2).ok_or_else(|| bad("bus must be 1 or 2 hex digits"))?;
        let slot = hex_field(slot, 2).ok_or_else(|| bad("slot must be 1 or 2 hex digits"))?;
        let function = hex_field(function, 1).ok_or_else(|| bad("function must be 0-7"))?;
        if slot > 0x1f {
            return Err(bad("slot must be 00-1f"));
        }
        if function > 7 {
            return Err(bad("function must be 0-7"));
        }
        // The range checks above make these conversions lossless.
        Ok(Self {
            domain,
            bus: bus as u8,
            slot: slot as u8,
            function: function as u8,
        })
    }
}

impl Serialize for PciAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PciAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Longest driver name accepted: the kernel's `MODULE_NAME_LEN` is 64 bytes with the NUL.
pub const DRIVER_NAME_MAX: usize = 63;

/// A kernel driver or module name (`vfio-pci`, `nvidia`, `snd_hda_intel`): 1 to
/// [`DRIVER_NAME_MAX`] of `A-Z a-z 0-9 _ -`.
///
/// A value that parsed is one plain path component (no `/`, no `.`), so
/// `sys/bus/pci/drivers/<name>` can never leave `drivers/`, and it never carries a newline into
/// a modprobe file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DriverName(String);

impl DriverName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for DriverName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for DriverName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for DriverName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl FromStr for DriverName {
    type Err = ModelError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let ok = !input.is_empty()
            && input.len() <= DRIVER_NAME_MAX
            && input
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(input.to_owned()))
        } else {
            Err(ModelError::InvalidDriverName {
                input: shown(input),
            })
        }
    }
}

impl From<DriverName> for String {
    fn from(d: DriverName) -> String {
        d.0
    }
}

impl Serialize for DriverName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for DriverName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A mediated device's UUID (`/sys/bus/mdev/devices/<uuid>`, libvirt's
/// `<source><address uuid=…/>`), kept in lowercase as the kernel and libvirt print it.
///
/// A value that parsed is hex digits and four `-`: one plain path component.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MdevUuid(String);

impl MdevUuid {
    /// The UUID, lowercase.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MdevUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for MdevUuid {
    type Err = ModelError;

    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in either case (surrounding whitespace
    /// skipped, as libvirt does).
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let t = input.trim();
        let ok = t.len() == 36
            && t.bytes().enumerate().all(|(i, b)| match i {
                8 | 13 | 18 | 23 => b == b'-',
                _ => b.is_ascii_hexdigit(),
            });
        if ok {
            Ok(Self(t.to_ascii_lowercase()))
        } else {
            Err(ModelError::InvalidMdevUuid {
                input: shown(input),
            })
        }
    }
}

impl Serialize for MdevUuid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for MdevUuid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A vendor:device ID pair, shown as `10de:2330`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciId {
    /// Vendor ID, e.g. 0x10de.
    pub vendor: u16,
    /// Device ID, e.g. 0x2330.
    pub device: u16,
}

impl fmt::Display for PciId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:04x}", self.vendor, self.device)
    }
}

impl FromStr for PciId {
    type Err = ModelError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let bad = || ModelError::InvalidPciId {
            input: shown(input),
        };
        let (v, d) = input.split_once(':').ok_or_else(bad)?;
        let vendor = hex_field(v, 4).ok_or_else(bad)?;
        let device = hex_field(d, 4).ok_or_else(bad)?;
        Ok(Self {
            vendor: vendor as u16,
            device: device as u16,
        })
    }
}

impl Serialize for PciId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A 24-bit PCI class code (base class, subclass, programming interface), shown as `030200`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciClass(pub u32);

impl PciClass {
    /// Base class byte (0x03 = display controller).
    pub fn base(self) -> u8 {
        (self.0 >> 16) as u8
    }

    /// Subclass byte.
    pub fn sub(self) -> u8 {
        (self.0 >> 8) as u8
    }

    /// A display controller: VGA (0x0300), XGA (0x0301), 3D (0x0302) or other (0x0380).
    pub fn is_display(self) -> bool {
        self.base() == 0x03
    }

    /// A processing accelerator (0x1200: AMD Instinct MI3xx, Habana Gaudi, …): a GPU-class
    /// device without the display class.
    pub fn is_accelerator(self) -> bool {
        self.base() == 0x12 && self.sub() == 0x00
    }

    /// What gpupass treats as a GPU: a display controller or a processing accelerator.
    pub fn is_gpu(self) -> bool {
        self.is_display() || self.is_accelerator()
    }

    /// A PCI-to-PCI bridge (0x0604, or semi-transparent 0x0609): the kernel lets it stay on
    /// `pcieport` while the rest of its IOMMU group is assigned.
    pub fn is_pci_bridge(self) -> bool {
        self.base() == 0x06 && matches!(self.sub(), 0x04 | 0x09)
    }

    /// Human name from the PCI ID database's class list, e.g. "3D controller".
    pub fn name(self) -> Option<&'static str> {
        class_names::subclass(self.base(), self.sub())
    }
}

impl fmt::Display for PciClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:06x}", self.0 & 0x00ff_ffff)
    }
}

impl Serialize for PciClass {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An IOMMU group number, as in `/sys/kernel/iommu_groups/<N>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct IommuGroupId(pub u32);

impl fmt::Display for IommuGroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A NUMA node number; `numa_node` = -1 in sysfs (unknown) is represented as `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct NumaNode(pub u32);

impl fmt::Display for NumaNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Vendor name from the PCI ID database compiled in (the `pci-ids` crate).
#[cfg(feature = "pci-names")]
pub fn vendor_name(vendor: u16) -> Option<&'static str> {
    use pci_ids::FromId;
    pci_ids::Vendor::from_id(vendor).map(|v| v.name())
}

/// Device name from the PCI ID database compiled in.
#[cfg(feature = "pci-names")]
pub fn device_name(id: PciId) -> Option<&'static str> {
    pci_ids::Device::from_vid_pid(id.vendor, id.device).map(|d| d.name())
}

/// Subsystem (board) name from the PCI ID database compiled in.
#[cfg(feature = "pci-names")]
pub fn subsystem_name(id: PciId, subsystem: PciId) -> Option<&'static str> {
    pci_ids::Device::from_vid_pid(id.vendor, id.device).and_then(|d| {
        d.subsystems()
            .find(|s| s.subvendor() == subsystem.vendor && s.subdevice() == subsystem.device)
            .map(|s| s.name())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_print_like_padded_hex() {
        for (d, b, sl, f) in [
            (0, 0, 0, 0),
            (0, 0x61, 0x1f, 7),
            (0xffff, 0xff, 0x1f, 7),
            (0x10000, 1, 2, 3),
            (0xffff_ffff, 0xab, 0x0c, 1),
            (0xa, 0xb, 0xc, 0xd),
            (0x123, 0, 0, 0xff),
        ] {
            let a = PciAddress {
                domain: d,
                bus: b,
                slot: sl,
                function: f,
            };
            assert_eq!(a.to_string(), format!("{d:04x}:{b:02x}:{sl:02x}.{f:x}"));
        }
    }

    #[test]
    fn parses_and_prints_addresses() {
        let a: PciAddress = "0000:61:00.0".parse().unwrap();
        assert_eq!((a.domain, a.bus, a.slot, a.function), (0, 0x61, 0, 0));
        assert_eq!(a.to_string(), "0000:61:00.0");
        let b: PciAddress = "10000:e1:1f.7".parse().unwrap();
        assert_eq!(b.to_string(), "10000:e1:1f.7");
        let c: PciAddress = "3b:00.1".parse().unwrap();
        assert_eq!(c.to_string(), "0000:3b:00.1");
        let d: PciAddress = "0000:0A:00.0".parse().unwrap();
        assert_eq!(d.to_string(), "0000:0a:00.0");
    }

    #[test]
    fn rejects_bad_addresses_without_echoing_paths() {
        for bad in [
            "",
            "0000:61:00",
            "0000:61:20.0",
            "0000:61:00.8",
            "0000:61:00.00",
            "000:61:00.0",
            "123456789:00:00.0",
            "0000:161:00.0",
            "../../etc/passwd",
            "0000:61:00.0/../../x",
            "0000:+1:00.0",
            "0000: 61:00.0",
            "0000:61:00.0\n",
            "a:b:c:d.0",
        ] {
            let err = bad.parse::<PciAddress>().unwrap_err();
            assert!(
                matches!(err, ModelError::InvalidPciAddress { .. }),
                "{bad:?} -> {err:?}"
            );
            assert!(!err.to_string().contains('\n'), "one line for {bad:?}");
        }
    }

    #[test]
    fn long_input_is_shortened_in_errors() {
        let long = "9".repeat(10_000);
        let err = long.parse::<PciAddress>().unwrap_err().to_string();
        assert!(err.len() < 200, "{err}");
    }

    #[test]
    fn orders_addresses_numerically() {
        let mut v: Vec<PciAddress> = [
            "0000:db:00.0",
            "0000:18:00.0",
            "0001:00:00.0",
            "0000:18:00.1",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        v.sort();
        let shown: Vec<String> = v.iter().map(|a| a.to_string()).collect();
        assert_eq!(
            shown,
            [
                "0000:18:00.0",
                "0000:18:00.1",
                "0000:db:00.0",
                "0001:00:00.0"
            ]
        );
    }

    #[test]
    fn parses_ids_and_classes() {
        let id: PciId = "10DE:2330".parse().unwrap();
        assert_eq!(id.to_string(), "10de:2330");
        assert!("10de".parse::<PciId>().is_err());
        assert!("10de:23301".parse::<PciId>().is_err());
        assert!("xyz:0001".parse::<PciId>().is_err());
        let c = PciClass(0x030200);
        assert!(c.is_display() && !c.is_pci_bridge());
        assert_eq!(c.to_string(), "030200");
        assert!(PciClass(0x060400).is_pci_bridge());
        assert!(PciClass(0x120000).is_gpu() && !PciClass(0x120000).is_display());
        assert!(!PciClass(0x120100).is_gpu() && !PciClass(0x040300).is_gpu());
        assert!(
            !PciClass(0x060100).is_pci_bridge(),
            "an ISA bridge is a host device"
        );
    }

    #[test]
    fn class_names_are_compiled_in() {
        assert_eq!(PciClass(0x030200).name(), Some("3D controller"));
        assert_eq!(PciClass(0x030000).name(), Some("VGA compatible controller"));
        assert_eq!(PciClass(0x120000).name(), Some("Processing accelerators"));
        assert_eq!(PciClass(0x020000).name(), Some("Ethernet controller"));
        assert_eq!(
            PciClass(0x13_00_00).name(),
            None,
            "a class without subclasses"
        );
        assert_eq!(PciClass(0x03_7f_00).name(), None);
    }

    /// The compiled-in class table is the `pci-ids` crate's, entry by entry.
    #[cfg(feature = "pci-names")]
    #[test]
    fn class_names_match_the_pci_id_database() {
        for base in 0..=u8::MAX {
            for sub in 0..=u8::MAX {
                let want = pci_ids::Subclass::from_cid_sid(base, sub).map(|s| s.name());
                let c = PciClass(u32::from(base) << 16 | u32::from(sub) << 8);
                assert_eq!(c.name(), want, "class {base:02x}{sub:02x}");
            }
        }
    }

    #[cfg(feature = "pci-names")]
    #[test]
    fn names_come_from_the_pci_id_database() {
        assert_eq!(vendor_name(0x10de), Some("NVIDIA Corporation"));
        let h100 = PciId {
            vendor: 0x10de,
            device: 0x2330,
        };
        assert!(device_name(h100).unwrap().contains("H100"));
        assert_eq!(PciClass(0x030200).name(), Some("3D controller"));
        let unknown = PciId {
            vendor: 0x10de,
            device: 0xfff0,
        };
        assert_eq!(device_name(unknown), None);
    }

    #[test]
    fn mdev_uuids_are_lowercased_and_checked() {
        let u: MdevUuid = " 4B20D080-1b54-4048-85b3-a6a62d165c01\n".parse().unwrap();
        assert_eq!(u.as_str(), "4b20d080-1b54-4048-85b3-a6a62d165c01");
        for bad in [
            "",
            "4b20d080-1b54-4048-85b3-a6a62d165c0",
            "4b20d080-1b54-4048-85b3-a6a62d165c011",
            "4b20d080x1b54-4048-85b3-a6a62d165c01",
            "../../../../../../../../../../../etc",
            "4b20d080-1b54-4048-85b3-a6a62d165cg1",
        ] {
            let e = bad.parse::<MdevUuid>().unwrap_err();
            assert!(e.to_string().contains("invalid mdev UUID"), "{bad}: {e}");
        }
    }

    #[test]
    fn driver_names_are_one_plain_path_component() {
        for ok in [
            "vfio-pci",
            "pci-stub",
            "nvidia",
            "snd_hda_intel",
            "i915",
            "a",
        ] {
            assert_eq!(ok.parse::<DriverName>().unwrap().as_str(), ok);
        }
        let long = "a".repeat(DRIVER_NAME_MAX + 1);
        for bad in [
            "", "..", ".", "../../x", "a/b", "nvidia\n", "a b", "vfio.pci", "/x", &long,
        ] {
            let e = bad.parse::<DriverName>().unwrap_err().to_string();
            assert!(e.contains("invalid driver name"), "{bad:?}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        assert!("a".repeat(DRIVER_NAME_MAX).parse::<DriverName>().is_ok());
        let d: DriverName = serde_json::from_str("\"nvidia\"").unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"nvidia\"");
        assert!(serde_json::from_str::<DriverName>("\"../../../../some/dir\"").is_err());
    }
}
