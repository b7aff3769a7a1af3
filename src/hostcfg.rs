//! `gpupass host-config`: what a host needs so the chosen GPUs come up on vfio-pci at boot —
//! `/etc/modprobe.d/gpupass-vfio.conf` (`options vfio-pci ids=…`, `softdep <driver> pre:
//! vfio-pci`), the initramfs module list (Debian `/etc/initramfs-tools/modules` or a dracut
//! drop-in), and the kernel command-line words still missing. `plan` decides (pure); `read_current`
//! and `apply` are the IO, always under a host root (every path read or written is checked by
//! `host::sysfs::confine`: no link leads them out), writing atomically with a backup.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::host::discover::Inventory;
use crate::host::readiness::VFIO_READY_DRIVERS;
use crate::host::sysfs::{confine, SysfsError};
use crate::model::{DriverName, PciAddress, PciId};

/// Errors from host-config.
#[derive(Debug, thiserror::Error)]
pub enum HostConfigError {
    /// Nothing was selected.
    #[error("no GPU to configure: {0}")]
    NothingSelected(String),
    /// A file could not be read or written.
    #[error("failed to {action} {path}")]
    Io {
        /// read / write / back up.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: io::Error,
    },
    /// A file's path leads out of the host root, or the file is a link.
    #[error(transparent)]
    Unsafe(#[from] SysfsError),
}

/// Which initramfs generator the host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Initramfs {
    /// Debian/Ubuntu initramfs-tools: `/etc/initramfs-tools/modules`.
    Debian,
    /// dracut (RHEL, Fedora, SUSE): a drop-in in `/etc/dracut.conf.d/`.
    Dracut,
}

/// The vfio modules the initramfs must carry, in load order.
pub const VFIO_INITRAMFS_MODULES: &[&str] = &["vfio", "vfio_iommu_type1", "vfio_pci"];

/// gpupass's own modprobe file.
pub const MODPROBE_FILE: &str = "etc/modprobe.d/gpupass-vfio.conf";
/// Debian's initramfs module list (not gpupass's: lines are appended).
pub const DEBIAN_MODULES_FILE: &str = "etc/initramfs-tools/modules";
/// gpupass's dracut drop-in.
pub const DRACUT_FILE: &str = "etc/dracut.conf.d/gpupass-vfio.conf";

/// One file to write: its path under the root, what is there now, what should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    /// Path relative to the host root.
    pub path: &'static str,
    /// Current contents (`None` = absent).
    pub current: Option<String>,
    /// Wanted contents.
    pub wanted: String,
    /// gpupass owns the file (else it only appends to it).
    pub owned: bool,
}

impl FileChange {
    /// True when the file must change.
    pub fn changes(&self) -> bool {
        self.current.as_deref() != Some(self.wanted.as_str())
    }

    /// A unified diff of the change (empty when none).
    pub fn diff(&self) -> String {
        if !self.changes() {
            return String::new();
        }
        let old = self.current.as_deref().unwrap_or("");
        let from = if self.current.is_some() {
            format!("a/{}", self.path)
        } else {
            "/dev/null".to_owned()
        };
        similar::TextDiff::from_lines(old, &self.wanted)
            .unified_diff()
            .header(&from, &format!("b/{}", self.path))
            .to_string()
    }
}

/// Everything host-config would do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfigPlan {
    /// The GPUs configured.
    pub gpus: Vec<PciAddress>,
    /// `vfio-pci ids=`.
    pub ids: Vec<PciId>,
    /// Files to write.
    pub files: Vec<FileChange>,
    /// Kernel command-line words still to add.
    pub cmdline_add: Vec<String>,
    /// Commands to run afterwards.
    pub commands: Vec<String>,
    /// Things to look at before applying.
    pub warnings: Vec<String>,
}

/// What to configure: these GPUs, GPUs of these models, or (neither) every passable GPU that
/// is not the boot VGA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// By address.
    Gpus(Vec<PciAddress>),
    /// By vendor:device.
    Models(Vec<PciId>),
    /// Every passable GPU that is not the host's console.
    AllPassable,
}

/// The current state host-config compares against.
#[derive(Debug, Clone, Default)]
pub struct Current {
    /// `proc/cmdline`.
    pub cmdline: String,
    /// `GenuineIntel` / `AuthenticAMD`.
    pub cpu_vendor: Option<String>,
    /// The contents of MODPROBE_FILE, DEBIAN_MODULES_FILE, DRACUT_FILE.
    pub modprobe: Option<String>,
    /// Debian's module list.
    pub debian_modules: Option<String>,
    /// The dracut drop-in.
    pub dracut: Option<String>,
    /// Kernel module name of each bound driver (from `drivers/<d>/module`), when known; only
    /// valid module names (they go into the modprobe file).
    pub driver_modules: Vec<(String, DriverName)>,
}

fn module_of(driver: &str, current: &Current) -> String {
    current
        .driver_modules
        .iter()
        .find(|(d, _)| d == driver)
        .map(|(_, m)| m.to_string())
        .unwrap_or_else(|| driver.replace('-', "_"))
}

