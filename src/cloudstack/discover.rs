//! The JSON CloudStack's KVM agent parses from its `gpudiscovery.sh` (`{"gpus":[…]}`, one entry
//! per physical GPU): [`build`] decides it from the inventory and who holds what (pure);
//! [`gather`] reads the host root and libvirt's own files for it (never libvirt itself).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::alloc::plan::Holdings;
use crate::cloudstack::CloudstackError;
use crate::config::CloudstackConfig;
use crate::host::discover::{discover_with, Gpu, Inventory, Scope};
use crate::host::pci_ids::{self, PciNames};
use crate::host::readiness::verdict;
use crate::host::sysfs::Sysfs;
use crate::libvirt::files;
use crate::model::PciAddress;

/// The whole answer: what the agent reads from stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuList {
    /// One entry per physical GPU.
    pub gpus: Vec<AgentGpu>,
}

/// One physical GPU as the agent reads it. The agent requires `pci_address`, `vendor_id`,
/// `vendor`, `device_id`, `device`, `full_passthrough` (with `enabled` an integer) and the two
/// instance arrays; the numbers are optional (null is fine); the rest it ignores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentGpu {
    /// `bb:ss.f` in PCI domain 0000; `dddd:bb:ss.f` elsewhere (only with `pci_domains`).
    pub pci_address: String,
    /// Four lowercase hex digits.
    pub vendor_id: String,
    /// Four lowercase hex digits.
    pub device_id: String,
    /// Vendor name from the host's `pci.ids` (what `lspci` says), `Vendor 10de` without one.
    pub vendor: String,
    /// Device name from the host's `pci.ids`, `Device 2330` without one.
    pub device: String,
    /// The bound driver, null when unbound.
    pub driver: Option<String>,
    /// The class name (`VGA compatible controller`, `3D controller`, …).
    pub pci_class: String,
    /// The IOMMU group number, as a string (what the stock script prints).
    pub iommu_group: Option<String>,
    /// The function at the top of the GPU's PCI hierarchy (`0000:ab:02.0`).
    pub pci_root: String,
    /// The NUMA node, null when the kernel does not know it.
    pub numa_node: Option<u32>,
    /// SR-IOV VFs the GPU can have.
    pub sriov_totalvfs: u32,
    /// SR-IOV VFs it has now.
    pub sriov_numvfs: u32,
    /// vGPU capacity: null for a whole GPU.
    pub max_instances: Option<u32>,
    /// Video memory in MiB: null (not known without the vendor's driver).
    pub video_ram: Option<u64>,
    /// Display heads: null.
    pub max_heads: Option<u32>,
    /// Horizontal resolution: null.
    pub max_resolution_x: Option<u32>,
    /// Vertical resolution: null.
    pub max_resolution_y: Option<u32>,
    /// The whole-GPU offer.
    pub full_passthrough: FullPassthrough,
    /// Existing mdev instances (none until gpupass manages vGPUs).
    pub vgpu_instances: Vec<serde_json::Value>,
    /// SR-IOV VF instances (none until gpupass manages vGPUs).
    pub vf_instances: Vec<serde_json::Value>,
}

/// `full_passthrough`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FullPassthrough {
    /// 1: offered whole; 0: split into vGPUs/VFs (the agent reads an integer, `true` throws).
    pub enabled: u8,
    /// The GPU's function as libvirt writes a PCI address.
    pub libvirt_address: LibvirtAddress,
    /// The libvirt domain holding it (running first, then defined), null when free.
    pub used_by_vm: Option<String>,
}

/// A PCI address as libvirt writes one (`domain='0x0000' bus='0xae' slot='0x00' function='0x0'`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LibvirtAddress {
    /// `0x0000`.
    pub domain: String,
    /// `0xae`.
    pub bus: String,
    /// `0x00`.
    pub slot: String,
    /// `0x0`.
    pub function: String,
}

impl LibvirtAddress {
    /// The address of `a`.
    pub fn of(a: PciAddress) -> Self {
        Self {
            domain: format!("0x{:04x}", a.domain),
            bus: format!("0x{:02x}", a.bus),
            slot: format!("0x{:02x}", a.slot),
            function: format!("0x{:x}", a.function),
        }
    }
}

/// How a GPU is split, read from sysfs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Split {
    /// `sriov_totalvfs` (0 when absent).
    pub total_vfs: u32,
    /// `sriov_numvfs` (0 when absent).
    pub num_vfs: u32,
    /// Existing mdev instances on the GPU.
    pub mdevs: usize,
}

impl Split {
    /// Split into VFs or mdevs: not offered whole.
    pub fn is_split(&self) -> bool {
        self.num_vfs > 0 || self.mdevs > 0
    }
}

