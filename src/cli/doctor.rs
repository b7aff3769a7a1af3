//! `gpupass doctor`: is this host ready for GPU passthrough, check by check, with the fix.

use serde::Serialize;

use gpupass::alloc::AllocError;
use gpupass::assign::read_holdings;
use gpupass::host::doctor::{checks, summary, Check, ChecksFailed, LibvirtFacts, Status};
use gpupass::host::probe::gather;
use gpupass::host::sysfs::Sysfs;
use gpupass::libvirt::virt::VirtHypervisor;
use gpupass::model::PciAddress;
use gpupass::xml::caps::pci_backends;

use crate::cli::{print_all, print_json, Global};

#[derive(Serialize)]
struct Report<'a> {
    checks: &'a [Check],
    ok: usize,
    warn: usize,
    fail: usize,
    skipped: usize,
}

fn libvirt_facts(uri: &str) -> LibvirtFacts {
    match VirtHypervisor::open(uri) {
        Ok(hv) => LibvirtFacts {
            uri: uri.to_owned(),
            reachable: Ok(()),
            pci_backends: hv
                .domain_capabilities()
                .ok()
                .and_then(|x| pci_backends(&x).ok()),
            holdings: read_holdings(&hv)
                .map_err(|e| tracing::warn!("{e}; partly attached GPUs are not checked"))
                .ok(),
        },
        Err(e) => LibvirtFacts {
            uri: uri.to_owned(),
            reachable: Err(e.to_string()),
            pci_backends: None,
            holdings: None,
        },
    }
}

fn word(s: Status) -> &'static str {
    match s {
        Status::Ok => "ok",
        Status::Warn => "warn",
        Status::Fail => "FAIL",
        Status::Skipped => "skip",
    }
}

/// Runs every check; exit 13 when any fails.
pub fn doctor(g: &Global, gpus: &[PciAddress], json: bool, offline: bool) -> anyhow::Result<()> {
    let mut facts = gather(&Sysfs::new(&g.host_root))?;
    facts.inv.quarantine = gpupass::health::store::HealthStore::new(&g.state_dir)
        .read()?
        .quarantined;
    let mut only = Vec::new();
    for a in gpus {
        let gpu = facts
            .inv
            .gpu(*a)
            .ok_or(AllocError::UnknownGpu { address: *a })?;
        only.push(gpu.address);
    }
    if !offline {
        facts.libvirt = Some(libvirt_facts(&g.uri));
    }
    let list = checks(&facts, (!gpus.is_empty()).then_some(only.as_slice()));
    let counts = summary(&list);
    let n = |s| counts.get(&s).copied().unwrap_or(0);
    if json {
        print_json(&Report {
            checks: &list,
            ok: n(Status::Ok),
            warn: n(Status::Warn),
            fail: n(Status::Fail),
            skipped: n(Status::Skipped),
        })?;
    } else {
        let width = list.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for c in &list {
            out.push_str(&format!(
                "{:<5} {:<width$}  {}\n",
                word(c.status),
                c.name,
                c.seen
            ));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("{:<5} {:<width$}  fix: {fix}\n", "", ""));
            }
        }
        out.push_str(&format!(
            "{} ok, {} warnings, {} failed, {} skipped\n",
            n(Status::Ok),
            n(Status::Warn),
            n(Status::Fail),
            n(Status::Skipped)
        ));
        print_all(&out)?;
    }
    match n(Status::Fail) {
        0 => Ok(()),
        failed => Err(ChecksFailed(failed).into()),
    }
}
