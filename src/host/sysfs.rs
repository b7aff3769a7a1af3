//! Reads the kernel's PCI, IOMMU and NUMA state under a host root (`/` on a real host, a fixture
//! directory in tests). Owns every path gpupass builds under that root, and [`confine`], which
//! every writer uses to make sure a path it writes stays under the root; writes nothing itself.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{self, OFlag};
use nix::sys::stat::Mode;

use crate::model::{DriverName, IommuGroupId, MdevUuid, NumaNode, PciAddress};

/// Errors from reading the host root.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    /// A file or directory could not be read.
    #[error("failed to read {path}")]
    Read {
        /// The full path, root included.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: io::Error,
    },
    /// A device's `driver` link ends in something that is not a kernel driver name.
    #[error("the driver link {path} names {name:?}, which is not a kernel driver name")]
    BadDriverLink {
        /// The link.
        path: PathBuf,
        /// Its last component, as read.
        name: String,
    },
    /// A path to be written leads out of the host root (through a symbolic link).
    #[error("refusing to write {path}: it resolves to {resolved}, outside the host root {root}")]
    Escapes {
        /// The path as gpupass built it.
        path: PathBuf,
        /// Where its directory really is.
        resolved: PathBuf,
        /// The host root.
        root: PathBuf,
    },
    /// The file to be written is itself a symbolic link.
    #[error("refusing to write {path}: it is a symbolic link (gpupass never writes through one)")]
    Symlink {
        /// The link.
        path: PathBuf,
    },
    /// A path to be written is not a plain relative path (a bug, never user input).
    #[error("refusing to write {path}: not a plain path under the host root")]
    NotPlain {
        /// The path.
        path: PathBuf,
    },
    /// A directory on the way to a file could not be created.
    #[error("failed to create the directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: io::Error,
    },
    /// The host root is not a directory with a `sys/bus/pci/devices` inside.
    #[error("host root {root} has no sys/bus/pci/devices (is --host-root right?)")]
    NotAHostRoot {
        /// The root that was given.
        root: PathBuf,
    },
}

/// The host as the kernel shows it, under a root prefix.
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

