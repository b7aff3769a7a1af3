//! GPU health after a VM gives a GPU back: the verdict on each function's sysfs readings (pure:
//! [`judge`] never reads the host), the quarantine record a failing GPU gets, and the AER
//! baseline a check compares against. Reading sysfs is [`read`]'s; the store in the state dir
//! is [`store`]'s; running a check and quarantining what fails is [`check`]'s; trying to bring
//! a GPU back, when asked, is [`recover`]'s.
//!
//! The signals are the ones sysfs gives without a driver: a device that fell off the bus reads
//! all-ones (`vendor`, `config`, header type 0x7f) or is gone; `reset_method` empty means
//! libvirt cannot reset it; a power state other than D0 (or `unknown`: no PM capability) that
//! the kernel did not choose; AER error counters that grew; a link narrower than it can be.

pub mod check;
pub mod read;
pub mod recover;
pub mod store;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::fsutil::FsError;
use crate::host::sysfs::SysfsError;
use crate::model::PciAddress;

/// Errors from health checks and the quarantine store.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The state dir or the health file is not safe to use, or its lock was held too long.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// The host root could not be read.
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
    /// The health file is not what gpupass writes.
    #[error("the health file {path} is unreadable ({detail}): fix it or move it away (every quarantine in it is then forgotten)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        detail: String,
    },
    /// `clear` of a GPU that is not quarantined.
    #[error("{gpu} is not quarantined (see `gpupass quarantine list`)")]
    NotQuarantined {
        /// The address.
        gpu: PciAddress,
    },
    /// `clear` of a GPU that still fails its check.
    #[error("{gpu} still fails its health check: {reason} (clear it anyway with --force)")]
    StillUnhealthy {
        /// The GPU.
        gpu: PciAddress,
        /// What still fails.
        reason: String,
    },
    /// `gpupass health` found GPUs that fail (they are quarantined).
    #[error("{count} GPU(s) failed the health check: {gpus} (quarantined; see `gpupass quarantine list`)")]
    Failed {
        /// How many.
        count: usize,
        /// Their addresses.
        gpus: String,
    },
    /// `--recover` of a GPU a running domain holds.
    #[error(
        "refusing to recover {gpu}: running domain '{domain}' holds it (stop the domain first)"
    )]
    InUse {
        /// The GPU.
        gpu: PciAddress,
        /// The domain.
        domain: String,
    },
    /// A recovery write failed.
    #[error("failed to write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// A check asked for a GPU the host does not have.
    #[error("no GPU at {address} on this host, and none quarantined there (see `gpupass list`)")]
    UnknownGpu {
        /// The address.
        address: PciAddress,
    },
}

/// Why a GPU is quarantined, and since when. Stored in the state dir ([`store`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    /// What failed, in words a person can act on.
    pub reason: String,
    /// Unix seconds when the GPU was quarantined.
    pub since: u64,
    /// Who quarantined it: `hook release of vm1`, `agent`, `gpupass health`, `by hand`.
    #[serde(default)]
    pub by: String,
}

/// AER error counters of one function at its last check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AerCounts {
    /// `aer_dev_fatal`'s total.
    pub fatal: u64,
    /// `aer_dev_nonfatal`'s total.
    pub nonfatal: u64,
}

/// What sysfs shows of one PCI function. `None` fields were not reported (an older kernel, a
/// conventional PCI device without link registers, a device without AER).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionReading {
    /// The function.
    pub address: PciAddress,
    /// Its sysfs directory exists.
    pub present: bool,
    /// `vendor`.
    pub vendor: Option<u32>,
    /// `device`.
    pub device: Option<u32>,
    /// The first bytes of `config` (up to 16: IDs and the header type).
    pub config: Option<Vec<u8>>,
    /// `power_state` (`D0`, `D3hot`, …).
    pub power_state: Option<String>,
    /// `power/runtime_status` (`active`, `suspended`, …).
    pub runtime_status: Option<String>,
    /// `reset_method`; `Some("")` is a kernel that reports no way to reset the device.
    pub reset_method: Option<String>,
    /// AER counters, when the device has AER.
    pub aer: Option<AerCounts>,
    /// `current_link_speed`.
    pub link_speed: Option<String>,
    /// `max_link_speed`.
    pub max_link_speed: Option<String>,
    /// `current_link_width`.
    pub link_width: Option<String>,
    /// `max_link_width`.
    pub max_link_width: Option<String>,
}

impl HealthError {
    /// The documented exit code (the table in `gpupass --help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            HealthError::NotQuarantined { .. } | HealthError::UnknownGpu { .. } => 3,
            HealthError::InUse { .. } => 5,
            HealthError::StillUnhealthy { .. } | HealthError::Failed { .. } => 18,
            _ => 1,
        }
    }
}

