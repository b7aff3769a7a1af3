//! Builds the host's inventory: every PCI function, the IOMMU groups, and the GPUs with all their
//! functions. `discover` does the reading; `Inventory::build` decides what a whole GPU is (pure).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::host::sysfs::{DevicesDir, Identity, Sysfs, SysfsError};
use crate::model::{IommuGroupId, NumaNode, PciAddress, PciClass, PciId};

/// One PCI function as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PciDevice {
    /// Its address.
    pub address: PciAddress,
    /// Vendor and device ID.
    pub id: PciId,
    /// Subsystem vendor and device ID (the board), when the kernel shows them.
    pub subsystem: Option<PciId>,
    /// Class code.
    pub class: PciClass,
    /// Bound driver, `None` when unbound (or not read: a bridge above the judged devices in a
    /// scoped discovery, see [`Scope`]).
    pub driver: Option<String>,
    /// IOMMU group, `None` when the IOMMU is off (or not read, as `driver`).
    pub iommu_group: Option<IommuGroupId>,
    /// NUMA node, `None` when unknown (`-1`) (or not read, as `driver`).
    pub numa_node: Option<NumaNode>,
    /// `boot_vga` = 1: the firmware's console display.
    pub boot_vga: bool,
    /// `reset_method` as the kernel lists it (`flr bus`); `None` when the file is absent,
    /// `Some("")` when the device has no reset method.
    pub reset_method: Option<String>,
    /// The bridge above it; `None` on a root bus.
    pub parent: Option<PciAddress>,
    /// An SR-IOV virtual function (it has a `physfn` link): never a companion function of the
    /// GPU whose slot it shares, nor a GPU of its own (its PF's `vgpu` reports it).
    pub virtfn: bool,
}

/// How the IOMMU looks on this host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IommuState {
    /// Number of IOMMU groups (0 = IOMMU off for VFIO's purposes). In a scoped discovery
    /// ([`Scope::Gpus`], [`Scope::Around`]), the number of groups of the devices read, when
    /// they are in any (the hook asks only whether there are groups).
    pub groups: usize,
    /// IOMMU units under `sys/class/iommu`.
    pub units: Vec<String>,
    /// IOMMU words on the kernel command line (`intel_iommu=on`, `iommu=pt`, …).
    pub cmdline: Vec<String>,
}

impl IommuState {
    /// VFIO can work only when the kernel has put devices into IOMMU groups.
    pub fn enabled(&self) -> bool {
        self.groups > 0
    }

    /// Picks the IOMMU-related words out of a kernel command line.
    pub fn cmdline_words(cmdline: &str) -> Vec<String> {
        cmdline
            .split_whitespace()
            .filter(|w| {
                let key = w.split('=').next().unwrap_or_default();
                matches!(
                    key,
                    "intel_iommu" | "amd_iommu" | "iommu" | "iommu.passthrough"
                ) || key.starts_with("vfio")
                    || key.starts_with("pci_stub")
            })
            .map(str::to_owned)
            .collect()
    }
}

/// A whole GPU: its display (or processing-accelerator) function and every function that belongs
/// to the same card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// The function that names the GPU: a display controller (class 0x03xxxx) or a processing
    /// accelerator (0x1200).
    pub address: PciAddress,
    /// All its functions, the display function included, sorted: every non-bridge function in
    /// its domain:bus:slot, plus same-vendor functions behind the card's own PCIe switch
    /// (Intel Arc puts its HDMI audio on another bus).
    pub functions: Vec<PciAddress>,
}

/// Everything gpupass knows about the host's PCI devices.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// Every PCI function, by address.
    pub devices: BTreeMap<PciAddress, PciDevice>,
    /// IOMMU group members.
    pub groups: BTreeMap<IommuGroupId, Vec<PciAddress>>,
    /// The GPUs, by display-function address.
    pub gpus: Vec<Gpu>,
    /// IOMMU state.
    pub iommu: IommuState,
    /// CPUs of each NUMA node ([`Scope::All`] only; empty otherwise).
    pub numa_cpus: Vec<(NumaNode, BTreeSet<u32>)>,
    /// Quarantined GPUs (from the state dir's health file, not from sysfs: empty until a
    /// caller loads them with [`Inventory::with_quarantine`]).
    pub quarantine: BTreeMap<PciAddress, crate::health::Quarantine>,
    /// Each SR-IOV virtual function's physical function (its `physfn` link), by VF address:
    /// the VFs `attach --vgpu vf` gives, and whose PF is then not passed whole.
    pub vf_parents: BTreeMap<PciAddress, PciAddress>,
}

