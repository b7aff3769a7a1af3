//! `gpupass doctor`'s judgements: is this host ready to pass GPUs through, and what is the one
//! line that fixes what is not. Pure: works on [`HostFacts`] that `host::probe` gathers; never
//! reads or writes the host itself.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::alloc::plan::Holdings;
use crate::cloudstack::agent::AgentFacts;
use crate::host::discover::{Gpu, Inventory};
use crate::host::readiness::{verdict, Blocker};
use crate::model::PciAddress;

/// A check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but worth a look.
    Warn,
    /// Passthrough will not work until this is fixed.
    Fail,
    /// Not checked (what it needs is missing or was not asked for).
    Skipped,
}

/// One check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What is checked (`iommu`, `gpu 0000:18:00.0 reset`…).
    pub name: String,
    /// The outcome.
    pub status: Status,
    /// What was seen.
    pub seen: String,
    /// The fix, in one line, when not ok.
    pub fix: Option<String>,
}

fn check(
    name: impl Into<String>,
    status: Status,
    seen: impl Into<String>,
    fix: Option<&str>,
) -> Check {
    Check {
        name: name.into(),
        status,
        seen: seen.into(),
        fix: fix.map(str::to_owned),
    }
}

/// A process holding a GPU's device node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHolder {
    /// Its pid.
    pub pid: u32,
    /// Its command name.
    pub comm: String,
    /// The node (`/dev/nvidia6`, `/dev/dri/card1`).
    pub node: String,
}

/// What libvirt said, when asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtFacts {
    /// The URI.
    pub uri: String,
    /// `Err(message)` when the daemon did not answer.
    pub reachable: Result<(), String>,
    /// The PCI passthrough backends of `domcapabilities`, when read.
    pub pci_backends: Option<Vec<String>>,
    /// Who holds which function, when read.
    pub holdings: Option<Holdings>,
}

/// Everything the checks look at.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    /// The inventory (full discovery).
    pub inv: Inventory,
    /// `proc/cmdline`.
    pub cmdline: String,
    /// `GenuineIntel` / `AuthenticAMD`.
    pub cpu_vendor: Option<String>,
    /// Loaded state of vfio, vfio_pci, vfio_iommu_type1.
    pub modules: BTreeMap<&'static str, bool>,
    /// `dev/vfio/vfio` exists.
    pub dev_vfio: bool,
    /// `vfio_iommu_type1 allow_unsafe_interrupts` is on (module parameter or command line).
    pub unsafe_interrupts: bool,
    /// Processes holding each GPU's device nodes, by GPU address.
    pub holders: BTreeMap<PciAddress, Vec<NodeHolder>>,
    /// libvirt, unless not asked.
    pub libvirt: Option<LibvirtFacts>,
    /// The gpupass qemu hook is installed.
    pub hook_installed: bool,
    /// The CloudStack agent, when the host has one (`agent.properties` present).
    pub cloudstack: Option<AgentFacts>,
}

/// The vfio modules doctor looks for.
pub const VFIO_MODULES: &[&str] = &["vfio", "vfio_pci", "vfio_iommu_type1"];

/// Host drivers that drive a display (a process may hold the GPU through them).
const DISPLAY_DRIVERS: &[&str] = &["nvidia", "nouveau", "amdgpu", "radeon", "i915", "xe"];

