//! The fit's decisions (pure): the 64-bit aperture a domain's GPUs need, what the domain gives
//! them, each missing piece with one line saying why, and the changes that make it fit — never
//! lowering anything the operator set higher.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::fit::bars::{human, GpuBars};
use crate::fit::domain::{DomainLayout, Firmware, Machine};
use crate::model::PciAddress;

const GIB: u64 = 1 << 30;
/// QEMU's guest physical address bits for a CPU model that is not the host's.
pub const QEMU_DEFAULT_PHYS_BITS: u8 = 40;
/// OVMF's classic 64-bit PCI window when nothing sizes it (`PcdPciMmio64Size`).
pub const OVMF_DEFAULT_WINDOW: u64 = 32 * GIB;
/// q35's default 64-bit PCI hole (`Q35_PCI_HOST_HOLE64_SIZE_DEFAULT`).
pub const Q35_HOLE64_DEFAULT: u64 = 32 * GIB;
/// i440fx's default 64-bit PCI hole (`I440FX_PCI_HOST_HOLE64_SIZE_DEFAULT`).
pub const I440FX_HOLE64_DEFAULT: u64 = 2 * GIB;
/// Empty root ports left on a q35 domain for hot-plug.
pub const SPARE_ROOT_PORTS: usize = 2;

/// The next power of two ≥ `n` (0 stays 0; saturates at 2^63).
pub fn next_pow2(n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        n.checked_next_power_of_two().unwrap_or(1 << 63)
    }
}

/// Bits needed to address `end` (exclusive end of a range).
fn bits_for(end: u64) -> u8 {
    if end <= 1 {
        return 1;
    }
    u8::try_from(64 - (end - 1).leading_zeros()).expect("at most 64")
}

fn align_up(v: u64, to: u64) -> u64 {
    if to == 0 {
        v
    } else {
        v.div_ceil(to).saturating_mul(to)
    }
}

/// The aperture GPUs need (OVMF's rule, edk2 `MemDetect.c`): each GPU behind its own root port
/// gets a window of the next power of two ≥ the sum of its 64-bit prefetchable BARs; the whole
/// aperture is the next power of two ≥ the sum of the windows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Need {
    /// Each GPU's window, bytes.
    pub windows: Vec<GpuWindow>,
    /// The whole 64-bit aperture, bytes.
    pub total: u64,
}

/// One GPU's window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuWindow {
    /// The GPU.
    pub gpu: PciAddress,
    /// Sum of its 64-bit prefetchable BARs.
    pub bars: u64,
    /// Its window.
    pub window: u64,
}

/// Sizes the aperture for `gpus`.
pub fn need(gpus: &[GpuBars]) -> Need {
    let windows: Vec<GpuWindow> = gpus
        .iter()
        .map(|g| {
            let bars = g.pref64_sum();
            GpuWindow {
                gpu: g.gpu,
                bars,
                window: next_pow2(bars),
            }
        })
        .collect();
    let sum = windows.iter().fold(0u64, |a, w| a.saturating_add(w.window));
    Need {
        windows,
        total: next_pow2(sum),
    }
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Given.
    Ok,
    /// Missing; the fit adds it.
    Missing,
    /// Cannot be given on this host.
    Fail,
}

/// One piece a GPU needs from its domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// `64-bit window`, `phys-bits`, `pcihole64`, `root ports`, `slot layout`.
    pub item: String,
    /// The outcome.
    pub status: Status,
    /// What the domain has.
    pub have: String,
    /// What the GPUs need.
    pub need: String,
    /// One line: why it matters, or what is wrong.
    pub why: String,
}

/// The guest's physical address bits to set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum PhysBits {
    /// `<maxphysaddr mode='passthrough'/>`: the host's.
    Passthrough,
    /// `<maxphysaddr mode='emulate' bits='N'/>`.
    Emulate {
        /// N.
        bits: u8,
    },
}

/// Where one GPU goes in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// The GPU.
    pub gpu: PciAddress,
    /// Guest bus (a root port's index; 0 on i440fx).
    pub bus: u32,
    /// Guest slot.
    pub slot: u32,
    /// Indexes into the layout's hostdevs, with each one's guest function.
    #[serde(skip)]
    pub hostdevs: Vec<(usize, u32)>,
    /// Host function → guest function.
    pub functions: Vec<(PciAddress, u32)>,
}

/// A change the fit makes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "change")]
pub enum Change {
    /// OVMF's `X-PciMmio64Mb` fw_cfg entry.
    OvmfWindow {
        /// MiB.
        mib: u64,
    },
    /// `<pcihole64>` on the root controller.
    Pcihole64 {
        /// KiB.
        kib: u64,
    },
    /// `<maxphysaddr>`.
    MaxPhysAddr(PhysBits),
    /// New `pcie-root-port` controllers with these indexes.
    RootPorts {
        /// Their indexes.
        indexes: Vec<u32>,
    },
    /// A GPU's functions put at one guest slot.
    Place(Placement),
    /// `<features><kvm><hidden state='on'/></kvm></features>`.
    HideHypervisor,
    /// `<features><hyperv><vendor_id state='on' value='…'/></hyperv></features>`.
    HypervVendorId {
        /// The value.
        value: String,
    },
    /// `<rom bar='off'/>` or `<rom file='…'/>` on hostdevs without one.
    Rom {
        /// The GPU.
        gpu: PciAddress,
        /// `off` or the file.
        setting: String,
        /// Indexes into the layout's hostdevs.
        #[serde(skip)]
        hostdevs: Vec<usize>,
    },
}

