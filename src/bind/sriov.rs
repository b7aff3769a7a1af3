//! SR-IOV virtual functions on a GPU's physical function, the host-prep behind
//! `gpupass sriov ADDR --vfs N`: what the PF shows now ([`read_pf`]), the pure plan of the
//! `sriov_drivers_autoprobe` / `sriov_numvfs` writes and its refusals ([`plan_sriov`],
//! [`plan_undo`]), the record of what gpupass set (`<state-dir>/sriov.json`, so `--undo` puts
//! back only what gpupass changed), and carrying the writes out through bind's checked writer,
//! putting the PF back as it was when a write fails. New VFs go to their driver through bind's
//! own moves (`driver_override` + `drivers_probe`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::alloc::plan::{Holder, Holdings};
use crate::bind::plan::{Mode, Move, SysfsWrite};
use crate::bind::{check_write, load_records, save_records, write, BindError, CheckedWrite};
use crate::host::discover::Inventory;
use crate::host::sysfs::{Sysfs, SysfsError};
use crate::host::vgpu::{address_at_end, is_vfio_driver, parse_count, read_sriov, VgpuError};
use crate::model::{DriverName, IommuGroupId, PciAddress};

/// Errors from `gpupass sriov`.
#[derive(Debug, thiserror::Error)]
pub enum SriovError {
    /// No PCI device at that address.
    #[error("no PCI device at {address} on this host")]
    UnknownDevice {
        /// The address.
        address: PciAddress,
    },
    /// The address is a VF: VFs are enabled on their PF.
    #[error("{address} is an SR-IOV virtual function of {pf}; give the physical function: gpupass sriov {pf}")]
    IsVirtfn {
        /// The VF.
        address: PciAddress,
        /// Its PF.
        pf: PciAddress,
    },
    /// The device has no SR-IOV capability.
    #[error("{address} has no SR-IOV virtual functions (no sriov_totalvfs)")]
    NoSriov {
        /// The device.
        address: PciAddress,
    },
    /// More VFs than the PF has.
    #[error("{address} has at most {total} virtual functions (sriov_totalvfs), not {asked}")]
    TooMany {
        /// The PF.
        address: PciAddress,
        /// `--vfs`.
        asked: u32,
        /// `sriov_totalvfs`.
        total: u32,
    },
    /// A VF that would go away is in a running domain.
    #[error("{vf} (a VF of {address}) is in use by running domain {domain}: detach it first")]
    InUse {
        /// The PF.
        address: PciAddress,
        /// The VF.
        vf: PciAddress,
        /// The domain.
        domain: String,
    },
    /// Refused for safety.
    #[error("refusing to change the VFs of {address}: {reason} (--force to do it anyway)")]
    Refused {
        /// The PF.
        address: PciAddress,
        /// Why.
        reason: String,
    },
    /// Nothing recorded for an undo.
    #[error("no SR-IOV change of {address} recorded by gpupass (nothing to undo)")]
    NoRecord {
        /// The PF.
        address: PciAddress,
    },
    /// The PF is no longer as gpupass left it.
    #[error("not undoing the SR-IOV change of {address}: {detail}, not what gpupass left ({left}); someone changed it since")]
    Changed {
        /// The PF.
        address: PciAddress,
        /// What it shows now.
        detail: String,
        /// What gpupass left.
        left: String,
    },
    /// A count file does not hold a count.
    #[error("{address}: {source}")]
    Malformed {
        /// The PF.
        address: PciAddress,
        /// What is wrong.
        #[source]
        source: VgpuError,
    },
    /// The kernel did not take the count.
    #[error("{address} shows {got} VFs after writing {want} to sriov_numvfs; {rollback}")]
    NotApplied {
        /// The PF.
        address: PciAddress,
        /// The count written.
        want: u32,
        /// The count read back.
        got: String,
        /// What was put back.
        rollback: String,
    },
    /// A write failed; what was put back is said.
    #[error("{source}; {rollback}")]
    WriteFailed {
        /// The failed write (or VF bind).
        #[source]
        source: BindError,
        /// What was put back.
        rollback: String,
    },
    /// Binding's machinery (checked writes, records, driver not loaded).
    #[error(transparent)]
    Bind(#[from] BindError),
    /// Reading sysfs.
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
}

/// Prefix of a rollback description that did not fully work.
const INCOMPLETE: &str = "ROLLBACK INCOMPLETE";

impl SriovError {
    /// The documented exit code (the table in `gpupass --help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            SriovError::UnknownDevice { .. }
            | SriovError::IsVirtfn { .. }
            | SriovError::NoRecord { .. } => 3,
            SriovError::NoSriov { .. } | SriovError::TooMany { .. } => 2,
            SriovError::InUse { .. } => 5,
            SriovError::Refused { .. } | SriovError::Changed { .. } => 14,
            SriovError::NotApplied { rollback, .. } | SriovError::WriteFailed { rollback, .. }
                if rollback.contains(INCOMPLETE) =>
            {
                11
            }
            SriovError::NotApplied { .. } => 10,
            SriovError::WriteFailed { .. } => 1,
            SriovError::Bind(e) => e.exit_code(),
            _ => 1,
        }
    }
}