/// Decides what the host needs (pure).
pub fn plan(
    inv: &Inventory,
    selection: &Selection,
    initramfs: Initramfs,
    current: &Current,
) -> Result<HostConfigPlan, HostConfigError> {
    use crate::host::readiness::verdict;
    let gpus: Vec<PciAddress> = match selection {
        Selection::Gpus(addrs) => {
            let mut out = Vec::new();
            for a in addrs {
                let g = inv.gpu(*a).ok_or_else(|| {
                    HostConfigError::NothingSelected(format!("no GPU at {a} on this host"))
                })?;
                if !out.contains(&g.address) {
                    out.push(g.address);
                }
            }
            out
        }
        Selection::Models(models) => inv
            .gpus
            .iter()
            .filter(|g| {
                inv.device(g.address)
                    .is_some_and(|d| models.contains(&d.id))
            })
            .map(|g| g.address)
            .collect(),
        Selection::AllPassable => inv
            .gpus
            .iter()
            .filter(|g| {
                let v = verdict(inv, g);
                v.viable && !v.boot_vga
            })
            .map(|g| g.address)
            .collect(),
    };
    if gpus.is_empty() {
        return Err(HostConfigError::NothingSelected(match selection {
            Selection::Models(m) => format!(
                "no GPU of model {} on this host",
                m.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => "no passable GPU that is not the host's console (name one with --gpu)".into(),
        }));
    }
    let functions: BTreeSet<PciAddress> = gpus
        .iter()
        .filter_map(|g| inv.gpu(*g))
        .flat_map(|g| g.functions.iter().copied())
        .collect();
    let ids: BTreeSet<PciId> = functions
        .iter()
        .filter_map(|f| inv.device(*f).map(|d| d.id))
        .collect();
    let mut warnings = Vec::new();
    for d in inv.devices.values() {
        if ids.contains(&d.id) && !functions.contains(&d.address) {
            let driver = d.driver.as_deref().unwrap_or("no driver");
            if VFIO_READY_DRIVERS.contains(&driver) || d.driver.is_none() {
                warnings.push(format!(
                    "ids={} also claims {} ({driver}), which was not selected",
                    d.id, d.address
                ));
            } else {
                warnings.push(format!(
                    "ids={} would also take {} away from the host driver {driver} at the next boot",
                    d.id, d.address
                ));
            }
        }
    }
    let host_modules: BTreeSet<String> = functions
        .iter()
        .filter_map(|f| inv.device(*f).and_then(|d| d.driver.clone()))
        .filter(|d| !VFIO_READY_DRIVERS.contains(&d.as_str()))
        .map(|d| module_of(&d, current))
        .collect();
    let names: Vec<String> = gpus.iter().map(|g| g.to_string()).collect();
    let ids_text: Vec<String> = ids.iter().map(ToString::to_string).collect();
    let mut modprobe = format!(
        "# Written by gpupass host-config for GPU(s) {}.\n# vfio-pci claims these vendor:device IDs at boot, before any host driver can.\noptions vfio-pci ids={}\n",
        names.join(" "),
        ids_text.join(",")
    );
    for m in &host_modules {
        modprobe.push_str(&format!("softdep {m} pre: vfio-pci\n"));
    }
    let mut files = vec![FileChange {
        path: MODPROBE_FILE,
        current: current.modprobe.clone(),
        wanted: modprobe,
        owned: true,
    }];
    let rebuild = match initramfs {
        Initramfs::Debian => {
            let base = current.debian_modules.clone().unwrap_or_default();
            let present: BTreeSet<&str> = base
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|w| !w.starts_with('#'))
                .collect();
            let missing: Vec<&str> = VFIO_INITRAMFS_MODULES
                .iter()
                .filter(|m| {
                    !present.contains(**m) && !present.contains(m.replace('_', "-").as_str())
                })
                .copied()
                .collect();
            let mut wanted = base.clone();
            if !missing.is_empty() {
                if !wanted.is_empty() && !wanted.ends_with('\n') {
                    wanted.push('\n');
                }
                wanted.push_str(
                    "# Added by gpupass host-config: vfio-pci must load before the GPU drivers.\n",
                );
                for m in missing {
                    wanted.push_str(m);
                    wanted.push('\n');
                }
            }
            if base.lines().any(|l| l.trim_start().starts_with("pci_stub")) {
                warnings.push(format!(
                    "{DEBIAN_MODULES_FILE} also loads pci_stub with ids: remove that line once vfio-pci claims the GPUs"
                ));
            }
            files.push(FileChange {
                path: DEBIAN_MODULES_FILE,
                current: current.debian_modules.clone(),
                wanted,
                owned: false,
            });
            "update-initramfs -u -k all"
        }
        Initramfs::Dracut => {
            files.push(FileChange {
                path: DRACUT_FILE,
                current: current.dracut.clone(),
                wanted: format!(
                    "# Written by gpupass host-config: vfio-pci must load before the GPU drivers.\nforce_drivers+=\" {} \"\n",
                    VFIO_INITRAMFS_MODULES.join(" ")
                ),
                owned: true,
            });
            "dracut -f --regenerate-all"
        }
    };
    let words: Vec<&str> = current.cmdline.split_whitespace().collect();
    let intel = current.cpu_vendor.as_deref() != Some("AuthenticAMD");
    let iommu_word = if intel {
        "intel_iommu=on"
    } else {
        "amd_iommu=on"
    };
    let cmdline_add: Vec<String> = [iommu_word, "iommu=pt"]
        .iter()
        .filter(|w| !words.contains(*w))
        .map(|w| (*w).to_owned())
        .collect();
    let mut commands = Vec::new();
    if files.iter().any(FileChange::changes) {
        commands.push(rebuild.to_owned());
    }
    if !cmdline_add.is_empty() {
        commands.push(format!(
            "add \"{}\" to GRUB_CMDLINE_LINUX_DEFAULT in /etc/default/grub, then update-grub (or grub2-mkconfig -o /boot/grub2/grub.cfg)",
            cmdline_add.join(" ")
        ));
    }
    if !commands.is_empty() {
        commands
            .push("reboot when convenient: the GPUs come up on vfio-pci at the next boot".into());
    }
    Ok(HostConfigPlan {
        gpus,
        ids: ids.into_iter().collect(),
        files,
        cmdline_add,
        commands,
        warnings,
    })
}