/// Which devices a discovery reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every PCI function (`list`, `show`, `attach`).
    All,
    /// The GPUs (and NVSwitches) and what judging them needs: their functions, IOMMU groups,
    /// the bridges above them (`transform`, `migrate`/`restore`). Reads only `class` of every
    /// other device, and of a bridge not its driver, IOMMU group or NUMA node.
    Gpus,
    /// These devices and what judging them needs (the hook's `prepare`); bridges that are not
    /// among them are read as in `Gpus`.
    Around(Vec<PciAddress>),
}

/// Reads the host root and builds the inventory of every device, with every detail.
pub fn discover(sysfs: &Sysfs) -> Result<Inventory, SysfsError> {
    discover_with(sysfs, &Scope::All, true)
}

/// How much of a device to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Detail {
    /// Board details too (subsystem IDs, reset method): reports.
    Full,
    /// What judging a device needs.
    Judged,
    /// A bridge above a card in a scoped discovery: what finding the card's root and the PCI
    /// root needs (IDs, class, parent), not its driver, IOMMU group or NUMA node (a GPU's own
    /// are read; a bridge sharing a GPU's group is skipped when the group is judged).
    Bridge,
}

fn read_device(
    devices: &DevicesDir<'_>,
    address: PciAddress,
    detail: Detail,
    (known, known_class): (Option<Identity>, Option<u32>),
) -> Result<Option<PciDevice>, SysfsError> {
    let skip = || {
        tracing::warn!(bdf = %address, "skipping PCI function without vendor/device/class");
        Ok(None)
    };
    // A scoped discovery reads a device's IDs and class in one read of its `modalias`; a full
    // one (reports) reads the three files.
    // (A class known without an identity: the scope read the `class` file, `modalias` absent.)
    let ident = match (known, known_class) {
        (Some(i), _) => Some(i),
        (None, None) if detail != Detail::Full => devices.identity(address)?,
        (None, _) => None,
    };
    let class = match (ident, known_class) {
        (Some(i), _) => Some(i.class),
        (None, Some(c)) => Some(c),
        (None, None) => devices.hex_attr(address, "class")?,
    };
    let Some(class) = class.map(PciClass) else {
        return skip();
    };
    if detail == Detail::Bridge && class.is_pci_bridge() {
        // A bridge above a card: its IDs and parent only, each read from the devices directory
        // (the device's own is not opened for two files). A bridge is never an SR-IOV virtual
        // function (VFs are type-0 functions), so `physfn` is not looked for.
        let (Some(vendor), Some(device)) = (match ident {
            Some(i) => (Some(i.vendor), Some(i.device)),
            None => (
                devices.hex_attr(address, "vendor")?,
                devices.hex_attr(address, "device")?,
            ),
        }) else {
            return skip();
        };
        return Ok(Some(PciDevice {
            address,
            id: PciId {
                vendor: vendor as u16,
                device: device as u16,
            },
            subsystem: None,
            class,
            driver: None,
            iommu_group: None,
            numa_node: None,
            boot_vga: false,
            reset_method: None,
            parent: devices.parent(address)?,
            virtfn: false,
        }));
    }
    let full = detail == Detail::Full;
    let dev = devices.device(address)?;
    let ids = match (&dev, ident) {
        (Some(_), Some(i)) => (Some(i.vendor), Some(i.device)),
        (Some(d), None) => (d.hex_attr("vendor")?, d.hex_attr("device")?),
        (None, _) => (None, None),
    };
    let (Some(dev), (Some(vendor), Some(device))) = (dev, ids) else {
        return skip();
    };
    let subsystem = if full {
        match (
            dev.hex_attr("subsystem_vendor")?,
            dev.hex_attr("subsystem_device")?,
        ) {
            (Some(v), Some(d)) => Some(PciId {
                vendor: v as u16,
                device: d as u16,
            }),
            _ => None,
        }
    } else {
        None
    };
    Ok(Some(PciDevice {
        address,
        id: PciId {
            vendor: vendor as u16,
            device: device as u16,
        },
        subsystem,
        class,
        driver: dev.driver()?,
        iommu_group: dev.iommu_group()?,
        numa_node: dev.numa_node()?,
        // Only display functions have boot_vga.
        boot_vga: class.is_display() && dev.attr("boot_vga")?.as_deref() == Some("1"),
        reset_method: if full {
            dev.attr("reset_method")?
        } else {
            None
        },
        parent: devices.parent(address)?,
        virtfn: dev.is_virtfn()?,
    }))
}