/// One VF as `sriov` judges it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VfState {
    /// Its address.
    pub address: PciAddress,
    /// Its driver (`None` = unbound).
    pub driver: Option<String>,
    /// Its IOMMU group.
    pub iommu_group: Option<IommuGroupId>,
    /// Domains whose XML (running or defined) holds it, running first.
    pub used_by: Vec<Holder>,
}

/// A physical function's SR-IOV settings now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PfState {
    /// The PF.
    pub address: PciAddress,
    /// Its driver.
    pub driver: Option<String>,
    /// `sriov_totalvfs`.
    pub total_vfs: u32,
    /// `sriov_numvfs`.
    pub num_vfs: u32,
    /// `sriov_drivers_autoprobe` (`None`: the kernel has no such file, before 4.12).
    pub drivers_autoprobe: Option<bool>,
    /// The VFs the kernel shows (`virtfnN` links).
    pub vfs: Vec<VfState>,
}

/// What gpupass set on a PF, and what it found there: `<state-dir>/sriov.json`, by PF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SriovRecord {
    /// `sriov_numvfs` before gpupass first changed it.
    pub prior_vfs: u32,
    /// `sriov_drivers_autoprobe` before gpupass first changed it (`None`: no such file).
    pub prior_autoprobe: Option<bool>,
    /// The count gpupass left.
    pub vfs: u32,
    /// The driver gpupass bound the new VFs to (`None`: left without one).
    pub driver: Option<DriverName>,
}

/// The SR-IOV records.
#[derive(Debug, Clone)]
pub struct SriovState {
    path: PathBuf,
}

impl SriovState {
    /// The records under `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("sriov.json"),
        }
    }

    /// Every record; none when the file is absent.
    pub fn load(&self) -> Result<BTreeMap<PciAddress, SriovRecord>, BindError> {
        load_records(&self.path)
    }

    /// Replaces the records atomically.
    pub fn save(&self, records: &BTreeMap<PciAddress, SriovRecord>) -> Result<(), BindError> {
        save_records(&self.path, records)
    }
}

fn pf_path(pf: PciAddress, attr: &str) -> String {
    format!("sys/bus/pci/devices/{pf}/{attr}")
}

fn numvfs(pf: PciAddress, n: u32) -> SysfsWrite {
    SysfsWrite {
        path: pf_path(pf, "sriov_numvfs"),
        value: n.to_string(),
    }
}

fn autoprobe(pf: PciAddress, on: bool) -> SysfsWrite {
    SysfsWrite {
        path: pf_path(pf, "sriov_drivers_autoprobe"),
        value: if on { "1" } else { "0" }.into(),
    }
}