impl Sysfs {
    /// A host root at `root`; `/` for the real host.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root this reads from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn device_dir(&self, addr: PciAddress) -> PathBuf {
        // `addr` prints as hex digits, ':' and '.', so this stays inside devices/.
        self.path("sys/bus/pci/devices").join(addr.to_string())
    }

    /// The device's directory, opened once, for reading many of its attributes: the kernel then
    /// resolves the host root and the device's link once per device rather than once per
    /// attribute (discovery reads ~8 per device, on every hook call). `None` when there is no
    /// such device.
    pub fn device(&self, addr: PciAddress) -> Result<Option<DeviceDir>, SysfsError> {
        let path = self.device_dir(addr);
        match fcntl::open(
            &path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(Some(DeviceDir { path, fd })),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(SysfsError::Read {
                path,
                source: e.into(),
            }),
        }
    }

    /// `sys/bus/pci/devices`, opened once for reading many devices (a discovery reads ~40): each
    /// device's directory and link are then found from it rather than by resolving the host
    /// root's path again. Reads as [`Sysfs::device`] and [`Sysfs::parent`] read, with the same
    /// answers and errors; when the directory cannot be opened, through them.
    pub fn devices_dir(&self) -> DevicesDir<'_> {
        let fd = fcntl::open(
            &self.path("sys/bus/pci/devices"),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok();
        DevicesDir { sysfs: self, fd }
    }

    /// Every PCI function the kernel lists, sorted. Names that are not PCI addresses are skipped.
    pub fn pci_devices(&self) -> Result<Vec<PciAddress>, SysfsError> {
        let dir = self.path("sys/bus/pci/devices");
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(SysfsError::NotAHostRoot {
                    root: self.root.clone(),
                })
            }
            Err(source) => return Err(SysfsError::Read { path: dir, source }),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| SysfsError::Read {
                path: dir.clone(),
                source,
            })?;
            if let Some(addr) = entry.file_name().to_str().and_then(pci_name) {
                out.push(addr);
            }
        }
        out.sort();
        Ok(out)
    }

    /// A device attribute with surrounding whitespace trimmed; `None` when the file is absent
    /// (older kernels lack `reset_method`, non-VGA devices lack `boot_vga`).
    pub fn attr(&self, addr: PciAddress, name: &str) -> Result<Option<String>, SysfsError> {
        read_optional(&self.device_dir(addr).join(name))
    }

    /// A hex attribute such as `vendor` (`0x10de`) or `class` (`0x030200`).
    pub fn hex_attr(&self, addr: PciAddress, name: &str) -> Result<Option<u32>, SysfsError> {
        Ok(self.attr(addr, name)?.as_deref().and_then(parse_hex))
    }

    /// The bound driver's name (last component of the `driver` link), or `None` when unbound.
    /// Only the name counts: where the link points is never followed (the kernel's own links
    /// are relative, `../../../bus/pci/drivers/nvidia`); a writer builds
    /// `sys/bus/pci/drivers/<name>` from it. A name no kernel driver has is an error.
    pub fn driver_name(&self, addr: PciAddress) -> Result<Option<DriverName>, SysfsError> {
        let path = self.device_dir(addr).join("driver");
        match self.link_target(&path)? {
            Some(target) => driver_of_link(&target, || path).map(Some),
            None => Ok(None),
        }
    }

    /// [`Sysfs::driver_name`] as a string, for the inventory.
    pub fn driver(&self, addr: PciAddress) -> Result<Option<String>, SysfsError> {
        Ok(self.driver_name(addr)?.map(String::from))
    }

    /// `rel` under this root, checked by [`confine`] for a write.
    pub fn confine(&self, rel: &str) -> Result<PathBuf, SysfsError> {
        confine(&self.root, rel, false)
    }

    /// The IOMMU group (last component of the `iommu_group` link), or `None` without an IOMMU.
    pub fn iommu_group(&self, addr: PciAddress) -> Result<Option<IommuGroupId>, SysfsError> {
        Ok(self
            .link_target(&self.device_dir(addr).join("iommu_group"))?
            .as_deref()
            .and_then(group_of_link))
    }

    /// The NUMA node; sysfs `-1` (unknown) and a missing file are `None`.
    pub fn numa_node(&self, addr: PciAddress) -> Result<Option<NumaNode>, SysfsError> {
        Ok(self
            .attr(addr, "numa_node")?
            .as_deref()
            .and_then(parse_numa))
    }

    /// The upstream PCI device (the bridge above), from the device's place under
    /// `sys/devices/pciDDDD:BB/…`; `None` for a device on a root bus.
    pub fn parent(&self, addr: PciAddress) -> Result<Option<PciAddress>, SysfsError> {
        let Some(target) = self.link_target(&self.device_dir(addr))? else {
            return Ok(None);
        };
        Ok(parent_in_link(&target))
    }

    /// The IOMMU group numbers (`sys/kernel/iommu_groups/<N>`), without reading members.
    pub fn iommu_group_ids(&self) -> Result<Vec<IommuGroupId>, SysfsError> {
        let mut ids: Vec<IommuGroupId> = list_dir(&self.path("sys/kernel/iommu_groups"))?
            .iter()
            .filter_map(|n| n.parse().ok())
            .map(IommuGroupId)
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Members of one IOMMU group.
    pub fn group_members(&self, group: IommuGroupId) -> Result<Vec<PciAddress>, SysfsError> {
        let dir = self
            .path("sys/kernel/iommu_groups")
            .join(group.0.to_string())
            .join("devices");
        let mut members: Vec<PciAddress> =
            list_dir(&dir)?.iter().filter_map(|m| pci_name(m)).collect();
        members.sort();
        Ok(members)
    }

    /// The PCI devices directly below a bridge (its sysfs directory's PCI-named entries).
    pub fn children(&self, addr: PciAddress) -> Result<Vec<PciAddress>, SysfsError> {
        let mut out: Vec<PciAddress> = list_dir(&self.device_dir(addr))?
            .iter()
            .filter_map(|n| pci_name(n))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Names under `sys/class/iommu` (`dmar0`, `ivhd0`…): the IOMMU units the kernel drives.
    pub fn iommu_units(&self) -> Result<Vec<String>, SysfsError> {
        let mut units = list_dir(&self.path("sys/class/iommu"))?;
        units.sort();
        Ok(units)
    }

    /// The kernel command line (`proc/cmdline`), empty when absent.
    pub fn cmdline(&self) -> Result<String, SysfsError> {
        Ok(read_optional(&self.path("proc/cmdline"))?.unwrap_or_default())
    }

    /// Whether a kernel module is loaded (`sys/module/<name>` exists).
    pub fn module_loaded(&self, name: &str) -> bool {
        // Module names are our own constants, never user input.
        self.path("sys/module").join(name).is_dir()
    }

    /// CPUs of each NUMA node (`sys/devices/system/node/node<N>/cpulist`).
    pub fn numa_cpus(&self) -> Result<Vec<(NumaNode, BTreeSet<u32>)>, SysfsError> {
        let dir = self.path("sys/devices/system/node");
        let mut out = Vec::new();
        for name in list_dir(&dir)? {
            let Some(n) = name
                .strip_prefix("node")
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let list = read_optional(&dir.join(&name).join("cpulist"))?.unwrap_or_default();
            // A malformed cpulist only costs the NUMA preference, never the command.
            let cpus = crate::cpuset::parse(&list).unwrap_or_default();
            out.push((NumaNode(n), cpus));
        }
        out.sort();
        Ok(out)
    }

    /// DRM nodes of a device (`card1`, `renderD129`), from its `drm/` directory.
    pub fn drm_nodes(&self, addr: PciAddress) -> Result<Vec<String>, SysfsError> {
        let mut n = list_dir(&self.device_dir(addr).join("drm"))?;
        n.retain(|x| x.starts_with("card") || x.starts_with("render"));
        n.sort();
        Ok(n)
    }

    /// The NVIDIA driver's device minor of a GPU (`/dev/nvidiaN`), from
    /// `proc/driver/nvidia/gpus/<bdf>/information`.
    pub fn nvidia_minor(&self, addr: PciAddress) -> Result<Option<u32>, SysfsError> {
        let path = self
            .path("proc/driver/nvidia/gpus")
            .join(addr.to_string())
            .join("information");
        Ok(read_optional(&path)?.and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("Device Minor:"))
                .and_then(|v| v.trim().parse().ok())
        }))
    }

    /// Processes with any of `paths` open: `(pid, comm, path)`, from `proc/<pid>/fd/*` links.
    /// Unreadable processes (gone, or not ours to read) are skipped.
    pub fn fd_holders(&self, paths: &BTreeSet<String>) -> Vec<(u32, String, String)> {
        let mut out = Vec::new();
        if paths.is_empty() {
            return out;
        }
        let Ok(procs) = list_dir(&self.path("proc")) else {
            return out;
        };
        for p in procs {
            let Ok(pid) = p.parse::<u32>() else { continue };
            let dir = self.path("proc").join(&p);
            let Ok(fds) = list_dir(&dir.join("fd")) else {
                continue;
            };
            for fd in fds {
                let Ok(Some(target)) = self.link_target(&dir.join("fd").join(&fd)) else {
                    continue;
                };
                let target = target.display().to_string();
                if paths.contains(&target) {
                    let comm = read_optional(&dir.join("comm"))
                        .ok()
                        .flatten()
                        .unwrap_or_default();
                    out.push((pid, comm, target));
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Whether a file exists under the root (`dev/vfio/vfio`, a hook script).
    pub fn exists(&self, rel: &str) -> bool {
        self.path(rel).exists()
    }

    /// A kernel module parameter (`sys/module/<m>/parameters/<p>`).
    pub fn module_param(&self, module: &str, param: &str) -> Result<Option<String>, SysfsError> {
        read_optional(
            &self
                .path("sys/module")
                .join(module)
                .join("parameters")
                .join(param),
        )
    }

    /// The CPU vendor (`GenuineIntel`, `AuthenticAMD`) from `proc/cpuinfo`.
    pub fn cpu_vendor(&self) -> Result<Option<String>, SysfsError> {
        Ok(first_line_after(&self.path("proc/cpuinfo"), "vendor_id")?
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned()))
    }

    /// The host CPU's physical address bits (`address sizes : 46 bits physical, …` in
    /// `proc/cpuinfo`): no guest may be given more. `None` when the file or line is absent.
    pub fn host_phys_bits(&self) -> Result<Option<u8>, SysfsError> {
        Ok(
            first_line_after(&self.path("proc/cpuinfo"), "address sizes")?.and_then(|v| {
                v.trim_start_matches([' ', '\t', ':'])
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
            }),
        )
    }

    /// Entry names of the directory `rel` inside a device's directory (`mdev_supported_types`),
    /// sorted; empty when it does not exist. `rel` is a constant or a name this listed.
    pub fn device_entries(&self, addr: PciAddress, rel: &str) -> Result<Vec<String>, SysfsError> {
        let mut names = list_dir(&self.device_dir(addr).join(rel))?;
        names.sort();
        Ok(names)
    }

    /// The target of the link `rel` inside a device's directory (`virtfn0`, `physfn`), not
    /// followed; `None` when absent or not a link.
    pub fn device_link(&self, addr: PciAddress, rel: &str) -> Result<Option<PathBuf>, SysfsError> {
        self.link_target(&self.device_dir(addr).join(rel))
    }

    /// The mediated devices the kernel lists (`sys/bus/mdev/devices`), sorted; names that are
    /// not UUIDs are skipped. Empty without the mdev bus.
    pub fn mdev_devices(&self) -> Result<Vec<MdevUuid>, SysfsError> {
        let mut out: Vec<MdevUuid> = list_dir(&self.path("sys/bus/mdev/devices"))?
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect();
        out.sort();
        Ok(out)
    }

    /// Where the mdev bus's link of a mediated device points (`…/<parent>/<uuid>`), not
    /// followed; `None` when absent or not a link.
    pub fn mdev_device_link(&self, uuid: &MdevUuid) -> Result<Option<PathBuf>, SysfsError> {
        self.link_target(&self.path("sys/bus/mdev/devices").join(uuid.as_str()))
    }

    /// The target of a mediated device's link `name` (`mdev_type`), not followed; `None` when
    /// absent or not a link.
    pub fn mdev_link(&self, uuid: &MdevUuid, name: &str) -> Result<Option<PathBuf>, SysfsError> {
        // A UUID that parsed is one plain path component.
        self.link_target(
            &self
                .path("sys/bus/mdev/devices")
                .join(uuid.as_str())
                .join(name),
        )
    }

    fn link_target(&self, path: &Path) -> Result<Option<PathBuf>, SysfsError> {
        match fs::read_link(path) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            // Not a link (EINVAL): treat as absent rather than guess.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => Ok(None),
            Err(source) => Err(SysfsError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// The upstream device in a device's link (`…/pci0000:17/0000:17:01.0/0000:18:00.0`): the name
/// before the device's own, of the link's plain components (what `Path::components` calls
/// normal: not empty, `.` or `..`), read from the end as bytes (`components()` over the whole
/// link showed in the hook's profile).
fn parent_in_link(target: &Path) -> Option<PciAddress> {
    let mut names = target
        .as_os_str()
        .as_bytes()
        .rsplit(|b| *b == b'/')
        .filter(|c| !c.is_empty() && *c != b"." && *c != b"..")
        .filter_map(|c| std::str::from_utf8(c).ok());
    names.next();
    names.next().and_then(pci_name)
}

/// A directory entry's name as a PCI address (`0000:18:00.0`); `None` at once for a name with
/// no `:` or no `.` (a device directory's `vendor`, `power`…, a link's `pci0000:17`), without
/// building the parse error the hook's profile showed for each of them.
fn pci_name(name: &str) -> Option<PciAddress> {
    if !name.contains(':') || !name.contains('.') {
        return None;
    }
    name.parse().ok()
}

/// The path to write for `rel` (a plain relative path such as `etc/modprobe.d/x.conf`) under
/// `root`, refusing one that leaves the root: each directory on the way is resolved (a
/// symbolic link is followed and must land under the canonical root; with `create_dirs`, a
/// missing one is made, never through a link), and the file itself must not be a symbolic
/// link. Returns the file's path below the resolved directory, so a writer opens exactly what
/// was checked; writers also open it with `O_NOFOLLOW`.
pub fn confine(root: &Path, rel: &str, create_dirs: bool) -> Result<PathBuf, SysfsError> {
    let shown = root.join(rel);
    let mut parts = Vec::new();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(n) => parts.push(n),
            _ => return Err(SysfsError::NotPlain { path: shown }),
        }
    }
    let Some((name, dirs)) = parts.split_last() else {
        return Err(SysfsError::NotPlain { path: shown });
    };
    let canon_root = fs::canonicalize(root).map_err(|source| SysfsError::Read {
        path: root.to_path_buf(),
        source,
    })?;
    let mut dir = canon_root.clone();
    for d in dirs {
        let next = dir.join(d);
        match fs::symlink_metadata(&next) {
            Ok(m) if m.file_type().is_symlink() => {
                let real = fs::canonicalize(&next).map_err(|source| SysfsError::Read {
                    path: next.clone(),
                    source,
                })?;
                if !real.starts_with(&canon_root) {
                    return Err(SysfsError::Escapes {
                        path: shown,
                        resolved: real,
                        root: root.to_path_buf(),
                    });
                }
                dir = real;
            }
            // A real directory (or not one: opening below it fails with a clear IO error).
            Ok(_) => dir = next,
            Err(e) if e.kind() == io::ErrorKind::NotFound && create_dirs => {
                match fs::create_dir(&next) {
                    Ok(()) => {}
                    // Made meanwhile: look again, it may be a link.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        return confine(root, rel, create_dirs)
                    }
                    Err(source) => return Err(SysfsError::CreateDir { path: next, source }),
                }
                dir = next;
            }
            // Missing: the write's open reports it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => dir = next,
            Err(source) => return Err(SysfsError::Read { path: next, source }),
        }
    }
    let file = dir.join(name);
    match fs::symlink_metadata(&file) {
        Ok(m) if m.file_type().is_symlink() => Err(SysfsError::Symlink { path: shown }),
        _ => Ok(file),
    }
}

fn last_name(p: &Path) -> Option<String> {
    p.file_name().and_then(|n| n.to_str()).map(str::to_owned)
}

/// `sys/bus/pci/devices`, open (see [`Sysfs::devices_dir`]).
#[derive(Debug)]
pub struct DevicesDir<'a> {
    sysfs: &'a Sysfs,
    fd: Option<OwnedFd>,
}

impl DevicesDir<'_> {
    /// Like [`Sysfs::device`].
    pub fn device(&self, addr: PciAddress) -> Result<Option<DeviceDir>, SysfsError> {
        let Some(dir) = &self.fd else {
            return self.sysfs.device(addr);
        };
        match fcntl::openat(
            dir,
            addr.to_string().as_str(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(Some(DeviceDir {
                path: self.sysfs.device_dir(addr),
                fd,
            })),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(SysfsError::Read {
                path: self.sysfs.device_dir(addr),
                source: e.into(),
            }),
        }
    }

    /// A hex attribute of a device (`vendor`, `class`) read as `<address>/<name>` from the open
    /// directory, without opening the device's own: for a device of which only one or two
    /// attributes are read (a bridge above a card), two system calls fewer than through
    /// [`DevicesDir::device`]. Like [`Sysfs::hex_attr`].
    pub fn hex_attr(&self, addr: PciAddress, name: &str) -> Result<Option<u32>, SysfsError> {
        if self.fd.is_none() {
            return self.sysfs.hex_attr(addr, name);
        }
        Ok(self.read_rel(addr, name)?.as_deref().and_then(parse_hex))
    }

    /// A device's vendor, device and class from one read of its `modalias`
    /// (`pci:v000010DEd00002330sv…sd…bc03sc02i00`: the kernel prints the same fields as the
    /// `vendor`, `device` and `class` files), read as `<address>/modalias` from the open
    /// directory. `None` when the file is absent or not in that form: then read the three files.
    pub fn identity(&self, addr: PciAddress) -> Result<Option<Identity>, SysfsError> {
        if self.fd.is_none() {
            return Ok(None);
        }
        Ok(self
            .read_rel(addr, "modalias")?
            .as_deref()
            .and_then(parse_modalias))
    }

    /// `<address>/<name>` read through the open directory (one `openat`, one read); `None` when
    /// absent or when the directory could not be opened. `addr` prints as hex digits, ':' and
    /// '.': one name inside devices/.
    fn read_rel(&self, addr: PciAddress, name: &str) -> Result<Option<String>, SysfsError> {
        let Some(dir) = &self.fd else {
            return Ok(None);
        };
        let rel = format!("{addr}/{name}");
        let err = |source| SysfsError::Read {
            path: self.sysfs.device_dir(addr).join(name),
            source,
        };
        match fcntl::openat(
            dir,
            rel.as_str(),
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(f) => read_small(fs::File::from(f)).map(Some).map_err(err),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(err(e.into())),
        }
    }

    /// Like [`Sysfs::parent`].
    pub fn parent(&self, addr: PciAddress) -> Result<Option<PciAddress>, SysfsError> {
        let Some(dir) = &self.fd else {
            return self.sysfs.parent(addr);
        };
        let target = match fcntl::readlinkat(dir, addr.to_string().as_str()) {
            Ok(t) => PathBuf::from(t),
            Err(Errno::ENOENT | Errno::EINVAL) => return Ok(None),
            Err(e) => {
                return Err(SysfsError::Read {
                    path: self.sysfs.device_dir(addr),
                    source: e.into(),
                })
            }
        };
        Ok(parent_in_link(&target))
    }
}

/// One PCI function's sysfs directory, open (see [`Sysfs::device`]). Reads what the
/// [`Sysfs`] methods of the same names read, relative to the open directory.
#[derive(Debug)]
pub struct DeviceDir {
    /// For error messages.
    path: PathBuf,
    fd: OwnedFd,
}

impl DeviceDir {
    /// Like [`Sysfs::attr`].
    pub fn attr(&self, name: &str) -> Result<Option<String>, SysfsError> {
        let err = |source| SysfsError::Read {
            path: self.path.join(name),
            source,
        };
        match fcntl::openat(
            &self.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => read_small(fs::File::from(fd)).map(Some).map_err(err),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(err(e.into())),
        }
    }

    /// The first `max` bytes of a binary attribute such as `config`, unchanged; `None` when
    /// the file is absent.
    pub fn bytes(&self, name: &str, max: usize) -> Result<Option<Vec<u8>>, SysfsError> {
        let err = |source| SysfsError::Read {
            path: self.path.join(name),
            source,
        };
        match fcntl::openat(
            &self.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => {
                let mut data = Vec::with_capacity(max);
                fs::File::from(fd)
                    .take(max as u64)
                    .read_to_end(&mut data)
                    .map_err(err)?;
                Ok(Some(data))
            }
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(err(e.into())),
        }
    }

    /// Like [`Sysfs::hex_attr`].
    pub fn hex_attr(&self, name: &str) -> Result<Option<u32>, SysfsError> {
        Ok(self.attr(name)?.as_deref().and_then(parse_hex))
    }

    /// Like [`Sysfs::driver`].
    pub fn driver(&self) -> Result<Option<String>, SysfsError> {
        match self.link("driver")? {
            Some(t) => driver_of_link(&t, || self.path.join("driver")).map(|d| Some(d.into())),
            None => Ok(None),
        }
    }

    /// Like [`Sysfs::iommu_group`].
    pub fn iommu_group(&self) -> Result<Option<IommuGroupId>, SysfsError> {
        Ok(self.link("iommu_group")?.as_deref().and_then(group_of_link))
    }

    /// Like [`Sysfs::numa_node`].
    pub fn numa_node(&self) -> Result<Option<NumaNode>, SysfsError> {
        Ok(self.attr("numa_node")?.as_deref().and_then(parse_numa))
    }

    /// An SR-IOV virtual function: the kernel links it to its PF (`physfn`).
    pub fn is_virtfn(&self) -> Result<bool, SysfsError> {
        Ok(self.link("physfn")?.is_some())
    }

    fn link(&self, name: &str) -> Result<Option<PathBuf>, SysfsError> {
        match fcntl::readlinkat(&self.fd, name) {
            Ok(t) => Ok(Some(PathBuf::from(t))),
            // Absent, or not a link: treat as absent rather than guess (as `link_target`).
            Err(Errno::ENOENT | Errno::EINVAL) => Ok(None),
            Err(e) => Err(SysfsError::Read {
                path: self.path.join(name),
                source: e.into(),
            }),
        }
    }
}

/// A hex attribute's value (`0x10de`).
/// A PCI function's IDs and class, as its `modalias` gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// `vendor`.
    pub vendor: u32,
    /// `device`.
    pub device: u32,
    /// `class` (base class, subclass, programming interface).
    pub class: u32,
}