/// Reads the devices `scope` names; `full` adds board details (subsystem IDs, reset method,
/// IOMMU units, command line) that only reports show.
pub fn discover_with(sysfs: &Sysfs, scope: &Scope, full: bool) -> Result<Inventory, SysfsError> {
    let names = sysfs.pci_devices()?;
    // Every function's class, when the scope needs them all (a device's class never changes:
    // read once, not again with the device's other attributes).
    let devices_dir = sysfs.devices_dir();
    // Every function's IDs and class (from `modalias`, else its `class` file alone), when the
    // scope needs them all: read once, not again with the device's other attributes.
    let idents = match scope {
        Scope::Gpus => names
            .iter()
            .map(|a| {
                Ok(match devices_dir.identity(*a)? {
                    Some(i) => (Some(i), Some(i.class)),
                    None => (None, devices_dir.hex_attr(*a, "class")?),
                })
            })
            .collect::<Result<Vec<_>, SysfsError>>()?,
        Scope::All | Scope::Around(_) => Vec::new(),
    };
    let ident_of = |a: &PciAddress| {
        names
            .binary_search(a)
            .ok()
            .and_then(|i| idents.get(i).copied())
    };
    let class_of = |a: &PciAddress| ident_of(a).and_then(|(_, c)| c);

    let mut todo: Vec<PciAddress> = match scope {
        Scope::All => names.clone(),
        Scope::Gpus => names
            .iter()
            .filter(|a| {
                // NVSwitches (class 0680) too: HGX full passthrough gives them with the GPUs.
                class_of(a).is_some_and(|c| {
                    let c = PciClass(c);
                    c.is_gpu() || (c.base() == 0x06 && c.sub() == 0x80)
                })
            })
            .copied()
            .collect(),
        Scope::Around(seeds) => seeds
            .iter()
            .filter(|a| names.binary_search(a).is_ok())
            .copied()
            .collect(),
    };
    let mut devices: BTreeMap<PciAddress, PciDevice> = BTreeMap::new();
    let mut groups: BTreeMap<IommuGroupId, Vec<PciAddress>> = BTreeMap::new();
    let mut skipped: BTreeSet<PciAddress> = BTreeSet::new();
    let mut walked: BTreeSet<PciAddress> = BTreeSet::new();
    loop {
        while let Some(a) = todo.pop() {
            if devices.contains_key(&a) || skipped.contains(&a) {
                continue;
            }
            let detail = match scope {
                _ if full => Detail::Full,
                Scope::All => Detail::Judged,
                Scope::Around(seeds) if seeds.contains(&a) => Detail::Judged,
                Scope::Gpus | Scope::Around(_) => Detail::Bridge,
            };
            let known = ident_of(&a).unwrap_or((None, None));
            let Some(d) = read_device(&devices_dir, a, detail, known)? else {
                skipped.insert(a);
                continue;
            };
            // The whole slot, the bridges above, and the IOMMU group.
            todo.extend(
                names
                    .iter()
                    .filter(|n| n.same_slot(&a) && !devices.contains_key(n)),
            );
            todo.extend(d.parent);
            // A bridge's own group matters only to a full report: the GPUs' groups (which a
            // bridge sharing them is listed in) are what judging a GPU or a hostdev reads, so
            // a scoped discovery does not list every bridge's group above the cards.
            let group = d
                .iommu_group
                .filter(|_| *scope == Scope::All || !d.class.is_pci_bridge());
            if let Some(g) = group {
                if let std::collections::btree_map::Entry::Vacant(slot) = groups.entry(g) {
                    let members = sysfs.group_members(g)?;
                    todo.extend(members.iter().copied());
                    slot.insert(members);
                }
            }
            devices.insert(a, d);
        }
        if *scope == Scope::All {
            break;
        }
        // Functions on other buses behind a card's own switch (Intel Arc's audio).
        let roots: Vec<PciAddress> = devices
            .values()
            .filter(|d| d.class.is_gpu())
            .filter_map(|d| card_root(&devices, d))
            .filter(|r| !walked.contains(r))
            .collect();
        if roots.is_empty() {
            break;
        }
        for r in roots {
            walked.insert(r);
            let mut stack = vec![r];
            while let Some(x) = stack.pop() {
                for c in sysfs.children(x)? {
                    stack.push(c);
                    todo.push(c);
                }
            }
        }
    }
    let iommu = IommuState {
        // Devices in groups prove the IOMMU on: a scoped discovery (the hook's `prepare` and
        // `transform`) need not list them all (hundreds on a large host).
        groups: match scope {
            Scope::Gpus | Scope::Around(_) if !groups.is_empty() => groups.len(),
            _ => sysfs.iommu_group_ids()?.len(),
        },
        units: if full {
            sysfs.iommu_units()?
        } else {
            Vec::new()
        },
        cmdline: if full {
            IommuState::cmdline_words(&sysfs.cmdline()?)
        } else {
            Vec::new()
        },
    };
    // Each node's CPUs matter only for a domain pinned by CPU: `transform` reads them itself
    // when it needs them.
    let numa = match scope {
        Scope::All => sysfs.numa_cpus()?,
        Scope::Gpus | Scope::Around(_) => Vec::new(),
    };
    // Each VF's PF, from its `physfn` link (a VF whose link names no PCI function is no VF
    // gpupass can give: it is left out).
    let mut vf_parents = BTreeMap::new();
    for d in devices.values().filter(|d| d.virtfn) {
        if let Some(pf) = sysfs
            .device_link(d.address, "physfn")?
            .as_deref()
            .and_then(crate::host::vgpu::address_at_end)
        {
            vf_parents.insert(d.address, pf);
        }
    }
    let mut inv = Inventory::build(devices, groups, iommu, numa);
    inv.vf_parents = vf_parents;
    Ok(inv)
}

