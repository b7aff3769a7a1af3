//! `gpupass fit DOMAIN`: what the domain's GPUs need to work in the guest (64-bit window,
//! phys-bits, pcihole64, root ports, slot layout), and with `--apply` the persistent definition
//! changed so they do. Also the fit `attach --config` applies by default.

use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use gpupass::alloc::lock::HostLock;
use gpupass::alloc::plan::{plan_attach, AttachRequest};
use gpupass::assign::{preferred_nodes, read_holdings};
use gpupass::fit::{self, FitError};
use gpupass::host::discover::Inventory;
use gpupass::libvirt::deadline::Deadline;
use gpupass::libvirt::virt::VirtHypervisor;
use gpupass::libvirt::{Hypervisor, XmlView};
use gpupass::model::PciAddress;

use crate::cli::{print_all, print_json, Global};

/// `gpupass fit` flags.
#[derive(Debug, Clone)]
pub struct FitFlags {
    /// `--json`.
    pub json: bool,
    /// `--apply`.
    pub apply: bool,
    /// `--lock-timeout`.
    pub lock_timeout: Duration,
    /// `--libvirt-timeout`.
    pub libvirt_timeout: Duration,
}

pub use gpupass::refit::FitOutcome;

/// Plans the fit of `xml` for the GPUs it holds plus `extra`, with the config's vendor options
/// (pure but for reading BARs).
pub fn plan_for(
    g: &Global,
    inv: &Inventory,
    xml: &str,
    extra: &[PciAddress],
) -> anyhow::Result<fit::Fitted> {
    gpupass::refit::plan_for(&g.host_root, &g.settings, inv, xml, extra)
        .with_context(|| format!("fitting with host root {}", g.host_root.display()))
}

/// Fits the persistent definition of `name` for the GPUs it holds plus `extra`, defining the
/// result; the caller holds the host lock (see `gpupass::refit::apply_config`).
pub fn apply_config(
    hv: &dyn Hypervisor,
    g: &Global,
    inv: &Inventory,
    name: &str,
    extra: &[PciAddress],
) -> anyhow::Result<FitOutcome> {
    Ok(gpupass::refit::apply_config(
        hv,
        &g.host_root,
        &g.settings,
        inv,
        name,
        extra,
    )?)
}

/// The text of an outcome.
pub fn outcome_text(o: &FitOutcome) -> String {
    let mut out = fit::describe(&o.plan, &o.domain);
    for c in &o.applied {
        out.push_str(&format!("  changed: {c}\n"));
    }
    for c in &o.would_apply {
        out.push_str(&format!("  --apply would set: {c}\n"));
    }
    out
}

/// `gpupass fit DOMAIN [--gpu …|--count N] [--json] [--apply]`.
pub fn fit(
    g: &Global,
    name: &str,
    request: Option<&AttachRequest>,
    flags: &FitFlags,
) -> anyhow::Result<()> {
    let inv = g.inventory()?;
    let deadline = Deadline::arm(
        flags.libvirt_timeout,
        format!("fit '{name}': connecting to {}", g.uri),
    );
    let hv = VirtHypervisor::open(&g.uri)?;
    drop(deadline);
    let _deadline = Deadline::arm(flags.libvirt_timeout, format!("fit '{name}'"));
    let info = hv.domain(name)?;
    let view = if info.persistent {
        XmlView::Config
    } else {
        XmlView::Live
    };
    let xml = hv.domain_xml(name, view)?;
    let extra: Vec<PciAddress> = match request {
        None => Vec::new(),
        Some(AttachRequest::Gpus(g)) => g.clone(),
        // Not asked by `fit` (it takes no --vgpu); VFs are not fitted.
        Some(AttachRequest::Vfs(_) | AttachRequest::VfCount { .. }) => Vec::new(),
        Some(r @ (AttachRequest::Count { .. } | AttachRequest::HgxFull)) => {
            let holdings = read_holdings(&hv)?;
            let facts = gpupass::xml::domain::parse(&xml)?;
            plan_attach(&inv, &holdings, name, r, &preferred_nodes(&inv, &facts))?.gpus
        }
    };
    for a in &extra {
        if inv.gpu(*a).is_none() {
            return Err(gpupass::alloc::AllocError::UnknownGpu { address: *a }.into());
        }
    }
    let outcome = if flags.apply {
        if !info.persistent {
            anyhow::bail!(
                "--apply: domain '{name}' is transient (no persistent definition to change)"
            );
        }
        let _lock = HostLock::acquire(&g.run_dir, flags.lock_timeout)?;
        let o = apply_config(&hv, g, &inv, name, &extra)?;
        if info.active && !o.applied.is_empty() {
            tracing::warn!(
                "domain '{name}' is running: the fitted definition takes effect at its next start"
            );
        }
        o
    } else {
        let fitted = plan_for(g, &inv, &xml, &extra)?;
        FitOutcome {
            domain: name.to_owned(),
            would_apply: if fitted.plan.impossible() {
                Vec::new()
            } else {
                fitted.plan.changes.iter().map(|c| c.describe()).collect()
            },
            plan: fitted.plan,
            applied: Vec::new(),
        }
    };
    if flags.json {
        print_json(&outcome)?;
    } else {
        print_all(&outcome_text(&outcome))?;
    }
    if !flags.apply {
        if let Some(e) = FitError::verdict(name, &outcome.plan) {
            return Err(e.into());
        }
    }
    Ok(())
}

