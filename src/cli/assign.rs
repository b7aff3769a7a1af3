//! `gpupass attach` and `gpupass detach`: whole GPUs and SR-IOV VFs in and out of a libvirt domain, under the
//! host lock, with a deadline on libvirt so a hung daemon cannot keep the lock.

use std::time::Duration;

use anyhow::Context;

use gpupass::alloc::lease::LeaseStore;
use gpupass::alloc::lock::HostLock;
use gpupass::alloc::plan::{AttachRequest, DetachRequest};
use gpupass::assign::{self, AssignOptions, AssignReport};
use gpupass::libvirt::deadline::Deadline;
use gpupass::libvirt::virt::VirtHypervisor;
use gpupass::libvirt::Impact;

use crate::cli::{print_all, print_json, Global};

/// Flags both verbs share.
#[derive(Debug, Clone)]
pub struct AssignFlags {
    /// `--live`.
    pub live: bool,
    /// `--config`.
    pub config: bool,
    /// `--json`.
    pub json: bool,
    /// `--lock-timeout`.
    pub lock_timeout: Duration,
    /// `--timeout` (live detach).
    pub detach_timeout: Duration,
    /// `--libvirt-timeout`: for connecting, then for the change under the lock.
    pub libvirt_timeout: Duration,
    /// Fit the persistent definition to its GPUs after an attach (`--no-fit` turns it off).
    pub fit: bool,
    /// Attach live although the running domain's window cannot hold the GPUs.
    pub force: bool,
}

impl AssignFlags {
    fn impact(&self) -> Option<Impact> {
        (self.live || self.config).then_some(Impact {
            live: self.live,
            config: self.config,
        })
    }
}

fn print_report(
    r: &AssignReport,
    fit: Option<&crate::cli::fit::FitOutcome>,
    json: bool,
) -> anyhow::Result<()> {
    for w in &r.warnings {
        tracing::warn!("{w}");
    }
    if json {
        let mut v = serde_json::to_value(r)?;
        if let (Some(f), Some(map)) = (fit, v.as_object_mut()) {
            map.insert("fit".into(), serde_json::to_value(f)?);
        }
        return print_json(&v);
    }
    let mut out = String::new();
    let verb = if r.action == "attach" {
        "attached"
    } else {
        "detached"
    };
    let prep = if r.action == "attach" { "to" } else { "from" };
    let what = match (r.live, r.config) {
        (true, true) => "live and config",
        (true, false) => "live only",
        (false, true) => "config only",
        (false, false) => "nothing",
    };
    if r.gpus.is_empty() {
        out.push_str(&format!("no GPUs to {} {prep} {}\n", r.action, r.domain));
    }
    for g in &r.gpus {
        let fns: Vec<String> = g.functions.iter().map(|f| f.to_string()).collect();
        out.push_str(&format!(
            "{verb} {} {} {prep} {} ({what}): {}\n",
            if g.nvswitch {
                "NVSwitch"
            } else if g.vf {
                "VF"
            } else {
                "GPU"
            },
            g.gpu,
            r.domain,
            fns.join(" ")
        ));
    }
    if let Some(f) = fit {
        for c in &f.applied {
            out.push_str(&format!("fitted {}: {c}\n", r.domain));
        }
    }
    print_all(&out)
}

fn options(g: &Global, flags: &AssignFlags) -> anyhow::Result<AssignOptions> {
    Ok(AssignOptions {
        template: g.template()?,
        impact: flags.impact(),
        detach_timeout: flags.detach_timeout,
        leases: Some(LeaseStore::new(&g.run_dir)),
        manage_drivers: g.host_root == std::path::Path::new("/"),
        config: g.settings.clone(),
        ledger: Some(gpupass::usage::Ledger::new(&g.state_dir)),
    })
}

/// What to do, for [`run`].
pub enum Action<'a> {
    /// `gpupass attach`.
    Attach(&'a AttachRequest),
    /// `gpupass detach`.
    Detach(&'a DetachRequest),
}

/// `gpupass attach` / `gpupass detach`: reads the host, connects, takes the host lock, changes
/// the domain, prints the report.
pub fn run(
    g: &Global,
    domain: &str,
    action: Action<'_>,
    flags: &AssignFlags,
) -> anyhow::Result<()> {
    let opts = options(g, flags)?;
    let inv = g.inventory()?;
    let what = match action {
        Action::Attach(_) => format!("attach to '{domain}'"),
        Action::Detach(_) => format!("detach from '{domain}'"),
    };
    let deadline = Deadline::arm(
        flags.libvirt_timeout,
        format!("{what}: connecting to {}", g.uri),
    );
    let hv = VirtHypervisor::open(&g.uri)?;
    drop(deadline);
    let lock = HostLock::acquire(&g.run_dir, flags.lock_timeout)?;
    // A live detach legitimately waits up to --timeout for the guest on top of libvirt's calls.
    let deadline = Deadline::arm(
        flags.libvirt_timeout.saturating_add(flags.detach_timeout),
        what.clone(),
    );
    if let Action::Attach(r) = action {
        if !flags.force {
            refuse_live_misfit(g, &hv, &inv, domain, r, flags)?;
        }
    }
    let report = match action {
        Action::Attach(r) => assign::attach(&hv, &inv, &lock, domain, r, &opts),
        Action::Detach(r) => assign::detach(&hv, &inv, &lock, domain, r, &opts),
    };
    let report = report.context(what.clone())?;
    // The persistent definition gets what its GPUs need; the running one cannot change.
    // A VF needs no 64-bit window or slot layout of the kind a whole GPU does: not fitted.
    let fit = flags.fit && !matches!(action, Action::Attach(r) if r.is_vf());
    let fitted = match (&action, report.config, fit) {
        (Action::Attach(_), true, true) => {
            match crate::cli::fit::apply_config(&hv, g, &inv, domain, &[]) {
                Ok(f) => Some(f),
                // The GPUs are attached; the fit is said plainly, never half-done.
                Err(e) => {
                    tracing::warn!(
                        "GPUs attached to '{domain}', but its definition was not fitted to them: {}; `gpupass fit {domain}` shows what is missing",
                        gpupass::hook::cli::one_line(&format!("{e:#}"))
                    );
                    None
                }
            }
        }
        (Action::Attach(_), true, false) if flags.fit => None,
        (Action::Attach(_), true, false) => {
            tracing::warn!(
                "domain '{domain}' left as it is (--no-fit): `gpupass fit {domain}` shows what its GPUs need"
            );
            None
        }
        _ => None,
    };
    drop(lock);
    drop(deadline);
    print_report(&report, fitted.as_ref(), flags.json)
}

/// Refuses a live attach whose GPUs cannot fit the running domain's window.
fn refuse_live_misfit(
    g: &Global,
    hv: &VirtHypervisor,
    inv: &gpupass::host::discover::Inventory,
    domain: &str,
    request: &AttachRequest,
    flags: &AssignFlags,
) -> anyhow::Result<()> {
    let live = flags.impact().map(|i| i.live);
    match gpupass::refit::live_misfit(hv, &g.host_root, &g.settings, inv, domain, request, live)? {
        Some(why) => Err(gpupass::assign::AssignError::Impact(why).into()),
        None => Ok(()),
    }
}
