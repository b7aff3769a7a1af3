//! The shapes `gpupass list` and `show` print (JSON and table), built from the inventory, the
//! verdicts and libvirt's holdings. Pure: no IO.

use serde::Serialize;

use crate::alloc::plan::{Holder, Holdings, PartialHold};
use crate::fit::bars::{human, FunctionBars, GpuBars};
use crate::fit::plan::next_pow2;
use crate::host::discover::{Gpu, Inventory, IommuState, PciDevice};
use crate::host::readiness::{verdict, Blocker};
use crate::host::vgpu::{is_vfio_driver, GpuVgpus, VgpuType};
use crate::model::{
    device_name, subsystem_name, vendor_name, IommuGroupId, MdevUuid, NumaNode, PciAddress,
    PciClass,
};

/// One function of a GPU.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionReport {
    /// Address.
    pub address: PciAddress,
    /// Vendor ID (`10de`).
    pub vendor_id: String,
    /// Device ID (`2330`).
    pub device_id: String,
    /// Device name from the PCI ID database compiled in.
    pub device_name: Option<&'static str>,
    /// Class code (`040300`).
    pub class: PciClass,
    /// Class name (`Audio device`).
    pub class_name: Option<&'static str>,
    /// Driver, `null` when unbound.
    pub driver: Option<String>,
    /// IOMMU group.
    pub iommu_group: Option<IommuGroupId>,
}

/// One member of a GPU's IOMMU group(s).
#[derive(Debug, Clone, Serialize)]
pub struct GroupMemberReport {
    /// Address.
    pub address: PciAddress,
    /// Class code.
    pub class: PciClass,
    /// Driver.
    pub driver: Option<String>,
    /// One of the GPU's own functions.
    pub own: bool,
}

/// A domain that references a GPU.
#[derive(Debug, Clone, Serialize)]
pub struct Reference {
    /// Domain name.
    pub domain: String,
    /// Held by the running domain (not only its defined configuration).
    pub running: bool,
}

/// Everything about one GPU, as `list --json` and `show --json` print it.
#[derive(Debug, Clone, Serialize)]
pub struct GpuReport {
    /// Display-function address.
    pub address: PciAddress,
    /// Vendor ID.
    pub vendor_id: String,
    /// Device ID.
    pub device_id: String,
    /// Vendor name.
    pub vendor_name: Option<&'static str>,
    /// Device name.
    pub device_name: Option<&'static str>,
    /// Subsystem vendor ID (the board maker).
    pub subsystem_vendor_id: Option<String>,
    /// Subsystem device ID.
    pub subsystem_device_id: Option<String>,
    /// Subsystem name.
    pub subsystem_name: Option<&'static str>,
    /// Class code.
    pub class: PciClass,
    /// Class name.
    pub class_name: Option<&'static str>,
    /// All functions, the display function first.
    pub functions: Vec<FunctionReport>,
    /// The display function's IOMMU group.
    pub iommu_group: Option<IommuGroupId>,
    /// Every device in the GPU's IOMMU group(s).
    pub iommu_group_members: Vec<GroupMemberReport>,
    /// The display function's driver.
    pub driver: Option<String>,
    /// NUMA node, `null` when unknown.
    pub numa_node: Option<NumaNode>,
    /// The host's boot (console) VGA.
    pub boot_vga: bool,
    /// `reset_method` (`flr bus`); `""` = no reset method; `null` = the kernel does not say.
    pub reset_method: Option<String>,
    /// Passable.
    pub viable: bool,
    /// What blocks passthrough.
    pub blockers: Vec<Blocker>,
    /// Other GPUs in the same IOMMU group.
    pub group_peers: Vec<PciAddress>,
    /// The domain that holds it: the running one, else the first that defines it; `null` when
    /// free or when libvirt could not be asked.
    pub used_by: Option<String>,
    /// Every domain that references it; `null` when libvirt could not be asked.
    pub references: Option<Vec<Reference>>,
    /// `partial` when a domain holds only some of its functions (see `partial`), else `free`,
    /// `in-use` or `unknown` (libvirt not asked), whatever `viable` says.
    pub state: &'static str,
    /// Domains holding only part of it (a crash mid-attach or mid-detach), each with the
    /// functions it has and lacks; `null` when libvirt could not be asked.
    pub partial: Option<Vec<PartialHold>>,
    /// Whether a health check quarantined it.
    pub health: HealthReport,
    /// Each function's BARs and the 64-bit window the GPU needs in a guest (`show` reads them
    /// from sysfs; `null` where they were not read).
    pub bars: Option<BarsReport>,
    /// Its fractions: SR-IOV VFs, vGPU types, mdev instances. `list` and `show` read them:
    /// `null` when the GPU has none of the three; the key is absent where they were not read
    /// (the agent's API).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vgpu: Option<Option<VgpuReport>>,
}