/// `pci:v%08Xd%08Xsv%08Xsd%08Xbc%02Xsc%02Xi%02X` (pci-sysfs.c's format); anything else is
/// `None`.
fn parse_modalias(v: &str) -> Option<Identity> {
    let mut rest = v.strip_prefix("pci:")?;
    let mut field = |tag: &str, digits: usize| -> Option<u32> {
        let after = rest.strip_prefix(tag)?;
        let hex = after.get(..digits)?;
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        rest = &after[digits..];
        u32::from_str_radix(hex, 16).ok()
    };
    let vendor = field("v", 8)?;
    let device = field("d", 8)?;
    field("sv", 8)?;
    field("sd", 8)?;
    let class = (field("bc", 2)? << 16) | (field("sc", 2)? << 8) | field("i", 2)?;
    (rest.is_empty() && vendor <= 0xffff && device <= 0xffff).then_some(Identity {
        vendor,
        device,
        class,
    })
}

fn parse_hex(v: &str) -> Option<u32> {
    u32::from_str_radix(v.strip_prefix("0x").unwrap_or(v), 16).ok()
}

/// `numa_node`'s value: `-1` (unknown) is `None`.
fn parse_numa(v: &str) -> Option<NumaNode> {
    v.parse::<i64>()
        .ok()
        .and_then(|n| u32::try_from(n).ok())
        .map(NumaNode)
}