impl FunctionReading {
    /// A function whose directory is gone: nothing read.
    pub fn absent(address: PciAddress) -> Self {
        Self {
            address,
            present: false,
            vendor: None,
            device: None,
            config: None,
            power_state: None,
            runtime_status: None,
            reset_method: None,
            aer: None,
            link_speed: None,
            max_link_speed: None,
            link_width: None,
            max_link_width: None,
        }
    }
}

/// One failed check of one function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The function's directory is gone.
    Gone {
        /// The function.
        function: PciAddress,
    },
    /// An identity or config read gave all-ones: the device does not answer.
    AllOnes {
        /// The function.
        function: PciAddress,
        /// `vendor`, `device` or `config`.
        what: &'static str,
    },
    /// The header type reads 0x7f (what QEMU reports as "Unknown PCI header type '127'").
    HeaderType {
        /// The function.
        function: PciAddress,
    },
    /// Not in D0, and not because the kernel suspended it on purpose.
    PowerState {
        /// The function.
        function: PciAddress,
        /// `power_state`.
        state: String,
    },
    /// `reset_method` is empty: no FLR, PM or bus reset.
    NoReset {
        /// The function.
        function: PciAddress,
    },
    /// AER counters grew since the last check.
    AerGrew {
        /// The function.
        function: PciAddress,
        /// `fatal` or `non-fatal`.
        kind: &'static str,
        /// The count at the last check.
        from: u64,
        /// The count now.
        to: u64,
    },
    /// The link trained narrower than it can run.
    LinkWidth {
        /// The function.
        function: PciAddress,
        /// `current_link_width`.
        current: u32,
        /// `max_link_width`.
        max: u32,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Gone { function } => write!(
                f,
                "{function} is gone from the PCI bus (removed, or it fell off: see dmesg; `echo 1 > /sys/bus/pci/rescan` may bring it back, else power-cycle the host)"
            ),
            Problem::AllOnes { function, what } => write!(
                f,
                "{function} reads all-ones from {what}: the device fell off the bus (see dmesg; try `gpupass health {function} --recover`, else power-cycle the host)"
            ),
            Problem::HeaderType { function } => write!(
                f,
                "{function} reports PCI header type 0x7f (QEMU: \"Unknown PCI header type '127'\"): the device did not come back from reset (try `gpupass health {function} --recover`, else power-cycle the host)"
            ),
            Problem::PowerState { function, state } => write!(
                f,
                "{function} is in power state {state}, not D0, and the kernel did not suspend it: it did not wake after release (try `gpupass health {function} --recover`)"
            ),
            Problem::NoReset { function } => write!(
                f,
                "{function} has no reset method (reset_method is empty): libvirt cannot reset it between VMs (re-enable one: `echo default > .../{function}/reset_method`)"
            ),
            Problem::AerGrew {
                function,
                kind,
                from,
                to,
            } => write!(
                f,
                "{function} logged AER {kind} errors since its last check ({from} -> {to}): check dmesg and the card's seating; `gpupass health {function} --recover` or a reboot starts the counters over, else clear with --force"
            ),
            Problem::LinkWidth {
                function,
                current,
                max,
            } => write!(
                f,
                "{function}'s PCIe link runs at x{current}, below its x{max}: it retrained narrower (reseat the card or check the riser; `gpupass health {function} --recover` may retrain it)"
            ),
        }
    }
}

/// The verdict on one GPU.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Judgement {
    /// What failed; empty = healthy.
    pub problems: Vec<Problem>,
    /// What is worth saying but quarantines nothing (a link slower than its maximum: GPUs
    /// lower their link speed when idle).
    pub notes: Vec<String>,
    /// The AER counters to keep as the next check's baseline (unchanged for a function whose
    /// counters grew: it stays failing until they drop, as after a reset, or a forced clear).
    pub baseline: BTreeMap<PciAddress, AerCounts>,
}

impl Judgement {
    /// No problem.
    pub fn healthy(&self) -> bool {
        self.problems.is_empty()
    }

