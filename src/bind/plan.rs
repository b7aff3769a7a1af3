//! Decides a driver change for a whole IOMMU group and the exact sysfs writes that make it
//! (pure). The unit is every non-bridge device of the group(s) the device is in: VFIO hands out
//! whole groups, so binding part of one is never useful.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::bind::BindError;
use crate::host::discover::Inventory;
use crate::host::doctor::NodeHolder;
use crate::host::readiness::VFIO_READY_DRIVERS;
use crate::model::{DriverName, PciAddress};

/// One device's move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Move {
    /// The device.
    pub address: PciAddress,
    /// Its driver now (`None` = unbound).
    pub from: Option<DriverName>,
    /// Its driver afterwards (`None` = left unbound).
    pub to: Option<DriverName>,
}

/// One write to a sysfs file, relative to the host root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SysfsWrite {
    /// `sys/bus/pci/devices/0000:61:00.0/driver_override`, …
    pub path: String,
    /// What is written (a trailing newline clears `driver_override`).
    pub value: String,
}

fn dev_path(a: PciAddress, attr: &str) -> String {
    format!("sys/bus/pci/devices/{a}/{attr}")
}

/// A driver's own directory, built from its name: a device's `driver` link is never followed
/// for a write (a planted link would lead the write anywhere).
fn driver_path(d: &DriverName, attr: &str) -> String {
    format!("sys/bus/pci/drivers/{d}/{attr}")
}

/// How a move is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// To vfio-pci / pci-stub / no driver: set `driver_override`, unbind, `drivers_probe` (the
    /// kernel binds the override and nothing else).
    Bind,
    /// Back to what the device had: clear `driver_override`, unbind, then the original driver's
    /// own `bind` — no override is left behind that the host never had.
    Restore,
}

/// The writes that carry out `moves`, in order, device by device.
pub fn writes(moves: &[Move], mode: Mode) -> Vec<SysfsWrite> {
    let mut out = Vec::new();
    for m in moves {
        let a = m.address;
        let clear = SysfsWrite {
            path: dev_path(a, "driver_override"),
            // "\n" rather than "": some kernels refuse an empty write; the newline clears it.
            value: "\n".into(),
        };
        let unbind = m.from.as_ref().map(|from| SysfsWrite {
            path: driver_path(from, "unbind"),
            value: a.to_string(),
        });
        match (mode, &m.to) {
            (Mode::Bind, _) if m.from == m.to => {}
            (Mode::Bind, Some(d)) => {
                out.push(SysfsWrite {
                    path: dev_path(a, "driver_override"),
                    value: d.to_string(),
                });
                out.extend(unbind);
                out.push(SysfsWrite {
                    path: "sys/bus/pci/drivers_probe".into(),
                    value: a.to_string(),
                });
            }
            // Left unbound: no override either, or the next probe would bind it again.
            (Mode::Bind, None) | (Mode::Restore, None) => {
                out.push(clear);
                out.extend(unbind);
            }
            (Mode::Restore, Some(d)) => {
                out.push(clear);
                if m.from.as_ref() != Some(d) {
                    out.extend(unbind);
                    out.push(SysfsWrite {
                        path: driver_path(d, "bind"),
                        value: a.to_string(),
                    });
                }
            }
        }
    }
    out
}

/// What a bind or unbind is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindRequest {
    /// Any device of the group.
    pub address: PciAddress,
    /// The driver to bind to; `None` = unbind only.
    pub driver: Option<DriverName>,
    /// Go ahead although the group holds the console or a device the host uses.
    pub force: bool,
}

/// The devices a bind moves, and why it may be refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BindPlan {
    /// The IOMMU groups (empty without an IOMMU: then the device's own slot).
    pub groups: Vec<u32>,
    /// The moves, in address order.
    pub moves: Vec<Move>,
    /// Things forced past, or worth knowing.
    pub warnings: Vec<String>,
}