/// A GPU's fractions as `list --json` and `show --json` print them.
#[derive(Debug, Clone, Serialize)]
pub struct VgpuReport {
    /// Its SR-IOV state; `null` when it has no SR-IOV capability.
    pub sriov: Option<SriovReport>,
    /// The vGPU types of the GPU and of its VFs.
    pub types: Vec<VgpuType>,
    /// The mdev instances on the GPU and on its VFs, each with its user.
    pub instances: Vec<InstanceReport>,
}

/// A PF's SR-IOV state.
#[derive(Debug, Clone, Serialize)]
pub struct SriovReport {
    /// How many VFs it can have.
    pub total_vfs: u32,
    /// How many are enabled (`null`: unreadable).
    pub num_vfs: Option<u32>,
    /// The enabled VFs.
    pub vfs: Vec<VfReport>,
}

/// One virtual function.
#[derive(Debug, Clone, Serialize)]
pub struct VfReport {
    /// Address.
    pub address: PciAddress,
    /// Driver, `null` when unbound.
    pub driver: Option<String>,
    /// On `vfio-pci` or a vfio-pci variant driver (`amd-vfio-pci`).
    pub on_vfio: bool,
    /// IOMMU group.
    pub iommu_group: Option<IommuGroupId>,
    /// NVIDIA vendor-specific VFIO: the vGPU type id set on it; `null` when none.
    pub current_type: Option<u32>,
    /// The domain that holds it (running first), as for a GPU; `null` when free or when
    /// libvirt could not be asked.
    pub used_by: Option<String>,
}

/// One mdev instance.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceReport {
    /// Its UUID.
    pub uuid: MdevUuid,
    /// Its type's id.
    #[serde(rename = "type")]
    pub type_id: String,
    /// Its parent (the GPU or one of its VFs).
    pub parent: PciAddress,
    /// The domain that holds it (running first); `null` when free or when libvirt could not
    /// be asked.
    pub used_by: Option<String>,
}

impl VgpuReport {
    /// A GPU's fractions with their users from `holdings` (`None`: unknown).
    pub fn new(v: &GpuVgpus, holdings: Option<&Holdings>) -> Self {
        let first = |hs: Vec<Holder>| hs.into_iter().next().map(|h| h.domain);
        Self {
            sriov: v.sriov.as_ref().map(|s| SriovReport {
                total_vfs: s.total_vfs,
                num_vfs: s.num_vfs,
                vfs: s
                    .vfs
                    .iter()
                    .map(|f| VfReport {
                        address: f.address,
                        driver: f.driver.clone(),
                        on_vfio: f.driver.as_deref().is_some_and(is_vfio_driver),
                        iommu_group: f.iommu_group,
                        current_type: f.current_type,
                        used_by: holdings.and_then(|h| first(h.holders(&[f.address]))),
                    })
                    .collect(),
            }),
            types: v.types.clone(),
            instances: v
                .instances
                .iter()
                .map(|i| InstanceReport {
                    uuid: i.uuid.clone(),
                    type_id: i.type_id.clone(),
                    parent: i.parent,
                    used_by: holdings.and_then(|h| first(h.mdev_holders(&i.uuid))),
                })
                .collect(),
        }
    }

