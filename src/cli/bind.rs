//! `gpupass bind`, `unbind`, `restore`: move a device's whole IOMMU group between drivers at
//! runtime, and back.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use anyhow::Context;

use gpupass::alloc::lock::HostLock;
use gpupass::bind::plan::{plan_bind, BindRequest, Mode, Move};
use gpupass::bind::{check, execute, persist_path, BindError, BindState, Binding, CheckedWrite};
use gpupass::host::probe::node_holders;
use gpupass::host::sysfs::{confine, Sysfs};
use gpupass::model::{DriverName, PciAddress};

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

/// The writes, one line each: `verb` is "write" for a dry run and "wrote" after the fact, so
/// the two lists are the same lines but for that word.
fn show_writes<'a>(verb: &str, ws: impl IntoIterator<Item = &'a CheckedWrite>) -> String {
    let mut out = String::new();
    for w in ws {
        out.push_str(&format!("{verb} {:?} to {}\n", w.value, w.shown.display()));
    }
    if out.is_empty() {
        out.push_str("nothing to write: every device is already where it should be\n");
    }
    out
}

/// The dry run: [`check`]'s list, which `execute` would write.
fn dry_run(sysfs: &Sysfs, moves: &[Move], mode: Mode) -> anyhow::Result<()> {
    let planned = check(sysfs, moves, mode)?;
    print_all(&format!(
        "{}(dry run: these writes, in this order; nothing changed)\n{}",
        describe(moves),
        show_writes("write", planned.iter().flatten())
    ))
}

fn describe(moves: &[Move]) -> String {
    moves
        .iter()
        .map(|m| {
            format!(
                "{}: {} -> {}\n",
                m.address,
                m.from.as_ref().map_or("no driver", DriverName::as_str),
                m.to.as_ref().map_or("no driver", DriverName::as_str)
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
        let rel = persist_path(m.address);
        let shown = g.host_root.join(&rel);
        match records.get(&m.address).and_then(|b| b.driver.clone()) {
            Some(d) => {
                // Directories made and checked under the root; the temp file is new (never a
                // planted one) and the rename replaces a link rather than following it.
                let path = confine(&g.host_root, &rel, true)?;
                let tmp = path.with_extension(format!("gpupass-tmp.{}", std::process::id()));
                let _ = fs::remove_file(&tmp);
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(&tmp)
                    .with_context(|| format!("failed to write {}", shown.display()))?;
                f.write_all(format!("{d}\n").as_bytes())
                    .and_then(|()| f.sync_all())
                    .with_context(|| format!("failed to write {}", shown.display()))?;
                fs::rename(&tmp, &path)
                    .with_context(|| format!("failed to write {}", shown.display()))?;
            }
            None => {
                if let Ok(path) = confine(&g.host_root, &rel, false) {
                    let _ = fs::remove_file(&path);
                }
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
    let driver: Option<DriverName> = driver.as_deref().map(str::parse).transpose()?;
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
        return dry_run(&sysfs, &plan.moves, Mode::Bind);
    }
    // Every path checked before anything is recorded or written.
    check(&sysfs, &plan.moves, Mode::Bind)?;
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
    let made = match execute(&sysfs, &plan.moves, Mode::Bind) {
        Ok(made) => made,
        Err(e) => {
            // The writes were undone: so is the record.
            state.save(&before)?;
            return Err(e.into());
        }
    };
    if flags.persist {
        write_persist(g, &records, &plan.moves)?;
    }
    let mut out = describe(&plan.moves);
    out.push_str(&show_writes("wrote", &made));
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
        return self::dry_run(&sysfs, &moves, Mode::Restore);
    }
    let _lock = HostLock::acquire(&g.run_dir, Duration::from_secs(60))?;
    let made = execute(&sysfs, &moves, Mode::Restore)?;
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
    print_all(&format!(
        "{}{}restored\n",
        describe(&moves),
        show_writes("wrote", &made)
    ))
}
