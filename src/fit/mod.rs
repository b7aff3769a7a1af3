//! Fits a domain to its GPUs so they work in the guest: the 64-bit MMIO aperture their BARs
//! need, the guest's physical address bits, PCIe root ports and each card's own slot layout.
//! `bars` reads BARs from sysfs; `domain` reads a domain XML; `plan` decides (pure); `rewrite`
//! edits the XML byte for byte (pure). Never calls libvirt: callers read and define.

pub mod bars;
pub mod domain;
pub mod plan;
pub mod rewrite;

use std::collections::BTreeSet;

use crate::config::GpupassConfig;
use crate::fit::bars::{read_gpu_bars, GpuBars};
use crate::fit::plan::{Fabric, FitPlan, FitRequest, VendorOptions};
use crate::host::discover::Inventory;
use crate::host::sysfs::{Sysfs, SysfsError};
use crate::model::PciAddress;
use crate::xml::XmlError;

/// Errors from fitting a domain.
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    /// The domain XML cannot be read.
    #[error(transparent)]
    Xml(XmlError),
    /// The host root cannot be read.
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
    /// A function's `resource` file is not what the kernel writes.
    #[error("the resource file of {function} is malformed: {reason}")]
    Resource {
        /// The function.
        function: PciAddress,
        /// What is wrong.
        reason: String,
    },
    /// The domain is written in a way the fit cannot edit safely.
    #[error("cannot fit this domain: {0}")]
    Unsupported(String),
    /// The domain lacks pieces its GPUs need (`fit --apply` adds them).
    #[error("domain '{domain}' does not fit its GPUs: {missing} missing (gpupass fit {domain} --apply adds them)")]
    DoesNotFit {
        /// The domain.
        domain: String,
        /// The missing pieces.
        missing: String,
    },
    /// `fit --all`: these domains lack pieces their GPUs need.
    #[error("domain(s) {domains} lack what their GPUs need (gpupass fit DOMAIN --apply adds it)")]
    SomeDoNotFit {
        /// The domains, comma-separated.
        domains: String,
    },
    /// The GPUs cannot work in the domain on this host.
    #[error("domain '{domain}' cannot fit its GPUs on this host: {why}")]
    CannotFit {
        /// The domain.
        domain: String,
        /// Why.
        why: String,
    },
}

impl FitError {
    /// The documented exit code (the table in `gpupass --help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            FitError::Xml(_) | FitError::Unsupported(_) => 2,
            FitError::Sysfs(_) | FitError::Resource { .. } => 1,
            FitError::DoesNotFit { .. } | FitError::SomeDoNotFit { .. } => 16,
            FitError::CannotFit { .. } => 17,
        }
    }

    /// The verdict of a plan as an error: `None` when it fits (or does not apply).
    pub fn verdict(domain: &str, plan: &FitPlan) -> Option<FitError> {
        if plan.impossible() {
            let why: Vec<String> = plan
                .checks
                .iter()
                .filter(|c| c.status == plan::Status::Fail)
                .map(|c| format!("{}: {}", c.item, c.why))
                .collect();
            return Some(FitError::CannotFit {
                domain: domain.to_owned(),
                why: why.join("; "),
            });
        }
        if plan.fits() {
            return None;
        }
        let missing: Vec<&str> = plan
            .checks
            .iter()
            .filter(|c| c.status == plan::Status::Missing)
            .map(|c| c.item.as_str())
            .collect();
        Some(FitError::DoesNotFit {
            domain: domain.to_owned(),
            missing: missing.join(", "),
        })
    }
}

/// A fit: the plan and, when it changes anything, the new XML.
#[derive(Debug, Clone)]
pub struct Fitted {
    /// The plan.
    pub plan: FitPlan,
    /// The rewritten XML; `None` when nothing changes.
    pub xml: Option<String>,
}

/// Fits `xml` for `gpus` (pure): plans, and rewrites when something is missing and nothing is
/// impossible (a fit that cannot work writes nothing).
pub fn fit_xml(
    xml: &str,
    gpus: &[GpuBars],
    host_phys_bits: Option<u8>,
) -> Result<Fitted, FitError> {
    fit_xml_with(xml, gpus, host_phys_bits, VendorOptions::default())
}

/// [`fit_xml`] with the opt-in vendor options that apply.
pub fn fit_xml_with(
    xml: &str,
    gpus: &[GpuBars],
    host_phys_bits: Option<u8>,
    vendor: VendorOptions,
) -> Result<Fitted, FitError> {
    fit_layout(&domain::scan(xml)?, gpus, host_phys_bits, vendor)
}

/// [`fit_xml_with`] that also judges HGX full passthrough against the host's fabric.
pub fn fit_xml_fabric(
    xml: &str,
    gpus: &[GpuBars],
    host_phys_bits: Option<u8>,
    vendor: VendorOptions,
    fabric: Option<Fabric>,
) -> Result<Fitted, FitError> {
    let layout = domain::scan(xml)?;
    let plan = plan::plan(
        &layout,
        &FitRequest {
            gpus,
            host_phys_bits,
            vendor,
            fabric,
        },
    );
    finish(&layout, plan)
}

