//! SR-IOV virtual functions on a physical function, the host-prep behind
//! `gpupass sriov ADDR --vfs N`: what the PF shows now ([`read_pf`]), the pure plan of the
//! `sriov_drivers_autoprobe` / `sriov_numvfs` writes and its refusals ([`plan_sriov`],
//! [`plan_undo`]), the record of what gpupass set (`<state-dir>/sriov.json`, so `--undo` puts
//! back only what gpupass changed), and carrying the writes out through bind's checked writer,
//! putting the PF back as it was when a write fails or the kernel does not follow. New VFs go
//! to their driver through bind's own moves (`driver_override` + `drivers_probe`). Never calls
//! libvirt: who holds what comes in as [`Holdings`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    #[error(
        "{address} has no SR-IOV capability (no sriov_totalvfs): it cannot have virtual functions"
    )]
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
    /// `--driver` names a driver that is not VFIO's.
    #[error("--driver {driver} is not a VFIO driver (vfio-pci or a vfio-pci variant such as xe-vfio-pci); --driver none leaves the new VFs without a driver")]
    NotVfio {
        /// The name given.
        driver: String,
    },
    /// The PF is passed whole to a domain: whole GPU and fractions exclude each other.
    #[error("{address} is passed whole to {} domain {domain}: a GPU passed whole has no VFs (detach it first)", if *running { "running" } else { "defined" })]
    WholeInUse {
        /// The PF.
        address: PciAddress,
        /// The domain.
        domain: String,
        /// Whether it runs.
        running: bool,
    },
    /// A VF that would go away is in a domain.
    #[error("{vf} (a VF of {address}) is in {} domain {domain}: changing the VF count destroys every VF; {}", if *running { "running" } else { "defined" }, if *running { "detach it first" } else { "remove it from that definition first" })]
    VfInUse {
        /// The PF.
        address: PciAddress,
        /// The VF.
        vf: PciAddress,
        /// The domain.
        domain: String,
        /// Whether it runs.
        running: bool,
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
    #[error("not undoing the SR-IOV change of {address}: it shows {detail}, not what gpupass left ({left}); someone changed it since")]
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
    /// A write (or a new VF's bind) failed; what was put back is said.
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
            SriovError::NoSriov { .. }
            | SriovError::TooMany { .. }
            | SriovError::NotVfio { .. } => 2,
            SriovError::WholeInUse { .. } | SriovError::VfInUse { .. } => 5,
            SriovError::Refused { .. } | SriovError::Changed { .. } => 14,
            SriovError::NotApplied { rollback, .. } | SriovError::WriteFailed { rollback, .. }
                if rollback.contains(INCOMPLETE) =>
            {
                11
            }
            SriovError::NotApplied { .. } => 10,
            SriovError::WriteFailed { source, .. } => match source.exit_code() {
                10 => 10,
                _ => 1,
            },
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
    /// `sriov_offset` and `sriov_stride`: where VF i will be (routing ID of the PF + offset +
    /// i × stride). `None` when absent or unreadable: the VFs' addresses are then known only
    /// once the kernel made them.
    pub offset_stride: Option<(u32, u32)>,
    /// Domains that hold the PF's GPU (any of its functions) as a whole PCI device.
    pub used_by: Vec<Holder>,
    /// The VFs the kernel shows (`virtfnN` links).
    pub vfs: Vec<VfState>,
}

/// What gpupass set on a PF, and what it found there: `<state-dir>/sriov.json`, by PF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SriovRecord {
    /// `sriov_numvfs` before gpupass first changed it.
    pub prior_vfs: u32,
    /// `sriov_drivers_autoprobe` before gpupass first changed it (`None`: no such file).
    pub prior_autoprobe: Option<bool>,
    /// The count gpupass left.
    pub vfs: u32,
    /// `sriov_drivers_autoprobe` as gpupass left it.
    pub autoprobe: Option<bool>,
    /// gpupass wrote the count: the VFs there are its own.
    pub made_vfs: bool,
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

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
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

