//! `gpupass health ADDR --recover`: tries to bring back a GPU that failed its check, only when
//! a person asks, through the host root: first the kernel's own `reset` of its display function,
//! then `remove` of each of its functions and a `rescan` of the bus above (the parent bridge's
//! `rescan`, else the whole bus); after each step the GPU is checked again, and the steps stop
//! at the first check it passes. Never runs on a GPU a running domain holds; never clears the
//! quarantine itself (`gpupass quarantine clear` re-checks).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::health::check::{check, GpuCheck, Target};
use crate::health::store::HealthStore;
use crate::health::HealthError;
use crate::host::sysfs::Sysfs;
use crate::model::PciAddress;

/// One recovery step and what the check said after it.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    /// `reset` or `remove + rescan`.
    pub step: &'static str,
    /// The files written, in order.
    pub wrote: Vec<PathBuf>,
    /// The check after the step.
    pub after: GpuCheck,
}

/// The sysfs writes of each step, as paths under the host root (pure): the display function's
/// `reset` when the kernel offers one (`has_reset`); then every function's `remove` and the
/// `rescan` of the parent bridge (`parent`), else of the whole PCI bus.
pub fn steps(
    target: &Target,
    has_reset: bool,
    parent: Option<PciAddress>,
) -> Vec<(&'static str, Vec<String>)> {
    let dev = |a: PciAddress, attr: &str| format!("sys/bus/pci/devices/{a}/{attr}");
    let mut out = Vec::new();
    if has_reset {
        out.push(("reset", vec![dev(target.gpu, "reset")]));
    }
    let mut writes: Vec<String> = target
        .functions
        .iter()
        .rev()
        .map(|f| dev(*f, "remove"))
        .collect();
    writes.push(match parent {
        Some(p) => dev(p, "rescan"),
        None => "sys/bus/pci/rescan".to_owned(),
    });
    out.push(("remove + rescan", writes));
    out
}

/// Writes `1` to a sysfs file under the root: checked by `confine`, never created, never
/// through a link.
fn write_one(sysfs: &Sysfs, rel: &str) -> Result<PathBuf, HealthError> {
    let path = sysfs.confine(rel)?;
    OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&path)
        .and_then(|mut f| f.write_all(b"1"))
        .map_err(|source| HealthError::Write {
            path: sysfs.root().join(rel),
            source,
        })?;
    Ok(sysfs.root().join(rel))
}

/// Runs the steps on `target` until a check passes; returns each step's outcome. `in_use`
/// names the running domain that holds the GPU, which refuses the whole recovery.
pub fn recover(
    sysfs: &Sysfs,
    store: &HealthStore,
    target: &Target,
    in_use: Option<&str>,
    now: u64,
) -> Result<Vec<StepOutcome>, HealthError> {
    if let Some(domain) = in_use {
        return Err(HealthError::InUse {
            gpu: target.gpu,
            domain: domain.to_owned(),
        });
    }
    let has_reset = sysfs
        .device(target.gpu)?
        .is_some_and(|d| d.attr("reset").ok().flatten().is_some());
    let parent = sysfs.parent(target.gpu)?;
    let mut out = Vec::new();
    for (step, writes) in steps(target, has_reset, parent) {
        let mut wrote = Vec::new();
        for w in &writes {
            wrote.push(write_one(sysfs, w)?);
        }
        tracing::warn!(gpu = %target.gpu, step, "recovery step done");
        let after = check(
            sysfs,
            store,
            std::slice::from_ref(target),
            "gpupass health --recover",
            now,
        )?
        .into_iter()
        .next()
        .expect("one target, one check");
        let healthy = after.judgement.healthy();
        out.push(StepOutcome { step, wrote, after });
        if healthy {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_first_then_remove_every_function_and_rescan_above() {
        let a = |s: &str| s.parse::<PciAddress>().unwrap();
        let t = Target {
            gpu: a("0000:01:00.0"),
            functions: vec![a("0000:01:00.0"), a("0000:01:00.1")],
        };
        let s = steps(&t, true, Some(a("0000:00:01.0")));
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].1, ["sys/bus/pci/devices/0000:01:00.0/reset"]);
        assert_eq!(
            s[1].1,
            [
                "sys/bus/pci/devices/0000:01:00.1/remove",
                "sys/bus/pci/devices/0000:01:00.0/remove",
                "sys/bus/pci/devices/0000:00:01.0/rescan"
            ]
        );
        let s = steps(&t, false, None);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].1.last().unwrap(), "sys/bus/pci/rescan");
    }
}