/// The group number at the end of an `iommu_group` link.
fn group_of_link(target: &Path) -> Option<IommuGroupId> {
    last_name(target)
        .and_then(|n| n.parse().ok())
        .map(IommuGroupId)
}

/// The driver name at the end of a `driver` link (`path`, for the error, is the link's).
fn driver_of_link(target: &Path, path: impl FnOnce() -> PathBuf) -> Result<DriverName, SysfsError> {
    let raw = target.file_name().unwrap_or(OsStr::new(""));
    raw.to_str()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| SysfsError::BadDriverLink {
            name: raw.to_string_lossy().chars().take(80).collect(),
            path: path(),
        })
}

/// Reads a small file: open, one read, close. A sysfs attribute's `show()` fills one read, so a
/// short read is the end; `read_to_string` would add a `statx` and a second `read` to each of
/// the hundreds of attributes a discovery reads.
fn read_optional(path: &Path) -> Result<Option<String>, SysfsError> {
    let err = |source| SysfsError::Read {
        path: path.to_path_buf(),
        source,
    };
    match fs::File::open(path) {
        Ok(f) => read_small(f).map(Some).map_err(err),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(err(e)),
    }
}

/// The rest of the first line of `path` that starts with `prefix`, reading only up to that
/// line: `proc/cpuinfo` repeats its lines for every CPU (hundreds of KB on a large host), and
/// the first CPU's block answers. `None` when the file or the line is absent.
fn first_line_after(path: &Path, prefix: &str) -> Result<Option<String>, SysfsError> {
    let err = |source| SysfsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let mut reader = io::BufReader::new(f);
    let mut line = Vec::new();
    loop {
        line.clear();
        if io::BufRead::read_until(&mut reader, b'\n', &mut line).map_err(err)? == 0 {
            return Ok(None);
        }
        if let Some(rest) = line.strip_prefix(prefix.as_bytes()) {
            return Ok(Some(String::from_utf8_lossy(rest).trim_end().to_owned()));
        }
    }
}