/// The count a `sriov_numvfs` write sets, when `w` is one.
fn count_of(w: &SysfsWrite) -> Option<u32> {
    w.path
        .ends_with("/sriov_numvfs")
        .then(|| w.value.parse().ok())
        .flatten()
}

/// Where VF `i` of `pf` will be: the PF's routing ID (bus << 8 | slot << 3 | function) plus
/// `offset` + `i` × `stride` (PCIe SR-IOV: First VF Offset, VF Stride); `None` past bus 255.
pub fn vf_address(pf: PciAddress, offset: u32, stride: u32, i: u32) -> Option<PciAddress> {
    let rid = (u32::from(pf.bus) << 8) | (u32::from(pf.slot) << 3) | u32::from(pf.function);
    let vf = rid
        .checked_add(offset)?
        .checked_add(stride.checked_mul(i)?)?;
    let bus = u8::try_from(vf >> 8).ok()?;
    let devfn = (vf & 0xff) as u8;
    PciAddress::new(pf.domain, bus, devfn >> 3, devfn & 7)
}

/// The driver new VFs go to when `--driver` is not given: the PF's own vfio-pci variant when
/// one is loaded (`<pf driver>-vfio-pci` or `<pf driver>_vfio_pci`: `xe` → `xe-vfio-pci`), else vfio-pci.
pub fn default_vf_driver(pf_driver: Option<&str>, loaded: &dyn Fn(&str) -> bool) -> DriverName {
    let variant = pf_driver.and_then(|d| {
        if is_vfio_driver(d) {
            return Some(d.to_owned());
        }
        [format!("{d}-vfio-pci"), format!("{d}_vfio_pci")]
            .into_iter()
            .find(|v| loaded(v))
    });
    variant
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| "vfio-pci".parse().expect("vfio-pci is a driver name"))
}

/// `--driver`: `none` (no driver), vfio-pci or a vfio-pci variant; anything else is refused.
pub fn parse_vf_driver(text: &str) -> Result<Option<DriverName>, SriovError> {
    if text == "none" {
        return Ok(None);
    }
    let not_vfio = || SriovError::NotVfio {
        driver: text.to_owned(),
    };
    let d: DriverName = text.parse().map_err(|_| not_vfio())?;
    if is_vfio_driver(d.as_str()) {
        Ok(Some(d))
    } else {
        Err(not_vfio())
    }
}

fn read_u32(sysfs: &Sysfs, address: PciAddress, what: &'static str) -> Option<u32> {
    sysfs
        .attr(address, what)
        .ok()
        .flatten()
        .and_then(|t| parse_count(what, &t).ok())
}