/// Reads the PF at `address` (refusing a VF, an unknown device, one without SR-IOV), with
/// each VF's holders from `holdings`.
pub fn read_pf(
    sysfs: &Sysfs,
    inv: &Inventory,
    holdings: &Holdings,
    address: PciAddress,
) -> Result<PfState, SriovError> {
    let dev = inv
        .device(address)
        .ok_or(SriovError::UnknownDevice { address })?;
    if dev.virtfn {
        let pf = sysfs
            .device_link(address, "physfn")?
            .as_deref()
            .and_then(address_at_end)
            .unwrap_or(address);
        return Err(SriovError::IsVirtfn { address, pf });
    }
    let malformed = |source| SriovError::Malformed { address, source };
    let sriov = read_sriov(sysfs, inv, address)
        .map_err(|e| match e {
            VgpuError::Sysfs(s) => SriovError::Sysfs(s),
            other => malformed(other),
        })?
        .ok_or(SriovError::NoSriov { address })?;
    let num_vfs = match sriov.num_vfs {
        Some(n) => n,
        None => {
            let text = sysfs.attr(address, "sriov_numvfs")?.unwrap_or_default();
            return Err(malformed(
                parse_count("sriov_numvfs", &text)
                    .err()
                    .unwrap_or_else(|| VgpuError::Malformed {
                        what: "sriov_numvfs",
                        detail: "absent".into(),
                    }),
            ));
        }
    };
    let drivers_autoprobe = match sysfs.attr(address, "sriov_drivers_autoprobe")? {
        None => None,
        Some(t) => Some(
            parse_count("sriov_drivers_autoprobe", &t)
                .map_err(malformed)?
                .ne(&0),
        ),
    };
    Ok(PfState {
        address,
        driver: dev.driver.clone(),
        total_vfs: sriov.total_vfs,
        num_vfs,
        drivers_autoprobe,
        vfs: sriov
            .vfs
            .into_iter()
            .map(|v| VfState {
                used_by: holdings.holders(&[v.address]),
                address: v.address,
                driver: v.driver,
                iommu_group: v.iommu_group,
            })
            .collect(),
    })
}

/// What `gpupass sriov ADDR --vfs N` is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SriovRequest {
    /// `--vfs`.
    pub vfs: u32,
    /// The driver the new VFs go to (`None`: leave them without one).
    pub driver: Option<DriverName>,
    /// Past the refusals that can be forced.
    pub force: bool,
}

/// The writes that set a PF's VFs, and the record that says so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SriovPlan {
    /// The writes, in order (empty: nothing to change).
    pub writes: Vec<SysfsWrite>,
    /// The record after the writes.
    pub record: SriovRecord,
    /// Things forced past.
    pub warnings: Vec<String>,
}

/// Checks the VFs that a change of `sriov_numvfs` would destroy: one in a running domain is
/// never taken away; one in a defined domain, on a host driver, or created by someone else is
/// refused unless `force`. Returns what was forced past.
fn judge_destroyed(
    pf: &PfState,
    ours: Option<&SriovRecord>,
    force: bool,
) -> Result<Vec<String>, SriovError> {
    let mut refusals = Vec::new();
    if ours.is_none_or(|r| r.vfs != pf.num_vfs) {
        refusals.push(format!(
            "its {} VF(s) were not created by gpupass (sriov-manage, a boot script?) and would be destroyed",
            pf.num_vfs
        ));
    }
    for vf in &pf.vfs {
        if let Some(h) = vf.used_by.iter().find(|h| h.running) {
            return Err(SriovError::InUse {
                address: pf.address,
                vf: vf.address,
                domain: h.domain.clone(),
            });
        }
        if let Some(h) = vf.used_by.first() {
            refusals.push(format!("{} is in defined domain {}", vf.address, h.domain));
        }
        if let Some(d) = vf.driver.as_deref().filter(|d| !is_vfio_driver(d)) {
            refusals.push(format!("{} is on host driver {d}", vf.address));
        }
    }
    if refusals.is_empty() {
        Ok(Vec::new())
    } else if force {
        Ok(refusals
            .into_iter()
            .map(|r| format!("forced: {r}"))
            .collect())
    } else {
        Err(SriovError::Refused {
            address: pf.address,
            reason: refusals.join("; "),
        })
    }
}