impl Change {
    /// One line for people.
    pub fn describe(&self) -> String {
        match self {
            Change::OvmfWindow { mib } => format!(
                "OVMF 64-bit PCI window: {MMIO}={mib} ({}) via <qemu:commandline>",
                human(mib << 20),
                MMIO = crate::fit::domain::MMIO64_ENTRY
            ),
            Change::Pcihole64 { kib } => {
                format!(
                    "<pcihole64 unit='KiB'>{kib}</pcihole64> ({})",
                    human(kib << 10)
                )
            }
            Change::MaxPhysAddr(PhysBits::Passthrough) => {
                "<maxphysaddr mode='passthrough'/> (the host's address bits)".into()
            }
            Change::MaxPhysAddr(PhysBits::Emulate { bits }) => {
                format!("<maxphysaddr mode='emulate' bits='{bits}'/>")
            }
            Change::RootPorts { indexes } => format!(
                "{} pcie-root-port controller(s), index {}",
                indexes.len(),
                indexes
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Change::HideHypervisor => {
                "<kvm><hidden state='on'/></kvm> (the guest driver does not see KVM)".into()
            }
            Change::HypervVendorId { value } => {
                format!("<hyperv><vendor_id state='on' value='{value}'/></hyperv>")
            }
            Change::Rom { gpu, setting, .. } if setting == "off" => {
                format!("GPU {gpu}: <rom bar='off'/>")
            }
            Change::Rom { gpu, setting, .. } => format!("GPU {gpu}: <rom file='{setting}'/>"),
            Change::Place(p) => format!(
                "GPU {} at guest bus 0x{:02x} slot 0x{:02x}: {}",
                p.gpu,
                p.bus,
                p.slot,
                p.functions
                    .iter()
                    .map(|(f, g)| format!("{f}->fn{g}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        }
    }
}

/// What the domain gives its GPUs now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Provides {
    /// Machine family.
    pub machine: Machine,
    /// Firmware.
    pub firmware: Firmware,
    /// `<cpu mode>`.
    pub cpu_mode: Option<String>,
    /// The guest's physical address bits as QEMU will give them.
    pub phys_bits: u8,
    /// Where that number comes from.
    pub phys_bits_from: String,
    /// `<pcihole64>` in bytes, when set.
    pub pcihole64: Option<u64>,
    /// OVMF's `X-PciMmio64Mb` in bytes, when set.
    pub ovmf_window: Option<u64>,
    /// `pcie-root-port` controllers.
    pub root_ports: usize,
    /// Of those, the ones no device uses.
    pub free_root_ports: usize,
    /// Guest RAM, bytes.
    pub memory: u64,
}

/// The fit of one domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FitPlan {
    /// Why the fit does not apply (another architecture, not QEMU), when it does not.
    pub not_applicable: Option<String>,
    /// The aperture the GPUs need.
    pub need: Need,
    /// Guest physical address bits the aperture needs (above RAM, aligned to its size).
    pub phys_bits_needed: u8,
    /// What the domain gives now.
    pub provides: Option<Provides>,
    /// The host CPU's physical address bits, when known.
    pub host_phys_bits: Option<u8>,
    /// Each piece, checked.
    pub checks: Vec<Check>,
    /// What the fit changes.
    pub changes: Vec<Change>,
    /// The GPUs' BARs certainly cannot be placed in the domain as it is (stacked above its
    /// RAM they pass 2^phys-bits): a start will not give the guest working GPUs.
    pub certain_failure: Option<String>,
    /// The outcome depends on the guest firmware's own sizing (no explicit window).
    pub firmware_dependent: Option<String>,
}

impl FitPlan {
    /// Nothing is missing.
    pub fn fits(&self) -> bool {
        self.checks.iter().all(|c| c.status == Status::Ok)
    }

    /// Something cannot be given on this host.
    pub fn impossible(&self) -> bool {
        self.checks.iter().any(|c| c.status == Status::Fail)
    }
}

/// Opt-in vendor options for a domain's GPUs (the config's `[[guest]]` entries that apply).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VendorOptions {
    /// `<kvm><hidden state='on'/>`.
    pub hide_hypervisor: bool,
    /// `<hyperv><vendor_id state='on' value='…'/>`.
    pub hyperv_vendor_id: Option<String>,
    /// Per GPU: `off` or a ROM file path, for each of its functions without a `<rom>`.
    pub rom: Vec<(PciAddress, String)>,
}

/// An NVIDIA HGX fabric on the host: its NVSwitches (class 0680) and its GPUs. In full
/// passthrough all of them go to one domain together (Fabric Manager runs in the guest).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fabric {
    /// The NVSwitches.
    pub switches: Vec<PciAddress>,
    /// The GPUs of the switches' vendor.
    pub gpus: Vec<PciAddress>,
}

/// What the domain is asked to hold: GPUs it has as hostdevs and GPUs it would get.
#[derive(Debug, Clone, Default)]
pub struct FitRequest<'a> {
    /// The GPUs (all their functions' BARs), in the domain or to be given to it.
    pub gpus: &'a [GpuBars],
    /// The host CPU's physical address bits.
    pub host_phys_bits: Option<u8>,
    /// Opt-in vendor options.
    pub vendor: VendorOptions,
    /// The host's HGX fabric, when it has NVSwitches.
    pub fabric: Option<Fabric>,
}

fn effective_bits(d: &DomainLayout<'_>, host: Option<u8>) -> (u8, String) {
    let host_bits = host.unwrap_or(QEMU_DEFAULT_PHYS_BITS);
    let host_cpu = matches!(d.cpu_mode.as_deref(), Some("host-passthrough" | "maximum"));
    match &d.maxphysaddr {
        Some(m) if m.mode == "emulate" => match m.bits {
            Some(b) => (b, format!("<maxphysaddr mode='emulate' bits='{b}'/>")),
            None => (
                QEMU_DEFAULT_PHYS_BITS,
                "<maxphysaddr mode='emulate'> without bits: QEMU's default".into(),
            ),
        },
        Some(m) if m.mode == "passthrough" => {
            let b = m.limit.map_or(host_bits, |l| l.min(host_bits));
            (b, "<maxphysaddr mode='passthrough'/>: the host's".into())
        }
        _ if host_cpu => (
            host_bits,
            format!(
                "{} CPU: the host's",
                d.cpu_mode.as_deref().unwrap_or_default()
            ),
        ),
        _ => (
            QEMU_DEFAULT_PHYS_BITS,
            "QEMU's default for a CPU model that is not the host's".into(),
        ),
    }
}