fn iommu_checks(f: &HostFacts, out: &mut Vec<Check>) {
    let words = &f.inv.iommu.cmdline;
    let intel = f.cpu_vendor.as_deref() == Some("GenuineIntel");
    let enable = if intel {
        "intel_iommu=on"
    } else {
        "amd_iommu=on"
    };
    let seen_cmdline = if words.is_empty() {
        "no IOMMU words on the kernel command line".to_owned()
    } else {
        format!("command line: {}", words.join(" "))
    };
    if f.inv.iommu.enabled() {
        out.push(check(
            "iommu",
            Status::Ok,
            format!(
                "{} IOMMU groups, units {}; {seen_cmdline}",
                f.inv.iommu.groups,
                if f.inv.iommu.units.is_empty() {
                    "-".into()
                } else {
                    f.inv.iommu.units.join(" ")
                }
            ),
            None,
        ));
        let pt = words
            .iter()
            .any(|w| w == "iommu=pt" || w == "iommu.passthrough=1");
        out.push(if pt {
            check("iommu passthrough mode", Status::Ok, "iommu=pt", None)
        } else {
            check(
                "iommu passthrough mode",
                Status::Warn,
                "iommu=pt is not set: the host's own devices pay for DMA translation",
                Some("add iommu=pt to the kernel command line (gpupass host-config prints it)"),
            )
        });
    } else {
        out.push(Check {
            name: "iommu".into(),
            status: Status::Fail,
            seen: format!(
                "no IOMMU groups and {} IOMMU units; {seen_cmdline}",
                if f.inv.iommu.units.is_empty() { "no" } else { "some" }
            ),
            fix: Some(format!(
                "enable VT-d/AMD-Vi in the firmware and add {enable} iommu=pt to the kernel command line, then reboot (gpupass host-config)"
            )),
        });
    }
    out.push(if f.unsafe_interrupts {
        check(
            "interrupt remapping",
            Status::Warn,
            "vfio_iommu_type1.allow_unsafe_interrupts=1: a guest can inject interrupts into the host",
            Some("enable interrupt remapping in the firmware and drop allow_unsafe_interrupts"),
        )
    } else {
        check("interrupt remapping", Status::Ok, "allow_unsafe_interrupts is not set", None)
    });
}

fn vfio_checks(f: &HostFacts, out: &mut Vec<Check>) {
    let missing: Vec<&str> = VFIO_MODULES
        .iter()
        .filter(|m| !f.modules.get(*m).copied().unwrap_or(false))
        .copied()
        .collect();
    out.push(if missing.is_empty() {
        check("vfio modules", Status::Ok, VFIO_MODULES.join(", ") + " loaded", None)
    } else {
        check(
            "vfio modules",
            Status::Warn,
            format!("not loaded: {} (libvirt loads vfio-pci on first use)", missing.join(", ")),
            Some("modprobe vfio-pci, and list the vfio modules in the initramfs (gpupass host-config)"),
        )
    });
    let vfio_loaded = f.modules.get("vfio").copied().unwrap_or(false);
    out.push(match (f.dev_vfio, vfio_loaded) {
        (true, _) => check("/dev/vfio/vfio", Status::Ok, "present", None),
        (false, true) => check(
            "/dev/vfio/vfio",
            Status::Fail,
            "vfio is loaded but /dev/vfio/vfio is missing",
            Some("run `kmod static-nodes`/udev, or mknod /dev/vfio/vfio c 10 196"),
        ),
        (false, false) => check(
            "/dev/vfio/vfio",
            Status::Warn,
            "missing (vfio is not loaded)",
            Some("modprobe vfio-pci"),
        ),
    });
}