impl Inventory {
    /// Assembles an inventory and works out the GPUs (pure).
    pub fn build(
        devices: BTreeMap<PciAddress, PciDevice>,
        groups: BTreeMap<IommuGroupId, Vec<PciAddress>>,
        iommu: IommuState,
        numa_cpus: Vec<(NumaNode, BTreeSet<u32>)>,
    ) -> Self {
        let gpus = find_gpus(&devices);
        Self {
            devices,
            groups,
            gpus,
            iommu,
            numa_cpus,
            quarantine: BTreeMap::new(),
            vf_parents: BTreeMap::new(),
        }
    }

    /// The physical function of an SR-IOV virtual function; `None` when `addr` is no VF.
    pub fn physfn(&self, addr: PciAddress) -> Option<PciAddress> {
        self.vf_parents.get(&addr).copied()
    }

    /// The SR-IOV virtual functions of a GPU (whose PF is any of its functions).
    pub fn vfs_of(&self, gpu: &Gpu) -> Vec<PciAddress> {
        self.vf_parents
            .iter()
            .filter(|(_, pf)| gpu.functions.contains(pf) || **pf == gpu.address)
            .map(|(vf, _)| *vf)
            .collect()
    }

    /// The inventory with the quarantines of the health file in `state_dir` (none when it has
    /// none): a quarantined GPU is judged not passable ([`crate::host::readiness::verdict`]).
    pub fn with_quarantine(
        mut self,
        state_dir: &std::path::Path,
    ) -> Result<Self, crate::health::HealthError> {
        self.quarantine = crate::health::store::HealthStore::new(state_dir)
            .read()?
            .quarantined;
        Ok(self)
    }