    /// The short marker of `list`'s VGPU column: `2/16 VFs (1 in use), 12 types, 1 mdev` (a
    /// GPU with a VF in use is not passed whole).
    pub fn marker(&self) -> String {
        let mut parts = Vec::new();
        if let Some(s) = &self.sriov {
            let used = s.vfs.iter().filter(|f| f.used_by.is_some()).count();
            parts.push(format!(
                "{}/{} VFs{}",
                s.num_vfs.map_or("?".into(), |n| n.to_string()),
                s.total_vfs,
                if used > 0 {
                    format!(" ({used} in use)")
                } else {
                    String::new()
                }
            ));
        }
        if !self.types.is_empty() {
            let n = self.types.len();
            parts.push(format!("{n} type{}", if n == 1 { "" } else { "s" }));
        }
        if !self.instances.is_empty() {
            let n = self.instances.len();
            parts.push(format!("{n} mdev{}", if n == 1 { "" } else { "s" }));
        }
        parts.join(", ")
    }
}

/// A GPU's health as `list`/`show --json` and the API print it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthReport {
    /// `ok` or `quarantined`.
    pub state: &'static str,
    /// What failed (quarantined only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Since when, RFC 3339 (quarantined only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

impl HealthReport {
    /// The report of a GPU with this quarantine, or none.
    pub fn of(q: Option<&crate::health::Quarantine>) -> Self {
        match q {
            Some(q) => HealthReport {
                state: "quarantined",
                reason: Some(q.reason.clone()),
                since: Some(crate::limits::rfc3339(q.since)),
            },
            None => HealthReport {
                state: "ok",
                reason: None,
                since: None,
            },
        }
    }
}

/// A GPU's BARs, as `show` prints them.
#[derive(Debug, Clone, Serialize)]
pub struct BarsReport {
    /// Each function with its BARs.
    pub functions: Vec<FunctionBars>,
    /// Sum of the 64-bit prefetchable BARs, bytes.
    pub prefetchable_64: u64,
    /// The guest window it needs behind its own root port (next power of two), bytes.
    pub window: u64,
}

impl BarsReport {
    /// From a GPU's BARs.
    pub fn new(b: GpuBars) -> Self {
        Self {
            prefetchable_64: b.pref64_sum(),
            window: next_pow2(b.pref64_sum()),
            functions: b.functions,
        }
    }
}

fn hex4(v: u16) -> String {
    format!("{v:04x}")
}

fn function(d: &PciDevice) -> FunctionReport {
    FunctionReport {
        address: d.address,
        vendor_id: hex4(d.id.vendor),
        device_id: hex4(d.id.device),
        device_name: device_name(d.id),
        class: d.class,
        class_name: d.class.name(),
        driver: d.driver.clone(),
        iommu_group: d.iommu_group,
    }
}

/// Builds the report of one GPU; `holdings` is `None` when libvirt could not be asked.
pub fn gpu_report(inv: &Inventory, gpu: &Gpu, holdings: Option<&Holdings>) -> GpuReport {
    let v = verdict(inv, gpu);
    let primary = inv.device(gpu.address);
    let mut functions: Vec<FunctionReport> = gpu
        .functions
        .iter()
        .filter_map(|f| inv.device(*f))
        .map(function)
        .collect();
    functions.sort_by_key(|f| f.address != gpu.address);
    let iommu_group_members = v
        .iommu_groups
        .iter()
        .flat_map(|g| inv.groups.get(g).into_iter().flatten())
        .filter_map(|m| inv.device(*m))
        .map(|d| GroupMemberReport {
            address: d.address,
            class: d.class,
            driver: d.driver.clone(),
            own: gpu.functions.contains(&d.address),
        })
        .collect();
    let holders: Option<Vec<Holder>> = holdings.map(|h| h.holders(&gpu.functions));
    let partial: Option<Vec<PartialHold>> = holdings.map(|h| h.partial(&gpu.functions));
    let state = match (&holders, &partial) {
        (_, Some(p)) if !p.is_empty() => "partial",
        (Some(h), _) if !h.is_empty() => "in-use",
        (Some(_), _) => "free",
        (None, _) => "unknown",
    };
    GpuReport {
        address: gpu.address,
        vendor_id: primary.map(|d| hex4(d.id.vendor)).unwrap_or_default(),
        device_id: primary.map(|d| hex4(d.id.device)).unwrap_or_default(),
        vendor_name: primary.and_then(|d| vendor_name(d.id.vendor)),
        device_name: primary.and_then(|d| device_name(d.id)),
        subsystem_vendor_id: primary.and_then(|d| d.subsystem).map(|s| hex4(s.vendor)),
        subsystem_device_id: primary.and_then(|d| d.subsystem).map(|s| hex4(s.device)),
        subsystem_name: primary.and_then(|d| d.subsystem.and_then(|s| subsystem_name(d.id, s))),
        class: primary.map_or(PciClass(0), |d| d.class),
        class_name: primary.and_then(|d| d.class.name()),
        functions,
        iommu_group: primary.and_then(|d| d.iommu_group),
        iommu_group_members,
        driver: primary.and_then(|d| d.driver.clone()),
        numa_node: primary.and_then(|d| d.numa_node),
        boot_vga: v.boot_vga,
        reset_method: primary.and_then(|d| d.reset_method.clone()),
        viable: v.viable,
        blockers: v.blockers,
        group_peers: v.group_peers,
        used_by: holders
            .as_ref()
            .and_then(|h| h.first().map(|h| h.domain.clone())),
        references: holders.map(|hs| {
            hs.into_iter()
                .map(|h| Reference {
                    domain: h.domain,
                    running: h.running,
                })
                .collect()
        }),
        state,
        partial,
        health: HealthReport::of(inv.quarantine_of(gpu)),
        bars: None,
        vgpu: None,
    }
}