/// The `sriov_numvfs` writes from `from` VFs to `to`: the kernel refuses a non-zero count
/// over another non-zero one (EBUSY), so N→M goes N→0→M.
fn count_writes(pf: PciAddress, from: u32, to: u32) -> Vec<SysfsWrite> {
    match (from, to) {
        _ if from == to => Vec::new(),
        (0, _) | (_, 0) => vec![numvfs(pf, to)],
        _ => vec![numvfs(pf, 0), numvfs(pf, to)],
    }
}

/// Plans `gpupass sriov PF --vfs N`: autoprobe off first (so the PF's driver does not grab
/// the new VFs), then the count (through 0 when both are non-zero). `ours` is gpupass's record
/// for the PF, when it has one.
pub fn plan_sriov(
    pf: &PfState,
    req: &SriovRequest,
    ours: Option<&SriovRecord>,
) -> Result<SriovPlan, SriovError> {
    if req.vfs > pf.total_vfs {
        return Err(SriovError::TooMany {
            address: pf.address,
            asked: req.vfs,
            total: pf.total_vfs,
        });
    }
    let mut warnings = Vec::new();
    if req.vfs != pf.num_vfs && pf.num_vfs > 0 {
        warnings = judge_destroyed(pf, ours, req.force)?;
    }
    let mut writes = Vec::new();
    match pf.drivers_autoprobe {
        Some(false) => {}
        Some(true) => writes.push(autoprobe(pf.address, false)),
        None => warnings.push(format!(
            "{} has no sriov_drivers_autoprobe (kernel before 4.12): its driver may take the new VFs first",
            pf.address
        )),
    }
    writes.extend(count_writes(pf.address, pf.num_vfs, req.vfs));
    // The first values gpupass found stay in the record while the PF is as gpupass left it.
    let (prior_vfs, prior_autoprobe) = match ours {
        Some(r) if r.vfs == pf.num_vfs => (r.prior_vfs, r.prior_autoprobe),
        _ => (pf.num_vfs, pf.drivers_autoprobe),
    };
    Ok(SriovPlan {
        writes,
        record: SriovRecord {
            prior_vfs,
            prior_autoprobe,
            vfs: req.vfs,
            driver: req.driver.clone(),
        },
        warnings,
    })
}

/// The writes that take a PF from `vfs_now` VFs and autoprobe off back to `vfs` and
/// `autoprobe`: the count to 0 first, autoprobe back, then the count (so VFs made again are
/// probed as they were before gpupass).
fn back_writes(
    pf: PciAddress,
    vfs_now: u32,
    vfs: u32,
    autoprobe_to: Option<bool>,
) -> Vec<SysfsWrite> {
    let mut out = Vec::new();
    if vfs_now != vfs && vfs_now > 0 {
        out.push(numvfs(pf, 0));
    }
    if autoprobe_to == Some(true) {
        out.push(autoprobe(pf, true));
    }
    if vfs_now != vfs && vfs > 0 {
        out.push(numvfs(pf, vfs));
    }
    out
}

/// Plans `gpupass sriov PF --undo`: only when the PF still shows what gpupass left (its count,
/// autoprobe off) and no domain holds one of its VFs (a defined one: unless `force`).
pub fn plan_undo(
    pf: &PfState,
    ours: &SriovRecord,
    force: bool,
) -> Result<(Vec<SysfsWrite>, Vec<String>), SriovError> {
    let left_autoprobe = ours.prior_autoprobe.map(|_| false);
    if pf.num_vfs != ours.vfs || pf.drivers_autoprobe != left_autoprobe {
        let show = |n: u32, a: Option<bool>| {
            format!(
                "{n} VFs, autoprobe {}",
                a.map_or("absent", |a| if a { "1" } else { "0" })
            )
        };
        return Err(SriovError::Changed {
            address: pf.address,
            detail: show(pf.num_vfs, pf.drivers_autoprobe),
            left: show(ours.vfs, left_autoprobe),
        });
    }
    let warnings = if ours.vfs != ours.prior_vfs && pf.num_vfs > 0 {
        // The VFs are gpupass's (the count is what it left): only holders can stop it.
        let mut mine = ours.clone();
        mine.vfs = pf.num_vfs;
        judge_destroyed(pf, Some(&mine), force)?
    } else {
        Vec::new()
    };
    Ok((
        back_writes(pf.address, pf.num_vfs, ours.prior_vfs, ours.prior_autoprobe),
        warnings,
    ))
}

