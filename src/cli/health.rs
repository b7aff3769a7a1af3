//! `gpupass health` and `gpupass quarantine`: check GPUs by hand, and list, add or clear
//! quarantines. Reads the host root and the state dir's health file; never calls libvirt.

use std::collections::BTreeSet;

use serde::Serialize;

use gpupass::health::check::{self, target_for, Target};
use gpupass::health::store::HealthStore;
use gpupass::health::{HealthError, Quarantine};
use gpupass::host::sysfs::Sysfs;
use gpupass::limits::rfc3339;
use gpupass::model::PciAddress;
use gpupass::usage::{unix_now, Ledger, Record};

use crate::cli::{print_all, print_json, Global};

/// One GPU as `health --json` prints it.
#[derive(Debug, Serialize)]
struct HealthLine {
    address: PciAddress,
    /// `ok` or `quarantined`.
    state: &'static str,
    /// This check failed.
    failed: bool,
    /// What this check found wrong.
    problems: Vec<String>,
    /// What it noticed without failing.
    notes: Vec<String>,
    /// The quarantine's reason (the first failure's), when quarantined.
    reason: Option<String>,
    /// Since when, RFC 3339.
    since: Option<String>,
    /// This check quarantined it.
    newly_quarantined: bool,
}

/// `gpupass health [ADDR…]`: checks the GPUs (default: every GPU but the host's console, every
/// quarantined address, and every GPU of the ledger's sessions that the host no longer shows),
/// quarantines those that fail; exit 18 when any fails.
pub fn health(g: &Global, addrs: &[PciAddress], json: bool) -> anyhow::Result<()> {
    let inv = g.inventory()?;
    let store = HealthStore::new(&g.state_dir);
    let state = store.read()?;
    // GPUs domains have used (the ledger's sessions): one of them the host no longer shows
    // is a GPU that left the bus, and is checked (and found gone) like any other.
    let gone: BTreeSet<PciAddress> = Ledger::new(&g.state_dir)
        .read()?
        .records
        .iter()
        .filter_map(|r| match r {
            Record::Start { gpus, .. } => Some(gpus),
            Record::Stop { .. } => None,
        })
        .flatten()
        .filter(|a| inv.gpu(**a).is_none())
        .copied()
        .collect();
    let target = |a: PciAddress| match target_for(&inv, &state, a) {
        Err(HealthError::UnknownGpu { .. }) if gone.contains(&a) => Ok(Target {
            gpu: a,
            functions: vec![a],
        }),
        r => r,
    };
    let mut targets: Vec<Target> = Vec::new();
    let mut add = |t: Target| {
        if !targets.iter().any(|x| x.gpu == t.gpu) {
            targets.push(t);
        }
    };
    if addrs.is_empty() {
        for gpu in &inv.gpus {
            let console = gpu
                .functions
                .iter()
                .any(|f| inv.device(*f).is_some_and(|d| d.boot_vga));
            if !console || state.quarantined.contains_key(&gpu.address) {
                add(target(gpu.address)?);
            }
        }
        for a in state.quarantined.keys().chain(&gone) {
            add(target(*a)?);
        }
    } else {
        for a in addrs {
            add(target(*a)?);
        }
    }
    let checks = check::check(
        &Sysfs::new(&g.host_root),
        &store,
        &targets,
        "gpupass health",
        unix_now(),
    )?;
    let lines: Vec<HealthLine> = checks
        .iter()
        .map(|c| HealthLine {
            address: c.gpu,
            state: if c.quarantine.is_some() {
                "quarantined"
            } else {
                "ok"
            },
            failed: !c.judgement.healthy(),
            problems: c
                .judgement
                .problems
                .iter()
                .map(ToString::to_string)
                .collect(),
            notes: c.judgement.notes.clone(),
            reason: c.quarantine.as_ref().map(|q| q.reason.clone()),
            since: c.quarantine.as_ref().map(|q| rfc3339(q.since)),
            newly_quarantined: c.newly_quarantined,
        })
        .collect();
    if json {
        print_json(&serde_json::json!({ "gpus": lines }))?;
    } else {
        let mut out = String::new();
        for l in &lines {
            let word = match (l.failed, l.state) {
                (true, _) if l.newly_quarantined => "FAIL, quarantined now",
                (true, _) => "FAIL, quarantined",
                (false, "quarantined") => {
                    "passes now, still quarantined (`gpupass quarantine clear` it)"
                }
                _ => "ok",
            };
            out.push_str(&format!("{}  {word}\n", l.address));
            for p in &l.problems {
                out.push_str(&format!("  {p}\n"));
            }
            for n in &l.notes {
                out.push_str(&format!("  note: {n}\n"));
            }
        }
        if lines.is_empty() {
            out.push_str("(no GPUs to check)\n");
        }
        print_all(&out)?;
    }
    let failed: Vec<String> = lines
        .iter()
        .filter(|l| l.failed)
        .map(|l| l.address.to_string())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(HealthError::Failed {
            count: failed.len(),
            gpus: failed.join(", "),
        }
        .into())
    }
}

