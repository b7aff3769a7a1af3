//! Judges whether a GPU can be passed through, from the inventory alone (pure: no IO).
//!
//! VFIO hands a whole IOMMU group to one VM, so every device in the GPU's group(s) must be one of
//! the GPU's own functions (libvirt detaches those itself with `managed='yes'`), a PCI bridge
//! (allowed to stay on `pcieport`), or already off the host (unbound, `vfio-pci`, `pci-stub`).

use std::fmt;

use serde::{Serialize, Serializer};

use crate::host::discover::{Gpu, Inventory};
use crate::model::{IommuGroupId, PciAddress, PciClass};

/// Drivers that leave a device free for VFIO.
pub const VFIO_READY_DRIVERS: &[&str] = &["vfio-pci", "pci-stub"];

/// Why a GPU cannot be passed through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocker {
    /// No IOMMU groups on the host.
    IommuOff,
    /// The IOMMU is on but this function is in no group.
    NoIommuGroup {
        /// The function without a group.
        device: PciAddress,
    },
    /// Another device in the group is on a host driver.
    DeviceInUse {
        /// The group.
        group: IommuGroupId,
        /// The device that is not the GPU's.
        device: PciAddress,
        /// Its class.
        class: PciClass,
        /// Its driver.
        driver: String,
    },
    /// A health check failed and the GPU is quarantined (`gpupass quarantine`).
    Quarantined {
        /// What failed.
        reason: String,
        /// Unix seconds.
        since: u64,
    },
}

impl fmt::Display for Blocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Blocker::IommuOff => write!(
                f,
                "the IOMMU is off (no IOMMU groups): enable VT-d/AMD-Vi in firmware and add intel_iommu=on or amd_iommu=on to the kernel command line"
            ),
            Blocker::NoIommuGroup { device } => {
                write!(f, "{device} is in no IOMMU group")
            }
            Blocker::DeviceInUse {
                group,
                device,
                class,
                driver,
            } => write!(
                f,
                "IOMMU group {group} also holds {device} ({}, class {class}) bound to host driver {driver}",
                class.name().unwrap_or("unknown class"),
            ),
            Blocker::Quarantined { reason, since } => write!(
                f,
                "quarantined since {}: {reason} (once fixed: `gpupass quarantine clear` it)",
                crate::limits::rfc3339(*since)
            ),
        }
    }
}

impl Serialize for Blocker {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Out<'a> {
            kind: &'static str,
            device: Option<PciAddress>,
            class: Option<PciClass>,
            driver: Option<&'a str>,
            iommu_group: Option<IommuGroupId>,
            message: String,
        }
        let message = self.to_string();
        let out = match self {
            Blocker::IommuOff => Out {
                kind: "iommu_off",
                device: None,
                class: None,
                driver: None,
                iommu_group: None,
                message,
            },
            Blocker::NoIommuGroup { device } => Out {
                kind: "no_iommu_group",
                device: Some(*device),
                class: None,
                driver: None,
                iommu_group: None,
                message,
            },
            Blocker::DeviceInUse {
                group,
                device,
                class,
                driver,
            } => Out {
                kind: "group_device_in_use",
                device: Some(*device),
                class: Some(*class),
                driver: Some(driver),
                iommu_group: Some(*group),
                message,
            },
            Blocker::Quarantined { .. } => Out {
                kind: "quarantined",
                device: None,
                class: None,
                driver: None,
                iommu_group: None,
                message,
            },
        };
        out.serialize(s)
    }
}

/// The judgement on one GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// True when nothing blocks passthrough.
    pub viable: bool,
    /// What blocks it.
    pub blockers: Vec<Blocker>,
    /// The host's console display: shown, never chosen automatically.
    pub boot_vga: bool,
    /// The IOMMU groups its functions are in.
    pub iommu_groups: Vec<IommuGroupId>,
    /// Other GPUs in the same IOMMU group(s): they can only go to the same domain.
    pub group_peers: Vec<PciAddress>,
}