/// The moves that put new VFs (those not on `driver`) on it; none for `None`.
pub fn vf_moves(vfs: &[VfState], driver: Option<&DriverName>) -> Result<Vec<Move>, BindError> {
    let Some(to) = driver else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for v in vfs
        .iter()
        .filter(|v| v.driver.as_deref() != Some(to.as_str()))
    {
        let from = match v.driver.as_deref() {
            None => None,
            Some(n) => Some(n.parse().map_err(|e| BindError::BadDriver {
                address: v.address,
                source: e,
            })?),
        };
        out.push(Move {
            address: v.address,
            from,
            to: Some(to.clone()),
        });
    }
    Ok(out)
}

/// Every write of `writes` checked (under the host root, not through a link) before the first.
pub fn check(sysfs: &Sysfs, writes: &[SysfsWrite]) -> Result<Vec<CheckedWrite>, SriovError> {
    Ok(writes
        .iter()
        .map(|w| check_write(sysfs, w))
        .collect::<Result<Vec<_>, _>>()?)
}

fn read_count(sysfs: &Sysfs, pf: PciAddress) -> Option<u32> {
    sysfs
        .attr(pf, "sriov_numvfs")
        .ok()
        .flatten()
        .and_then(|t| parse_count("sriov_numvfs", &t).ok())
}

fn read_autoprobe(sysfs: &Sysfs, pf: PciAddress) -> Option<bool> {
    sysfs
        .attr(pf, "sriov_drivers_autoprobe")
        .ok()
        .flatten()
        .and_then(|t| parse_count("sriov_drivers_autoprobe", &t).ok())
        .map(|n| n != 0)
}

/// Puts the PF back to `vfs` VFs and autoprobe `autoprobe_to` from whatever it shows now, and
/// says what it did, in words for the error line.
fn put_back(sysfs: &Sysfs, pf: PciAddress, vfs: u32, autoprobe_to: Option<bool>) -> String {
    let now = read_count(sysfs, pf).unwrap_or(vfs);
    let mut ws = back_writes(pf, now, vfs, autoprobe_to);
    // Autoprobe was possibly turned off even where the count did not move.
    if autoprobe_to == Some(true) && !ws.iter().any(|w| w.path.ends_with("autoprobe")) {
        ws.insert(0, autoprobe(pf, true));
    }
    if read_autoprobe(sysfs, pf) == autoprobe_to && now == vfs {
        return "nothing was changed".into();
    }
    let mut failed = Vec::new();
    for w in &ws {
        if let Err(e) = check_write(sysfs, w).and_then(|c| write(&c)) {
            failed.push(e.to_string());
        }
    }
    let what = format!(
        "{vfs} VFs{}",
        match autoprobe_to {
            Some(a) => format!(", autoprobe {}", u8::from(a)),
            None => String::new(),
        }
    );
    if failed.is_empty() {
        format!("put back {what}")
    } else {
        format!("{INCOMPLETE} (wanted {what}): {}", failed.join("; "))
    }
}