/// IOMMU state as `list --json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct IommuReport {
    /// IOMMU groups exist.
    pub enabled: bool,
    /// Group count.
    pub groups: usize,
    /// IOMMU units.
    pub units: Vec<String>,
    /// IOMMU words on the kernel command line.
    pub cmdline: Vec<String>,
}

impl From<&IommuState> for IommuReport {
    fn from(s: &IommuState) -> Self {
        Self {
            enabled: s.enabled(),
            groups: s.groups,
            units: s.units.clone(),
            cmdline: s.cmdline.clone(),
        }
    }
}

/// `list --json`.
#[derive(Debug, Clone, Serialize)]
pub struct ListReport {
    /// The GPUs.
    pub gpus: Vec<GpuReport>,
    /// The IOMMU.
    pub iommu: IommuReport,
    /// libvirt as seen by this run.
    pub libvirt: LibvirtReport,
}

impl ListReport {
    /// Every GPU of `inv` judged, with its user from `holdings` (`None`: unknown).
    pub fn new(inv: &Inventory, holdings: Option<&Holdings>, libvirt: LibvirtReport) -> Self {
        Self {
            gpus: inv
                .gpus
                .iter()
                .map(|gpu| gpu_report(inv, gpu, holdings))
                .collect(),
            iommu: IommuReport::from(&inv.iommu),
            libvirt,
        }
    }
}

/// Whether holdings came from libvirt.
#[derive(Debug, Clone, Serialize)]
pub struct LibvirtReport {
    /// The URI.
    pub uri: String,
    /// True when `used_by` is known.
    pub connected: bool,
    /// Why not, when not.
    pub error: Option<String>,
    /// The agent's API only: unix seconds since which `used_by` is the last known state
    /// (libvirt away).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_since: Option<u64>,
}

/// A short state word for the table (`partial` first: it needs a hand).
pub fn state_word(r: &GpuReport) -> &'static str {
    if r.state == "partial" {
        return "partial";
    }
    if r.health.state == "quarantined" {
        return "quarantined";
    }
    match (r.viable, r.boot_vga) {
        (false, _) => "blocked",
        (true, true) => "boot-vga",
        (true, false) => "passable",
    }
}

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