/// Where the top of guest RAM can be, pessimistic (all of it above 4 GiB, plus memory hot-plug)
/// and optimistic (QEMU keeps up to 3 GiB below 4 GiB).
fn ram_top(d: &DomainLayout<'_>) -> (u64, u64) {
    let hotplug = d
        .max_memory
        .map_or(0, |m| m.saturating_sub(d.memory).saturating_add(GIB));
    let pessimistic = (4 * GIB).saturating_add(d.memory).saturating_add(hotplug);
    let optimistic = (4 * GIB).saturating_add(d.memory.saturating_sub(3 * GIB));
    (pessimistic, optimistic)
}

/// Whether the BARs, each aligned to its size, largest first, fit between `start` and 2^bits.
fn stack_fits(bars: &[u64], start: u64, bits: u8) -> bool {
    let limit = if bits >= 64 { u64::MAX } else { 1u64 << bits };
    let mut at = start;
    for b in bars {
        at = align_up(at, *b).saturating_add(*b);
        if at > limit {
            return false;
        }
    }
    true
}

fn check(item: &str, status: Status, have: String, need: String, why: String) -> Check {
    Check {
        item: item.into(),
        status,
        have,
        need,
        why,
    }
}

/// Plans the fit of `d` for `req.gpus`.
pub fn plan(d: &DomainLayout<'_>, req: &FitRequest<'_>) -> FitPlan {
    let need = need(req.gpus);
    let mut plan = FitPlan {
        not_applicable: None,
        need: need.clone(),
        phys_bits_needed: 0,
        provides: None,
        host_phys_bits: req.host_phys_bits,
        checks: Vec::new(),
        changes: Vec::new(),
        certain_failure: None,
        firmware_dependent: None,
    };
    if req.gpus.is_empty() {
        plan.not_applicable = Some("it holds none of this host's GPUs".into());
        return plan;
    }
    if !d.is_x86() {
        plan.not_applicable = Some(format!(
            "arch {}: gpupass fits x86 guests only",
            d.arch.as_deref().unwrap_or("?")
        ));
        return plan;
    }
    if !matches!(d.virt_type.as_str(), "kvm" | "qemu") {
        plan.not_applicable = Some(format!(
            "domain type '{}': gpupass fits QEMU guests only",
            d.virt_type
        ));
        return plan;
    }
    let machine = d.machine();
    if machine == Machine::Other {
        plan.not_applicable = Some(format!(
            "machine '{}': gpupass fits q35 and i440fx guests only",
            d.machine_name.as_deref().unwrap_or("?")
        ));
        return plan;
    }
    let (bits, bits_from) = effective_bits(d, req.host_phys_bits);
    let root = d
        .controllers
        .iter()
        .find(|c| matches!(c.model.as_deref(), Some("pcie-root" | "pci-root")));
    let hole = root.and_then(|c| c.pcihole64.as_ref().map(|(_, v)| *v));
    let ovmf = d.mmio64.as_ref().and_then(|m| m.mib).map(|m| m << 20);
    let ports: Vec<u32> = d
        .controllers
        .iter()
        .filter(|c| c.model.as_deref() == Some("pcie-root-port"))
        .map(|c| c.index)
        .collect();
    let used_buses: BTreeSet<u32> = d.addresses.iter().map(|a| a.bus).collect();
    let free_ports = ports.iter().filter(|p| !used_buses.contains(p)).count();
    plan.provides = Some(Provides {
        machine,
        firmware: d.firmware,
        cpu_mode: d.cpu_mode.clone(),
        phys_bits: bits,
        phys_bits_from: bits_from.clone(),
        pcihole64: hole,
        ovmf_window: ovmf,
        root_ports: ports.len(),
        free_root_ports: free_ports,
        memory: d.memory,
    });
    let total = need.total;
    let (top, top_optimistic) = ram_top(d);
    // OVMF puts the aperture above RAM, aligned to its own size; QEMU ≥ 7.1 also checks that
    // the 64-bit hole's end fits the guest's phys-bits.
    let end = if total == 0 {
        top
    } else {
        align_up(top, total).saturating_add(total)
    };
    let needed_bits = bits_for(end);
    plan.phys_bits_needed = needed_bits;

    // A certain failure: even placed as tightly as possible above RAM, the BARs pass 2^bits.
    let bars: Vec<u64> = {
        let mut v: Vec<u64> = req.gpus.iter().flat_map(GpuBars::pref64_bars).collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v
    };
    if !stack_fits(&bars, top_optimistic, bits) {
        plan.certain_failure = Some(format!(
            "its 64-bit BARs ({}) stacked above {} of guest RAM pass what {bits} guest address bits reach ({})",
            human(bars.iter().fold(0u64, |a, b| a.saturating_add(*b))),
            human(d.memory),
            human(if bits >= 64 { u64::MAX } else { 1u64 << bits })
        ));
    }

    // 1. The firmware's 64-bit window.
    match d.firmware {
        Firmware::Uefi => {
            let have = ovmf.map_or(
                "not set: OVMF's own sizing (32 GiB, or from phys-bits in newer builds)".into(),
                |w| format!("{} = {}", crate::fit::domain::MMIO64_ENTRY, human(w)),
            );
            let enough = ovmf.is_some_and(|w| w >= total) || total <= OVMF_DEFAULT_WINDOW;
            if enough {
                plan.checks.push(check(
                    "64-bit window",
                    Status::Ok,
                    have,
                    human(total),
                    "OVMF's window holds every GPU's BARs".into(),
                ));
            } else if d.mmio64.as_ref().is_some_and(|m| m.mib.is_none()) {
                plan.checks.push(check(
                    "64-bit window",
                    Status::Fail,
                    "set through a file= fw_cfg entry gpupass does not read".into(),
                    human(total),
                    "change the operator's own -fw_cfg X-PciMmio64Mb entry by hand".into(),
                ));
            } else {
                plan.firmware_dependent = Some(format!(
                    "OVMF's own window may be smaller than the {} the GPUs need",
                    human(total)
                ));
                plan.checks.push(check(
                    "64-bit window",
                    Status::Missing,
                    have,
                    human(total),
                    "without it OVMF may leave large BARs unassigned ('BAR 1: no space')".into(),
                ));
                plan.changes.push(Change::OvmfWindow {
                    mib: total.div_ceil(1 << 20),
                });
            }
        }
        Firmware::Bios => plan.checks.push(check(
            "64-bit window",
            Status::Ok,
            "SeaBIOS places 64-bit BARs above RAM itself".into(),
            human(total),
            "QEMU's ACPI window grows to what SeaBIOS assigned; phys-bits are the limit".into(),
        )),
    }

    // 2. The guest's physical address bits.
    let host = req.host_phys_bits;
    let host_cpu = matches!(d.cpu_mode.as_deref(), Some("host-passthrough" | "maximum"));
    if bits >= needed_bits {
        if host_cpu && d.maxphysaddr.is_none() && needed_bits > QEMU_DEFAULT_PHYS_BITS {
            plan.checks.push(check(
                "phys-bits",
                Status::Missing,
                format!("{bits} ({bits_from})"),
                needed_bits.to_string(),
                "made explicit: QEMU builds that do not pass the host's bits give 40".into(),
            ));
            plan.changes
                .push(Change::MaxPhysAddr(PhysBits::Passthrough));
        } else {
            plan.checks.push(check(
                "phys-bits",
                Status::Ok,
                format!("{bits} ({bits_from})"),
                needed_bits.to_string(),
                "the aperture fits the guest's address space".into(),
            ));
        }
    } else if host.is_some_and(|h| h < needed_bits) {
        plan.checks.push(check(
            "phys-bits",
            Status::Fail,
            format!("{bits} ({bits_from})"),
            needed_bits.to_string(),
            format!(
                "the host CPU has {} physical address bits; these GPUs need {needed_bits} in the guest (fewer GPUs or less guest RAM)",
                host.unwrap_or_default()
            ),
        ));
    } else {
        plan.checks.push(check(
            "phys-bits",
            Status::Missing,
            format!("{bits} ({bits_from})"),
            needed_bits.to_string(),
            format!(
                "{} of aperture above {} of RAM needs {needed_bits} address bits",
                human(total),
                human(d.memory)
            ),
        ));
        let passthrough_ok = host_cpu
            && host.is_some_and(|h| h >= needed_bits)
            && d.maxphysaddr
                .as_ref()
                .is_none_or(|m| m.mode == "passthrough" && m.limit.is_none());
        plan.changes.push(Change::MaxPhysAddr(if passthrough_ok {
            PhysBits::Passthrough
        } else {
            PhysBits::Emulate { bits: needed_bits }
        }));
    }

    // 3. QEMU's 64-bit PCI hole (hot-plug, guest `pci=realloc`, QEMU's own phys-bits check).
    let default_hole = if machine == Machine::Q35 {
        Q35_HOLE64_DEFAULT
    } else {
        I440FX_HOLE64_DEFAULT
    };
    let have_hole = hole.unwrap_or(default_hole);
    if total <= have_hole {
        plan.checks.push(check(
            "pcihole64",
            Status::Ok,
            hole.map_or(format!("default {}", human(default_hole)), human),
            human(total),
            "QEMU's 64-bit PCI hole holds the aperture".into(),
        ));
    } else {
        plan.checks.push(check(
            "pcihole64",
            Status::Missing,
            hole.map_or(format!("default {}", human(default_hole)), human),
            human(total),
            "the hole is what a hot-plugged GPU and the guest's own reallocation get".into(),
        ));
        plan.changes.push(Change::Pcihole64 {
            kib: total.div_ceil(1 << 10),
        });
    }

    // 4 and 5. Root ports and the card's own slot layout.
    slots(d, req.gpus, machine, &ports, &mut plan);
    vendor(d, req, &mut plan);
    fabric(d, req, &mut plan);
    plan
}