/// Reads an open small file to its end, trimmed. A read shorter than the buffer is the end (a
/// sysfs `show()` fills one read); a longer file takes more reads. The buffer is small because
/// attributes are (`0x10de`), and zeroing a page per read showed in the hook's profile.
fn read_small(mut f: fs::File) -> io::Result<String> {
    let mut buf = [0u8; 256];
    let mut data = Vec::new();
    loop {
        let n = match f.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        data.extend_from_slice(&buf[..n]);
        if n < buf.len() {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&data).trim().to_owned())
}

/// Entry names of a directory; empty when it does not exist.
fn list_dir(dir: &Path) -> Result<Vec<String>, SysfsError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(SysfsError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| SysfsError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        if let Some(n) = entry.file_name().to_str() {
            names.push(n.to_owned());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn the_parent_is_the_link_s_second_last_plain_name() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("sys/bus/pci/devices");
        fs::create_dir_all(&dir).unwrap();
        let s = Sysfs::new(t.path());
        let link = |addr: &str, target: &str| {
            symlink(target, dir.join(addr)).unwrap();
            s.parent(addr.parse().unwrap()).unwrap()
        };
        let up: PciAddress = "0000:17:01.0".parse().unwrap();
        let kernel = "../../../devices/pci0000:17/0000:17:01.0/0000:18:00.0";
        assert_eq!(link("0000:18:00.0", kernel), Some(up));
        // `.`, empty names and a trailing slash are not names, as `Path::components` reads them.
        let odd = "../../../devices/pci0000:17/0000:17:01.0/.//0000:19:00.0/";
        assert_eq!(link("0000:19:00.0", odd), Some(up));
        // On a root bus the name before is the root bus: no parent.
        assert_eq!(
            link("0000:17:01.0", "../../../devices/pci0000:17/0000:17:01.0"),
            None
        );
        assert_eq!(link("0000:1a:00.0", "0000:1a:00.0"), None, "one name only");
        // Read from the directory opened once: the same answers.
        let devices = s.devices_dir();
        for a in [
            "0000:18:00.0",
            "0000:19:00.0",
            "0000:17:01.0",
            "0000:1a:00.0",
            "0000:1b:00.0",
        ] {
            let a: PciAddress = a.parse().unwrap();
            assert_eq!(devices.parent(a).unwrap(), s.parent(a).unwrap(), "{a}");
            // Errors too (the link to itself loops): the same, with the same path.
            assert_eq!(
                format!("{:?}", devices.device(a).map(|d| d.is_some())),
                format!("{:?}", s.device(a).map(|d| d.is_some())),
                "{a}"
            );
        }
        let a: PciAddress = "0000:18:00.0".parse().unwrap();
        fs::create_dir_all(
            t.path()
                .join("sys/devices/pci0000:17/0000:17:01.0/0000:18:00.0"),
        )
        .unwrap();
        assert!(
            devices.device(a).unwrap().is_some(),
            "the link resolves: a device"
        );
        // Without the directory, through the per-path readers.
        let bare = tempfile::tempdir().unwrap();
        let none = Sysfs::new(bare.path());
        assert_eq!(none.devices_dir().parent(a).unwrap(), None);
        assert!(none.devices_dir().device(a).unwrap().is_none());
        assert_eq!(
            s.parent("0000:1b:00.0".parse().unwrap()).unwrap(),
            None,
            "no link"
        );
    }

    #[test]
    fn cpuinfo_answers_from_the_first_cpu_and_stops_there() {
        let t = tempfile::tempdir().unwrap();
        let info = t.path().join("cpuinfo");
        let block = |n: u32, bits: u32| {
            format!("processor\t: {n}\nvendor_id\t: GenuineIntel\naddress sizes\t: {bits} bits physical, 57 bits virtual\n\n")
        };
        // A big host's file: many blocks; a later (impossible) value is never read.
        let mut text = block(0, 46);
        text.push_str(&block(1, 52).repeat(2000));
        fs::write(&info, text).unwrap();
        let rest = first_line_after(&info, "address sizes").unwrap().unwrap();
        assert_eq!(rest, "\t: 46 bits physical, 57 bits virtual");
        assert_eq!(first_line_after(&info, "model name").unwrap(), None);
        assert_eq!(
            first_line_after(&t.path().join("absent"), "vendor_id").unwrap(),
            None
        );
    }

    #[test]
    fn confine_keeps_writes_under_the_root() {
        let t = tempfile::tempdir().unwrap();
        let (root, out) = (t.path().join("root"), t.path().join("out"));
        fs::create_dir_all(root.join("sys/devices/pci0/0000:01:00.0")).unwrap();
        fs::create_dir_all(root.join("sys/bus/pci/devices")).unwrap();
        fs::create_dir_all(&out).unwrap();
        // A link that stays inside (as sysfs's own are) is followed.
        symlink(
            "../../../devices/pci0/0000:01:00.0",
            root.join("sys/bus/pci/devices/0000:01:00.0"),
        )
        .unwrap();
        let p = confine(
            &root,
            "sys/bus/pci/devices/0000:01:00.0/driver_override",
            false,
        )
        .unwrap();
        assert_eq!(
            p,
            fs::canonicalize(&root)
                .unwrap()
                .join("sys/devices/pci0/0000:01:00.0/driver_override")
        );
        // A link leaving the root is refused, with or without creating directories.
        symlink(&out, root.join("etc")).unwrap();
        for create in [false, true] {
            let e = confine(&root, "etc/modprobe.d/x.conf", create).unwrap_err();
            assert!(matches!(e, SysfsError::Escapes { .. }), "{e}");
        }
        assert_eq!(fs::read_dir(&out).unwrap().count(), 0);
        // Missing directories are made when asked, and only then.
        let p = confine(&root, "var/lib/x/f", false).unwrap();
        assert!(!p.parent().unwrap().exists());
        let p = confine(&root, "var/lib/x/f", true).unwrap();
        assert!(p.parent().unwrap().is_dir());
        // The file itself may not be a link; nor may the path climb or be absolute.
        symlink(&out, root.join("var/lib/x/f")).unwrap();
        let e = confine(&root, "var/lib/x/f", false).unwrap_err();
        assert!(matches!(e, SysfsError::Symlink { .. }), "{e}");
        for bad in ["../x", "/etc/x", "", "a/../../x"] {
            let e = confine(&root, bad, false).unwrap_err();
            assert!(matches!(e, SysfsError::NotPlain { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn a_driver_link_counts_by_its_name_only() {
        let t = tempfile::tempdir().unwrap();
        let dev = t.path().join("sys/bus/pci/devices/0000:01:00.0");
        fs::create_dir_all(&dev).unwrap();
        let s = Sysfs::new(t.path());
        let a: PciAddress = "0000:01:00.0".parse().unwrap();
        assert_eq!(s.driver_name(a).unwrap(), None);
        symlink("/somewhere/else/nvidia", dev.join("driver")).unwrap();
        assert_eq!(s.driver(a).unwrap().as_deref(), Some("nvidia"));
        fs::remove_file(dev.join("driver")).unwrap();
        symlink("../..", dev.join("driver")).unwrap();
        let e = s.driver_name(a).unwrap_err();
        assert!(matches!(e, SysfsError::BadDriverLink { .. }), "{e}");
    }

    #[test]
    fn attributes_read_through_one_open_directory_match_one_by_one() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hosts/hgx-8gpu");
        let sysfs = Sysfs::new(&root);
        let mut addrs = sysfs.pci_devices().unwrap();
        assert!(addrs.len() > 8);
        let missing: PciAddress = "0000:ff:1f.7".parse().unwrap();
        addrs.push(missing);
        // One attribute at a time from the devices directory (and, without it, one by one).
        let devices = sysfs.devices_dir();
        for name in ["vendor", "device", "class", "no_such_attribute"] {
            let from_dir: Vec<Option<u32>> = addrs
                .iter()
                .map(|a| devices.hex_attr(*a, name).unwrap())
                .collect();
            let one: Vec<Option<u32>> = addrs
                .iter()
                .map(|a| sysfs.hex_attr(*a, name).unwrap())
                .collect();
            assert_eq!(from_dir, one, "{name}");
            assert_eq!(from_dir.last(), Some(&None), "{name}");
        }
        assert!(devices.hex_attr(addrs[0], "vendor").unwrap().is_some());
        let none = Sysfs::new(root.join("none"));
        assert_eq!(
            none.devices_dir().hex_attr(addrs[0], "vendor").unwrap(),
            None
        );
        // The eight GPUs and the BMC's VGA.
        assert_eq!(
            addrs
                .iter()
                .filter(|a| devices
                    .hex_attr(**a, "class")
                    .unwrap()
                    .is_some_and(|c| c >> 16 == 3))
                .count(),
            9
        );
    }

    #[test]
    fn modalias_gives_the_ids_and_class_or_nothing() {
        assert_eq!(
            parse_modalias("pci:v000010DEd00002330sv000010DEsd000016C1bc03sc02i00"),
            Some(Identity {
                vendor: 0x10de,
                device: 0x2330,
                class: 0x030200
            })
        );
        assert_eq!(
            parse_modalias("pci:v00008086d00000D57sv00000000sd00000000bc06sc04i01")
                .map(|i| i.class),
            Some(0x060401)
        );
        for bad in [
            "",
            "pci:v000010DEd00002330sv000010DEsd000016C1bc03sc02",
            "pci:v000010DEd00002330sv000010DEsd000016C1bc03sc02i00x",
            "pci:v000010DEd0000233sv000010DEsd000016C1bc03sc02i000",
            "pci:v000G10DEd00002330sv000010DEsd000016C1bc03sc02i00",
            "pci:v000110DEd00002330sv000010DEsd000016C1bc03sc02i00",
            "usb:v10DEp2330d0100dc00dsc00dp00ic03isc01ip01in00",
            "pci:v+00010DEd00002330sv000010DEsd000016C1bc03sc02i00",
        ] {
            assert_eq!(parse_modalias(bad), None, "{bad}");
        }
        // From the fixture: the same as the three files.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hosts/hgx-8gpu");
        let sysfs = Sysfs::new(&root);
        let devices = sysfs.devices_dir();
        for a in sysfs.pci_devices().unwrap() {
            let i = devices
                .identity(a)
                .unwrap()
                .expect("every fixture device has a modalias");
            let file = |n| sysfs.hex_attr(a, n).unwrap();
            assert_eq!(
                (Some(i.vendor), Some(i.device), Some(i.class)),
                (file("vendor"), file("device"), file("class")),
                "{a}"
            );
        }
        let gone: PciAddress = "0000:ff:1f.7".parse().unwrap();
        assert_eq!(devices.identity(gone).unwrap(), None);
        assert_eq!(
            Sysfs::new(root.join("none"))
                .devices_dir()
                .identity(gone)
                .unwrap(),
            None
        );
    }

    #[test]
    fn directory_entries_that_are_no_pci_address_are_skipped() {
        assert_eq!(
            pci_name("0000:18:00.0"),
            Some("0000:18:00.0".parse().unwrap())
        );
        assert_eq!(pci_name("18:00.0"), Some("0000:18:00.0".parse().unwrap()));
        for n in [
            "vendor",
            "pci0000:17",
            "0000:18:00",
            "power.x",
            "0000:18:00.8",
            "",
        ] {
            assert_eq!(pci_name(n), None, "{n}");
        }
    }
}