/// The `list` table, with one note line per blocked GPU.
pub fn table(list: &ListReport) -> String {
    let mut out = String::new();
    if !list.iommu.enabled {
        out.push_str("IOMMU: off (no IOMMU groups) - no GPU can be passed through; enable VT-d/AMD-Vi and intel_iommu=on or amd_iommu=on\n");
    }
    let rows: Vec<[String; 9]> = list
        .gpus
        .iter()
        .map(|g| {
            let model = format!(
                "{}:{} {}",
                g.vendor_id,
                g.device_id,
                g.device_name.unwrap_or("")
            );
            let used = match (&g.used_by, list.libvirt.connected) {
                (Some(d), _) => d.clone(),
                (None, true) => "-".into(),
                (None, false) => "?".into(),
            };
            [
                g.address.to_string(),
                cut(model.trim(), 40),
                g.functions.len().to_string(),
                g.iommu_group.map_or("-".into(), |x| x.to_string()),
                g.numa_node.map_or("-".into(), |x| x.to_string()),
                g.driver.clone().unwrap_or_else(|| "-".into()),
                state_word(g).into(),
                match &g.vgpu {
                    Some(Some(v)) => v.marker(),
                    _ => "-".into(),
                },
                used,
            ]
        })
        .collect();
    let header = [
        "ADDRESS", "MODEL", "FUNCS", "GROUP", "NUMA", "DRIVER", "STATE", "VGPU", "USED BY",
    ];
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(c);
                l.push_str(&" ".repeat(w - c.chars().count() + 2));
            }
        }
        l.push('\n');
        l
    };
    out.push_str(&line(header.to_vec()));
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    if list.gpus.is_empty() {
        out.push_str("(no GPUs: no PCI function of class 03xxxx)\n");
    }
    for g in &list.gpus {
        for b in &g.blockers {
            if *b != Blocker::IommuOff {
                out.push_str(&format!("{}: blocked: {b}\n", g.address));
            }
        }
        for p in g.partial.iter().flatten() {
            out.push_str(&format!(
                "{}: partial: {}; {}\n",
                g.address,
                p.summary(g.address),
                p.fix(g.address)
            ));
        }
    }
    out
}

/// The `show` text for one GPU.
pub fn details(g: &GpuReport, connected: bool) -> String {
    let mut o = String::new();
    let opt = |v: Option<&str>| v.unwrap_or("-").to_owned();
    o.push_str(&format!("GPU {}\n", g.address));
    o.push_str(&format!(
        "  model:        {}:{} {} / {}\n",
        g.vendor_id,
        g.device_id,
        opt(g.vendor_name),
        opt(g.device_name)
    ));
    if let (Some(v), Some(d)) = (&g.subsystem_vendor_id, &g.subsystem_device_id) {
        o.push_str(&format!(
            "  subsystem:    {v}:{d} {}\n",
            opt(g.subsystem_name)
        ));
    }
    o.push_str(&format!(
        "  class:        {} {}\n",
        g.class,
        opt(g.class_name)
    ));
    o.push_str(&format!("  driver:       {}\n", opt(g.driver.as_deref())));
    o.push_str(&format!(
        "  numa node:    {}\n",
        g.numa_node.map_or("unknown".into(), |n| n.to_string())
    ));
    o.push_str(&format!(
        "  reset method: {}\n",
        match g.reset_method.as_deref() {
            None => "not reported by the kernel",
            Some("") => "none (the GPU may not reset between VMs)",
            Some(m) => m,
        }
    ));
    o.push_str(&format!(
        "  boot vga:     {}\n",
        if g.boot_vga {
            "yes (the host console; never chosen by --count)"
        } else {
            "no"
        }
    ));
    o.push_str(&format!(
        "  passable:     {}\n",
        if g.viable { "yes" } else { "no" }
    ));
    for b in &g.blockers {
        o.push_str(&format!("    blocked: {b}\n"));
    }
    o.push_str(&format!(
        "  used by:      {}\n",
        match (&g.references, connected) {
            (Some(r), _) if !r.is_empty() => r
                .iter()
                .map(|r| format!(
                    "{}{}",
                    r.domain,
                    if r.running {
                        " (running)"
                    } else {
                        " (defined)"
                    }
                ))
                .collect::<Vec<_>>()
                .join(", "),
            (_, true) => "-".into(),
            (_, false) => "unknown (libvirt not reachable)".into(),
        }
    ));
    for p in g.partial.iter().flatten() {
        o.push_str(&format!("  partial:      {}\n", p.summary(g.address)));
        o.push_str(&format!("    fix: {}\n", p.fix(g.address)));
    }
    o.push_str("  functions:\n");
    for f in &g.functions {
        o.push_str(&format!(
            "    {}  {}:{}  {} {:<24} driver={} group={}\n",
            f.address,
            f.vendor_id,
            f.device_id,
            f.class,
            cut(f.class_name.unwrap_or("-"), 24),
            f.driver.as_deref().unwrap_or("-"),
            f.iommu_group.map_or("-".into(), |x| x.to_string())
        ));
    }
    if let Some(b) = &g.bars {
        o.push_str(&format!(
            "  bars:         64-bit prefetchable {} -> needs a {} guest window\n",
            human(b.prefetchable_64),
            human(b.window)
        ));
        for f in &b.functions {
            for bar in &f.bars {
                o.push_str(&format!(
                    "    {}  BAR{} {:>9}  {}\n",
                    f.function,
                    bar.index,
                    human(bar.size),
                    bar.kind
                ));
            }
        }
    }
    if let Some(Some(v)) = &g.vgpu {
        vgpu_details(&mut o, v);
    }
    if !g.iommu_group_members.is_empty() {
        o.push_str("  iommu group members:\n");
        for m in &g.iommu_group_members {
            o.push_str(&format!(
                "    {}  {}  driver={}{}\n",
                m.address,
                m.class,
                m.driver.as_deref().unwrap_or("-"),
                if m.own { "  (this GPU)" } else { "" }
            ));
        }
    }
    if !g.group_peers.is_empty() {
        let peers: Vec<String> = g.group_peers.iter().map(|p| p.to_string()).collect();
        o.push_str(&format!(
            "  shares its IOMMU group with GPU(s) {}: they can only go to the same domain\n",
            peers.join(", ")
        ));
    }
    o
}