/// HGX full passthrough is all or nothing: a domain that holds an NVSwitch must hold every
/// NVSwitch and every GPU of the fabric (never some GPUs with the switches). A domain without
/// switches (shared-NVSwitch mode, a service VM holds them) is not judged here.
fn fabric(d: &DomainLayout<'_>, req: &FitRequest<'_>, plan: &mut FitPlan) {
    let Some(f) = &req.fabric else { return };
    let sources: BTreeSet<PciAddress> = d.hostdevs.iter().map(|h| h.source).collect();
    if !f.switches.iter().any(|s| sources.contains(s)) {
        return;
    }
    let held: BTreeSet<PciAddress> = req.gpus.iter().map(|g| g.gpu).collect();
    let lacking: Vec<String> = f
        .switches
        .iter()
        .filter(|s| !sources.contains(s))
        .chain(f.gpus.iter().filter(|g| !held.contains(g)))
        .map(PciAddress::to_string)
        .collect();
    let want = format!(
        "all {} GPUs and {} NVSwitches together",
        f.gpus.len(),
        f.switches.len()
    );
    if lacking.is_empty() {
        plan.checks.push(check(
            "HGX fabric",
            Status::Ok,
            "every GPU and NVSwitch".into(),
            want,
            "full passthrough: Fabric Manager runs in the guest".into(),
        ));
    } else {
        plan.checks.push(check(
            "HGX fabric",
            Status::Fail,
            format!("NVSwitches without {}", lacking.join(", ")),
            want,
            "full passthrough gives one domain the whole fabric; some GPUs with the switches cannot train NVLink".into(),
        ));
    }
}