/// Makes `writes` (a plan's or an undo's), all checked before the first; when one fails, or
/// the kernel shows another count afterwards, puts the PF back to `prior_vfs` and
/// `prior_autoprobe` and says so in the error. Returns the writes made.
pub fn execute(
    sysfs: &Sysfs,
    pf: PciAddress,
    writes: &[SysfsWrite],
    want_vfs: u32,
    prior_vfs: u32,
    prior_autoprobe: Option<bool>,
) -> Result<Vec<CheckedWrite>, SriovError> {
    let planned = check(sysfs, writes)?;
    let mut made = Vec::new();
    for w in planned {
        if let Err(source) = write(&w) {
            let rollback = put_back(sysfs, pf, prior_vfs, prior_autoprobe);
            return Err(SriovError::WriteFailed { source, rollback });
        }
        made.push(w);
    }
    let got = read_count(sysfs, pf);
    if got != Some(want_vfs) {
        let rollback = put_back(sysfs, pf, prior_vfs, prior_autoprobe);
        return Err(SriovError::NotApplied {
            address: pf,
            want: want_vfs,
            got: got.map_or_else(|| "no readable count of".into(), |n| n.to_string()),
            rollback,
        });
    }
    Ok(made)
}

/// After a plan's writes: the VFs the kernel shows now go to `driver` through bind's moves
/// (checked like a bind). On failure the PF is put back to `prior_vfs`/`prior_autoprobe`.
pub fn bind_new_vfs(
    sysfs: &Sysfs,
    inv: &Inventory,
    pf: PciAddress,
    driver: Option<&DriverName>,
    prior_vfs: u32,
    prior_autoprobe: Option<bool>,
) -> Result<(Vec<Move>, Vec<CheckedWrite>), SriovError> {
    let vfs = match read_sriov(sysfs, inv, pf) {
        Ok(Some(s)) => s.vfs,
        Ok(None) => Vec::new(),
        Err(VgpuError::Sysfs(e)) => return Err(e.into()),
        Err(e) => {
            return Err(SriovError::Malformed {
                address: pf,
                source: e,
            })
        }
    };
    let states: Vec<VfState> = vfs
        .into_iter()
        .map(|v| VfState {
            address: v.address,
            // Freshly made: what the kernel says now, not the inventory read before.
            driver: sysfs.driver(v.address).ok().flatten(),
            iommu_group: v.iommu_group,
            used_by: Vec::new(),
        })
        .collect();
    let moves = vf_moves(&states, driver)?;
    match crate::bind::execute(sysfs, &moves, Mode::Bind) {
        Ok(made) => Ok((moves, made)),
        Err(source) => {
            let rollback = put_back(sysfs, pf, prior_vfs, prior_autoprobe);
            Err(SriovError::WriteFailed { source, rollback })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PF: &str = "0000:4d:00.0";

    fn vf(n: u8, driver: Option<&str>, held: &[(&str, bool)]) -> VfState {
        VfState {
            address: format!("0000:4d:00.{n}").parse().unwrap(),
            driver: driver.map(str::to_owned),
            iommu_group: Some(IommuGroupId(40 + u32::from(n))),
            used_by: held
                .iter()
                .map(|(d, running)| Holder {
                    domain: (*d).to_owned(),
                    running: *running,
                })
                .collect(),
        }
    }

    fn pf(num: u32, autoprobe: Option<bool>, vfs: Vec<VfState>) -> PfState {
        PfState {
            address: PF.parse().unwrap(),
            driver: Some("i915".into()),
            total_vfs: 7,
            num_vfs: num,
            drivers_autoprobe: autoprobe,
            vfs,
        }
    }

    fn req(vfs: u32, force: bool) -> SriovRequest {
        SriovRequest {
            vfs,
            driver: Some("vfio-pci".parse().unwrap()),
            force,
        }
    }

    fn ours(prior: u32, vfs: u32) -> SriovRecord {
        SriovRecord {
            prior_vfs: prior,
            prior_autoprobe: Some(true),
            vfs,
            driver: Some("vfio-pci".parse().unwrap()),
        }
    }

    fn shown(ws: &[SysfsWrite]) -> Vec<String> {
        ws.iter()
            .map(|w| {
                let attr = w.path.rsplit('/').next().unwrap();
                format!("{attr}={}", w.value)
            })
            .collect()
    }

    #[test]
    fn from_none_autoprobe_goes_off_before_the_count() {
        let p = plan_sriov(&pf(0, Some(true), vec![]), &req(3, false), None).unwrap();
        assert_eq!(
            shown(&p.writes),
            ["sriov_drivers_autoprobe=0", "sriov_numvfs=3"]
        );
        assert_eq!(
            p.writes[1].path,
            "sys/bus/pci/devices/0000:4d:00.0/sriov_numvfs"
        );
        assert_eq!(p.record, ours(0, 3));
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn a_non_zero_count_goes_through_zero() {
        let vfs = vec![vf(1, Some("vfio-pci"), &[]), vf(2, None, &[])];
        let p = plan_sriov(&pf(2, Some(false), vfs), &req(5, false), Some(&ours(0, 2))).unwrap();
        assert_eq!(shown(&p.writes), ["sriov_numvfs=0", "sriov_numvfs=5"]);
        // The first values gpupass found are kept.
        assert_eq!(p.record, ours(0, 5));
        let down = plan_sriov(
            &pf(2, Some(false), vec![vf(1, None, &[])]),
            &req(0, false),
            Some(&ours(0, 2)),
        )
        .unwrap();
        assert_eq!(shown(&down.writes), ["sriov_numvfs=0"]);
    }

    #[test]
    fn the_same_count_writes_only_autoprobe_or_nothing() {
        let vfs = || vec![vf(1, Some("i915"), &[("vm", true)])];
        // VFs someone else made, held and on a host driver: untouched, so not refused.
        let p = plan_sriov(&pf(1, Some(true), vfs()), &req(1, false), None).unwrap();
        assert_eq!(shown(&p.writes), ["sriov_drivers_autoprobe=0"]);
        assert_eq!(p.record.prior_vfs, 1);
        let p = plan_sriov(&pf(1, Some(false), vfs()), &req(1, false), None).unwrap();
        assert!(p.writes.is_empty());
    }

    #[test]
    fn more_than_total_is_refused() {
        let e = plan_sriov(&pf(0, Some(true), vec![]), &req(8, true), None).unwrap_err();
        assert!(
            matches!(
                e,
                SriovError::TooMany {
                    asked: 8,
                    total: 7,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn vfs_gpupass_did_not_create_are_refused_unless_forced() {
        let vfs = || vec![vf(1, Some("vfio-pci"), &[])];
        let e = plan_sriov(&pf(1, Some(true), vfs()), &req(2, false), None).unwrap_err();
        assert!(e.to_string().contains("not created by gpupass"), "{e}");
        assert_eq!(e.exit_code(), 14);
        // A record for another count is not gpupass's VFs either.
        let e =
            plan_sriov(&pf(1, Some(true), vfs()), &req(2, false), Some(&ours(0, 3))).unwrap_err();
        assert_eq!(e.exit_code(), 14);
        let p = plan_sriov(&pf(1, Some(true), vfs()), &req(2, true), None).unwrap();
        assert_eq!(
            shown(&p.writes),
            [
                "sriov_drivers_autoprobe=0",
                "sriov_numvfs=0",
                "sriov_numvfs=2"
            ]
        );
        assert!(
            p.warnings[0].starts_with("forced: its 1 VF(s)"),
            "{:?}",
            p.warnings
        );
        assert_eq!(p.record.prior_vfs, 1);
    }

    #[test]
    fn a_vf_on_a_host_driver_or_in_a_defined_domain_is_refused_unless_forced() {
        let host = vec![vf(1, Some("i915"), &[])];
        let e = plan_sriov(
            &pf(1, Some(false), host.clone()),
            &req(0, false),
            Some(&ours(0, 1)),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("0000:4d:00.1 is on host driver i915"),
            "{e}"
        );
        assert!(plan_sriov(&pf(1, Some(false), host), &req(0, true), Some(&ours(0, 1))).is_ok());
        // A variant driver is VFIO's.
        let amd = vec![vf(1, Some("amd-vfio-pci"), &[])];
        assert!(plan_sriov(&pf(1, Some(false), amd), &req(0, false), Some(&ours(0, 1))).is_ok());
        let defined = vec![vf(1, Some("vfio-pci"), &[("vm-off", false)])];
        let e = plan_sriov(
            &pf(1, Some(false), defined),
            &req(3, false),
            Some(&ours(0, 1)),
        )
        .unwrap_err();
        assert!(e.to_string().contains("in defined domain vm-off"), "{e}");
    }

    #[test]
    fn a_vf_in_a_running_domain_is_never_destroyed() {
        let vfs = vec![vf(1, Some("vfio-pci"), &[("vm-a", true)])];
        let e = plan_sriov(&pf(1, Some(false), vfs), &req(0, true), Some(&ours(0, 1))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "0000:4d:00.1 (a VF of 0000:4d:00.0) is in use by running domain vm-a: detach it first"
        );
        assert_eq!(e.exit_code(), 5);
    }

    #[test]
    fn without_an_autoprobe_file_only_the_count_is_written_with_a_warning() {
        let p = plan_sriov(&pf(0, None, vec![]), &req(2, false), None).unwrap();
        assert_eq!(shown(&p.writes), ["sriov_numvfs=2"]);
        assert!(p.warnings[0].contains("no sriov_drivers_autoprobe"));
        assert_eq!(p.record.prior_autoprobe, None);
    }

    #[test]
    fn undo_puts_back_count_and_autoprobe_only_when_unchanged() {
        let vfs = || vec![vf(1, Some("vfio-pci"), &[]), vf(2, Some("vfio-pci"), &[])];
        let (w, warn) = plan_undo(&pf(2, Some(false), vfs()), &ours(0, 2), false).unwrap();
        assert_eq!(shown(&w), ["sriov_numvfs=0", "sriov_drivers_autoprobe=1"]);
        assert!(warn.is_empty());
        // Back to someone else's count: through 0, autoprobe back before they are made again.
        let (w, _) = plan_undo(&pf(2, Some(false), vfs()), &ours(4, 2), false).unwrap();
        assert_eq!(
            shown(&w),
            [
                "sriov_numvfs=0",
                "sriov_drivers_autoprobe=1",
                "sriov_numvfs=4"
            ]
        );
        // Only autoprobe changed.
        let (w, _) = plan_undo(&pf(2, Some(false), vfs()), &ours(2, 2), false).unwrap();
        assert_eq!(shown(&w), ["sriov_drivers_autoprobe=1"]);
        for (n, a) in [(3, Some(false)), (2, Some(true))] {
            let e = plan_undo(&pf(n, a, vfs()), &ours(0, 2), true).unwrap_err();
            assert!(e.to_string().contains("someone changed it since"), "{e}");
            assert_eq!(e.exit_code(), 14);
        }
        let held = vec![vf(1, Some("vfio-pci"), &[("vm", true)])];
        let e = plan_undo(&pf(2, Some(false), held), &ours(0, 2), true).unwrap_err();
        assert_eq!(e.exit_code(), 5);
    }

    #[test]
    fn new_vfs_move_to_the_driver_those_on_it_stay() {
        let vfs = vec![
            vf(1, None, &[]),
            vf(2, Some("vfio-pci"), &[]),
            vf(3, Some("i915"), &[]),
        ];
        let d: DriverName = "vfio-pci".parse().unwrap();
        let m = vf_moves(&vfs, Some(&d)).unwrap();
        let got: Vec<(String, Option<String>)> = m
            .iter()
            .map(|m| {
                (
                    m.address.to_string(),
                    m.from.as_ref().map(|d| d.to_string()),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("0000:4d:00.1".to_owned(), None),
                ("0000:4d:00.3".to_owned(), Some("i915".to_owned()))
            ]
        );
        assert!(vf_moves(&vfs, None).unwrap().is_empty());
    }
}