    /// The quarantine of a GPU (any of its functions' addresses).
    pub fn quarantine_of(&self, gpu: &Gpu) -> Option<&crate::health::Quarantine> {
        std::iter::once(&gpu.address)
            .chain(&gpu.functions)
            .find_map(|f| self.quarantine.get(f))
    }

    /// The GPU with this display address, or the GPU one of whose functions this is.
    pub fn gpu(&self, addr: PciAddress) -> Option<&Gpu> {
        self.gpus
            .iter()
            .find(|g| g.address == addr)
            .or_else(|| self.gpus.iter().find(|g| g.functions.contains(&addr)))
    }

    /// The host's NVIDIA NVSwitches (vendor 10de, class 0680): the HGX fabric's switches, each
    /// a single function.
    pub fn nvswitches(&self) -> Vec<PciAddress> {
        self.devices
            .values()
            .filter(|d| d.id.vendor == 0x10de && d.class.base() == 0x06 && d.class.sub() == 0x80)
            .map(|d| d.address)
            .collect()
    }

    /// The NVIDIA GPUs of an HGX fabric (empty when the host has no NVSwitch).
    pub fn fabric_gpus(&self) -> Vec<PciAddress> {
        if self.nvswitches().is_empty() {
            return Vec::new();
        }
        self.gpus
            .iter()
            .filter(|g| {
                self.device(g.address)
                    .is_some_and(|d| d.id.vendor == 0x10de)
            })
            .map(|g| g.address)
            .collect()
    }

    /// A device by address.
    pub fn device(&self, addr: PciAddress) -> Option<&PciDevice> {
        self.devices.get(&addr)
    }

    /// NUMA nodes whose CPUs intersect `cpus`.
    pub fn nodes_of_cpus(&self, cpus: &BTreeSet<u32>) -> BTreeSet<NumaNode> {
        self.numa_cpus
            .iter()
            .filter(|(_, node_cpus)| !node_cpus.is_disjoint(cpus))
            .map(|(n, _)| *n)
            .collect()
    }
}

fn ancestors(devices: &BTreeMap<PciAddress, PciDevice>, addr: PciAddress) -> Vec<PciAddress> {
    let mut out = Vec::new();
    let mut cur = devices.get(&addr).and_then(|d| d.parent);
    while let Some(p) = cur {
        // A malformed tree must not loop forever.
        if out.contains(&p) || out.len() > 64 {
            break;
        }
        out.push(p);
        cur = devices.get(&p).and_then(|d| d.parent);
    }
    out
}

/// The card's own PCIe switch above a GPU: the highest bridge of the GPU's vendor in an unbroken
/// chain above it, never a root port (a bridge on a root bus belongs to the platform).
fn card_root(devices: &BTreeMap<PciAddress, PciDevice>, gpu: &PciDevice) -> Option<PciAddress> {
    let mut root = None;
    for a in ancestors(devices, gpu.address) {
        let Some(d) = devices.get(&a) else { break };
        if d.id.vendor != gpu.id.vendor || !d.class.is_pci_bridge() || d.parent.is_none() {
            break;
        }
        root = Some(a);
    }
    root
}

