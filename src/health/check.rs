//! Runs health checks over the host root and keeps the health file current: reads each GPU's
//! functions, judges them against the stored AER baseline, stores the new baseline and
//! quarantines the GPUs that fail, in one update of the health file. Also `clear`, which
//! re-checks first. Never calls libvirt.

use std::collections::BTreeSet;

use crate::health::read::read_function;
use crate::health::store::{HealthState, HealthStore};
use crate::health::{judge, FunctionReading, HealthError, Judgement, Quarantine};
use crate::host::discover::Inventory;
use crate::host::sysfs::Sysfs;
use crate::model::PciAddress;

/// A GPU to check: its display function and the functions to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The GPU (display function).
    pub gpu: PciAddress,
    /// The functions to read (the display function included).
    pub functions: Vec<PciAddress>,
}

/// The outcome for one GPU.
#[derive(Debug, Clone)]
pub struct GpuCheck {
    /// The GPU.
    pub gpu: PciAddress,
    /// The verdict.
    pub judgement: Judgement,
    /// Its quarantine after the check (an earlier one is kept as it was).
    pub quarantine: Option<Quarantine>,
    /// This check quarantined it.
    pub newly_quarantined: bool,
}

/// The GPUs among a domain's PCI `sources` (pure): each display function (`display`) with the
/// sources in its slot. A GPU the domain's usage session named (`session_gpus`, from the
/// ledger) counts even when its device is gone, which is when it matters most.
pub fn targets_of(
    sources: &[PciAddress],
    display: &BTreeSet<PciAddress>,
    session_gpus: &[PciAddress],
) -> Vec<Target> {
    let gpus: BTreeSet<PciAddress> = display.iter().chain(session_gpus).copied().collect();
    gpus.into_iter()
        .map(|gpu| {
            let mut functions: BTreeSet<PciAddress> = sources
                .iter()
                .filter(|s| s.same_slot(&gpu))
                .copied()
                .collect();
            functions.insert(gpu);
            Target {
                gpu,
                functions: functions.into_iter().collect(),
            }
        })
        .collect()
}

/// The target for `addr` (any function of a GPU): the inventory's GPU, else a quarantined
/// address that is no longer on the host (only its own function).
pub fn target_for(
    inv: &Inventory,
    state: &HealthState,
    addr: PciAddress,
) -> Result<Target, HealthError> {
    match inv.gpu(addr) {
        Some(g) => Ok(Target {
            gpu: g.address,
            functions: g.functions.clone(),
        }),
        None if state.quarantined.contains_key(&addr) => Ok(Target {
            gpu: addr,
            functions: vec![addr],
        }),
        None => Err(HealthError::UnknownGpu { address: addr }),
    }
}

/// Reads every function of `targets`.
fn read_all(sysfs: &Sysfs, targets: &[Target]) -> Result<Vec<Vec<FunctionReading>>, HealthError> {
    targets
        .iter()
        .map(|t| {
            t.functions
                .iter()
                .map(|f| read_function(sysfs, *f).map_err(HealthError::from))
                .collect()
        })
        .collect()
}

/// Checks `targets`, stores the new AER baselines and quarantines the GPUs that fail (as
/// `by`, at `now`), in one update of the health file.
pub fn check(
    sysfs: &Sysfs,
    store: &HealthStore,
    targets: &[Target],
    by: &str,
    now: u64,
) -> Result<Vec<GpuCheck>, HealthError> {
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let readings = read_all(sysfs, targets)?;
    store.update(|state| {
        targets
            .iter()
            .zip(&readings)
            .map(|(t, r)| {
                let judgement = judge(r, &state.aer);
                for f in &t.functions {
                    match judgement.baseline.get(f) {
                        Some(b) => state.aer.insert(*f, *b),
                        None => state.aer.remove(f),
                    };
                }
                let mut newly_quarantined = false;
                if !judgement.healthy() && !state.quarantined.contains_key(&t.gpu) {
                    state.quarantined.insert(
                        t.gpu,
                        Quarantine {
                            reason: judgement.reason(),
                            since: now,
                            by: by.to_owned(),
                        },
                    );
                    newly_quarantined = true;
                    tracing::info!(gpu = %t.gpu, by, reason = %judgement.reason(), "GPU quarantined");
                }
                GpuCheck {
                    gpu: t.gpu,
                    quarantine: state.quarantined.get(&t.gpu).cloned(),
                    judgement,
                    newly_quarantined,
                }
            })
            .collect()
    })
}

/// [`check`] of what `domain` gave back (the hook's `release end`, the agent's stop or
/// detach): logs each GPU quarantined now and returns every target that is quarantined. A
/// failure to check is logged and yields none: bookkeeping never stops a domain.
pub fn check_released(
    sysfs: &Sysfs,
    store: &HealthStore,
    targets: &[Target],
    domain: &str,
    by: &str,
    now: u64,
) -> Vec<PciAddress> {
    match check(sysfs, store, targets, by, now) {
        Ok(checks) => {
            for c in checks.iter().filter(|c| c.newly_quarantined) {
                tracing::warn!(domain, gpu = %c.gpu, reason = %c.judgement.reason(), "GPU quarantined after release");
            }
            checks
                .into_iter()
                .filter(|c| c.quarantine.is_some())
                .map(|c| c.gpu)
                .collect()
        }
        Err(e) => {
            tracing::warn!(domain, error = %e, "health check of released GPUs failed");
            Vec::new()
        }
    }
}

/// Lifts `target`'s quarantine after checking it again: refused while it still fails, unless
/// `force` (logged). A forced clear takes the AER counters of now as the new baseline, so the
/// next check does not quarantine it again for the same errors. Returns the old quarantine.
pub fn clear(
    sysfs: &Sysfs,
    store: &HealthStore,
    target: &Target,
    force: bool,
) -> Result<Quarantine, HealthError> {
    let readings = read_all(sysfs, std::slice::from_ref(target))?;
    let readings = readings.into_iter().next().unwrap_or_default();

    store.update(|state| {
        let Some(old) = state.quarantined.get(&target.gpu).cloned() else {
            return Err(HealthError::NotQuarantined { gpu: target.gpu });
        };
        let j = judge(&readings, &state.aer);
        if !j.healthy() && !force {
            return Err(HealthError::StillUnhealthy {
                gpu: target.gpu,
                reason: j.reason(),
            });
        }
        if !j.healthy() {
            tracing::warn!(gpu = %target.gpu, still = %j.reason(), "quarantine cleared with --force although the GPU still fails its check");
        }
        for r in &readings {
            match r.aer {
                Some(now) => state.aer.insert(r.address, now),
                None => state.aer.remove(&r.address),
            };
        }
        state.quarantined.remove(&target.gpu);
        tracing::info!(gpu = %target.gpu, force, "quarantine cleared");
        Ok(old)
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    #[test]
    fn a_domains_gpus_are_its_display_functions_with_their_slot_and_its_session_gpus() {
        let sources = [a("0000:18:00.0"), a("0000:18:00.1"), a("0000:19:00.0")];
        let display: BTreeSet<_> = [a("0000:18:00.0")].into();
        let t = targets_of(&sources, &display, &[]);
        assert_eq!(
            t,
            vec![Target {
                gpu: a("0000:18:00.0"),
                functions: vec![a("0000:18:00.0"), a("0000:18:00.1")]
            }]
        );
        // The display function is gone (its class cannot be read): the session names it.
        let t = targets_of(&sources, &BTreeSet::new(), &[a("0000:18:00.0")]);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].functions.len(), 2);
    }
}