/// The answer and what was left out of it (one line each, for stderr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// What the agent gets.
    pub list: GpuList,
    /// `GPU 0000:05:00.0 left out: …` lines.
    pub left_out: Vec<String>,
}

/// The address the agent understands: `bb:ss.f` in domain 0000.
pub fn agent_address(a: PciAddress) -> String {
    if a.domain == 0 {
        format!("{:02x}:{:02x}.{:x}", a.bus, a.slot, a.function)
    } else {
        a.to_string()
    }
}

/// The function at the top of `a`'s hierarchy (the root port, or `a` on a root bus).
fn pci_root(inv: &Inventory, a: PciAddress) -> PciAddress {
    let mut top = a;
    // A malformed tree must not loop forever.
    for _ in 0..64 {
        match inv.device(top).and_then(|d| d.parent) {
            Some(p) => top = p,
            None => break,
        }
    }
    top
}

/// Why a GPU is not offered, or `None` when it is.
fn left_out_reason(inv: &Inventory, gpu: &Gpu, opts: &CloudstackConfig) -> Option<String> {
    let v = verdict(inv, gpu);
    if v.boot_vga {
        return Some("it is the host's boot VGA (its console)".into());
    }
    if let Some(b) = v.blockers.first() {
        return Some(format!("it cannot be passed through: {b}"));
    }
    if let Some(peer) = v.group_peers.first() {
        return Some(format!(
            "it shares its IOMMU group with GPU {peer}: VFIO gives them to one VM together, which CloudStack cannot ask for"
        ));
    }
    if gpu.address.domain != 0 && !opts.pci_domains {
        return Some(format!(
            "it is in PCI domain {:04x} and the agent reads only bb:ss.f addresses (set [cloudstack] pci_domains = true for an agent with CloudStack's multi-domain fix)",
            gpu.address.domain
        ));
    }
    None
}

/// The answer for this host (pure): every passable GPU but the boot VGA, each once, named from
/// `names` (the host's `pci.ids`, the same in both binaries).
pub fn build(
    inv: &Inventory,
    holdings: &Holdings,
    split: &BTreeMap<PciAddress, Split>,
    names: &PciNames,
    opts: &CloudstackConfig,
) -> Discovery {
    let mut gpus = Vec::new();
    let mut left_out = Vec::new();
    for gpu in &inv.gpus {
        if let Some(why) = left_out_reason(inv, gpu, opts) {
            left_out.push(format!("GPU {} left out: {why}", gpu.address));
            continue;
        }
        let Some(d) = inv.device(gpu.address) else {
            continue;
        };
        let s = split.get(&gpu.address).copied().unwrap_or_default();
        let used_by_vm = holdings
            .holders(&gpu.functions)
            .into_iter()
            .next()
            .map(|h| h.domain);
        gpus.push(AgentGpu {
            pci_address: agent_address(gpu.address),
            vendor_id: format!("{:04x}", d.id.vendor),
            device_id: format!("{:04x}", d.id.device),
            vendor: names
                .vendor(d.id.vendor)
                .map_or_else(|| format!("Vendor {:04x}", d.id.vendor), str::to_owned),
            device: names
                .device(d.id)
                .map_or_else(|| format!("Device {:04x}", d.id.device), str::to_owned),
            driver: d.driver.clone(),
            pci_class: d
                .class
                .name()
                .map_or_else(|| format!("Class {}", d.class), str::to_owned),
            iommu_group: d.iommu_group.map(|g| g.to_string()),
            pci_root: pci_root(inv, gpu.address).to_string(),
            numa_node: d.numa_node.map(|n| n.0),
            sriov_totalvfs: s.total_vfs,
            sriov_numvfs: s.num_vfs,
            max_instances: None,
            video_ram: None,
            max_heads: None,
            max_resolution_x: None,
            max_resolution_y: None,
            full_passthrough: FullPassthrough {
                enabled: u8::from(!s.is_split()),
                libvirt_address: LibvirtAddress::of(gpu.address),
                used_by_vm,
            },
            vgpu_instances: Vec::new(),
            vf_instances: Vec::new(),
        });
    }
    Discovery {
        list: GpuList { gpus },
        left_out,
    }
}

/// Mdev instances under a function's `mdev_supported_types/*/devices/`.
fn mdev_count(dev_dir: &Path) -> usize {
    let Ok(types) = fs::read_dir(dev_dir.join("mdev_supported_types")) else {
        return 0;
    };
    types
        .flatten()
        .filter_map(|t| fs::read_dir(t.path().join("devices")).ok())
        .map(|d| d.flatten().count())
        .sum()
}

