//! `gpupass sriov ADDR --vfs N | --undo`: enable (or change, or remove) SR-IOV virtual
//! functions on a physical function, with autoprobe off so no host driver takes them, the new
//! VFs on vfio-pci; preview, apply, undo of only what gpupass set.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use gpupass::alloc::lock::HostLock;
use gpupass::alloc::plan::Holdings;
use gpupass::assign::{read_holdings, AssignError};
use gpupass::bind::plan::Mode;
use gpupass::bind::sriov::{
    after_writes, bind_new_vfs, check, default_vf_driver, execute, parse_vf_driver, plan_sriov,
    plan_undo, read_pf, vfs_now, Back, PfState, SriovError, SriovRecord, SriovRequest, SriovState,
    VfState,
};
use gpupass::bind::CheckedWrite;
use gpupass::host::sysfs::Sysfs;
use gpupass::libvirt::virt::VirtHypervisor;
use gpupass::model::{DriverName, PciAddress};

use crate::cli::{print_all, print_json, Global};

/// What was asked.
#[derive(Debug, Clone)]
pub struct SriovFlags {
    /// `--vfs N`; `None` with `--undo`.
    pub vfs: Option<u32>,
    /// `--driver` as given (`None`: the default).
    pub driver: Option<String>,
    /// Print the writes, change nothing.
    pub dry_run: bool,
    /// Past the refusals that can be forced.
    pub force: bool,
    /// Print JSON.
    pub json: bool,
}

/// One write as the output shows it.
#[derive(Debug, Serialize)]
struct WriteOut {
    path: String,
    value: String,
}

/// The settings of the PF, before or after.
#[derive(Debug, Serialize)]
struct Settings {
    num_vfs: u32,
    drivers_autoprobe: Option<bool>,
}

impl Settings {
    /// What the PF shows now.
    fn of(pf: &PfState) -> Self {
        Settings {
            num_vfs: pf.num_vfs,
            drivers_autoprobe: pf.drivers_autoprobe,
        }
    }
}

/// `--json`.
#[derive(Debug, Serialize)]
struct Report {
    pf: PciAddress,
    action: &'static str,
    dry_run: bool,
    before: Settings,
    after: Settings,
    driver: Option<DriverName>,
    writes: Vec<WriteOut>,
    vfs: Vec<VfState>,
    record: Option<SriovRecord>,
    warnings: Vec<String>,
}

fn holdings(g: &Global) -> anyhow::Result<Holdings> {
    VirtHypervisor::open(&g.uri)
        .map_err(AssignError::from)
        .and_then(|hv| read_holdings(&hv))
        .context("asking libvirt which domains hold the PF and its VFs")
}

fn show(verb: &str, ws: &[WriteOut]) -> String {
    ws.iter()
        .map(|w| format!("{verb} {:?} to {}\n", w.value, w.path))
        .collect()
}

fn outs<'a>(ws: impl IntoIterator<Item = &'a CheckedWrite>) -> Vec<WriteOut> {
    ws.into_iter()
        .map(|w| WriteOut {
            path: w.shown.display().to_string(),
            value: w.value.clone(),
        })
        .collect()
}

fn autoprobe_word(a: Option<bool>) -> &'static str {
    match a {
        Some(true) => "1",
        Some(false) => "0",
        None => "absent",
    }
}

/// `0000:4d:00.0 (i915): 0 -> 3 VFs, sriov_drivers_autoprobe 1 -> 0, new VFs to vfio-pci`.
fn summary(pf: &PfState, after: &Settings, driver: Option<&DriverName>, undo: bool) -> String {
    let mut s = format!(
        "{} ({}): {} -> {} VFs, sriov_drivers_autoprobe {} -> {}",
        pf.address,
        pf.driver.as_deref().unwrap_or("no driver"),
        pf.num_vfs,
        after.num_vfs,
        autoprobe_word(pf.drivers_autoprobe),
        autoprobe_word(after.drivers_autoprobe),
    );
    if !undo && after.num_vfs > 0 {
        s.push_str(&match driver {
            Some(d) => format!(", VFs on no driver to {d}"),
            None => ", new VFs left on no driver".into(),
        });
    }
    s.push('\n');
    s
}

fn vf_lines(vfs: &[VfState]) -> String {
    vfs.iter()
        .map(|v| {
            format!(
                "  {} {} (IOMMU group {})\n",
                v.address,
                v.driver.as_deref().unwrap_or("no driver"),
                v.iommu_group.map_or("none".into(), |g| g.0.to_string())
            )
        })
        .collect()
}

const REBOOT: &str = "not kept across a reboot: sysfs settings are lost; run this again at boot (see README, vGPUs: SR-IOV virtual functions)\n";