/// The host's HGX fabric (pure): its NVIDIA NVSwitches (class 0680) and NVIDIA GPUs; `None`
/// without switches.
pub fn fabric(inv: &Inventory) -> Option<Fabric> {
    let switches = inv.nvswitches();
    if switches.is_empty() {
        return None;
    }
    Some(Fabric {
        switches,
        gpus: inv.fabric_gpus(),
    })
}

/// [`fit_xml_with`] on a domain already scanned.
pub fn fit_layout(
    layout: &domain::DomainLayout<'_>,
    gpus: &[GpuBars],
    host_phys_bits: Option<u8>,
    vendor: VendorOptions,
) -> Result<Fitted, FitError> {
    let plan = plan::plan(
        layout,
        &FitRequest {
            gpus,
            host_phys_bits,
            vendor,
            fabric: None,
        },
    );
    finish(layout, plan)
}

fn finish(layout: &domain::DomainLayout<'_>, plan: FitPlan) -> Result<Fitted, FitError> {
    let xml = if plan.changes.is_empty() || plan.impossible() {
        None
    } else {
        Some(rewrite::rewrite(layout, &plan)?)
    };
    Ok(Fitted { plan, xml })
}

/// The GPUs of the inventory that a domain XML holds (any of their functions as a hostdev),
/// plus `extra` GPUs (addresses of any of their functions), each once, in address order.
pub fn domain_gpus(
    inv: &Inventory,
    xml: &str,
    extra: &[PciAddress],
) -> Result<Vec<PciAddress>, FitError> {
    Ok(layout_gpus(inv, &domain::scan(xml)?, extra))
}

/// [`domain_gpus`] of a domain already scanned.
pub fn layout_gpus(
    inv: &Inventory,
    layout: &domain::DomainLayout<'_>,
    extra: &[PciAddress],
) -> Vec<PciAddress> {
    let mut out: BTreeSet<PciAddress> = BTreeSet::new();
    for a in layout
        .hostdevs
        .iter()
        .map(|h| h.source)
        .chain(extra.iter().copied())
    {
        if let Some(g) = inv.gpu(a) {
            out.insert(g.address);
        }
    }
    out.into_iter().collect()
}

/// The vendor options the config's `[[guest]]` entries give domain `name` for `gpus` (pure).
pub fn vendor_options(
    config: &GpupassConfig,
    name: &str,
    inv: &Inventory,
    gpus: &[PciAddress],
) -> VendorOptions {
    let mut v = VendorOptions::default();
    for gpu in gpus {
        let Some(id) = inv.device(*gpu).map(|d| d.id) else {
            continue;
        };
        for g in config.guest_options(name, id) {
            v.hide_hypervisor |= g.hide_hypervisor;
            if v.hyperv_vendor_id.is_none() {
                v.hyperv_vendor_id.clone_from(&g.hyperv_vendor_id);
            }
            if let Some(r) = &g.rom {
                if !v.rom.iter().any(|(a, _)| a == gpu) {
                    v.rom.push((*gpu, r.clone()));
                }
            }
        }
    }
    v
}

/// Reads the BARs of these GPUs (IO).
pub fn read_bars(
    sysfs: &Sysfs,
    inv: &Inventory,
    gpus: &[PciAddress],
) -> Result<Vec<GpuBars>, FitError> {
    gpus.iter()
        .filter_map(|a| inv.gpu(*a))
        .map(|g| read_gpu_bars(sysfs, g))
        .collect()
}

/// A plan as text: what the GPUs need, each check, and the changes.
pub fn describe(plan: &FitPlan, domain: &str) -> String {
    use crate::fit::bars::human;
    let mut o = String::new();
    if let Some(why) = &plan.not_applicable {
        o.push_str(&format!("domain '{domain}': not fitted ({why})\n"));
        return o;
    }
    o.push_str(&format!(
        "domain '{domain}': {} GPU(s) need a {} 64-bit window and {} guest address bits\n",
        plan.need.windows.len(),
        human(plan.need.total),
        plan.phys_bits_needed
    ));
    for w in &plan.need.windows {
        o.push_str(&format!(
            "  GPU {}: 64-bit prefetchable BARs {} -> window {}\n",
            w.gpu,
            human(w.bars),
            human(w.window)
        ));
    }
    for c in &plan.checks {
        let word = match c.status {
            plan::Status::Ok => "ok     ",
            plan::Status::Missing => "MISSING",
            plan::Status::Fail => "FAIL   ",
        };
        o.push_str(&format!(
            "  {word} {:<14} have {}; need {} — {}\n",
            c.item, c.have, c.need, c.why
        ));
    }
    if let Some(f) = &plan.certain_failure {
        o.push_str(&format!("  as it is, the start cannot work: {f}\n"));
    }
    o
}