/// The opt-in vendor options (config `[[guest]]`): what is asked and not there yet.
fn vendor(d: &DomainLayout<'_>, req: &FitRequest<'_>, plan: &mut FitPlan) {
    let v = &req.vendor;
    let mut missing = Vec::new();
    let on = |e: &Option<crate::fit::domain::StateElement>| {
        e.as_ref().is_some_and(|h| h.state.as_deref() == Some("on"))
    };
    if v.hide_hypervisor && !on(&d.kvm_hidden) {
        missing.push("hidden hypervisor".to_owned());
        plan.changes.push(Change::HideHypervisor);
    }
    if let Some(id) = &v.hyperv_vendor_id {
        let set = d
            .hyperv_vendor_id
            .as_ref()
            .is_some_and(|h| h.state.as_deref() == Some("on") && h.value.as_deref() == Some(id));
        if !set {
            missing.push(format!("Hyper-V vendor id {id}"));
            plan.changes
                .push(Change::HypervVendorId { value: id.clone() });
        }
    }
    for (gpu, setting) in &v.rom {
        let fns: Vec<PciAddress> = req
            .gpus
            .iter()
            .filter(|g| g.gpu == *gpu)
            .flat_map(|g| g.functions.iter().map(|f| f.function))
            .collect();
        let hostdevs: Vec<usize> = d
            .hostdevs
            .iter()
            .enumerate()
            .filter(|(_, h)| fns.contains(&h.source) && !h.rom)
            .map(|(i, _)| i)
            .collect();
        if !hostdevs.is_empty() {
            missing.push(format!("GPU {gpu} ROM {setting}"));
            plan.changes.push(Change::Rom {
                gpu: *gpu,
                setting: setting.clone(),
                hostdevs,
            });
        }
    }
    let asked = v.hide_hypervisor || v.hyperv_vendor_id.is_some() || !v.rom.is_empty();
    if asked {
        plan.checks.push(if missing.is_empty() {
            check(
                "vendor options",
                Status::Ok,
                "as the config's [[guest]] asks".into(),
                "config [[guest]]".into(),
                "opt-in options for these GPUs are set".into(),
            )
        } else {
            check(
                "vendor options",
                Status::Missing,
                "-".into(),
                missing.join(", "),
                "asked by the config's [[guest]] for these GPUs".into(),
            )
        });
    }
}