fn gpu_checks(f: &HostFacts, gpu: &Gpu, out: &mut Vec<Check>) {
    let inv = &f.inv;
    let v = verdict(inv, gpu);
    let name = |what: &str| format!("gpu {} {what}", gpu.address);
    let drivers: Vec<String> = gpu
        .functions
        .iter()
        .map(|a| {
            let d = inv.device(*a).and_then(|d| d.driver.clone());
            format!("{a}={}", d.as_deref().unwrap_or("none"))
        })
        .collect();
    if v.boot_vga {
        out.push(check(
            name("console"),
            Status::Warn,
            "the host's boot VGA (its console); never chosen by --count",
            Some("pass another GPU, or move the console to another display first"),
        ));
    }
    // The console is not meant for passthrough: its blockers are a warning, not a failure.
    let blocked = if v.boot_vga {
        Status::Warn
    } else {
        Status::Fail
    };
    // A quarantine is the health check's finding, not a passthrough blocker.
    let blockers: Vec<&Blocker> = v
        .blockers
        .iter()
        .filter(|b| !matches!(b, Blocker::Quarantined { .. }))
        .collect();
    out.push(if blockers.is_empty() {
        check(name("passable"), Status::Ok, format!("groups {:?}", v.iommu_groups.iter().map(|g| g.0).collect::<Vec<_>>()), None)
    } else {
        let fix = if v.blockers.contains(&Blocker::IommuOff) {
            "turn the IOMMU on (see the iommu check)"
        } else {
            "move the card to a slot with its own IOMMU group (ACS), or bind every group member to vfio-pci (gpupass bind)"
        };
        check(
            name("passable"),
            blocked,
            blockers.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
            Some(fix),
        )
    });
    if let Some(q) = inv.quarantine_of(gpu) {
        out.push(quarantine_check(gpu.address, q));
    }
    let host_display = gpu.functions.iter().any(|a| {
        inv.device(*a)
            .and_then(|d| d.driver.as_deref())
            .is_some_and(|d| DISPLAY_DRIVERS.contains(&d))
    });
    let holders = f
        .holders
        .get(&gpu.address)
        .map(Vec::as_slice)
        .unwrap_or_default();
    out.push(if !holders.is_empty() {
        let who: Vec<String> = holders
            .iter()
            .map(|h| format!("pid {} ({}) holds {}", h.pid, h.comm, h.node))
            .collect();
        check(
            name("drivers"),
            Status::Warn,
            format!("{}; {}: unbinding would hang until they let go", drivers.join(" "), who.join(", ")),
            Some("stop those processes (display manager, nvidia-persistenced) before passing the GPU"),
        )
    } else if host_display {
        check(
            name("drivers"),
            Status::Ok,
            format!("{} (a host display driver: libvirt detaches it with managed='yes')", drivers.join(" ")),
            None,
        )
    } else {
        check(name("drivers"), Status::Ok, drivers.join(" "), None)
    });
    // A domain with only some of the GPU's functions (a crash mid-attach or mid-detach): the
    // guest sees half a card and the rest cannot go anywhere else.
    if let Some(h) = f.libvirt.as_ref().and_then(|l| l.holdings.as_ref()) {
        for p in h.partial(&gpu.functions) {
            out.push(check(
                name("assignment"),
                Status::Fail,
                p.summary(gpu.address),
                Some(&p.fix(gpu.address)),
            ));
        }
    }
    let reset = inv.device(gpu.address).and_then(|d| d.reset_method.clone());
    out.push(match reset.as_deref() {
        Some("") => check(
            name("reset"),
            Status::Warn,
            "no reset method: the GPU may not reset between VMs",
            Some("prefer a GPU with FLR or bus reset; expect to reboot the host to recover it"),
        ),
        Some(m) => check(
            name("reset"),
            Status::Ok,
            format!("reset_method: {m}"),
            None,
        ),
        None => check(
            name("reset"),
            Status::Skipped,
            "the kernel does not report reset_method",
            None,
        ),
    });
    let nodes = inv.numa_cpus.len();
    let numa = inv.device(gpu.address).and_then(|d| d.numa_node);
    out.push(match (numa, nodes > 1) {
        (Some(n), _) => check(name("numa"), Status::Ok, format!("node {n}"), None),
        (None, true) => check(
            name("numa"),
            Status::Warn,
            format!("unknown on a host with {nodes} NUMA nodes: gpupass cannot place VMs near it"),
            Some("enable NUMA/ACPI SRAT in the firmware"),
        ),
        (None, false) => check(name("numa"), Status::Ok, "unknown (single-node host)", None),
    });
}