/// Judges one GPU.
pub fn verdict(inv: &Inventory, gpu: &Gpu) -> Verdict {
    let boot_vga = gpu
        .functions
        .iter()
        .any(|f| inv.device(*f).is_some_and(|d| d.boot_vga));
    let mut blockers = Vec::new();
    let mut groups: Vec<IommuGroupId> = Vec::new();
    if !inv.iommu.enabled() {
        blockers.push(Blocker::IommuOff);
    } else {
        for f in &gpu.functions {
            match inv.device(*f).and_then(|d| d.iommu_group) {
                Some(g) if !groups.contains(&g) => groups.push(g),
                Some(_) => {}
                None => blockers.push(Blocker::NoIommuGroup { device: *f }),
            }
        }
    }
    groups.sort();
    let mut group_peers = Vec::new();
    for g in &groups {
        for member in inv.groups.get(g).map(Vec::as_slice).unwrap_or_default() {
            if gpu.functions.contains(member) {
                continue;
            }
            let Some(d) = inv.device(*member) else {
                continue;
            };
            if let Some(peer) = inv.gpu(*member) {
                if peer.address != gpu.address && !group_peers.contains(&peer.address) {
                    group_peers.push(peer.address);
                }
            }
            if d.class.is_pci_bridge() {
                continue;
            }
            match &d.driver {
                Some(drv) if !VFIO_READY_DRIVERS.contains(&drv.as_str()) => {
                    blockers.push(Blocker::DeviceInUse {
                        group: *g,
                        device: *member,
                        class: d.class,
                        driver: drv.clone(),
                    })
                }
                _ => {}
            }
        }
    }
    group_peers.sort();
    if let Some(q) = inv.quarantine_of(gpu) {
        blockers.push(Blocker::Quarantined {
            reason: q.reason.clone(),
            since: q.since,
        });
    }
    Verdict {
        viable: blockers.is_empty(),
        blockers,
        boot_vga,
        iommu_groups: groups,
        group_peers,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::host::discover::{IommuState, PciDevice};
    use crate::model::PciId;

    fn dev(addr: &str, class: u32, driver: Option<&str>, group: Option<u32>) -> PciDevice {
        PciDevice {
            address: addr.parse().unwrap(),
            id: PciId {
                vendor: 0x10de,
                device: 0x1eb8,
            },
            subsystem: None,
            class: PciClass(class),
            driver: driver.map(str::to_owned),
            iommu_group: group.map(IommuGroupId),
            numa_node: None,
            boot_vga: false,
            reset_method: None,
            parent: None,
            virtfn: false,
        }
    }

    fn inv(devs: Vec<PciDevice>) -> Inventory {
        let mut groups: BTreeMap<IommuGroupId, Vec<PciAddress>> = BTreeMap::new();
        for d in &devs {
            if let Some(g) = d.iommu_group {
                groups.entry(g).or_default().push(d.address);
            }
        }
        let iommu = IommuState {
            groups: groups.len(),
            ..Default::default()
        };
        Inventory::build(
            devs.into_iter().map(|d| (d.address, d)).collect(),
            groups,
            iommu,
            Vec::new(),
        )
    }

    #[test]
    fn own_functions_on_host_drivers_are_fine() {
        let i = inv(vec![
            dev("0000:01:00.0", 0x030000, Some("nvidia"), Some(1)),
            dev("0000:01:00.1", 0x040300, Some("snd_hda_intel"), Some(1)),
            dev("0000:00:01.0", 0x060400, Some("pcieport"), Some(1)),
        ]);
        let v = verdict(&i, &i.gpus[0]);
        assert!(v.viable, "{v:?}");
        assert_eq!(v.iommu_groups, [IommuGroupId(1)]);
    }

    #[test]
    fn a_host_nic_in_the_group_blocks_and_is_named() {
        let i = inv(vec![
            dev("0000:04:00.0", 0x030200, Some("vfio-pci"), Some(12)),
            dev("0000:05:00.0", 0x030200, Some("vfio-pci"), Some(12)),
            dev("0000:06:00.0", 0x020000, Some("ixgbe"), Some(12)),
            dev("0000:07:00.0", 0x020000, None, Some(12)),
        ]);
        let v = verdict(&i, &i.gpus[0]);
        assert!(!v.viable);
        assert_eq!(v.blockers.len(), 1, "{:?}", v.blockers);
        let msg = v.blockers[0].to_string();
        assert!(msg.contains("0000:06:00.0") && msg.contains("ixgbe") && msg.contains("020000"));
        assert_eq!(v.group_peers, ["0000:05:00.0".parse().unwrap()]);
        let json = serde_json::to_value(&v.blockers[0]).unwrap();
        assert_eq!(json["kind"], "group_device_in_use");
        assert_eq!(json["driver"], "ixgbe");
        assert_eq!(json["iommu_group"], 12);
    }

    #[test]
    fn iommu_off_blocks_everything() {
        let i = inv(vec![dev("0000:01:00.0", 0x030000, Some("nvidia"), None)]);
        let v = verdict(&i, &i.gpus[0]);
        assert_eq!(v.blockers, [Blocker::IommuOff]);
    }

    #[test]
    fn a_function_without_group_blocks_when_iommu_is_on() {
        let i = inv(vec![
            dev("0000:01:00.0", 0x030000, None, Some(3)),
            dev("0000:01:00.1", 0x040300, None, None),
        ]);
        let v = verdict(&i, &i.gpus[0]);
        assert!(matches!(v.blockers[..], [Blocker::NoIommuGroup { .. }]));
    }
}