/// `gpupass quarantine list`.
pub fn list(g: &Global, json: bool) -> anyhow::Result<()> {
    let state = HealthStore::new(&g.state_dir).read()?;
    if json {
        let gpus: Vec<serde_json::Value> = state
            .quarantined
            .iter()
            .map(|(a, q)| {
                serde_json::json!({
                    "address": a, "reason": q.reason, "since": rfc3339(q.since), "by": q.by,
                })
            })
            .collect();
        return print_json(&serde_json::json!({ "quarantined": gpus }));
    }
    let mut out = String::new();
    for (a, q) in &state.quarantined {
        out.push_str(&format!(
            "{a}  since {}  by {}\n  {}\n",
            rfc3339(q.since),
            if q.by.is_empty() { "?" } else { &q.by },
            q.reason
        ));
    }
    if out.is_empty() {
        out.push_str("no GPU is quarantined\n");
    }
    print_all(&out)
}

/// `gpupass quarantine add ADDR --reason TEXT`.
pub fn add(g: &Global, addr: PciAddress, reason: &str) -> anyhow::Result<()> {
    let inv = g.inventory()?;
    let gpu = inv
        .gpu(addr)
        .ok_or(gpupass::alloc::AllocError::UnknownGpu { address: addr })?
        .address;
    let reason = gpupass::hook::cli::one_line(reason);
    let new = HealthStore::new(&g.state_dir).quarantine(
        gpu,
        Quarantine {
            reason: reason.clone(),
            since: unix_now(),
            by: "by hand".into(),
        },
    )?;
    if new {
        tracing::warn!(gpu = %gpu, reason = %reason, "GPU quarantined by hand");
        print_all(&format!("quarantined {gpu}: {reason}\n"))
    } else {
        print_all(&format!(
            "{gpu} was already quarantined; its first reason stays (see `gpupass quarantine list`)\n"
        ))
    }
}

/// `gpupass quarantine clear ADDR [--force]`.
pub fn clear(g: &Global, addr: PciAddress, force: bool) -> anyhow::Result<()> {
    let inv = g.inventory()?;
    let store = HealthStore::new(&g.state_dir);
    let target = match target_for(&inv, &store.read()?, addr) {
        Ok(t) => t,
        Err(HealthError::UnknownGpu { .. }) => {
            return Err(HealthError::NotQuarantined { gpu: addr }.into())
        }
        Err(e) => return Err(e.into()),
    };
    let old = check::clear(&Sysfs::new(&g.host_root), &store, &target, force)?;
    print_all(&format!(
        "cleared {} (quarantined since {}: {})\n",
        target.gpu,
        rfc3339(old.since),
        old.reason
    ))
}

/// `gpupass health ADDR… --recover`: for each GPU that fails its check, the recovery steps
/// until one passes; exit 18 when a GPU still fails after them all.
pub fn recover(g: &Global, addrs: &[PciAddress]) -> anyhow::Result<()> {
    let inv = g.inventory()?;
    let store = HealthStore::new(&g.state_dir);
    let state = store.read()?;
    let sysfs = Sysfs::new(&g.host_root);
    let running = gpupass::libvirt::files::running_holdings(&g.host_root, "", None)?;
    let mut out = String::new();
    let mut failed = Vec::new();
    for a in addrs {
        let target = target_for(&inv, &state, *a)?;
        let now = check::check(
            &sysfs,
            &store,
            std::slice::from_ref(&target),
            "gpupass health",
            unix_now(),
        )?;
        if now.iter().all(|c| c.judgement.healthy()) {
            out.push_str(&format!("{}  ok: nothing to recover\n", target.gpu));
            continue;
        }
        let holder = running.holders(&target.functions).into_iter().next();
        let steps = gpupass::health::recover::recover(
            &sysfs,
            &store,
            &target,
            holder.as_ref().map(|h| h.domain.as_str()),
            unix_now(),
        )?;
        for s in &steps {
            let word = if s.after.judgement.healthy() {
                "passes"
            } else {
                "still fails"
            };
            out.push_str(&format!("{}  {}: {word}\n", target.gpu, s.step));
            for p in &s.after.judgement.problems {
                out.push_str(&format!("  {p}\n"));
            }
        }
        match steps.last() {
            Some(s) if s.after.judgement.healthy() => out.push_str(&format!(
                "{}  recovered; lift its quarantine with `gpupass quarantine clear {}`\n",
                target.gpu, target.gpu
            )),
            _ => failed.push(target.gpu.to_string()),
        }
    }
    print_all(&out)?;
    if failed.is_empty() {
        Ok(())
    } else {
        Err(HealthError::Failed {
            count: failed.len(),
            gpus: failed.join(", "),
        }
        .into())
    }
}