fn libvirt_checks(f: &HostFacts, out: &mut Vec<Check>) {
    match &f.libvirt {
        None => {
            for n in ["libvirt", "libvirt vfio backend"] {
                out.push(check(n, Status::Skipped, "not asked (--no-libvirt)", None));
            }
        }
        Some(l) => {
            match &l.reachable {
                Ok(()) => out.push(check(
                    "libvirt",
                    Status::Ok,
                    format!("answers at {}", l.uri),
                    None,
                )),
                Err(e) => out.push(check(
                    "libvirt",
                    Status::Fail,
                    format!("no answer at {}: {e}", l.uri),
                    Some("start libvirtd (systemctl start libvirtd) or pass -c URI"),
                )),
            }
            out.push(match &l.pci_backends {
                Some(b) if b.iter().any(|x| x == "vfio") => check(
                    "libvirt vfio backend",
                    Status::Ok,
                    format!("pciBackend: {}", b.join(", ")),
                    None,
                ),
                Some(b) => check(
                    "libvirt vfio backend",
                    Status::Fail,
                    format!(
                        "domcapabilities lists no vfio PCI backend ({})",
                        if b.is_empty() {
                            "none".to_owned()
                        } else {
                            b.join(", ")
                        }
                    ),
                    Some("turn the IOMMU on and load vfio-pci; libvirt then offers vfio"),
                ),
                None => check(
                    "libvirt vfio backend",
                    Status::Skipped,
                    "libvirt did not answer",
                    None,
                ),
            });
        }
    }
    out.push(if f.hook_installed {
        check(
            "gpupass hook",
            Status::Ok,
            "/etc/libvirt/hooks/qemu.d/gpupass installed",
            None,
        )
    } else {
        check(
            "gpupass hook",
            Status::Warn,
            "not installed: starts that cannot work fail later, with QEMU's message",
            Some("gpupass install-hook"),
        )
    });
}

/// On a CloudStack host: the agent's XML transformer does not stop a start it cannot complete
/// (the agent falls back to the original XML), so it must never run without the qemu hook,
/// which does.
fn cloudstack_checks(f: &HostFacts, out: &mut Vec<Check>) {
    let Some(cs) = &f.cloudstack else { return };
    let names: Vec<String> = cs
        .transformers
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    out.push(match (names.is_empty(), f.hook_installed) {
        (true, _) => check(
            "cloudstack transformer",
            Status::Warn,
            "CloudStack agent host without an XML transformer: GPUs CloudStack allocates go to VMs without their audio/USB functions",
            Some("gpupass cloudstack install"),
        ),
        (false, true) => check(
            "cloudstack transformer",
            Status::Ok,
            format!("{} with the gpupass qemu hook", names.join(", ")),
            None,
        ),
        (false, false) => check(
            "cloudstack transformer",
            Status::Fail,
            format!(
                "{} is configured but the gpupass qemu hook is not installed: the agent starts a VM without its GPUs when the transformer fails",
                names.join(", ")
            ),
            Some("gpupass cloudstack install (or gpupass install-hook)"),
        ),
    });
}

/// Every check, host-wide ones first, then per GPU (`only` restricts the GPUs).
pub fn checks(f: &HostFacts, only: Option<&[PciAddress]>) -> Vec<Check> {
    let mut out = Vec::new();
    iommu_checks(f, &mut out);
    vfio_checks(f, &mut out);
    for gpu in &f.inv.gpus {
        if only.is_some_and(|o| !o.contains(&gpu.address)) {
            continue;
        }
        gpu_checks(f, gpu, &mut out);
    }
    // Quarantined addresses the host no longer shows (a GPU that fell off the bus).
    for (addr, q) in &f.inv.quarantine {
        if f.inv.gpu(*addr).is_none() && only.is_none_or(|o| o.contains(addr)) {
            out.push(quarantine_check(*addr, q));
        }
    }
    libvirt_checks(f, &mut out);
    cloudstack_checks(f, &mut out);
    out
}

fn quarantine_check(gpu: PciAddress, q: &crate::health::Quarantine) -> Check {
    check(
        format!("gpu {gpu} health"),
        Status::Fail,
        format!(
            "quarantined since {} by {}: {}",
            crate::limits::rfc3339(q.since),
            if q.by.is_empty() { "?" } else { &q.by },
            q.reason
        ),
        Some(&format!(
            "fix the cause, then `gpupass quarantine clear {gpu}` (it checks the GPU again first)"
        )),
    )
}

/// Counts per status.
pub fn summary(checks: &[Check]) -> BTreeMap<Status, usize> {
    let mut m = BTreeMap::new();
    for c in checks {
        *m.entry(c.status).or_default() += 1;
    }
    m
}

/// Doctor found failing checks (exit code 13).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("doctor: {0} check(s) failed")]
pub struct ChecksFailed(pub usize);