/// Plans a bind (or unbind) of the whole unit `req.address` belongs to.
pub fn plan_bind(
    inv: &Inventory,
    req: &BindRequest,
    holders: &BTreeMap<PciAddress, Vec<NodeHolder>>,
) -> Result<BindPlan, BindError> {
    let a = req.address;
    let dev = inv
        .device(a)
        .ok_or(BindError::UnknownDevice { address: a })?;
    let vfio = req.driver.as_ref().is_some_and(|d| d == "vfio-pci");
    // The unit: the device's GPU (all functions) or the device, widened to its IOMMU groups.
    let seed: Vec<PciAddress> = match inv.gpu(a) {
        Some(g) => g.functions.clone(),
        None => vec![a],
    };
    let mut groups = BTreeSet::new();
    for s in &seed {
        if let Some(g) = inv.device(*s).and_then(|d| d.iommu_group) {
            groups.insert(g);
        }
    }
    if vfio && groups.is_empty() {
        return Err(BindError::NoIommu { address: a });
    }
    let mut unit: BTreeSet<PciAddress> = seed.iter().copied().collect();
    for g in &groups {
        for m in inv.groups.get(g).map(Vec::as_slice).unwrap_or_default() {
            if inv.device(*m).is_some_and(|d| !d.class.is_pci_bridge()) {
                unit.insert(*m);
            }
        }
    }
    let mut refusals = Vec::new();
    let mut warnings = Vec::new();
    let own: BTreeSet<PciAddress> = seed.iter().copied().collect();
    for m in &unit {
        let Some(d) = inv.device(*m) else { continue };
        if d.boot_vga {
            refusals.push(format!("{m} is the host's boot VGA (its console)"));
        }
        let host_driver = d
            .driver
            .as_deref()
            .filter(|x| !VFIO_READY_DRIVERS.contains(x));
        if let (false, Some(drv)) = (own.contains(m), host_driver) {
            refusals.push(format!(
                "IOMMU group also holds {m} ({}, class {}) on host driver {drv}, which the host uses",
                d.class.name().unwrap_or("device"),
                d.class
            ));
        }
    }
    for (gpu, hs) in holders {
        if unit.contains(gpu) {
            for h in hs {
                refusals.push(format!(
                    "pid {} ({}) holds {} of {gpu}: unbinding would hang until it lets go",
                    h.pid, h.comm, h.node
                ));
            }
        }
    }
    if !refusals.is_empty() {
        if !req.force {
            return Err(BindError::Refused {
                address: dev.address,
                reason: refusals.join("; "),
            });
        }
        warnings.extend(refusals.into_iter().map(|r| format!("forced: {r}")));
    }
    let mut moves = Vec::new();
    for d in unit.iter().filter_map(|m| inv.device(*m)) {
        // The inventory's names came through `Sysfs::driver_name`; parsing again keeps the
        // type honest without trusting that.
        let from = match d.driver.as_deref() {
            None => None,
            Some(n) => Some(n.parse().map_err(|e| BindError::BadDriver {
                address: d.address,
                source: e,
            })?),
        };
        moves.push(Move {
            address: d.address,
            from,
            to: req.driver.clone(),
        });
    }
    Ok(BindPlan {
        groups: groups.iter().map(|g| g.0).collect(),
        moves,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(a: &str, from: Option<&str>, to: Option<&str>) -> Move {
        Move {
            address: a.parse().unwrap(),
            from: from.map(|d| d.parse().unwrap()),
            to: to.map(|d| d.parse().unwrap()),
        }
    }

    fn shown(w: &[SysfsWrite]) -> Vec<String> {
        w.iter()
            .map(|w| format!("{} <- {:?}", w.path, w.value))
            .collect()
    }

    #[test]
    fn bind_is_override_unbind_probe() {
        let w = writes(
            &[
                m("0000:01:00.0", Some("nvidia"), Some("vfio-pci")),
                m("0000:01:00.1", None, Some("vfio-pci")),
            ],
            Mode::Bind,
        );
        assert_eq!(
            shown(&w),
            [
                "sys/bus/pci/devices/0000:01:00.0/driver_override <- \"vfio-pci\"",
                "sys/bus/pci/drivers/nvidia/unbind <- \"0000:01:00.0\"",
                "sys/bus/pci/drivers_probe <- \"0000:01:00.0\"",
                "sys/bus/pci/devices/0000:01:00.1/driver_override <- \"vfio-pci\"",
                "sys/bus/pci/drivers_probe <- \"0000:01:00.1\"",
            ]
        );
    }

    #[test]
    fn restore_clears_the_override_and_binds_the_original_driver() {
        let w = writes(
            &[
                m("0000:01:00.0", Some("vfio-pci"), Some("nvidia")),
                m("0000:01:00.1", Some("vfio-pci"), None),
                m("0000:01:00.2", Some("pci-stub"), Some("pci-stub")),
            ],
            Mode::Restore,
        );
        assert_eq!(
            shown(&w),
            [
                "sys/bus/pci/devices/0000:01:00.0/driver_override <- \"\\n\"",
                "sys/bus/pci/drivers/vfio-pci/unbind <- \"0000:01:00.0\"",
                "sys/bus/pci/drivers/nvidia/bind <- \"0000:01:00.0\"",
                "sys/bus/pci/devices/0000:01:00.1/driver_override <- \"\\n\"",
                "sys/bus/pci/drivers/vfio-pci/unbind <- \"0000:01:00.1\"",
                "sys/bus/pci/devices/0000:01:00.2/driver_override <- \"\\n\"",
            ]
        );
        assert!(writes(
            &[m("0000:01:00.0", Some("vfio-pci"), Some("vfio-pci"))],
            Mode::Bind
        )
        .is_empty());
    }
}