/// `gpupass sriov ADDR --vfs N` and `gpupass sriov ADDR --undo`.
pub fn sriov(g: &Global, address: PciAddress, flags: &SriovFlags) -> anyhow::Result<()> {
    // The lock covers the reads (sysfs and libvirt's holdings), the decision, the record and
    // the writes: no attach and no other gpupass decides from the same "before".
    let _lock = if flags.dry_run {
        None
    } else {
        Some(HostLock::acquire(&g.run_dir, Duration::from_secs(60))?)
    };
    let sysfs = Sysfs::new(&g.host_root);
    let inv = g.inventory()?;
    let holdings = holdings(g)?;
    let state = SriovState::new(&g.state_dir);
    let mut records = state.load()?;
    let before_records = records.clone();
    let pf = read_pf(&sysfs, &inv, &holdings, address)?;
    match flags.vfs {
        Some(vfs) => apply(
            g,
            &sysfs,
            &inv,
            &pf,
            vfs,
            flags,
            &state,
            &mut records,
            &before_records,
        ),
        None => undo(&sysfs, &inv, &pf, flags, &state, &mut records),
    }
}

#[allow(clippy::too_many_arguments)]
fn apply(
    g: &Global,
    sysfs: &Sysfs,
    inv: &gpupass::host::discover::Inventory,
    pf: &PfState,
    vfs: u32,
    flags: &SriovFlags,
    state: &SriovState,
    records: &mut BTreeMap<PciAddress, SriovRecord>,
    before_records: &BTreeMap<PciAddress, SriovRecord>,
) -> anyhow::Result<()> {
    let driver = match &flags.driver {
        Some(text) => parse_vf_driver(text)?,
        None => {
            let drivers = g.host_root.join("sys/bus/pci/drivers");
            Some(default_vf_driver(pf.driver.as_deref(), &|d| {
                drivers.join(d).is_dir()
            }))
        }
    };
    // The VFs' driver must be there before the first write, whether or not their addresses
    // are known yet.
    if let Some(d) = &driver {
        if !g
            .host_root
            .join("sys/bus/pci/drivers")
            .join(d.as_str())
            .is_dir()
        {
            return Err(gpupass::bind::BindError::DriverNotLoaded {
                driver: d.clone(),
                module: d.as_str().replace('-', "_"),
            }
            .into());
        }
    }
    let ours = records.get(&pf.address);
    let plan = plan_sriov(
        pf,
        &SriovRequest {
            vfs,
            driver: driver.clone(),
            force: flags.force,
        },
        ours,
    )?;
    let mut warnings = plan.warnings.clone();
    if plan.unpredicted {
        warnings.push(format!(
            "{} has no sriov_offset/sriov_stride: the new VFs' addresses (and their bind writes) are known only once the kernel made them",
            pf.address
        ));
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let (n, a) = after_writes(&plan.writes, pf.num_vfs, pf.drivers_autoprobe);
    let after = Settings {
        num_vfs: n,
        drivers_autoprobe: a,
    };
    // Every path checked (and the VF driver loaded) before anything is recorded or written.
    let pf_writes = check(sysfs, &plan.writes)?;
    let bind_writes: Vec<CheckedWrite> = gpupass::bind::check(sysfs, &plan.moves, Mode::Bind)
        .map_err(SriovError::from)?
        .into_iter()
        .flatten()
        .collect();
    let nothing = plan.writes.is_empty() && plan.moves.is_empty() && !plan.unpredicted;
    if flags.dry_run {
        let planned = outs(pf_writes.iter().chain(&bind_writes));
        return if flags.json {
            print_json(&Report {
                pf: pf.address,
                action: "set",
                dry_run: true,
                before: Settings::of(pf),
                after,
                driver,
                writes: planned,
                vfs: pf.vfs.clone(),
                record: (!nothing).then(|| plan.record.clone()),
                warnings,
            })
        } else {
            let mut out = summary(pf, &after, driver.as_ref(), false);
            out.push_str(&show("write", &planned));
            if nothing {
                out.push_str("nothing to write: the PF already shows this\n");
            }
            out.push_str("(dry run: these writes, in this order; nothing changed)\n");
            print_all(&out)
        };
    }
    if nothing {
        let out = summary(pf, &after, driver.as_ref(), false)
            + "nothing to write: the PF already shows this\n";
        return if flags.json {
            print_json(&Report {
                pf: pf.address,
                action: "set",
                dry_run: false,
                before: Settings::of(pf),
                after,
                driver,
                writes: Vec::new(),
                vfs: pf.vfs.clone(),
                record: records.get(&pf.address).cloned(),
                warnings,
            })
        } else {
            print_all(&out)
        };
    }
    // Record first: a crash between the writes and the record must not lose what the PF had.
    // Binding VFs that were on no driver changes no PF setting: nothing to record for it.
    if !plan.writes.is_empty() || records.contains_key(&pf.address) {
        records.insert(pf.address, plan.record.clone());
        state.save(records)?;
    }
    let back = Back {
        vfs: pf.num_vfs,
        autoprobe: pf.drivers_autoprobe,
    };
    let undo_record = |e: SriovError| -> anyhow::Error {
        // The writes were undone: so is the record.
        match state.save(before_records) {
            Ok(()) => e.into(),
            Err(s) => anyhow::Error::from(e).context(format!(
                "and {} could not be put back ({s})",
                state.path().display()
            )),
        }
    };
    let made = execute(sysfs, pf.address, &plan.writes, back).map_err(undo_record)?;
    let (_, bound) =
        bind_new_vfs(sysfs, inv, pf.address, driver.as_ref(), back).map_err(undo_record)?;
    let now = vfs_now(sysfs, inv, pf.address)?;
    let wrote = outs(made.iter().chain(&bound));
    if flags.json {
        return print_json(&Report {
            pf: pf.address,
            action: "set",
            dry_run: false,
            before: Settings::of(pf),
            after,
            driver,
            writes: wrote,
            vfs: now,
            record: Some(plan.record),
            warnings,
        });
    }
    let mut out = summary(pf, &after, driver.as_ref(), false);
    out.push_str(&show("wrote", &wrote));
    if !now.is_empty() {
        out.push_str("VFs:\n");
        out.push_str(&vf_lines(&now));
    }
    out.push_str(&format!(
        "recorded in {}; `gpupass sriov {} --undo` puts back {}\n",
        state.path().display(),
        pf.address,
        prior_words(&plan.record)
    ));
    out.push_str(REBOOT);
    print_all(&out)
}

fn prior_words(r: &SriovRecord) -> String {
    format!(
        "{} VFs, sriov_drivers_autoprobe {}",
        r.prior_vfs,
        autoprobe_word(r.prior_autoprobe)
    )
}

fn undo(
    sysfs: &Sysfs,
    inv: &gpupass::host::discover::Inventory,
    pf: &PfState,
    flags: &SriovFlags,
    state: &SriovState,
    records: &mut BTreeMap<PciAddress, SriovRecord>,
) -> anyhow::Result<()> {
    let ours = records
        .get(&pf.address)
        .cloned()
        .ok_or(SriovError::NoRecord {
            address: pf.address,
        })?;
    let (writes, warnings) = plan_undo(pf, &ours, flags.force)?;
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let (n, a) = after_writes(&writes, pf.num_vfs, pf.drivers_autoprobe);
    let after = Settings {
        num_vfs: n,
        drivers_autoprobe: a,
    };
    let checked = check(sysfs, &writes)?;
    let report =
        |dry_run: bool, ws: Vec<WriteOut>, vfs: Vec<VfState>, warnings: Vec<String>| Report {
            pf: pf.address,
            action: "undo",
            dry_run,
            before: Settings::of(pf),
            after: Settings {
                num_vfs: n,
                drivers_autoprobe: a,
            },
            driver: None,
            writes: ws,
            vfs,
            record: Some(ours.clone()),
            warnings,
        };
    if flags.dry_run {
        let planned = outs(&checked);
        return if flags.json {
            print_json(&report(true, planned, pf.vfs.clone(), warnings))
        } else {
            let mut out = summary(pf, &after, None, true);
            out.push_str(&show("write", &planned));
            out.push_str("(dry run: these writes, in this order; nothing changed)\n");
            print_all(&out)
        };
    }
    // A failed undo puts back what gpupass left (its VFs come back on no driver) and keeps
    // the record, so it can be tried again.
    let left = Back {
        vfs: ours.vfs,
        autoprobe: ours.autoprobe,
    };
    let made = execute(sysfs, pf.address, &writes, left)?;
    records.remove(&pf.address);
    state.save(records)?;
    let now = vfs_now(sysfs, inv, pf.address)?;
    let wrote = outs(&made);
    if flags.json {
        return print_json(&report(false, wrote, now, warnings));
    }
    let mut out = summary(pf, &after, None, true);
    out.push_str(&show("wrote", &wrote));
    if !now.is_empty() {
        out.push_str("VFs:\n");
        out.push_str(&vf_lines(&now));
    }
    out.push_str("undone: the PF shows what it had before gpupass\n");
    print_all(&out)
}