/// Reads the PF at `address` (refusing a VF, an unknown device, one without SR-IOV), with the
/// holders of its GPU and of each VF from `holdings`.
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
            let text = sysfs.attr(address, "sriov_numvfs")?;
            let source = match text {
                Some(t) => parse_count("sriov_numvfs", &t).err(),
                None => None,
            };
            return Err(malformed(source.unwrap_or(VgpuError::Malformed {
                what: "sriov_numvfs",
                detail: "absent".into(),
            })));
        }
    };
    let drivers_autoprobe = match sysfs.attr(address, "sriov_drivers_autoprobe")? {
        None => None,
        Some(t) => Some(parse_count("sriov_drivers_autoprobe", &t).map_err(malformed)? != 0),
    };
    let offset_stride = read_u32(sysfs, address, "sriov_offset")
        .zip(read_u32(sysfs, address, "sriov_stride"))
        .filter(|&(o, _)| o > 0);
    let whole = inv
        .gpu(address)
        .map_or_else(|| vec![address], |g| g.functions.clone());
    Ok(PfState {
        address,
        driver: dev.driver.clone(),
        total_vfs: sriov.total_vfs,
        num_vfs,
        drivers_autoprobe,
        offset_stride,
        used_by: holdings.holders(&whole),
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
    /// The PF's `sriov_drivers_autoprobe` / `sriov_numvfs` writes, in order (empty: the PF
    /// already shows what is asked).
    pub writes: Vec<SysfsWrite>,
    /// The VFs that go to the driver afterwards, with their writes: the new ones at the
    /// addresses `sriov_offset`/`sriov_stride` give (when the count changes), or the unbound
    /// ones there are (when it does not).
    pub moves: Vec<Move>,
    /// The count changes but the new VFs' addresses are known only once the kernel made them
    /// (no `sriov_offset`/`sriov_stride`): their writes are not in `moves`.
    pub unpredicted: bool,
    /// The record after the writes.
    pub record: SriovRecord,
    /// Things forced past, and things to know.
    pub warnings: Vec<String>,
}

/// Checks the VFs that a change of `sriov_numvfs` from `pf.num_vfs` to `to` destroys (the
/// kernel goes through 0: every VF goes): one a domain holds is never destroyed; otherwise the
/// change is refused unless `force`, except gpupass's own VFs going to 0 on no host driver.
/// Returns what was forced past.
fn judge_destroyed(
    pf: &PfState,
    ours: bool,
    to: u32,
    force: bool,
) -> Result<Vec<String>, SriovError> {
    for vf in &pf.vfs {
        if let Some(h) = vf.used_by.first() {
            return Err(SriovError::VfInUse {
                address: pf.address,
                vf: vf.address,
                domain: h.domain.clone(),
                running: h.running,
            });
        }
    }
    let n = pf.num_vfs;
    let mut reasons = Vec::new();
    if to > 0 {
        reasons.push(format!(
            "the kernel changes a VF count only through 0: all {n} VF(s) would be destroyed before {to} are made"
        ));
    }
    if !ours {
        reasons.push(format!(
            "its {n} VF(s) were not made by gpupass (sriov-manage, a boot script?) and would be destroyed"
        ));
    }
    for vf in &pf.vfs {
        if let Some(d) = vf.driver.as_deref().filter(|d| !is_vfio_driver(d)) {
            reasons.push(format!("{} is on host driver {d}", vf.address));
        }
    }
    if reasons.is_empty() {
        Ok(Vec::new())
    } else if force {
        Ok(reasons
            .into_iter()
            .map(|r| format!("forced: {r}"))
            .collect())
    } else {
        Err(SriovError::Refused {
            address: pf.address,
            reason: reasons.join("; "),
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
/// the new VFs), then the count (through 0 when both are non-zero), then each new VF to the
/// driver. Refuses more VFs than `sriov_totalvfs`, a PF a domain holds whole, and a change
/// that destroys VFs a domain holds (never) or that gpupass did not make (unless `force`).
/// `ours` is gpupass's record for the PF, when it has one.
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
    if req.vfs > 0 {
        if let Some(h) = pf.used_by.first() {
            return Err(SriovError::WholeInUse {
                address: pf.address,
                domain: h.domain.clone(),
                running: h.running,
            });
        }
    }
    // The record still describes the PF when the count is the one gpupass left.
    let current = ours.filter(|r| r.vfs == pf.num_vfs);
    let ours_now = current.is_some_and(|r| r.made_vfs);
    let changing = req.vfs != pf.num_vfs;
    let mut warnings = Vec::new();
    if changing && pf.num_vfs > 0 {
        warnings = judge_destroyed(pf, ours_now, req.vfs, req.force)?;
    }
    let mut writes = Vec::new();
    let mut autoprobe_left = pf.drivers_autoprobe;
    // Only a count that makes VFs needs autoprobe off: going to 0, or keeping the count,
    // leaves it as it is.
    if changing && req.vfs > 0 {
        match pf.drivers_autoprobe {
            Some(false) => {}
            Some(true) => {
                writes.push(autoprobe(pf.address, false));
                autoprobe_left = Some(false);
            }
            None => warnings.push(format!(
                "{} has no sriov_drivers_autoprobe (kernel before 4.12): its driver may take the new VFs first",
                pf.address
            )),
        }
    }
    writes.extend(count_writes(pf.address, pf.num_vfs, req.vfs));
    let (targets, unpredicted): (Vec<PciAddress>, bool) = if changing {
        match pf.offset_stride {
            Some((offset, stride)) => (
                (0..req.vfs)
                    .map_while(|i| vf_address(pf.address, offset, stride, i))
                    .collect(),
                false,
            ),
            None => (Vec::new(), req.vfs > 0),
        }
    } else {
        // Only VFs on no driver: one on a driver is someone's (`gpupass bind` moves it).
        (
            pf.vfs
                .iter()
                .filter(|v| v.driver.is_none())
                .map(|v| v.address)
                .collect(),
            false,
        )
    };
    let moves = match &req.driver {
        Some(d) => targets
            .into_iter()
            .map(|address| Move {
                address,
                from: None,
                to: Some(d.clone()),
            })
            .collect(),
        None => Vec::new(),
    };
    let (prior_vfs, prior_autoprobe) = match current {
        Some(r) => (r.prior_vfs, r.prior_autoprobe),
        None => (pf.num_vfs, pf.drivers_autoprobe),
    };
    Ok(SriovPlan {
        writes,
        moves,
        unpredicted,
        record: SriovRecord {
            prior_vfs,
            prior_autoprobe,
            vfs: req.vfs,
            autoprobe: autoprobe_left,
            made_vfs: if changing { req.vfs > 0 } else { ours_now },
            driver: req.driver.clone(),
        },
        warnings,
    })
}

/// The writes that take a PF from `vfs_now` VFs and autoprobe `autoprobe_now` to `vfs` and
/// `autoprobe_to`: the count to 0 first, autoprobe back, then the count (so VFs made again
/// are probed as they were before gpupass).
fn back_writes(
    pf: PciAddress,
    vfs_now: u32,
    vfs: u32,
    autoprobe_now: Option<bool>,
    autoprobe_to: Option<bool>,
) -> Vec<SysfsWrite> {
    let mut out = Vec::new();
    if vfs_now != vfs && vfs_now > 0 {
        out.push(numvfs(pf, 0));
    }
    if let Some(a) = autoprobe_to.filter(|a| autoprobe_now != Some(*a)) {
        out.push(autoprobe(pf, a));
    }
    if vfs_now != vfs && vfs > 0 {
        out.push(numvfs(pf, vfs));
    }
    out
}

fn show_state(n: u32, a: Option<bool>) -> String {
    format!(
        "{n} VFs, sriov_drivers_autoprobe {}",
        a.map_or("absent", |a| if a { "1" } else { "0" })
    )
}

/// Plans `gpupass sriov PF --undo`: only when the PF still shows what gpupass left (its count
/// and autoprobe), and never destroying a VF a domain holds.
pub fn plan_undo(
    pf: &PfState,
    ours: &SriovRecord,
    force: bool,
) -> Result<(Vec<SysfsWrite>, Vec<String>), SriovError> {
    // After a reboot the PF shows what it had before gpupass: nothing to put back.
    let prior_autoprobe = ours.prior_autoprobe.or(pf.drivers_autoprobe);
    if pf.num_vfs == ours.prior_vfs && pf.drivers_autoprobe == prior_autoprobe {
        return Ok((
            Vec::new(),
            vec![format!(
                "{} already shows what it had before gpupass ({}; after a reboot?): nothing to put back",
                pf.address,
                show_state(pf.num_vfs, pf.drivers_autoprobe)
            )],
        ));
    }
    if pf.num_vfs != ours.vfs || pf.drivers_autoprobe != ours.autoprobe {
        return Err(SriovError::Changed {
            address: pf.address,
            detail: show_state(pf.num_vfs, pf.drivers_autoprobe),
            left: show_state(ours.vfs, ours.autoprobe),
        });
    }
    let warnings = if ours.vfs != ours.prior_vfs && pf.num_vfs > 0 {
        // gpupass's VFs (the count is what it left) going to 0 or back to the prior count.
        judge_destroyed(pf, ours.made_vfs, 0, force)?
    } else {
        Vec::new()
    };
    Ok((
        back_writes(
            pf.address,
            pf.num_vfs,
            ours.prior_vfs,
            pf.drivers_autoprobe,
            ours.prior_autoprobe,
        ),
        warnings,
    ))
}

/// Every write of `writes` checked (under the host root, not through a link) before the first.
pub fn check(sysfs: &Sysfs, writes: &[SysfsWrite]) -> Result<Vec<CheckedWrite>, SriovError> {
    Ok(writes
        .iter()
        .map(|w| check_write(sysfs, w))
        .collect::<Result<Vec<_>, _>>()?)
}

fn read_count(sysfs: &Sysfs, pf: PciAddress) -> Option<u32> {
    read_u32(sysfs, pf, "sriov_numvfs")
}

fn read_autoprobe(sysfs: &Sysfs, pf: PciAddress) -> Option<bool> {
    read_u32(sysfs, pf, "sriov_drivers_autoprobe").map(|n| n != 0)
}

fn virtfn_links(sysfs: &Sysfs, pf: PciAddress) -> usize {
    sysfs.device_entries(pf, ".").map_or(0, |names| {
        names
            .iter()
            .filter(|n| crate::host::vgpu::virtfn_index(n).is_some())
            .count()
    })
}

/// How long the kernel gets to show a new count (the write is synchronous on a real host:
/// the VFs exist when it returns; this is for a slow one).
const SETTLE: Duration = Duration::from_secs(5);

/// Waits until the PF shows `n` VFs (the count and the `virtfnN` links); the count it shows
/// when it does not.
fn settle(sysfs: &Sysfs, pf: PciAddress, n: u32) -> Result<(), Option<u32>> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let got = read_count(sysfs, pf);
        if got == Some(n) && virtfn_links(sysfs, pf) == n as usize {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(got);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Makes one checked write; a count write waits until the kernel shows it.
fn write_settled(sysfs: &Sysfs, pf: PciAddress, w: &CheckedWrite) -> Result<(), SriovError> {
    write(w).map_err(|source| SriovError::WriteFailed {
        source,
        rollback: String::new(),
    })?;
    if w.shown.ends_with("sriov_numvfs") {
        if let Ok(n) = w.value.parse::<u32>() {
            settle(sysfs, pf, n).map_err(|got| SriovError::NotApplied {
                address: pf,
                want: n,
                got: got.map_or_else(|| "no readable count of".into(), |g| g.to_string()),
                rollback: String::new(),
            })?;
        }
    }
    Ok(())
}

/// What to put a PF back to when a change fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Back {
    /// The count.
    pub vfs: u32,
    /// `sriov_drivers_autoprobe` (`None`: no such file, nothing to put back).
    pub autoprobe: Option<bool>,
}

/// Puts the PF back to `back` from whatever it shows now, and says what it did, in words for
/// the error line.
fn put_back(sysfs: &Sysfs, pf: PciAddress, back: Back) -> String {
    let now = read_count(sysfs, pf).unwrap_or(back.vfs);
    let ws = back_writes(pf, now, back.vfs, read_autoprobe(sysfs, pf), back.autoprobe);
    let what = format!(
        "{} VFs{}",
        back.vfs,
        back.autoprobe.map_or_else(String::new, |a| format!(
            ", sriov_drivers_autoprobe {}",
            u8::from(a)
        ))
    );
    if ws.is_empty() {
        return format!("the PF shows what it had ({what})");
    }
    let mut failed = Vec::new();
    for w in &ws {
        if let Err(e) = check_write(sysfs, w)
            .map_err(SriovError::from)
            .and_then(|c| write_settled(sysfs, pf, &c))
        {
            failed.push(e.to_string());
        }
    }
    if failed.is_empty() {
        format!("put back {what}")
    } else {
        format!("{INCOMPLETE} (wanted {what}): {}", failed.join("; "))
    }
}

fn with_rollback(e: SriovError, rollback: String) -> SriovError {
    match e {
        SriovError::WriteFailed { source, .. } => SriovError::WriteFailed { source, rollback },
        SriovError::NotApplied {
            address, want, got, ..
        } => SriovError::NotApplied {
            address,
            want,
            got,
            rollback,
        },
        other => other,
    }
}

/// Makes `writes` (a plan's or an undo's), all checked before the first, each count write
/// waited for; when one fails or the kernel does not show the count, puts the PF back to
/// `back` and says so in the error. Returns the writes made.
pub fn execute(
    sysfs: &Sysfs,
    pf: PciAddress,
    writes: &[SysfsWrite],
    back: Back,
) -> Result<Vec<CheckedWrite>, SriovError> {
    let planned = check(sysfs, writes)?;
    let mut made = Vec::new();
    for w in planned {
        if let Err(e) = write_settled(sysfs, pf, &w) {
            let rollback = put_back(sysfs, pf, back);
            return Err(with_rollback(e, rollback));
        }
        made.push(w);
        tracing::debug!(bdf = %pf, "sysfs write made");
    }
    Ok(made)
}

/// The VFs the PF shows now, each with its driver as the kernel says now.
pub fn vfs_now(sysfs: &Sysfs, inv: &Inventory, pf: PciAddress) -> Result<Vec<VfState>, SriovError> {
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
    let mut out = Vec::new();
    for v in vfs {
        out.push(VfState {
            address: v.address,
            // Freshly made: what the kernel says now, not the inventory read before.
            driver: sysfs.driver(v.address)?,
            iommu_group: sysfs.iommu_group(v.address)?,
            used_by: Vec::new(),
        });
    }
    Ok(out)
}

/// After a plan's writes: the VFs on no driver go to `driver` through bind's moves (checked
/// like a bind, each device verified before the next). On failure the PF is put back to
/// `back` (the VFs go with it). Returns the moves and the writes made.
pub fn bind_new_vfs(
    sysfs: &Sysfs,
    inv: &Inventory,
    pf: PciAddress,
    driver: Option<&DriverName>,
    back: Back,
) -> Result<(Vec<Move>, Vec<CheckedWrite>), SriovError> {
    let Some(to) = driver else {
        return Ok((Vec::new(), Vec::new()));
    };
    let vfs = match vfs_now(sysfs, inv, pf) {
        Ok(v) => v,
        Err(e) => {
            put_back(sysfs, pf, back);
            return Err(e);
        }
    };
    let moves: Vec<Move> = vfs
        .iter()
        .filter(|v| v.driver.is_none())
        .map(|v| Move {
            address: v.address,
            from: None,
            to: Some(to.clone()),
        })
        .collect();
    match crate::bind::execute(sysfs, &moves, Mode::Bind) {
        Ok(made) => Ok((moves, made)),
        Err(source) => {
            let rollback = put_back(sysfs, pf, back);
            Err(SriovError::WriteFailed { source, rollback })
        }
    }
}

/// The count and autoprobe a write list leaves, starting from `vfs` and `autoprobe`.
pub fn after_writes(
    writes: &[SysfsWrite],
    vfs: u32,
    autoprobe: Option<bool>,
) -> (u32, Option<bool>) {
    writes.iter().fold((vfs, autoprobe), |(n, a), w| {
        if let Some(c) = count_of(w) {
            (c, a)
        } else if w.path.ends_with("/sriov_drivers_autoprobe") {
            (n, Some(w.value != "0"))
        } else {
            (n, a)
        }
    })
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
            offset_stride: Some((1, 1)),
            used_by: Vec::new(),
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

    /// gpupass's record after it took the PF from `prior` VFs (autoprobe on) to `vfs`.
    fn ours(prior: u32, vfs: u32) -> SriovRecord {
        SriovRecord {
            prior_vfs: prior,
            prior_autoprobe: Some(true),
            vfs,
            autoprobe: Some(false),
            made_vfs: vfs != prior && vfs > 0,
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

    fn targets(p: &SriovPlan) -> Vec<String> {
        p.moves.iter().map(|m| m.address.to_string()).collect()
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
        // The new VFs where offset 1, stride 1 put them, each to vfio-pci from no driver.
        assert_eq!(
            targets(&p),
            ["0000:4d:00.1", "0000:4d:00.2", "0000:4d:00.3"]
        );
        assert!(p.moves.iter().all(|m| m.from.is_none()));
        assert!(!p.unpredicted);
    }

    #[test]
    fn vf_addresses_follow_offset_and_stride_across_slots_and_buses() {
        let pf: PciAddress = "0000:ca:00.0".parse().unwrap();
        let at = |o, s, i| vf_address(pf, o, s, i).map(|a| a.to_string());
        assert_eq!(at(4, 1, 0).as_deref(), Some("0000:ca:00.4"));
        assert_eq!(at(4, 1, 4).as_deref(), Some("0000:ca:01.0"));
        assert_eq!(at(0x80, 2, 1).as_deref(), Some("0000:ca:10.2"));
        let last: PciAddress = "0000:ff:1f.0".parse().unwrap();
        assert_eq!(vf_address(last, 8, 1, 0), None, "past bus 255");
        // Without offset and stride the count is written, the VFs are bound once they exist.
        let mut p0 = self::pf(0, Some(false), vec![]);
        p0.offset_stride = None;
        let p = plan_sriov(&p0, &req(2, false), None).unwrap();
        assert!(p.moves.is_empty() && p.unpredicted);
    }

    #[test]
    fn a_non_zero_count_goes_through_zero_only_when_forced() {
        let vfs = || vec![vf(1, Some("vfio-pci"), &[]), vf(2, None, &[])];
        let e = plan_sriov(
            &pf(2, Some(false), vfs()),
            &req(5, false),
            Some(&ours(0, 2)),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("the kernel changes a VF count only through 0: all 2 VF(s) would be destroyed before 5 are made"),
            "{e}"
        );
        assert_eq!(e.exit_code(), 14);
        let p = plan_sriov(&pf(2, Some(false), vfs()), &req(5, true), Some(&ours(0, 2))).unwrap();
        assert_eq!(shown(&p.writes), ["sriov_numvfs=0", "sriov_numvfs=5"]);
        // The first values gpupass found are kept.
        assert_eq!(p.record, ours(0, 5));
        assert_eq!(targets(&p).len(), 5);
        // gpupass's own VFs to 0: no force needed, autoprobe left as it is.
        let down = plan_sriov(
            &pf(2, Some(false), vec![vf(1, None, &[])]),
            &req(0, false),
            Some(&ours(0, 2)),
        )
        .unwrap();
        assert_eq!(shown(&down.writes), ["sriov_numvfs=0"]);
        assert!(down.moves.is_empty());
        assert_eq!((down.record.vfs, down.record.made_vfs), (0, false));
    }

    #[test]
    fn the_same_count_writes_nothing_and_binds_only_unbound_vfs() {
        let vfs = || vec![vf(1, Some("i915"), &[("vm", true)]), vf(2, None, &[])];
        // VFs someone else made, held and on a host driver: untouched, so not refused.
        let p = plan_sriov(&pf(2, Some(true), vfs()), &req(2, false), None).unwrap();
        assert!(p.writes.is_empty(), "{:?}", p.writes);
        assert_eq!(p.record.autoprobe, Some(true));
        assert_eq!(targets(&p), ["0000:4d:00.2"]);
        assert_eq!(p.record.prior_vfs, 2);
        assert!(!p.record.made_vfs, "someone else's VFs stay someone else's");
        // Nothing to do at all.
        let all_bound = vec![vf(1, Some("vfio-pci"), &[])];
        let p = plan_sriov(&pf(1, Some(false), all_bound), &req(1, false), None).unwrap();
        assert!(p.writes.is_empty() && p.moves.is_empty());
        // A record of the same count taken over that way does not make the VFs gpupass's.
        let mut taken = ours(1, 1);
        taken.made_vfs = false;
        let e = plan_sriov(
            &pf(1, Some(false), vec![vf(1, None, &[])]),
            &req(0, false),
            Some(&taken),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not made by gpupass"), "{e}");
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
        let e = plan_sriov(&pf(1, Some(true), vfs()), &req(0, false), None).unwrap_err();
        assert!(e.to_string().contains("not made by gpupass"), "{e}");
        assert!(e.to_string().ends_with("(--force to do it anyway)"), "{e}");
        assert_eq!(e.exit_code(), 14);
        // A record for another count is not gpupass's VFs either.
        let e =
            plan_sriov(&pf(1, Some(true), vfs()), &req(0, false), Some(&ours(0, 3))).unwrap_err();
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
            p.warnings
                .iter()
                .any(|w| w.starts_with("forced: its 1 VF(s)")),
            "{:?}",
            p.warnings
        );
        assert_eq!((p.record.prior_vfs, p.record.made_vfs), (1, true));
    }

    #[test]
    fn a_vf_on_a_host_driver_is_refused_unless_forced() {
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
    }

    #[test]
    fn a_vf_in_any_domain_is_never_destroyed_even_forced() {
        let running = vec![vf(1, Some("vfio-pci"), &[("vm-a", true)])];
        let e = plan_sriov(
            &pf(1, Some(false), running),
            &req(0, true),
            Some(&ours(0, 1)),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "0000:4d:00.1 (a VF of 0000:4d:00.0) is in running domain vm-a: changing the VF count destroys every VF; detach it first"
        );
        assert_eq!(e.exit_code(), 5);
        let defined = vec![vf(1, Some("vfio-pci"), &[("vm-off", false)])];
        let e = plan_sriov(
            &pf(1, Some(false), defined),
            &req(3, true),
            Some(&ours(0, 1)),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("in defined domain vm-off: changing the VF count destroys every VF; remove it from that definition first"),
            "{e}"
        );
        assert_eq!(e.exit_code(), 5);
    }

    #[test]
    fn a_pf_passed_whole_gets_no_vfs() {
        let mut p = pf(0, Some(true), vec![]);
        p.used_by = vec![Holder {
            domain: "vm-whole".into(),
            running: false,
        }];
        let e = plan_sriov(&p, &req(2, true), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "0000:4d:00.0 is passed whole to defined domain vm-whole: a GPU passed whole has no VFs (detach it first)"
        );
        assert_eq!(e.exit_code(), 5);
        // Going to 0 VFs is no fraction.
        assert!(plan_sriov(&p, &req(0, false), None).is_ok());
    }

    #[test]
    fn without_an_autoprobe_file_only_the_count_is_written_with_a_warning() {
        let p = plan_sriov(&pf(0, None, vec![]), &req(2, false), None).unwrap();
        assert_eq!(shown(&p.writes), ["sriov_numvfs=2"]);
        assert!(p.warnings[0].contains("no sriov_drivers_autoprobe"));
        assert_eq!((p.record.prior_autoprobe, p.record.autoprobe), (None, None));
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
        // After a reboot: the PF shows what it had, nothing is written.
        let (w, warn) = plan_undo(&pf(0, Some(true), vec![]), &ours(0, 2), false).unwrap();
        assert!(w.is_empty());
        assert!(warn[0].contains("after a reboot?"), "{warn:?}");
    }

    #[test]
    fn the_writes_say_what_they_leave() {
        let ws = [
            autoprobe(PF.parse().unwrap(), false),
            numvfs(PF.parse().unwrap(), 3),
        ];
        assert_eq!(after_writes(&ws, 0, Some(true)), (3, Some(false)));
        assert_eq!(after_writes(&[], 2, None), (2, None));
    }

    #[test]
    fn the_vf_driver_is_vfio_the_pfs_variant_or_none() {
        let loaded = |d: &str| d == "xe-vfio-pci" || d == "mlx5_vfio_pci";
        assert_eq!(
            default_vf_driver(Some("xe"), &loaded).as_str(),
            "xe-vfio-pci"
        );
        assert_eq!(
            default_vf_driver(Some("mlx5"), &loaded).as_str(),
            "mlx5_vfio_pci"
        );
        assert_eq!(
            default_vf_driver(Some("i915"), &loaded).as_str(),
            "vfio-pci"
        );
        assert_eq!(default_vf_driver(None, &loaded).as_str(), "vfio-pci");
        assert_eq!(
            parse_vf_driver("amd-vfio-pci").unwrap().unwrap().as_str(),
            "amd-vfio-pci"
        );
        assert_eq!(parse_vf_driver("none").unwrap(), None);
        for bad in ["i915", "pci-stub", "../vfio-pci"] {
            let e = parse_vf_driver(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}");
        }
    }
}