fn read(root: &Path, rel: &str) -> Result<Option<String>, HostConfigError> {
    // The same check as the write: a preview of a file that cannot be written fails the same way.
    let path = confine(root, rel, false)?;
    match fs::read_to_string(&path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(HostConfigError::Io {
            action: "read",
            path,
            source,
        }),
    }
}

/// Reads the current state under the host root.
pub fn read_current(root: &Path, inv: &Inventory) -> Result<Current, HostConfigError> {
    let sysfs = crate::host::sysfs::Sysfs::new(root);
    let mut driver_modules = Vec::new();
    let drivers: BTreeSet<String> = inv
        .devices
        .values()
        .filter_map(|d| d.driver.clone())
        .collect();
    for d in drivers {
        let link = root.join("sys/bus/pci/drivers").join(&d).join("module");
        // A name that is not a module name is ignored: the driver's own name stands in.
        if let Some(m) = fs::read_link(&link).ok().and_then(|t| {
            t.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<DriverName>().ok())
        }) {
            driver_modules.push((d, m));
        }
    }
    Ok(Current {
        cmdline: read(root, "proc/cmdline")?.unwrap_or_default(),
        cpu_vendor: sysfs.cpu_vendor().ok().flatten(),
        modprobe: read(root, MODPROBE_FILE)?,
        debian_modules: read(root, DEBIAN_MODULES_FILE)?,
        dracut: read(root, DRACUT_FILE)?,
        driver_modules,
    })
}

/// Writes every changed file atomically under `root`, keeping a copy of what it replaces as
/// `<file>.gpupass-bak.<unix time>`. Returns the backups made. Each file's directory is made
/// and resolved under the root first ([`confine`]); the temp file and the backup are created
/// new (`O_EXCL`, `O_NOFOLLOW`), never through a planted name.
pub fn apply(
    root: &Path,
    plan: &HostConfigPlan,
    now: u64,
) -> Result<Vec<PathBuf>, HostConfigError> {
    // Every path checked before the first write: nothing is half-written.
    for f in plan.files.iter().filter(|f| f.changes()) {
        confine(root, f.path, false)?;
    }
    let mut backups = Vec::new();
    for f in plan.files.iter().filter(|f| f.changes()) {
        let path = confine(root, f.path, true)?;
        let io_err = |action, source| HostConfigError::Io {
            action,
            path: root.join(f.path),
            source,
        };
        let dir = path.parent().expect("host-config paths have a parent");
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let create_new = |p: &Path| {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(p)
        };
        if f.current.is_some() {
            let mut from = fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| io_err("back up", e))?;
            // A second apply within the same second keeps both old files.
            let mut n = 0u32;
            let (backup, mut to) = loop {
                let backup = match n {
                    0 => dir.join(format!("{name}.gpupass-bak.{now}")),
                    _ => dir.join(format!("{name}.gpupass-bak.{now}.{n}")),
                };
                match create_new(&backup) {
                    Ok(to) => break (backup, to),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 100 => n += 1,
                    Err(e) => return Err(io_err("back up", e)),
                }
            };
            io::copy(&mut from, &mut to)
                .and_then(|_| to.sync_all())
                .map_err(|e| io_err("back up", e))?;
            backups.push(backup);
        }
        let tmp = dir.join(format!(".{name}.gpupass.{}", std::process::id()));
        // A temp file left by a killed run of this pid is ours to replace.
        let _ = fs::remove_file(&tmp);
        let mut file = create_new(&tmp).map_err(|e| io_err("write", e))?;
        file.write_all(f.wanted.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| io_err("write", e))?;
        fs::rename(&tmp, &path).map_err(|e| io_err("write", e))?;
    }
    Ok(backups)
}