fn find_gpus(devices: &BTreeMap<PciAddress, PciDevice>) -> Vec<Gpu> {
    // Display controllers and processing accelerators (class 1200) both name a GPU. An SR-IOV
    // virtual function is not a whole GPU: it is one of its PF's fractions (`host::vgpu`).
    let displays: Vec<&PciDevice> = devices
        .values()
        .filter(|d| d.class.is_gpu() && !d.virtfn)
        .collect();
    let mut gpus = Vec::new();
    for d in &displays {
        // A second display function in the same slot (old dual-head cards) is part of the first.
        if displays
            .iter()
            .any(|o| o.address.same_slot(&d.address) && o.address < d.address)
        {
            continue;
        }
        // A GPU's functions: its slot's, but never a virtual function (a whole-GPU attach must
        // not take an SR-IOV GPU's VFs with it, even those in its own slot).
        let mut functions: BTreeSet<PciAddress> = devices
            .values()
            .filter(|o| o.address.same_slot(&d.address) && !o.class.is_pci_bridge() && !o.virtfn)
            .map(|o| o.address)
            .collect();
        if let Some(root) = card_root(devices, d) {
            let below: Vec<&PciDevice> = devices
                .values()
                .filter(|o| ancestors(devices, o.address).contains(&root))
                .collect();
            let display_slots: BTreeSet<(u32, u8, u8)> = below
                .iter()
                .filter(|o| o.class.is_gpu())
                .map(|o| (o.address.domain, o.address.bus, o.address.slot))
                .collect();
            // Only a switch that carries exactly one GPU is that GPU's own (an NF200-style
            // bridge above two cards is not).
            if display_slots.len() == 1 {
                functions.extend(
                    below
                        .iter()
                        .filter(|o| {
                            o.id.vendor == d.id.vendor && !o.class.is_pci_bridge() && !o.virtfn
                        })
                        .map(|o| o.address),
                );
            }
        }
        gpus.push(Gpu {
            address: d.address,
            functions: functions.into_iter().collect(),
        });
    }
    gpus
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(addr: &str, id: &str, class: u32, parent: Option<&str>) -> PciDevice {
        PciDevice {
            address: addr.parse().unwrap(),
            id: id.parse().unwrap(),
            subsystem: None,
            class: PciClass(class),
            driver: None,
            iommu_group: None,
            numa_node: None,
            boot_vga: false,
            reset_method: None,
            parent: parent.map(|p| p.parse().unwrap()),
            virtfn: false,
        }
    }

    fn inv(devs: Vec<PciDevice>) -> Inventory {
        Inventory::build(
            devs.into_iter().map(|d| (d.address, d)).collect(),
            BTreeMap::new(),
            IommuState::default(),
            Vec::new(),
        )
    }

    fn fns(g: &Gpu) -> Vec<String> {
        g.functions.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn whole_gpu_is_every_function_of_the_slot() {
        let i = inv(vec![
            dev("0000:00:01.0", "8086:1901", 0x060400, None),
            dev("0000:01:00.0", "10de:1e07", 0x030000, Some("0000:00:01.0")),
            dev("0000:01:00.1", "10de:10f7", 0x040300, Some("0000:00:01.0")),
            dev("0000:01:00.2", "10de:1ad6", 0x0c0330, Some("0000:00:01.0")),
            dev("0000:01:00.3", "10de:1ad7", 0x0c8000, Some("0000:00:01.0")),
        ]);
        assert_eq!(i.gpus.len(), 1);
        assert_eq!(
            fns(&i.gpus[0]),
            [
                "0000:01:00.0",
                "0000:01:00.1",
                "0000:01:00.2",
                "0000:01:00.3"
            ]
        );
        let audio = "0000:01:00.1".parse().unwrap();
        assert_eq!(i.gpu(audio).unwrap().address.to_string(), "0000:01:00.0");
    }

    #[test]
    fn an_sr_iov_gpus_virtual_functions_are_neither_its_functions_nor_gpus() {
        // An A10-style PF with its audio, and VFs in its own slot and the next one.
        let vf = |a: &str| PciDevice {
            virtfn: true,
            ..dev(a, "10de:2236", 0x030200, Some("0000:40:01.0"))
        };
        let i = inv(vec![
            dev("0000:40:01.0", "8086:1901", 0x060400, None),
            dev("0000:41:00.0", "10de:2236", 0x030200, Some("0000:40:01.0")),
            dev("0000:41:00.1", "10de:1aef", 0x040300, Some("0000:40:01.0")),
            vf("0000:41:00.4"),
            vf("0000:41:00.5"),
            vf("0000:41:01.0"),
        ]);
        let pf = i.gpu("0000:41:00.0".parse().unwrap()).unwrap();
        assert_eq!(fns(pf), ["0000:41:00.0", "0000:41:00.1"]);
        // A VF is neither folded into the PF nor a whole GPU of its own (it is one of the
        // PF's fractions, reported under its `vgpu`); the inventory still has the device.
        assert_eq!(i.gpus.len(), 1);
        for a in ["0000:41:00.4", "0000:41:00.5", "0000:41:01.0"] {
            let a: PciAddress = a.parse().unwrap();
            assert!(i.gpu(a).is_none(), "{a}");
            assert!(i.device(a).is_some_and(|d| d.virtfn));
        }
    }

    #[test]
    fn arc_audio_on_another_bus_belongs_to_the_card() {
        let i = inv(vec![
            dev("0001:00:01.0", "8086:a70d", 0x060400, None),
            dev("0001:03:00.0", "8086:4fa1", 0x060400, Some("0001:00:01.0")),
            dev("0001:04:01.0", "8086:4fa4", 0x060400, Some("0001:03:00.0")),
            dev("0001:04:04.0", "8086:4fa4", 0x060400, Some("0001:03:00.0")),
            dev("0001:05:00.0", "8086:56a0", 0x030000, Some("0001:04:01.0")),
            dev("0001:06:00.0", "8086:4f90", 0x040300, Some("0001:04:04.0")),
        ]);
        assert_eq!(fns(&i.gpus[0]), ["0001:05:00.0", "0001:06:00.0"]);
    }

    #[test]
    fn a_shared_bridge_does_not_merge_two_cards() {
        // Two NVIDIA cards behind an NVIDIA bridge (NF200 style): each keeps only its slot.
        let i = inv(vec![
            dev("0000:00:03.0", "8086:0e08", 0x060400, None),
            dev("0000:02:00.0", "10de:05b1", 0x060400, Some("0000:00:03.0")),
            dev("0000:03:00.0", "10de:05b1", 0x060400, Some("0000:02:00.0")),
            dev("0000:03:02.0", "10de:05b1", 0x060400, Some("0000:02:00.0")),
            dev("0000:04:00.0", "10de:11b4", 0x030000, Some("0000:03:00.0")),
            dev("0000:04:00.1", "10de:0e0a", 0x040300, Some("0000:03:00.0")),
            dev("0000:05:00.0", "10de:11b4", 0x030000, Some("0000:03:02.0")),
            dev("0000:05:00.1", "10de:0e0a", 0x040300, Some("0000:03:02.0")),
        ]);
        assert_eq!(i.gpus.len(), 2);
        assert_eq!(fns(&i.gpus[0]), ["0000:04:00.0", "0000:04:00.1"]);
        assert_eq!(fns(&i.gpus[1]), ["0000:05:00.0", "0000:05:00.1"]);
    }

    #[test]
    fn a_processing_accelerator_is_a_gpu_and_other_classes_are_not() {
        let i = inv(vec![
            dev("0000:c1:00.0", "1002:74a1", 0x120000, None),
            dev("0000:c2:00.0", "1d0f:efa1", 0x020000, None),
            dev("0000:c3:00.0", "8086:0b25", 0x120100, None),
        ]);
        assert_eq!(i.gpus.len(), 1);
        assert_eq!(fns(&i.gpus[0]), ["0000:c1:00.0"]);
    }

    #[test]
    fn parent_cycles_do_not_hang() {
        let i = inv(vec![
            dev("0000:01:00.0", "10de:05b1", 0x060400, Some("0000:02:00.0")),
            dev("0000:02:00.0", "10de:05b1", 0x060400, Some("0000:01:00.0")),
            dev("0000:03:00.0", "10de:1e07", 0x030000, Some("0000:02:00.0")),
        ]);
        assert_eq!(i.gpus.len(), 1);
    }

    #[test]
    fn finds_iommu_words() {
        let words = IommuState::cmdline_words(
            "BOOT_IMAGE=/vmlinuz root=/dev/sda1 intel_iommu=on iommu=pt vfio-pci.ids=10de:11b4 quiet",
        );
        assert_eq!(
            words,
            ["intel_iommu=on", "iommu=pt", "vfio-pci.ids=10de:11b4"]
        );
    }
}