    /// The quarantine reason: every problem, `; `-joined.
    pub fn reason(&self) -> String {
        self.problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// All-ones for a field of `bytes` bytes.
fn all_ones(v: u32, bytes: u32) -> bool {
    let mask = if bytes >= 4 {
        u32::MAX
    } else {
        (1u32 << (bytes * 8)) - 1
    };
    v & mask == mask
}

/// A link width (`16`, `x16`); `None` when not a number.
fn width(s: &str) -> Option<u32> {
    s.trim().trim_start_matches('x').parse().ok()
}

/// A link speed in GT/s (`16.0 GT/s PCIe`, `2.5 GT/s`); `None` for `Unknown`.
fn speed(s: &str) -> Option<f64> {
    s.split_whitespace().next()?.parse().ok()
}

/// Judges a GPU from its functions' readings and the AER counters of its last check (pure).
pub fn judge(
    readings: &[FunctionReading],
    baseline: &BTreeMap<PciAddress, AerCounts>,
) -> Judgement {
    let mut j = Judgement::default();
    for r in readings {
        let function = r.address;
        if !r.present {
            j.problems.push(Problem::Gone { function });
            continue;
        }
        let mut dead = false;
        for (what, v, bytes) in [("vendor", r.vendor, 2), ("device", r.device, 2)] {
            if v.is_some_and(|v| all_ones(v, bytes)) {
                j.problems.push(Problem::AllOnes { function, what });
                dead = true;
                break;
            }
        }
        if let Some(c) = &r.config {
            if !dead && c.len() >= 4 && c[..4].iter().all(|b| *b == 0xff) {
                j.problems.push(Problem::AllOnes {
                    function,
                    what: "config",
                });
                dead = true;
            } else if !dead && c.get(0x0e).is_some_and(|h| h & 0x7f == 0x7f) {
                j.problems.push(Problem::HeaderType { function });
                dead = true;
            }
        }
        if dead {
            // Nothing else a dead device reports means anything; keep its baseline.
            if let Some(b) = baseline.get(&function) {
                j.baseline.insert(function, *b);
            }
            continue;
        }
        if let Some(state) = &r.power_state {
            // The kernel's runtime PM put it there (or is on its way in or out).
            let suspended = matches!(
                r.runtime_status.as_deref(),
                Some("suspended" | "suspending" | "resuming")
            );
            // `unknown`: the kernel never learned the state — a function without the PM
            // capability that no driver has enabled yet (kernel 6.1 reads `unknown` for QEMU's
            // pci-testdev in tests/e2e). It says nothing of a failed wake: a function that does
            // not answer reads all-ones and D3cold, judged above.
            let ok = state == "D0" || state == "unknown" || (state.starts_with("D3") && suspended);
            if !ok {
                j.problems.push(Problem::PowerState {
                    function,
                    state: state.clone(),
                });
            }
        }
        if r.reset_method.as_deref() == Some("") {
            j.problems.push(Problem::NoReset { function });
        }
        if let Some(now) = r.aer {
            let mut keep = now;
            if let Some(before) = baseline.get(&function) {
                for (kind, b, n, k) in [
                    ("fatal", before.fatal, now.fatal, &mut keep.fatal),
                    (
                        "non-fatal",
                        before.nonfatal,
                        now.nonfatal,
                        &mut keep.nonfatal,
                    ),
                ] {
                    if n > b {
                        j.problems.push(Problem::AerGrew {
                            function,
                            kind,
                            from: b,
                            to: n,
                        });
                        *k = b;
                    }
                }
            }
            j.baseline.insert(function, keep);
        }
        if let (Some(c), Some(m)) = (
            r.link_width.as_deref().and_then(width),
            r.max_link_width.as_deref().and_then(width),
        ) {
            if c > 0 && c < m {
                j.problems.push(Problem::LinkWidth {
                    function,
                    current: c,
                    max: m,
                });
            }
        }
        if let (Some(c), Some(m)) = (&r.link_speed, &r.max_link_speed) {
            if let (Some(cs), Some(ms)) = (speed(c), speed(m)) {
                if cs > 0.0 && cs < ms {
                    j.notes.push(format!(
                        "{function}'s link runs at {c}, below its {m} (normal for an idle GPU; a problem only under load)"
                    ));
                }
            }
        }
    }
    j
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    fn healthy(addr: &str) -> FunctionReading {
        let mut config = vec![0u8; 16];
        config[..4].copy_from_slice(&[0xde, 0x10, 0x30, 0x23]);
        FunctionReading {
            address: a(addr),
            present: true,
            vendor: Some(0x10de),
            device: Some(0x2330),
            config: Some(config),
            power_state: Some("D0".into()),
            runtime_status: Some("active".into()),
            reset_method: Some("flr bus".into()),
            aer: Some(AerCounts::default()),
            link_speed: Some("32.0 GT/s PCIe".into()),
            max_link_speed: Some("32.0 GT/s PCIe".into()),
            link_width: Some("16".into()),
            max_link_width: Some("16".into()),
        }
    }

    #[test]
    fn a_healthy_gpu_passes_and_sets_its_baseline() {
        let j = judge(
            &[healthy("0000:18:00.0"), healthy("0000:18:00.1")],
            &BTreeMap::new(),
        );
        assert!(j.healthy(), "{:?}", j.problems);
        assert_eq!(j.baseline.len(), 2);
        // What an older kernel or a conventional PCI device does not report is not judged.
        let bare = FunctionReading {
            present: true,
            vendor: Some(0x1234),
            device: Some(0x1111),
            ..FunctionReading::absent(a("0000:00:06.0"))
        };
        let j = judge(&[bare], &BTreeMap::new());
        assert!(j.healthy() && j.baseline.is_empty() && j.notes.is_empty());
    }

    #[test]
    fn each_failure_has_its_reason() {
        let f = "0000:18:00.0";
        let mut gone = healthy(f);
        gone.present = false;
        let mut ones = healthy(f);
        ones.vendor = Some(0xffff);
        let mut cfg = healthy(f);
        cfg.config = Some(vec![0xff; 16]);
        let mut hdr = healthy(f);
        hdr.config.as_mut().unwrap()[0x0e] = 0x7f;
        let mut d3 = healthy(f);
        d3.power_state = Some("D3cold".into());
        let mut noreset = healthy(f);
        noreset.reset_method = Some(String::new());
        let mut narrow = healthy(f);
        narrow.link_width = Some("1".into());
        for (r, want) in [
            (gone, "gone from the PCI bus"),
            (ones, "all-ones from vendor"),
            (cfg, "all-ones from config"),
            (hdr, "header type 0x7f"),
            (d3, "power state D3cold"),
            (noreset, "no reset method"),
            (narrow, "x1, below its x16"),
        ] {
            let j = judge(&[r], &BTreeMap::new());
            assert_eq!(j.problems.len(), 1, "{want}: {:?}", j.problems);
            assert!(j.reason().contains(want), "{want}: {}", j.reason());
        }
    }

    #[test]
    fn a_suspended_device_and_an_idle_link_are_not_failures() {
        let mut r = healthy("0000:18:00.0");
        r.power_state = Some("D3hot".into());
        r.runtime_status = Some("suspended".into());
        r.link_speed = Some("2.5 GT/s PCIe".into());
        let j = judge(&[r], &BTreeMap::new());
        assert!(j.healthy(), "{:?}", j.problems);
        assert_eq!(j.notes.len(), 1, "{:?}", j.notes);
        let mut r = healthy("0000:18:00.0");
        r.link_speed = Some("Unknown".into());
        assert!(judge(&[r], &BTreeMap::new()).notes.is_empty());
    }

    #[test]
    fn a_function_without_power_management_is_not_a_failure() {
        let mut r = healthy("0000:18:00.1");
        r.power_state = Some("unknown".into());
        r.runtime_status = Some("unsupported".into());
        let j = judge(&[r], &BTreeMap::new());
        assert!(j.healthy(), "{:?}", j.problems);
        // …but a state the kernel did read, out of D0 and not chosen by it, still is.
        let mut r = healthy("0000:18:00.1");
        r.power_state = Some("D3hot".into());
        r.runtime_status = Some("unsupported".into());
        assert!(!judge(&[r], &BTreeMap::new()).healthy());
    }

    #[test]
    fn aer_growth_fails_until_the_counters_drop() {
        let f = a("0000:18:00.0");
        let base: BTreeMap<_, _> = [(
            f,
            AerCounts {
                fatal: 0,
                nonfatal: 2,
            },
        )]
        .into();
        let mut r = healthy("0000:18:00.0");
        r.aer = Some(AerCounts {
            fatal: 0,
            nonfatal: 2,
        });
        assert!(judge(&[r.clone()], &base).healthy());
        r.aer = Some(AerCounts {
            fatal: 1,
            nonfatal: 5,
        });
        let j = judge(&[r.clone()], &base);
        assert_eq!(j.problems.len(), 2, "{:?}", j.problems);
        assert!(j
            .reason()
            .contains("fatal errors since its last check (0 -> 1)"));
        assert!(j
            .reason()
            .contains("non-fatal errors since its last check (2 -> 5)"));
        // The baseline stays where it was: the next check fails again.
        assert_eq!(j.baseline[&f], base[&f]);
        assert!(!judge(&[r.clone()], &j.baseline).healthy());
        // A reset clears the counters: healthy, and that is the new baseline.
        r.aer = Some(AerCounts::default());
        let j = judge(&[r], &base);
        assert!(j.healthy());
        assert_eq!(j.baseline[&f], AerCounts::default());
    }
}
