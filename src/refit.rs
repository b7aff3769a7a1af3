//! Fits a domain's persistent definition through the hypervisor: plans from the definition
//! libvirt keeps, defines the fitted XML, re-reads it and checks again. Used by the CLI's
//! `attach --config` and `fit --apply` and by the agent's API attach; the deciding is `fit`'s.

use std::path::Path;

use serde::Serialize;

use crate::config::GpupassConfig;
use crate::fit::plan::FitPlan;
use crate::fit::{self, FitError, Fitted};
use crate::host::discover::Inventory;
use crate::host::sysfs::Sysfs;
use crate::libvirt::{Hypervisor, LibvirtError, XmlView};
use crate::model::PciAddress;

/// Errors from fitting a definition through libvirt.
#[derive(Debug, thiserror::Error)]
pub enum RefitError {
    /// Planning or judging the fit failed.
    #[error(transparent)]
    Fit(#[from] FitError),
    /// libvirt could not be read or refused the definition.
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    /// The fitted definition libvirt kept still does not fit (the proof failed).
    #[error("after defining the fitted domain: {0}")]
    NotKept(FitError),
}

impl RefitError {
    /// The documented exit code (the table in `gpupass --help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            RefitError::Fit(e) | RefitError::NotKept(e) => e.exit_code(),
            RefitError::Libvirt(e) => e.exit_code(),
        }
    }
}

/// What a fit found and did.
#[derive(Debug, Clone, Serialize)]
pub struct FitOutcome {
    /// The domain.
    pub domain: String,
    /// The plan for the definition as it was.
    pub plan: FitPlan,
    /// The changes written (empty without `--apply`, or when nothing was missing).
    pub applied: Vec<String>,
    /// The changes `--apply` would write.
    pub would_apply: Vec<String>,
}

/// Plans the fit of `xml` for the GPUs it holds plus `extra`, with the config's vendor options
/// (pure but for reading BARs and the host's address bits under `host_root`).
pub fn plan_for(
    host_root: &Path,
    settings: &GpupassConfig,
    inv: &Inventory,
    xml: &str,
    extra: &[PciAddress],
) -> Result<Fitted, FitError> {
    let sysfs = Sysfs::new(host_root);
    let gpus = fit::domain_gpus(inv, xml, extra)?;
    let bars = fit::read_bars(&sysfs, inv, &gpus)?;
    let name = crate::xml::domain::parse(xml).map_err(FitError::Xml)?.name;
    let vendor = fit::vendor_options(settings, &name, inv, &gpus);
    fit::fit_xml_fabric(
        xml,
        &bars,
        sysfs.host_phys_bits()?,
        vendor,
        fit::fabric(inv),
    )
}

/// Fits the persistent definition of `name` for the GPUs it holds plus `extra`, defining the
/// result; the caller holds the host lock. A fit that cannot work writes nothing and is an
/// error.
pub fn apply_config(
    hv: &dyn Hypervisor,
    host_root: &Path,
    settings: &GpupassConfig,
    inv: &Inventory,
    name: &str,
    extra: &[PciAddress],
) -> Result<FitOutcome, RefitError> {
    let xml = hv.domain_xml(name, XmlView::Config)?;
    let fitted = plan_for(host_root, settings, inv, &xml, extra)?;
    let changes: Vec<String> = fitted.plan.changes.iter().map(|c| c.describe()).collect();
    if let Some(e @ FitError::CannotFit { .. }) = FitError::verdict(name, &fitted.plan) {
        return Err(e.into());
    }
    let Some(new) = fitted.xml.clone() else {
        return Ok(FitOutcome {
            domain: name.to_owned(),
            plan: fitted.plan,
            applied: Vec::new(),
            would_apply: Vec::new(),
        });
    };
    hv.define(name, &new)?;
    // The definition libvirt keeps is the proof.
    let kept = hv.domain_xml(name, XmlView::Config)?;
    let after = plan_for(host_root, settings, inv, &kept, extra)?;
    if let Some(e) = FitError::verdict(name, &after.plan) {
        return Err(RefitError::NotKept(e));
    }
    tracing::info!(domain = name, changes = changes.len(), "domain fitted");
    Ok(FitOutcome {
        domain: name.to_owned(),
        plan: fitted.plan,
        applied: changes,
        would_apply: Vec::new(),
    })
}

/// Why a live attach of `new` GPUs to the running domain cannot work, or `None` when it can:
/// a hot-plugged GPU gets only what the running guest was booted with — QEMU's 64-bit PCI
/// hole and its phys-bits — and no firmware runs again to size anything.
pub fn live_refusal(
    host_root: &Path,
    settings: &GpupassConfig,
    inv: &Inventory,
    name: &str,
    live_xml: &str,
    new: &[PciAddress],
) -> Result<Option<String>, FitError> {
    let fitted = plan_for(host_root, settings, inv, live_xml, new)?;
    let p = &fitted.plan;
    if p.not_applicable.is_some() {
        return Ok(None);
    }
    let short: Vec<String> = p
        .checks
        .iter()
        .filter(|c| {
            c.status != crate::fit::plan::Status::Ok
                && matches!(c.item.as_str(), "pcihole64" | "phys-bits")
        })
        .map(|c| format!("{} has {}, needs {}", c.item, c.have, c.need))
        .chain(p.certain_failure.clone())
        .collect();
    if short.is_empty() {
        return Ok(None);
    }
    let gpus: Vec<String> = new.iter().map(PciAddress::to_string).collect();
    Ok(Some(format!(
        "GPU {} needs a {} 64-bit window in running domain '{name}', which cannot give it ({}); attach with --config and restart the domain, or --force",
        gpus.join(", "),
        crate::fit::bars::human(p.need.total),
        short.join("; ")
    )))
}

/// The live-attach check of an attach request: `Some(why)` when the GPUs it would hot-plug
/// into the running domain cannot fit its window (`live` = whether this attach changes the
/// running domain; `None` = as libvirt decides: when it runs).
pub fn live_misfit(
    hv: &dyn Hypervisor,
    host_root: &Path,
    settings: &GpupassConfig,
    inv: &Inventory,
    domain: &str,
    request: &crate::alloc::plan::AttachRequest,
    live: Option<bool>,
) -> Result<Option<String>, RefitError> {
    use crate::alloc::plan::{plan_attach, AttachRequest};
    let info = hv.domain(domain)?;
    if !live.unwrap_or(info.active) || !info.active {
        return Ok(None);
    }
    let xml = hv.domain_xml(domain, XmlView::Live)?;
    let gpus: Vec<PciAddress> = match request {
        AttachRequest::Gpus(g) => g.clone(),
        // A VF's BARs are small and not fitted (see README: asking for a virtual function).
        AttachRequest::Vfs(_) | AttachRequest::VfCount { .. } => return Ok(None),
        AttachRequest::Count { .. } | AttachRequest::HgxFull => {
            let Ok(holdings) = crate::assign::read_holdings(hv) else {
                // The attach itself reads them again and says what failed.
                return Ok(None);
            };
            let facts = crate::xml::domain::parse(&xml).map_err(FitError::Xml)?;
            let prefer = crate::assign::preferred_nodes(inv, &facts);
            match plan_attach(inv, &holdings, domain, request, &prefer) {
                Ok(p) => p.gpus,
                // The attach itself says why none can be given.
                Err(_) => return Ok(None),
            }
        }
    };
    Ok(live_refusal(host_root, settings, inv, domain, &xml, &gpus)?)
}
