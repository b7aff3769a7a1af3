//! Runtime driver binding for `managed='no'` set-ups and for preparing a host: moves a whole
//! IOMMU group to vfio-pci (or any driver) through `driver_override` + `unbind` +
//! `drivers_probe` — never `new_id`, which grabs every identical device — records each device's
//! original driver in a state file (written atomically) so `restore` puts it back, checks the
//! kernel did what was asked, and undoes its own writes when it did not. Every path written is
//! checked to stay under the host root (`host::sysfs::confine`) before the first write, and the
//! dry run prints the very list [`check`] returns, which [`execute`] then writes.

pub mod plan;
pub mod sriov;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::bind::plan::{writes, Mode, Move, SysfsWrite};
use crate::host::sysfs::{Sysfs, SysfsError};
use crate::model::{DriverName, ModelError, PciAddress};

/// Errors from binding.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// No PCI device at that address.
    #[error("no PCI device at {address} on this host")]
    UnknownDevice {
        /// The address.
        address: PciAddress,
    },
    /// vfio-pci needs an IOMMU group.
    #[error("{address} is in no IOMMU group: vfio-pci needs the IOMMU on (gpupass doctor); pci-stub does not")]
    NoIommu {
        /// The device.
        address: PciAddress,
    },
    /// The target driver is not loaded.
    #[error("driver {driver} is not loaded (modprobe {module})")]
    DriverNotLoaded {
        /// The driver.
        driver: DriverName,
        /// The module to load.
        module: String,
    },
    /// Refused for safety.
    #[error("refusing to move the IOMMU group of {address}: {reason} (--force to do it anyway)")]
    Refused {
        /// The device asked for.
        address: PciAddress,
        /// Why.
        reason: String,
    },
    /// Nothing recorded for a restore.
    #[error("no binding of {address} recorded by gpupass (nothing to restore)")]
    NoRecord {
        /// The device.
        address: PciAddress,
    },
    /// A sysfs write failed.
    #[error("failed to write {value:?} to {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The value.
        value: String,
        /// The IO error.
        #[source]
        source: io::Error,
    },
    /// The kernel did not do what was asked; gpupass undid its writes.
    #[error(
        "{address} is on {got} after the writes, not {want}; the group was put back{rollback}"
    )]
    NotApplied {
        /// The device.
        address: PciAddress,
        /// The wanted driver.
        want: String,
        /// The driver seen.
        got: String,
        /// What could not be undone, when anything.
        rollback: String,
    },
    /// A device's current driver has no directory under `sys/bus/pci/drivers`.
    #[error(
        "{address} is bound to {driver}, but {path} is not a driver directory; not writing there"
    )]
    NoDriverDir {
        /// The device.
        address: PciAddress,
        /// Its driver, by the name its `driver` link ends in.
        driver: DriverName,
        /// The directory that should hold the driver's `unbind`.
        path: PathBuf,
    },
    /// A driver name from the inventory is not one.
    #[error("{address} has an invalid driver name")]
    BadDriver {
        /// The device.
        address: PciAddress,
        /// What is wrong.
        #[source]
        source: ModelError,
    },
    /// A path to write is not safely under the host root.
    #[error(transparent)]
    Host(#[from] SysfsError),
    /// The state file does not hold valid records.
    #[error("the binding record {path} is not valid")]
    BadRecord {
        /// The file.
        path: PathBuf,
        /// What is wrong (an invalid driver name, bad JSON).
        #[source]
        source: serde_json::Error,
    },
    /// The state file.
    #[error("failed to update the binding record {path}")]
    State {
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: io::Error,
    },
    /// The state file could not be replaced safely (untrusted directory, a link in the way).
    #[error("failed to update the binding record")]
    StateFs(#[from] crate::fsutil::FsError),
}

impl BindError {
    /// The documented exit code (the table in `gpupass --help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            BindError::UnknownDevice { .. } | BindError::NoRecord { .. } => 3,
            BindError::NoIommu { .. } => 7,
            BindError::NotApplied { rollback, .. } if rollback.is_empty() => 10,
            BindError::NotApplied { .. } => 11,
            BindError::Refused { .. } => 14,
            _ => 1,
        }
    }
}

/// One device's record: what it was on before gpupass moved it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// Its driver before gpupass moved it (`None` = unbound).
    pub original: Option<DriverName>,
    /// The driver gpupass moved it to (`None` = unbound).
    pub driver: Option<DriverName>,
    /// The device gpupass was asked about (its group moved with it).
    pub requested: PciAddress,
    /// A driverctl-style record keeps the override across reboots.
    pub persisted: bool,
}

/// The binding records: `<state-dir>/bindings.json`.
#[derive(Debug, Clone)]
pub struct BindState {
    path: PathBuf,
}

impl BindState {
    /// The records under `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("bindings.json"),
        }
    }

    /// Every record; none when the file is absent.
    pub fn load(&self) -> Result<BTreeMap<PciAddress, Binding>, BindError> {
        load_records(&self.path)
    }

    /// Replaces the records atomically (temp file, fsync, rename).
    pub fn save(&self, records: &BTreeMap<PciAddress, Binding>) -> Result<(), BindError> {
        save_records(&self.path, records)
    }
}