fn decimal(sysfs: &Sysfs, a: PciAddress, name: &str) -> Result<u32, CloudstackError> {
    Ok(sysfs
        .attr(a, name)?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// Reads the host root, libvirt's files under it, the quarantined GPUs (`state_dir`) and the
/// host's `pci.ids` (for the GPUs' IDs only) and builds the answer; `run_dir` keeps the cache of
/// libvirt's files. Any read failure, or a host root listing no PCI device at all, is an error:
/// never a partial answer.
pub fn gather(
    host_root: &Path,
    state_dir: &Path,
    run_dir: &Path,
    opts: &CloudstackConfig,
) -> Result<Discovery, CloudstackError> {
    let sysfs = Sysfs::new(host_root);
    // A quarantined GPU is not passable: left out, with its reason, like any blocked GPU.
    let inv = discover_with(&sysfs, &Scope::Gpus, false)?.with_quarantine(state_dir)?;
    if inv.devices.is_empty() && sysfs.pci_devices()?.is_empty() {
        return Err(CloudstackError::NoPciDevices {
            root: host_root.to_path_buf(),
        });
    }
    let holdings = files::all_holdings(host_root, "", Some(run_dir))?;
    let mut split = BTreeMap::new();
    for gpu in &inv.gpus {
        let dir = host_root
            .join("sys/bus/pci/devices")
            .join(gpu.address.to_string());
        split.insert(
            gpu.address,
            Split {
                total_vfs: decimal(&sysfs, gpu.address, "sriov_totalvfs")?,
                num_vfs: decimal(&sysfs, gpu.address, "sriov_numvfs")?,
                mdevs: mdev_count(&dir),
            },
        );
    }
    let wanted: BTreeSet<_> = inv
        .gpus
        .iter()
        .filter_map(|g| inv.device(g.address).map(|d| d.id))
        .collect();
    let names = pci_ids::read(host_root, &wanted)?;
    Ok(build(&inv, &holdings, &split, &names, opts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::discover::{IommuState, PciDevice};
    use crate::model::{IommuGroupId, NumaNode, PciClass};

    fn dev(addr: &str, id: &str, class: u32, group: u32, parent: Option<&str>) -> PciDevice {
        PciDevice {
            address: addr.parse().unwrap(),
            id: id.parse().unwrap(),
            subsystem: None,
            class: PciClass(class),
            driver: Some("vfio-pci".into()),
            iommu_group: Some(IommuGroupId(group)),
            numa_node: Some(NumaNode(1)),
            boot_vga: false,
            reset_method: None,
            parent: parent.map(|p| p.parse().unwrap()),
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
        Inventory::build(
            devs.into_iter().map(|d| (d.address, d)).collect(),
            groups,
            IommuState {
                groups: 4,
                ..IommuState::default()
            },
            Vec::new(),
        )
    }

    #[test]
    fn one_entry_per_gpu_with_the_agent_s_fields() {
        let i = inv(vec![
            dev("0000:ab:02.0", "8086:352a", 0x060400, 9, None),
            dev(
                "0000:ae:00.0",
                "10de:233b",
                0x030200,
                1,
                Some("0000:ab:02.0"),
            ),
            dev(
                "0000:ae:00.1",
                "10de:22e8",
                0x040300,
                1,
                Some("0000:ab:02.0"),
            ),
            dev("0000:c1:00.0", "1002:74a1", 0x120000, 2, None),
        ]);
        let mut h = Holdings::default();
        h.add("0000:ae:00.1".parse().unwrap(), "i-2-33-VM", true);
        let split = BTreeMap::from([(
            "0000:c1:00.0".parse().unwrap(),
            Split {
                total_vfs: 8,
                num_vfs: 2,
                mdevs: 0,
            },
        )]);
        // The host's pci.ids names NVIDIA's card (as on #12960's host) but not AMD's.
        let ids = "1002  Advanced Micro Devices, Inc. [AMD/ATI]\n10de  NVIDIA Corporation\n\t233b  Device\n";
        let wanted = ["10de:233b".parse().unwrap(), "1002:74a1".parse().unwrap()].into();
        let names = PciNames::parse(ids.as_bytes(), &wanted).unwrap();
        let d = build(&i, &h, &split, &names, &CloudstackConfig::default());
        assert!(d.left_out.is_empty(), "{:?}", d.left_out);
        assert_eq!(d.list.gpus.len(), 2, "one entry per GPU, not per function");
        let g = &d.list.gpus[0];
        assert_eq!(g.pci_address, "ae:00.0");
        assert_eq!(
            (g.vendor_id.as_str(), g.device_id.as_str()),
            ("10de", "233b")
        );
        assert_eq!(
            (g.vendor.as_str(), g.device.as_str()),
            ("NVIDIA Corporation", "Device")
        );
        assert_eq!(g.pci_class, "3D controller");
        assert_eq!(g.pci_root, "0000:ab:02.0");
        assert_eq!(g.iommu_group.as_deref(), Some("1"));
        assert_eq!(g.numa_node, Some(1));
        assert_eq!(g.full_passthrough.enabled, 1);
        assert_eq!(
            g.full_passthrough.used_by_vm.as_deref(),
            Some("i-2-33-VM"),
            "held through its audio function"
        );
        assert_eq!(g.full_passthrough.libvirt_address.bus, "0xae");
        assert_eq!(g.full_passthrough.libvirt_address.function, "0x0");
        let mi = &d.list.gpus[1];
        assert_eq!(
            (mi.vendor.as_str(), mi.device.as_str()),
            ("Advanced Micro Devices, Inc. [AMD/ATI]", "Device 74a1"),
            "a device the host's pci.ids does not list, as lspci prints it"
        );
        assert_eq!(mi.pci_class, "Processing accelerators");
        assert_eq!(mi.full_passthrough.enabled, 0, "split into VFs");
        assert_eq!((mi.sriov_totalvfs, mi.sriov_numvfs), (8, 2));
        assert_eq!(mi.pci_root, "0000:c1:00.0", "on a root bus: itself");
    }

    #[test]
    fn boot_vga_blocked_shared_and_other_domains_are_left_out_with_a_reason() {
        let mut console = dev("0000:00:02.0", "8086:3e92", 0x030000, 0, None);
        console.boot_vga = true;
        let mut nic = dev("0000:3c:00.0", "8086:10fb", 0x020000, 3, None);
        nic.driver = Some("ixgbe".into());
        let i = inv(vec![
            console,
            dev("0000:3b:00.0", "10de:1eb8", 0x030200, 3, None),
            nic,
            dev("0000:5e:00.0", "10de:1eb8", 0x030200, 4, None),
            dev("0000:5f:00.0", "10de:1eb8", 0x030200, 4, None),
            dev("0001:05:00.0", "8086:56a0", 0x030000, 5, None),
        ]);
        let d = build(
            &i,
            &Holdings::default(),
            &BTreeMap::new(),
            &PciNames::default(),
            &CloudstackConfig::default(),
        );
        assert!(d.list.gpus.is_empty(), "{:?}", d.list.gpus);
        let text = d.left_out.join("\n");
        assert_eq!(d.left_out.len(), 5, "{text}");
        assert!(text.contains("0000:00:02.0 left out: it is the host's boot VGA"));
        assert!(text.contains("0000:3b:00.0 left out: it cannot be passed through: IOMMU group 3 also holds 0000:3c:00.0"));
        assert!(
            text.contains("0000:5e:00.0 left out: it shares its IOMMU group with GPU 0000:5f:00.0")
        );
        assert!(text.contains("0001:05:00.0 left out: it is in PCI domain 0001"));
        let d = build(
            &i,
            &Holdings::default(),
            &BTreeMap::new(),
            &PciNames::default(),
            &CloudstackConfig { pci_domains: true },
        );
        assert_eq!(d.list.gpus.len(), 1);
        assert_eq!(d.list.gpus[0].pci_address, "0001:05:00.0");
        assert_eq!(
            d.list.gpus[0].full_passthrough.libvirt_address.domain,
            "0x0001"
        );
    }

    #[test]
    fn enabled_is_an_integer_and_absent_numbers_are_null() {
        let i = inv(vec![dev("0000:18:00.0", "10de:2330", 0x030200, 1, None)]);
        let d = build(
            &i,
            &Holdings::default(),
            &BTreeMap::new(),
            &PciNames::default(),
            &CloudstackConfig::default(),
        );
        let v = serde_json::to_value(&d.list).unwrap();
        let g = &v["gpus"][0];
        assert_eq!(g["full_passthrough"]["enabled"], serde_json::json!(1));
        assert_eq!(
            (&g["vendor"], &g["device"]),
            (
                &serde_json::json!("Vendor 10de"),
                &serde_json::json!("Device 2330")
            ),
            "a host without pci.ids: the IDs, as lspci prints them"
        );
        assert!(g["full_passthrough"]["used_by_vm"].is_null());
        assert!(g["video_ram"].is_null() && g.get("video_ram").is_some());
        assert_eq!(g["vgpu_instances"], serde_json::json!([]));
        assert_eq!(g["vf_instances"], serde_json::json!([]));
    }
}
