//! `gpupass attach` and `gpupass detach`: whole GPUs in and out of a libvirt domain, under the
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
}

impl AssignFlags {
    fn impact(&self) -> Option<Impact> {
        (self.live || self.config).then_some(Impact {
            live: self.live,
            config: self.config,
        })
    }
}

fn print_report(r: &AssignReport, json: bool) -> anyhow::Result<()> {
    for w in &r.warnings {
        tracing::warn!("{w}");
    }
    if json {
        return print_json(r);
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
            "{verb} GPU {} {prep} {} ({what}): {}\n",
            g.gpu,
            r.domain,
            fns.join(" ")
        ));
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
    let report = match action {
        Action::Attach(r) => assign::attach(&hv, &inv, &lock, domain, r, &opts),
        Action::Detach(r) => assign::detach(&hv, &inv, &lock, domain, r, &opts),
    };
    drop(lock);
    drop(deadline);
    let report = report.context(what)?;
    print_report(&report, flags.json)
}