/// A state file's records (bindings, SR-IOV settings); none when the file is absent.
pub(crate) fn load_records<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<BTreeMap<PciAddress, T>, BindError> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|source| BindError::BadRecord {
            path: path.to_path_buf(),
            source,
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(source) => Err(BindError::State {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Replaces a state file's records atomically (temp file, fsync, rename).
pub(crate) fn save_records<T: Serialize>(
    path: &Path,
    records: &BTreeMap<PciAddress, T>,
) -> Result<(), BindError> {
    let dir = path.parent().expect("the state file has a directory");
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("the state file has a UTF-8 name");
    let body = serde_json::to_vec_pretty(records).expect("records serialize");
    // A new 0600 temp file, never through a link, renamed over the record (fsutil).
    crate::fsutil::write_atomic(dir, name, &body)?;
    Ok(())
}

/// One sysfs write, checked: the file is under the host root and not a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedWrite {
    /// The path as gpupass names it (host root joined to the sysfs path): what a dry run shows.
    pub shown: PathBuf,
    /// The same file with its directory resolved under the root: what is opened.
    path: PathBuf,
    /// What is written.
    pub value: String,
}

pub(crate) fn check_write(sysfs: &Sysfs, w: &SysfsWrite) -> Result<CheckedWrite, BindError> {
    Ok(CheckedWrite {
        shown: sysfs.root().join(&w.path),
        path: sysfs.confine(&w.path)?,
        value: w.value.clone(),
    })
}

/// Every write `moves` needs in `mode`, checked before the first is made: each target driver
/// is loaded, each device's current driver has its directory (its `unbind` is written there,
/// never through the device's `driver` link), and every path stays under the host root. One
/// list per move, in order. The dry run prints exactly this; [`execute`] writes exactly this.
pub fn check(
    sysfs: &Sysfs,
    moves: &[Move],
    mode: Mode,
) -> Result<Vec<Vec<CheckedWrite>>, BindError> {
    let root = sysfs.root();
    for m in moves {
        if let Some(d) = &m.to {
            if !root.join("sys/bus/pci/drivers").join(d.as_str()).is_dir() {
                return Err(BindError::DriverNotLoaded {
                    driver: d.clone(),
                    module: d.as_str().replace('-', "_"),
                });
            }
        }
    }
    let mut out = Vec::new();
    for m in moves {
        let ws = writes(std::slice::from_ref(m), mode);
        if let Some(d) = &m.from {
            let dir = root.join("sys/bus/pci/drivers").join(d.as_str());
            if ws.iter().any(|w| w.path.ends_with("/unbind")) && !dir.is_dir() {
                return Err(BindError::NoDriverDir {
                    address: m.address,
                    driver: d.clone(),
                    path: dir,
                });
            }
        }
        out.push(
            ws.iter()
                .map(|w| check_write(sysfs, w))
                .collect::<Result<Vec<_>, _>>()?,
        );
    }
    Ok(out)
}

/// Writes one sysfs value to a checked path. Never creates a file (on a real host every
/// attribute exists) and never follows a link at the last step.
pub(crate) fn write(w: &CheckedWrite) -> Result<(), BindError> {
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&w.path)
        .and_then(|mut f| f.write_all(w.value.as_bytes()))
        .map_err(|source| BindError::Write {
            path: w.shown.clone(),
            value: w.value.clone(),
            source,
        })
}

fn driver_now(sysfs: &Sysfs, a: PciAddress) -> Option<DriverName> {
    sysfs.driver_name(a).ok().flatten()
}

/// How long the kernel gets to finish a bind (it is synchronous on a real host; a slow device
/// probe can take a moment).
const SETTLE: Duration = Duration::from_secs(3);

/// Carries out `moves` in `mode`: the writes of [`check`] (all checked before the first),
/// checking each device is on its target before the next; when one is not, or a write fails,
/// puts every device it touched back where it was. Returns the writes made, in order.
pub fn execute(sysfs: &Sysfs, moves: &[Move], mode: Mode) -> Result<Vec<CheckedWrite>, BindError> {
    let planned = check(sysfs, moves, mode)?;
    let mut done: Vec<Move> = Vec::new();
    let mut made = Vec::new();
    let fail = |cause: BindError, done: &[Move]| -> BindError {
        let undo: Vec<Move> = done
            .iter()
            .map(|m| Move {
                address: m.address,
                from: driver_now(sysfs, m.address),
                to: m.from.clone(),
            })
            .collect();
        let mut left = Vec::new();
        for w in writes(&undo, Mode::Restore) {
            if let Err(e) = check_write(sysfs, &w).and_then(|c| write(&c)) {
                left.push(e.to_string());
            }
        }
        match cause {
            BindError::NotApplied {
                address, want, got, ..
            } => BindError::NotApplied {
                address,
                want,
                got,
                rollback: if left.is_empty() {
                    String::new()
                } else {
                    format!("; ROLLBACK INCOMPLETE: {}", left.join("; "))
                },
            },
            other => other,
        }
    };
    // One device at a time, each checked before the next is touched: a kernel that does not
    // follow stops gpupass after one device, not after a whole group.
    for (m, ws) in moves.iter().zip(planned) {
        for w in ws {
            if let Err(e) = write(&w) {
                let mut partial = done.clone();
                partial.push(m.clone());
                return Err(fail(e, &partial));
            }
            made.push(w);
        }
        done.push(m.clone());
        let deadline = Instant::now() + SETTLE;
        loop {
            let now = driver_now(sysfs, m.address);
            if now == m.to {
                break;
            }
            if Instant::now() >= deadline {
                let name =
                    |d: Option<DriverName>| d.map_or_else(|| "no driver".into(), String::from);
                let cause = BindError::NotApplied {
                    address: m.address,
                    want: name(m.to.clone()),
                    got: name(now),
                    rollback: String::new(),
                };
                return Err(fail(cause, &done));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::info!(bdf = %m.address, from = ?m.from, to = ?m.to, "driver changed");
    }
    Ok(made)
}

/// driverctl's record of an override: `etc/driverctl.d/pci-<bdf>` holding the driver's name.
pub fn persist_path(a: PciAddress) -> String {
    format!("etc/driverctl.d/pci-{a}")
}