/// Places each GPU's functions at one guest slot (host function numbers, multifunction on
/// function 0), behind its own root port on q35, and keeps spare root ports for hot-plug.
fn slots(
    d: &DomainLayout<'_>,
    gpus: &[GpuBars],
    machine: Machine,
    ports: &[u32],
    plan: &mut FitPlan,
) {
    // Who is on each guest bus/slot now: hostdev index, or None for any other device.
    let hostdev_of_span: BTreeMap<usize, usize> = d
        .hostdevs
        .iter()
        .enumerate()
        .filter_map(|(i, h)| h.guest.as_ref().map(|g| (g.span.start, i)))
        .collect();
    let mut occupants: BTreeMap<(u32, u32), Vec<Option<usize>>> = BTreeMap::new();
    for a in &d.addresses {
        occupants
            .entry((a.bus, a.slot))
            .or_default()
            .push(hostdev_of_span.get(&a.span.start).copied());
    }
    let bus_used = |occ: &BTreeMap<(u32, u32), Vec<Option<usize>>>, bus: u32| {
        occ.iter().any(|((b, _), v)| *b == bus && !v.is_empty())
    };
    let mut next_index = d
        .controllers
        .iter()
        .map(|c| c.index)
        .chain(d.addresses.iter().map(|a| a.bus))
        .max()
        .map_or(1, |m| m + 1);
    let mut new_ports: Vec<u32> = Vec::new();
    let mut reserved: BTreeSet<u32> = BTreeSet::new();
    let mut placed_ok = 0usize;
    let mut missing_layout: Vec<String> = Vec::new();
    let mut failed_layout: Vec<String> = Vec::new();
    for g in gpus {
        let fns: Vec<PciAddress> = g.functions.iter().map(|f| f.function).collect();
        let mut members: Vec<(usize, PciAddress)> = d
            .hostdevs
            .iter()
            .enumerate()
            .filter(|(_, h)| fns.contains(&h.source))
            .map(|(i, h)| (i, h.source))
            .collect();
        members.sort_by_key(|(_, s)| (*s != g.gpu, *s));
        if members.is_empty() {
            // A GPU the domain would get: it will need a root port of its own.
            if machine == Machine::Q35 {
                match ports
                    .iter()
                    .chain(&new_ports)
                    .find(|p| !bus_used(&occupants, **p) && !reserved.contains(p))
                {
                    Some(p) => {
                        reserved.insert(*p);
                    }
                    None => {
                        new_ports.push(next_index);
                        reserved.insert(next_index);
                        next_index += 1;
                    }
                }
            }
            continue;
        }
        if members.iter().any(|(i, _)| d.hostdevs[*i].other_address) {
            // The operator placed it some other way (e.g. `unassigned`): left alone.
            continue;
        }
        // Guest function numbers: the host's when they differ, else 0..n in order.
        let host_fns: BTreeSet<u8> = members.iter().map(|(_, s)| s.function).collect();
        let guest_fn = |k: usize, s: PciAddress| -> u32 {
            if host_fns.len() == members.len() && host_fns.contains(&0) {
                u32::from(s.function)
            } else {
                u32::try_from(k).unwrap_or(0)
            }
        };
        let own: BTreeSet<usize> = members.iter().map(|(i, _)| *i).collect();
        let only_ours =
            |occ: &BTreeMap<(u32, u32), Vec<Option<usize>>>, bus: u32, slot: Option<u32>| {
                occ.iter()
                    .filter(|((b, s), _)| *b == bus && slot.is_none_or(|x| x == *s))
                    .all(|(_, v)| v.iter().all(|o| o.is_some_and(|i| own.contains(&i))))
            };
        let first = d.hostdevs[members[0].0].guest.clone();
        let multi = members.len() > 1;
        let in_place = members.iter().enumerate().all(|(k, (i, s))| {
            d.hostdevs[*i].guest.as_ref().is_some_and(|a| {
                first
                    .as_ref()
                    .is_some_and(|f| a.bus == f.bus && a.slot == f.slot)
                    && a.function == guest_fn(k, *s)
                    && (a.function != 0 || !multi || a.multifunction)
            })
        }) && first.as_ref().is_some_and(|f| match machine {
            Machine::Q35 => ports.contains(&f.bus) && only_ours(&occupants, f.bus, None),
            _ => f.bus == 0 && only_ours(&occupants, 0, Some(f.slot)),
        });
        if in_place {
            placed_ok += 1;
            if let Some(f) = &first {
                reserved.insert(f.bus);
            }
            continue;
        }
        // Take this GPU's functions off their slots, then find it one.
        for v in occupants.values_mut() {
            v.retain(|o| !o.is_some_and(|i| own.contains(&i)));
        }
        let (bus, slot) = match machine {
            Machine::Q35 => {
                let keep = first.as_ref().map(|f| f.bus).filter(|b| {
                    ports.contains(b) && !bus_used(&occupants, *b) && !reserved.contains(b)
                });
                let bus = keep
                    .or_else(|| {
                        ports
                            .iter()
                            .chain(&new_ports)
                            .find(|p| !bus_used(&occupants, **p) && !reserved.contains(p))
                            .copied()
                    })
                    .unwrap_or_else(|| {
                        new_ports.push(next_index);
                        next_index += 1;
                        next_index - 1
                    });
                (bus, 0)
            }
            _ => {
                let taken = |s: u32| occupants.get(&(0, s)).is_some_and(|v| !v.is_empty());
                let keep = first
                    .as_ref()
                    .filter(|f| f.bus == 0 && f.slot > 2 && !taken(f.slot))
                    .map(|f| f.slot);
                match keep.or_else(|| (3..=31).find(|s| !taken(*s))) {
                    Some(s) => (0, s),
                    None => {
                        failed_layout.push(format!("GPU {}: no free slot on bus 0", g.gpu));
                        continue;
                    }
                }
            }
        };
        reserved.insert(bus);
        let placement = Placement {
            gpu: g.gpu,
            bus,
            slot,
            hostdevs: members
                .iter()
                .enumerate()
                .map(|(k, (i, s))| (*i, guest_fn(k, *s)))
                .collect(),
            functions: members
                .iter()
                .enumerate()
                .map(|(k, (_, s))| (*s, guest_fn(k, *s)))
                .collect(),
        };
        for (i, _) in &placement.hostdevs {
            occupants.entry((bus, slot)).or_default().push(Some(*i));
        }
        missing_layout.push(g.gpu.to_string());
        plan.changes.push(Change::Place(placement));
    }
    if !failed_layout.is_empty() {
        plan.checks.push(check(
            "slot layout",
            Status::Fail,
            "-".into(),
            "each GPU at one slot".into(),
            failed_layout.join("; "),
        ));
    } else if !missing_layout.is_empty() {
        plan.checks.push(check(
            "slot layout",
            Status::Missing,
            format!("{} of {} GPU(s) as the host has them", placed_ok, placed_ok + missing_layout.len()),
            "each GPU's functions at one guest slot, host function numbers, multifunction on function 0".into(),
            format!(
                "GPU(s) {}: drivers expect the card's own layout (NVIDIA HDMI audio, AMD, Turing USB-C)",
                missing_layout.join(", ")
            ),
        ));
    } else if placed_ok > 0 {
        plan.checks.push(check(
            "slot layout",
            Status::Ok,
            format!("{placed_ok} GPU(s) as the host has them"),
            "each GPU's functions at one guest slot".into(),
            "the guest sees each card as the host does".into(),
        ));
    }
    if machine == Machine::Q35 {
        let free = ports
            .iter()
            .chain(&new_ports)
            .filter(|p| !bus_used(&occupants, **p) && !reserved.contains(p))
            .count();
        let spare_needed = SPARE_ROOT_PORTS.saturating_sub(free);
        for _ in 0..spare_needed {
            new_ports.push(next_index);
            next_index += 1;
        }
        let have = format!(
            "{} pcie-root-port(s), {} free",
            ports.len(),
            ports.iter().filter(|p| !bus_used(&occupants, **p)).count()
        );
        let want = format!("one per GPU ({}) + {SPARE_ROOT_PORTS} spare", gpus.len());
        if new_ports.is_empty() {
            plan.checks.push(check(
                "root ports",
                Status::Ok,
                have,
                want,
                "each GPU has its own port, and hot-plug has spares".into(),
            ));
        } else {
            plan.checks.push(check(
                "root ports",
                Status::Missing,
                have,
                want,
                "a PCIe GPU sits behind its own root port; live attach needs an empty one".into(),
            ));
            // Root ports go in before the placements that use them.
            let at = plan
                .changes
                .iter()
                .position(|c| matches!(c, Change::Place(_)))
                .unwrap_or(plan.changes.len());
            plan.changes
                .insert(at, Change::RootPorts { indexes: new_ports });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::bars::{Bar, FunctionBars};
    use crate::fit::domain::scan;

    fn a(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    fn pref(index: u8, size: u64) -> Bar {
        Bar {
            index,
            size,
            flags: 0x14220c,
            kind: "64-bit pref",
            prefetchable_64: true,
        }
    }

    fn h100(addr: &str) -> GpuBars {
        GpuBars {
            gpu: a(addr),
            functions: vec![FunctionBars {
                function: a(addr),
                bars: vec![
                    Bar {
                        index: 0,
                        size: 16 << 20,
                        flags: 0x40200,
                        kind: "32-bit",
                        prefetchable_64: false,
                    },
                    pref(1, 128 << 30),
                    pref(3, 32 << 20),
                ],
            }],
        }
    }

    fn hgx(n: usize) -> Vec<GpuBars> {
        ["18", "2a", "3a", "5d", "9a", "ab", "ba", "db"][..n]
            .iter()
            .map(|b| h100(&format!("0000:{b}:00.0")))
            .collect()
    }

    #[test]
    fn sizing_rule_matches_the_figures_operators_use() {
        assert_eq!(
            need(&hgx(1)).total,
            256 << 30,
            "128 GiB + 32 MiB -> 256 GiB"
        );
        assert_eq!(need(&hgx(1)).windows[0].window, 256 << 30);
        assert_eq!(
            need(&hgx(8)).total,
            2 << 40,
            "8 x H100 = X-PciMmio64Mb=2097152"
        );
        assert_eq!(need(&hgx(8)).total >> 20, 2_097_152);
        assert_eq!(need(&hgx(3)).total, 1 << 40, "768 GiB rounds up to 1 TiB");
        assert_eq!(need(&[]).total, 0);
        assert_eq!(next_pow2(1), 1);
        assert_eq!(next_pow2(u64::MAX), 1 << 63);
        assert_eq!(bits_for(1 << 40), 40);
        assert_eq!(bits_for((1 << 40) + 1), 41);
    }

    fn dom(extra_os: &str, cpu: &str, devices: &str, memory_gib: u64) -> String {
        format!(
            "<domain type='kvm'>\n  <name>vm</name>\n  <memory unit='GiB'>{memory_gib}</memory>\n  <os{extra_os}>\n    <type arch='x86_64' machine='q35'>hvm</type>\n  </os>\n{cpu}  <devices>\n{devices}  </devices>\n</domain>\n"
        )
    }

    fn item<'a>(p: &'a FitPlan, name: &str) -> &'a Check {
        p.checks.iter().find(|c| c.item == name).unwrap()
    }

    const H100_HOSTDEV: &str = "    <hostdev mode='subsystem' type='pci' managed='yes'>\n      <source><address domain='0x0000' bus='0x18' slot='0x00' function='0x0'/></source>\n    </hostdev>\n";

    #[test]
    fn one_h100_on_a_default_uefi_q35_needs_the_window_ports_and_layout() {
        let x = dom(" firmware='efi'", "", H100_HOSTDEV, 16);
        let p = plan(
            &scan(&x).unwrap(),
            &FitRequest {
                gpus: &hgx(1),
                host_phys_bits: Some(46),
                ..Default::default()
            },
        );
        assert!(p.not_applicable.is_none());
        assert_eq!(item(&p, "64-bit window").status, Status::Missing);
        assert!(item(&p, "64-bit window").why.contains("no space"));
        assert_eq!(
            p.phys_bits_needed, 39,
            "256 GiB above 20 GiB of RAM ends at 512 GiB"
        );
        assert_eq!(item(&p, "phys-bits").status, Status::Ok, "40 is enough");
        assert_eq!(item(&p, "pcihole64").status, Status::Missing);
        assert_eq!(item(&p, "root ports").status, Status::Missing);
        assert_eq!(item(&p, "slot layout").status, Status::Missing);
        assert!(p.certain_failure.is_none(), "one 128 GiB BAR fits 40 bits");
        assert!(p.firmware_dependent.is_some());
        assert!(p.changes.contains(&Change::OvmfWindow { mib: 262_144 }));
        assert!(p.changes.contains(&Change::Pcihole64 { kib: 268_435_456 }));
        assert!(!p.fits() && !p.impossible());
    }

    #[test]
    fn eight_h100_need_42_bits_and_a_host_with_fewer_cannot_fit() {
        let hostdevs: String = hgx(8)
            .iter()
            .map(|g| format!("    <hostdev mode='subsystem' type='pci'><source><address domain='0' bus='0x{:02x}' slot='0' function='0'/></source></hostdev>\n", g.gpu.bus))
            .collect();
        let x = dom(" firmware='efi'", "", &hostdevs, 64);
        let d = scan(&x).unwrap();
        let p = plan(
            &d,
            &FitRequest {
                gpus: &hgx(8),
                host_phys_bits: Some(46),
                ..Default::default()
            },
        );
        assert_eq!(p.phys_bits_needed, 42);
        assert_eq!(item(&p, "phys-bits").status, Status::Missing);
        assert!(p
            .changes
            .contains(&Change::MaxPhysAddr(PhysBits::Emulate { bits: 42 })));
        assert!(p.changes.contains(&Change::OvmfWindow { mib: 2_097_152 }));
        assert!(
            p.certain_failure
                .as_deref()
                .is_some_and(|w| w.contains("40 guest address bits")),
            "eight 128 GiB BARs do not fit 1 TiB: {:?}",
            p.certain_failure
        );
        let p = plan(
            &d,
            &FitRequest {
                gpus: &hgx(8),
                host_phys_bits: Some(39),
                ..Default::default()
            },
        );
        assert_eq!(item(&p, "phys-bits").status, Status::Fail);
        assert!(item(&p, "phys-bits").why.contains("host CPU has 39"));
        assert!(p.impossible());
    }

    #[test]
    fn bios_is_a_certain_failure_only_when_the_stack_passes_phys_bits() {
        // Facts section 6: SeaBIOS with one 128 GiB BAR and defaults works.
        let x = dom("", "", H100_HOSTDEV, 4);
        let p = plan(
            &scan(&x).unwrap(),
            &FitRequest {
                gpus: &hgx(1),
                host_phys_bits: Some(46),
                ..Default::default()
            },
        );
        assert!(p.certain_failure.is_none());
        assert!(
            p.firmware_dependent.is_none(),
            "SeaBIOS sizes nothing itself"
        );
        assert_eq!(item(&p, "64-bit window").status, Status::Ok);
        assert_eq!(
            item(&p, "pcihole64").status,
            Status::Missing,
            "still set, for hot-plug"
        );
        // Eight do not fit 40 bits (the 8th: 'can't assign; no space').
        let p = plan(
            &scan(&x).unwrap(),
            &FitRequest {
                gpus: &hgx(8),
                host_phys_bits: Some(46),
                ..Default::default()
            },
        );
        assert!(p.certain_failure.is_some());
        // With the bits the fit sets, the same eight fit.
        let cpu = "  <cpu mode='custom'><model>qemu64</model><maxphysaddr mode='emulate' bits='42'/></cpu>\n";
        let x = dom("", cpu, H100_HOSTDEV, 4);
        let p = plan(
            &scan(&x).unwrap(),
            &FitRequest {
                gpus: &hgx(8),
                host_phys_bits: Some(46),
                ..Default::default()
            },
        );
        assert!(p.certain_failure.is_none());
    }

    #[test]
    fn host_passthrough_gets_passthrough_and_higher_settings_are_kept() {
        let cpu = "  <cpu mode='host-passthrough'/>\n";
        let x = dom(" firmware='efi'", cpu, H100_HOSTDEV, 64);
        let p = plan(
            &scan(&x).unwrap(),
            &FitRequest {
                gpus: &hgx(8),
                host_phys_bits: Some(46),
                ..Default::default()
            },
        );
        assert!(p
            .changes
            .contains(&Change::MaxPhysAddr(PhysBits::Passthrough)));
        // An operator's higher values stay: nothing to change for them.
        let cpu = "  <cpu mode='custom'><model>qemu64</model><maxphysaddr mode='emulate' bits='48'/></cpu>\n";
        let devices = format!("    <controller type='pci' index='0' model='pcie-root'><pcihole64 unit='TiB'>4</pcihole64></controller>\n{H100_HOSTDEV}");
        let x = dom(" firmware='efi'", cpu, &devices, 64).replace(
            "</devices>\n",
            "</devices>\n  <qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><qemu:arg value='-fw_cfg'/><qemu:arg value='name=opt/ovmf/X-PciMmio64Mb,string=4194304'/></qemu:commandline>\n",
        );
        let p = plan(
            &scan(&x).unwrap(),
            &FitRequest {
                gpus: &hgx(8),
                host_phys_bits: Some(46),
                ..Default::default()
            },
        );
        for c in ["64-bit window", "phys-bits", "pcihole64"] {
            assert_eq!(item(&p, c).status, Status::Ok, "{c}: {:?}", item(&p, c));
        }
        assert!(!p.changes.iter().any(|c| matches!(
            c,
            Change::OvmfWindow { .. } | Change::Pcihole64 { .. } | Change::MaxPhysAddr(_)
        )));
    }

    #[test]
    fn hgx_full_passthrough_is_all_gpus_and_switches_or_nothing() {
        let switches: Vec<PciAddress> = ["05", "06", "07", "08"]
            .iter()
            .map(|b| a(&format!("0000:{b}:00.0")))
            .collect();
        let fabric = Fabric {
            switches: switches.clone(),
            gpus: hgx(8).iter().map(|g| g.gpu).collect(),
        };
        let hostdev = |addr: &PciAddress| {
            format!("    <hostdev mode='subsystem' type='pci'><source><address domain='0' bus='0x{:02x}' slot='0' function='0'/></source></hostdev>\n", addr.bus)
        };
        let all_gpus: String = hgx(8).iter().map(|g| hostdev(&g.gpu)).collect();
        let all_switches: String = switches.iter().map(hostdev).collect();
        let cpu = "  <cpu mode='custom'><model>qemu64</model><maxphysaddr mode='emulate' bits='46'/></cpu>\n";
        let whole = dom(
            " firmware='efi'",
            cpu,
            &format!("{all_gpus}{all_switches}"),
            64,
        );
        let p = plan(
            &scan(&whole).unwrap(),
            &FitRequest {
                gpus: &hgx(8),
                host_phys_bits: Some(46),
                fabric: Some(fabric.clone()),
                ..Default::default()
            },
        );
        assert_eq!(item(&p, "HGX fabric").status, Status::Ok);
        // Two GPUs with the switches: impossible, naming what is lacking.
        let some: String = hgx(2).iter().map(|g| hostdev(&g.gpu)).collect();
        let part = dom(" firmware='efi'", cpu, &format!("{some}{all_switches}"), 64);
        let p = plan(
            &scan(&part).unwrap(),
            &FitRequest {
                gpus: &hgx(2),
                host_phys_bits: Some(46),
                fabric: Some(fabric.clone()),
                ..Default::default()
            },
        );
        let c = item(&p, "HGX fabric");
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.have.contains("0000:3a:00.0") && c.have.contains("0000:db:00.0"),
            "{c:?}"
        );
        assert!(p.impossible());
        // GPUs without switches (shared-NVSwitch mode): not judged.
        let p = plan(
            &scan(&dom(" firmware='efi'", cpu, &some, 64)).unwrap(),
            &FitRequest {
                gpus: &hgx(2),
                host_phys_bits: Some(46),
                fabric: Some(fabric),
                ..Default::default()
            },
        );
        assert!(p.checks.iter().all(|c| c.item != "HGX fabric"));
    }

    #[test]
    fn other_architectures_and_hypervisors_are_left_alone() {
        let x = "<domain type='kvm'><name>x</name><os><type arch='aarch64' machine='virt'>hvm</type></os><devices/></domain>";
        let p = plan(
            &scan(x).unwrap(),
            &FitRequest {
                gpus: &hgx(1),
                host_phys_bits: None,
                ..Default::default()
            },
        );
        assert!(p.not_applicable.unwrap().contains("aarch64"));
        assert!(p.changes.is_empty());
        let p = plan(&scan(&dom("", "", "", 4)).unwrap(), &FitRequest::default());
        assert!(p
            .not_applicable
            .unwrap()
            .contains("none of this host's GPUs"));
        assert!(
            p.changes.is_empty(),
            "no spare root ports for a domain without GPUs"
        );
        let x = "<domain type='xen'><name>x</name><os><type>hvm</type></os></domain>";
        let p = plan(
            &scan(x).unwrap(),
            &FitRequest {
                gpus: &hgx(1),
                host_phys_bits: None,
                ..Default::default()
            },
        );
        assert!(p.not_applicable.unwrap().contains("xen"));
    }

    #[test]
    fn a_multifunction_card_goes_to_one_slot_with_its_own_function_numbers() {
        let card = GpuBars {
            gpu: a("0000:01:00.0"),
            functions: (0..4)
                .map(|f| FunctionBars {
                    function: a(&format!("0000:01:00.{f}")),
                    bars: vec![pref(1, 256 << 20)],
                })
                .collect(),
        };
        // libvirt's own placement: each function behind its own root port.
        let mut devices = String::new();
        for f in 0..4u32 {
            devices.push_str(&format!(
                "    <controller type='pci' index='{}' model='pcie-root-port'/>\n",
                f + 1
            ));
        }
        for f in [2u32, 0, 3, 1] {
            devices.push_str(&format!("    <hostdev mode='subsystem' type='pci'><source><address domain='0' bus='1' slot='0' function='{f}'/></source><address type='pci' domain='0x0000' bus='0x{:02x}' slot='0x00' function='0x0'/></hostdev>\n", f + 1));
        }
        let x = dom("", "", &devices, 4);
        let d = scan(&x).unwrap();
        let p = plan(
            &d,
            &FitRequest {
                gpus: std::slice::from_ref(&card),
                host_phys_bits: Some(39),
                ..Default::default()
            },
        );
        let place = p
            .changes
            .iter()
            .find_map(|c| match c {
                Change::Place(p) => Some(p.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(place.bus, 1, "function 0's port is kept");
        assert_eq!(
            place.functions,
            (0..4)
                .map(|f| (a(&format!("0000:01:00.{f}")), f))
                .collect::<Vec<_>>()
        );
        // Three ports freed: spares enough, none added.
        assert!(
            !p.changes
                .iter()
                .any(|c| matches!(c, Change::RootPorts { .. })),
            "{:?}",
            p.changes
        );
        assert_eq!(item(&p, "root ports").status, Status::Ok);
    }
}
