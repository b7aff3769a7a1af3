//! `gpupass bind`, `unbind`, `restore`: move a device's whole IOMMU group between drivers at
//! runtime, and back.

use std::collections::BTreeMap;
use std::time::Duration;

use gpupass::alloc::lock::HostLock;
use gpupass::bind::plan::{plan_bind, writes, BindRequest, Mode, Move};
use gpupass::bind::{execute, persist_path, BindError, BindState, Binding};
use gpupass::host::probe::node_holders;
use gpupass::host::sysfs::Sysfs;
use gpupass::model::PciAddress;

use crate::cli::{print_all, Global};

/// Flags the three verbs share.
#[derive(Debug, Clone, Copy)]
pub struct BindFlags {
    /// Print the writes, change nothing.
    pub dry_run: bool,
    /// Keep the override across reboots (driverctl-style record).
    pub persist: bool,
    /// Past the safety refusals.
    pub force: bool,
}

fn show_writes(g: &Global, moves: &[Move], mode: Mode) -> String {
    let mut out = String::new();
    for w in writes(moves, mode) {
        out.push_str(&format!(
            "write {:?} to {}\n",
            w.value,
            g.host_root.join(&w.path).display()
        ));
    }
    if out.is_empty() {
        out.push_str("nothing to write: every device is already where it should be\n");
    }
    out
}

fn describe(moves: &[Move]) -> String {
    moves
        .iter()
        .map(|m| {
            format!(
                "{}: {} -> {}\n",
                m.address,
                m.from.as_deref().unwrap_or("no driver"),
                m.to.as_deref().unwrap_or("no driver")
            )
        })
        .collect()
}

fn write_persist(
    g: &Global,
    records: &BTreeMap<PciAddress, Binding>,
    moves: &[Move],
) -> anyhow::Result<()> {
    for m in moves {
        let path = g.host_root.join(persist_path(m.address));
        match records.get(&m.address).and_then(|b| b.driver.clone()) {
            Some(d) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let tmp = path.with_extension("gpupass-tmp");
                std::fs::write(&tmp, format!("{d}\n"))?;
                std::fs::rename(&tmp, &path)?;
            }
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    Ok(())
}

/// `gpupass bind ADDR [--driver D]` and `gpupass unbind ADDR` (driver `None`).
pub fn bind(
    g: &Global,
    address: PciAddress,
    driver: Option<String>,
    flags: BindFlags,
) -> anyhow::Result<()> {
    let sysfs = Sysfs::new(&g.host_root);
    let inv = g.inventory()?;
    let holders = node_holders(&sysfs, &inv)?;
    let plan = plan_bind(
        &inv,
        &BindRequest {
            address,
            driver: driver.clone(),
            force: flags.force,
        },
        &holders,
    )?;
    for w in &plan.warnings {
        tracing::warn!("{w}");
    }
    if flags.dry_run {
        return print_all(&format!(
            "{}(dry run: these writes, in this order; nothing changed)\n{}",
            describe(&plan.moves),
            show_writes(g, &plan.moves, Mode::Bind)
        ));
    }
    let _lock = HostLock::acquire(&g.run_dir, Duration::from_secs(60))?;
    let state = BindState::new(&g.state_dir);
    let mut records = state.load()?;
    let before = records.clone();
    // Record first: a crash between the writes and the record must not lose the original driver.
    for m in &plan.moves {
        let b = records.entry(m.address).or_insert(Binding {
            original: m.from.clone(),
            driver: None,
            requested: address,
            persisted: false,
        });
        b.driver = m.to.clone();
        b.persisted = b.persisted || flags.persist;
    }
    state.save(&records)?;
    if let Err(e) = execute(&sysfs, &plan.moves, Mode::Bind) {
        // The writes were undone: so is the record.
        state.save(&before)?;
        return Err(e.into());
    }
    if flags.persist {
        write_persist(g, &records, &plan.moves)?;
    }
    let mut out = describe(&plan.moves);
    out.push_str(&format!(
        "IOMMU group(s) {:?} moved; `gpupass restore {address}` puts the original drivers back\n",
        plan.groups
    ));
    if flags.persist {
        out.push_str("persisted in /etc/driverctl.d (applied at boot by driverctl's service)\n");
    }
    print_all(&out)
}

/// `gpupass restore ADDR`: every device of the unit gpupass recorded goes back to its original
/// driver (or none), and its record (and driverctl record) goes away.
pub fn restore(g: &Global, address: PciAddress, dry_run: bool) -> anyhow::Result<()> {
    let sysfs = Sysfs::new(&g.host_root);
    let inv = g.inventory()?;
    // The same unit a bind of this address moved (force: restoring is always allowed).
    let unit = plan_bind(
        &inv,
        &BindRequest {
            address,
            driver: None,
            force: true,
        },
        &BTreeMap::new(),
    )?;
    let state = BindState::new(&g.state_dir);
    let mut records = state.load()?;
    let moves: Vec<Move> = unit
        .moves
        .iter()
        .filter_map(|m| {
            records.get(&m.address).map(|b| Move {
                address: m.address,
                from: m.from.clone(),
                to: b.original.clone(),
            })
        })
        .collect();
    if moves.is_empty() {
        return Err(BindError::NoRecord { address }.into());
    }
    if dry_run {
        return print_all(&format!(
            "{}(dry run: these writes, in this order; nothing changed)\n{}",
            describe(&moves),
            show_writes(g, &moves, Mode::Restore)
        ));
    }
    let _lock = HostLock::acquire(&g.run_dir, Duration::from_secs(60))?;
    execute(&sysfs, &moves, Mode::Restore)?;
    let persisted: Vec<Move> = moves
        .iter()
        .filter(|m| records.get(&m.address).is_some_and(|b| b.persisted))
        .cloned()
        .collect();
    for m in &moves {
        records.remove(&m.address);
    }
    state.save(&records)?;
    write_persist(g, &records, &persisted)?;
    print_all(&format!("{}restored\n", describe(&moves)))
}