/// One domain's line in `fit --all`.
#[derive(Debug, Clone, Serialize)]
pub struct DomainFit {
    /// The domain.
    pub domain: String,
    /// `ok`, `missing`, `impossible` or `not-fitted`.
    pub status: &'static str,
    /// What is missing or impossible, or why it is not fitted.
    pub detail: String,
    /// The command that fixes it, when one does.
    pub fix: Option<String>,
}

/// `gpupass fit --all`: every domain holding a GPU of this host (its persistent definition, else
/// the running one), judged; exit 17 when one cannot fit, else 16 when one lacks something.
pub fn fit_all(g: &Global, flags: &FitFlags) -> anyhow::Result<()> {
    let inv = g.inventory()?;
    let deadline = Deadline::arm(
        flags.libvirt_timeout,
        format!("fit --all: connecting to {}", g.uri),
    );
    let hv = VirtHypervisor::open(&g.uri)?;
    drop(deadline);
    let _deadline = Deadline::arm(flags.libvirt_timeout, "fit --all".into());
    let mut rows = Vec::new();
    for d in hv.domains()? {
        let view = if d.persistent {
            XmlView::Config
        } else {
            XmlView::Live
        };
        let xml = match hv.domain_xml(&d.name, view) {
            Ok(x) => x,
            Err(gpupass::libvirt::LibvirtError::UnknownDomain { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        if fit::domain_gpus(&inv, &xml, &[])?.is_empty() {
            continue;
        }
        let p = plan_for(g, &inv, &xml, &[])?.plan;
        let row = match (&p.not_applicable, FitError::verdict(&d.name, &p)) {
            (Some(why), _) => DomainFit {
                domain: d.name.clone(),
                status: "not-fitted",
                detail: why.clone(),
                fix: None,
            },
            (None, None) => DomainFit {
                domain: d.name.clone(),
                status: "ok",
                detail: format!("{} window", gpupass::fit::bars::human(p.need.total)),
                fix: None,
            },
            (None, Some(FitError::DoesNotFit { missing, .. })) => DomainFit {
                domain: d.name.clone(),
                status: "missing",
                detail: missing,
                fix: Some(if d.persistent {
                    format!("gpupass fit {} --apply", d.name)
                } else {
                    "define the domain, then gpupass fit --apply".into()
                }),
            },
            (None, Some(e)) => DomainFit {
                domain: d.name.clone(),
                status: "impossible",
                detail: e.to_string(),
                fix: None,
            },
        };
        rows.push(row);
    }
    if flags.json {
        print_json(&rows)?;
    } else {
        let mut out = String::new();
        if rows.is_empty() {
            out.push_str("no domain holds a GPU of this host\n");
        }
        for r in &rows {
            out.push_str(&format!(
                "{:<10} {}: {}{}\n",
                r.status,
                r.domain,
                r.detail,
                r.fix
                    .as_ref()
                    .map(|f| format!(" — fix: {f}"))
                    .unwrap_or_default()
            ));
        }
        print_all(&out)?;
    }
    if let Some(r) = rows.iter().find(|r| r.status == "impossible") {
        return Err(FitError::CannotFit {
            domain: r.domain.clone(),
            why: r.detail.clone(),
        }
        .into());
    }
    let missing: Vec<&str> = rows
        .iter()
        .filter(|r| r.status == "missing")
        .map(|r| r.domain.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(FitError::SomeDoNotFit {
            domains: missing.join(", "),
        }
        .into());
    }
    Ok(())
}