/// The `show` lines of a GPU's fractions: SR-IOV, then the types that can be created now (by
/// parent), then the mdev instances.
fn vgpu_details(o: &mut String, v: &VgpuReport) {
    o.push_str(&format!("  vgpu:         {}\n", v.marker()));
    if let Some(s) = &v.sriov {
        let on_vfio = s.vfs.iter().filter(|f| f.on_vfio).count();
        let used = s.vfs.iter().filter(|f| f.used_by.is_some()).count();
        o.push_str(&format!(
            "    sr-iov: {} of {} VFs enabled, {on_vfio} on vfio, {used} in use\n",
            s.num_vfs.map_or("?".into(), |n| n.to_string()),
            s.total_vfs
        ));
        for f in &s.vfs {
            o.push_str(&format!(
                "      {}  driver={} group={}{}{}\n",
                f.address,
                f.driver.as_deref().unwrap_or("-"),
                f.iommu_group.map_or("-".into(), |x| x.to_string()),
                f.current_type
                    .map_or(String::new(), |t| format!(" vgpu-type={t}")),
                f.used_by
                    .as_ref()
                    .map_or(String::new(), |d| format!(" used by {d}"))
            ));
        }
    }
    let available: Vec<&VgpuType> = v
        .types
        .iter()
        .filter(|t| t.available_instances.is_some_and(|n| n > 0))
        .collect();
    if !v.types.is_empty() {
        o.push_str(&format!(
            "    types: {} ({} with instances available)\n",
            v.types.len(),
            available.len()
        ));
    }
    // One line per type and name, counting the parents that offer it (a type on every VF).
    let mut lines: Vec<(String, u32, usize)> = Vec::new();
    for t in available {
        let label = format!(
            "{} {}{}",
            t.id,
            t.name.as_deref().unwrap_or("-"),
            t.details
                .framebuffer_mib
                .map_or(String::new(), |m| format!(" ({m} MiB)"))
        );
        let n = t.available_instances.unwrap_or(0);
        match lines.iter_mut().find(|(l, _, _)| *l == label) {
            Some(line) => {
                line.1 += n;
                line.2 += 1;
            }
            None => lines.push((label, n, 1)),
        }
    }
    for (label, n, parents) in lines {
        o.push_str(&format!(
            "      {label}: {n} available{}\n",
            if parents > 1 {
                format!(" on {parents} parents")
            } else {
                String::new()
            }
        ));
    }
    if !v.instances.is_empty() {
        o.push_str("    mdevs:\n");
        for i in &v.instances {
            o.push_str(&format!(
                "      {}  type={} parent={}{}\n",
                i.uuid,
                i.type_id,
                i.parent,
                i.used_by
                    .as_ref()
                    .map_or(String::new(), |d| format!(" used by {d}"))
            ));
        }
    }
}
