//! Fractions of the host's GPUs as the kernel shows them, read-only: each GPU's SR-IOV virtual
//! functions, the mediated-device (mdev) types of the GPU and of its VFs, NVIDIA's
//! vendor-specific VFIO types on VFs, and the mdev instances that exist. Reading is sysfs IO
//! under the host root; parsing each file (and the vendors' type descriptions) is pure.
//!
//! A file that is present but does not parse is skipped with a warning (its field is `None`, a
//! type or instance it would describe is left out): one odd driver file must not hide every
//! GPU from `list`. Only an IO error other than "absent" fails the reading.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use serde::Serialize;

use crate::host::discover::{Gpu, Inventory};
use crate::host::sysfs::{Sysfs, SysfsError};
use crate::model::{IommuGroupId, MdevUuid, PciAddress};

/// Errors from reading or parsing the vGPU files.
#[derive(Debug, thiserror::Error)]
pub enum VgpuError {
    /// A file could not be read.
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
    /// A file's contents do not have the kernel's (or the vendor's) shape.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// Which file (`sriov_totalvfs`, `an NVIDIA vGPU type description`, …).
        what: &'static str,
        /// What is wrong, with the offending text (shortened).
        detail: String,
    },
}

fn malformed(what: &'static str, detail: impl Into<String>) -> VgpuError {
    VgpuError::Malformed {
        what,
        detail: detail.into(),
    }
}

/// Keeps a quoted value one short line.
fn quoted(s: &str) -> String {
    let mut t: String = s.chars().take(60).collect();
    if s.chars().count() > 60 {
        t.push('…');
    }
    format!("{:?}", t)
}

/// What one GPU offers in fractions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuVgpus {
    /// Its SR-IOV capability (`None`: the GPU has none, no `sriov_totalvfs`).
    pub sriov: Option<Sriov>,
    /// The vGPU types of the GPU and of its VFs, by parent then id.
    pub types: Vec<VgpuType>,
    /// The mdev instances whose parent is the GPU or one of its VFs.
    pub instances: Vec<MdevInstance>,
}

impl GpuVgpus {
    /// Nothing fractional at all: no SR-IOV, no types, no instances.
    pub fn is_empty(&self) -> bool {
        self.sriov.is_none() && self.types.is_empty() && self.instances.is_empty()
    }
}

/// A physical function's SR-IOV state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sriov {
    /// `sriov_totalvfs`: how many VFs it can have.
    pub total_vfs: u32,
    /// `sriov_numvfs`: how many are enabled now (`None` when the file is absent or malformed).
    pub num_vfs: Option<u32>,
    /// The enabled VFs (`virtfnN` links), by N.
    pub vfs: Vec<VirtualFunction>,
}

/// One SR-IOV virtual function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VirtualFunction {
    /// Its address.
    pub address: PciAddress,
    /// Its driver, `None` when unbound.
    pub driver: Option<String>,
    /// Its IOMMU group.
    pub iommu_group: Option<IommuGroupId>,
    /// NVIDIA vendor-specific VFIO: the vGPU type id set on it (`nvidia/current_vgpu_type`);
    /// `None` when unset (`0`) or when the VF has no such file.
    pub current_type: Option<u32>,
}

/// Where a vGPU type comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TypeSource {
    /// The kernel's mdev framework: `mdev_supported_types/<id>/` of the parent.
    Mdev,
    /// NVIDIA's vendor-specific VFIO: a line of the VF's `nvidia/creatable_vgpu_types`.
    NvidiaVfio,
}

/// One vGPU type a parent (the GPU or one of its VFs) can create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VgpuType {
    /// The mdev type directory (`nvidia-222`, `i915-GVTg_V5_4`), or NVIDIA's numeric id for a
    /// vendor-VFIO type (`1414`).
    pub id: String,
    /// Its `name` (`GRID T4-2Q`), or the vendor-VFIO line's name (`NVIDIA H200X-1-18C`).
    pub name: Option<String>,
    /// Its `description`, as the driver wrote it (`None`: the driver has none).
    pub description: Option<String>,
    /// How many more the kernel would create now (shared across a parent's types). A
    /// vendor-VFIO type listed as creatable on a VF counts 1: a VF holds one vGPU.
    pub available_instances: Option<u32>,
    /// `device_api` (`vfio-pci`); `None` for vendor-VFIO types (the VF itself is the device).
    pub device_api: Option<String>,
    /// The device that creates it: the GPU's function or one of its VFs.
    pub parent: PciAddress,
    /// Where it comes from.
    pub source: TypeSource,
    /// What its description says, where gpupass knows the vendor's format.
    #[serde(flatten)]
    pub details: TypeDetails,
}

/// The parsed parts of a type's description (all `None` for a format gpupass does not know).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TypeDetails {
    /// Frame buffer in MiB: NVIDIA's `framebuffer=`; for Intel GVT-g the vGPU's graphics memory,
    /// `low_gm_size` + `high_gm_size`.
    pub framebuffer_mib: Option<u64>,
    /// NVIDIA's `num_heads=`: virtual display heads.
    pub max_heads: Option<u32>,
    /// NVIDIA's `max_resolution=`, GVT-g's `resolution:` (`WxH`).
    pub max_resolution: Option<String>,
    /// NVIDIA's `max_instance=`: how many of the type one GPU holds at most.
    pub max_instances: Option<u32>,
    /// Intel GVT-g's own lines (absent for other vendors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gvt: Option<GvtDetails>,
}

/// Intel GVT-g's description lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GvtDetails {
    /// `low_gm_size`: aperture (CPU-visible) graphics memory, MiB.
    pub low_gm_mib: u64,
    /// `high_gm_size`: hidden graphics memory, MiB.
    pub high_gm_mib: u64,
    /// `fence`: fence registers.
    pub fence: Option<u32>,
    /// `weight`: its share of the GPU's time.
    pub weight: Option<u32>,
}

/// A mediated device that exists (`/sys/bus/mdev/devices/<uuid>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MdevInstance {
    /// Its UUID.
    pub uuid: MdevUuid,
    /// Its type's id (the `mdev_type` link's last name).
    #[serde(rename = "type")]
    pub type_id: String,
    /// Its parent device.
    pub parent: PciAddress,
}

/// Whether a driver is VFIO's: `vfio-pci` or a vfio-pci-core variant driver (`amd-vfio-pci`,
/// `xe-vfio-pci`, `mlx5_vfio_pci`).
pub fn is_vfio_driver(driver: &str) -> bool {
    driver == "vfio-pci" || driver.ends_with("-vfio-pci") || driver.ends_with("_vfio_pci")
}

// ---------------------------------------------------------------- pure parsers

/// A count file (`sriov_totalvfs`, `available_instances`): one decimal number.
pub fn parse_count(what: &'static str, text: &str) -> Result<u32, VgpuError> {
    text.trim()
        .parse()
        .map_err(|_| malformed(what, format!("{} is not a count", quoted(text.trim()))))
}

/// A size with its unit (`2048M`, `128MB`, `512 MB`, `16G`), in MiB.
fn parse_size_mib(what: &'static str, text: &str) -> Result<u64, VgpuError> {
    let t = text.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let bad = || malformed(what, format!("{} is not a size like 2048M", quoted(t)));
    let n: u64 = t[..digits].parse().map_err(|_| bad())?;
    let factor = match t[digits..].trim_start() {
        "M" | "MB" | "MiB" => 1,
        "G" | "GB" | "GiB" => 1024,
        _ => return Err(bad()),
    };
    n.checked_mul(factor).ok_or_else(bad)
}

/// A resolution `WxH` (both decimal), returned as written.
fn parse_resolution(what: &'static str, text: &str) -> Result<String, VgpuError> {
    let t = text.trim();
    let ok = t.split_once('x').is_some_and(|(w, h)| {
        !w.is_empty()
            && !h.is_empty()
            && w.bytes().all(|b| b.is_ascii_digit())
            && h.bytes().all(|b| b.is_ascii_digit())
    });
    if ok {
        Ok(t.to_owned())
    } else {
        Err(malformed(
            what,
            format!("{} is not a resolution like 1920x1080", quoted(t)),
        ))
    }
}

const NVIDIA_DESCRIPTION: &str = "NVIDIA vGPU type description";
const GVT_DESCRIPTION: &str = "Intel GVT-g type description";

/// What a type's `description` says: NVIDIA's `num_heads=4, frl_config=60, framebuffer=2048M,
/// max_resolution=7680x4320, max_instance=4`, Intel GVT-g's `low_gm_size: 128MB` lines, or
/// nothing for a text in another format (free text is not an error). A recognised format with
/// a bad value is an error.
pub fn parse_description(text: &str) -> Result<TypeDetails, VgpuError> {
    if text.contains("low_gm_size") {
        parse_gvt_description(text)
    } else if text.contains("framebuffer=") || text.contains("num_heads=") {
        parse_nvidia_description(text)
    } else {
        Ok(TypeDetails::default())
    }
}

/// NVIDIA's `key=value, key=value` description; unknown keys are ignored.
pub fn parse_nvidia_description(text: &str) -> Result<TypeDetails, VgpuError> {
    let mut d = TypeDetails::default();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once('=').ok_or_else(|| {
            malformed(
                NVIDIA_DESCRIPTION,
                format!("{} is not key=value", quoted(part)),
            )
        })?;
        let value = value.trim();
        match key.trim() {
            "num_heads" => d.max_heads = Some(parse_count(NVIDIA_DESCRIPTION, value)?),
            "framebuffer" => d.framebuffer_mib = Some(parse_size_mib(NVIDIA_DESCRIPTION, value)?),
            "max_resolution" => {
                d.max_resolution = Some(parse_resolution(NVIDIA_DESCRIPTION, value)?)
            }
            "max_instance" => d.max_instances = Some(parse_count(NVIDIA_DESCRIPTION, value)?),
            _ => {}
        }
    }
    Ok(d)
}

/// Intel GVT-g's `key: value` lines (the kernel prints `low_gm_size: 128MB`); unknown keys
/// (`aggregation` on later kernels) are ignored; both graphics-memory sizes must be there.
pub fn parse_gvt_description(text: &str) -> Result<TypeDetails, VgpuError> {
    let (mut low, mut high, mut fence, mut weight, mut resolution) = (None, None, None, None, None);
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (key, value) = line.split_once(':').ok_or_else(|| {
            malformed(
                GVT_DESCRIPTION,
                format!("{} is not a key: value line", quoted(line)),
            )
        })?;
        match key.trim() {
            "low_gm_size" => low = Some(parse_size_mib(GVT_DESCRIPTION, value)?),
            "high_gm_size" => high = Some(parse_size_mib(GVT_DESCRIPTION, value)?),
            "fence" => fence = Some(parse_count(GVT_DESCRIPTION, value)?),
            "weight" => weight = Some(parse_count(GVT_DESCRIPTION, value)?),
            "resolution" => resolution = Some(parse_resolution(GVT_DESCRIPTION, value)?),
            _ => {}
        }
    }
    let (Some(low), Some(high)) = (low, high) else {
        return Err(malformed(
            GVT_DESCRIPTION,
            "low_gm_size or high_gm_size is missing",
        ));
    };
    Ok(TypeDetails {
        framebuffer_mib: low.checked_add(high),
        max_heads: None,
        max_resolution: resolution,
        max_instances: None,
        gvt: Some(GvtDetails {
            low_gm_mib: low,
            high_gm_mib: high,
            fence,
            weight,
        }),
    })
}

const CREATABLE: &str = "nvidia/creatable_vgpu_types";

/// NVIDIA's `creatable_vgpu_types`: one `<id> : <name>` line per type (`1414 : NVIDIA
/// H200X-1-18C`); a heading line `ID : vGPU Name` is skipped; empty means none.
pub fn parse_creatable(text: &str) -> Result<Vec<(u32, String)>, VgpuError> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let bad = || {
            malformed(
                CREATABLE,
                format!("{} is not `<id> : <name>`", quoted(line)),
            )
        };
        let (id, name) = line.split_once(':').ok_or_else(bad)?;
        let (id, name) = (id.trim(), name.trim());
        if id.eq_ignore_ascii_case("id") {
            continue;
        }
        let id: u32 = id.parse().map_err(|_| bad())?;
        if name.is_empty() {
            return Err(bad());
        }
        out.push((id, name.to_owned()));
    }
    Ok(out)
}

/// NVIDIA's `current_vgpu_type`: the type id set on the VF, `None` for `0` (unset).
pub fn parse_current_type(text: &str) -> Result<Option<u32>, VgpuError> {
    let id = parse_count("nvidia/current_vgpu_type", text)?;
    Ok((id != 0).then_some(id))
}

/// `N` of a PF's `virtfnN` link name.
pub fn virtfn_index(name: &str) -> Option<u32> {
    let n = name.strip_prefix("virtfn")?;
    (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .then(|| n.parse().ok())
        .flatten()
}

/// The last name of a link's target parsed as a PCI address (`virtfn0 -> ../0000:41:00.4`).
pub fn address_at_end(target: &Path) -> Option<PciAddress> {
    target.file_name()?.to_str()?.parse().ok()
}

/// The parent of a mediated device from the mdev bus's link to it
/// (`../../../devices/pci0000:00/0000:00:02.0/<uuid>`): the name before the UUID, when it is
/// a PCI address (a sample driver's virtual parent is not).
pub fn mdev_parent(target: &Path) -> Option<PciAddress> {
    let names: Vec<&str> = target
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => n.to_str(),
            _ => None,
        })
        .collect();
    names
        .len()
        .checked_sub(2)
        .and_then(|i| names[i].parse().ok())
}

// ---------------------------------------------------------------- reading

/// A parse result, or a warning naming `path` and `None` (see the module's note).
fn or_warn<T>(path: impl std::fmt::Display, r: Result<T, VgpuError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!("{path}: {e}; skipped");
            None
        }
    }
}

/// Every mediated device of the host, with its type and PCI parent (one with a non-PCI
/// parent, or without a readable type, is left out).
pub fn read_instances(sysfs: &Sysfs) -> Result<Vec<MdevInstance>, VgpuError> {
    let mut out = Vec::new();
    for uuid in sysfs.mdev_devices()? {
        let Some(parent) = sysfs
            .mdev_device_link(&uuid)?
            .as_deref()
            .and_then(mdev_parent)
        else {
            tracing::debug!(%uuid, "mdev without a PCI parent; not a GPU's");
            continue;
        };
        let type_id = sysfs
            .mdev_link(&uuid, "mdev_type")?
            .and_then(|t| t.file_name().and_then(|n| n.to_str()).map(str::to_owned));
        let Some(type_id) = type_id else {
            tracing::warn!(%uuid, "mdev without an mdev_type link; skipped");
            continue;
        };
        out.push(MdevInstance {
            uuid,
            type_id,
            parent,
        });
    }
    Ok(out)
}

/// The mdev types of one parent device (`mdev_supported_types/*`).
pub fn read_mdev_types(sysfs: &Sysfs, parent: PciAddress) -> Result<Vec<VgpuType>, VgpuError> {
    let mut out = Vec::new();
    for id in sysfs.device_entries(parent, "mdev_supported_types")? {
        let file = |name: &str| format!("mdev_supported_types/{id}/{name}");
        let read = |name: &str| sysfs.attr(parent, &file(name));
        let shown = |name: &str| format!("{parent}/{}", file(name));
        let description = read("description")?.filter(|d| !d.is_empty());
        let details = description
            .as_deref()
            .and_then(|d| or_warn(shown("description"), parse_description(d)))
            .unwrap_or_default();
        let available_instances = read("available_instances")?.and_then(|t| {
            or_warn(
                shown("available_instances"),
                parse_count("available_instances", &t),
            )
        });
        out.push(VgpuType {
            name: read("name")?.filter(|n| !n.is_empty()),
            description,
            available_instances,
            device_api: read("device_api")?.filter(|n| !n.is_empty()),
            parent,
            source: TypeSource::Mdev,
            details,
            id,
        });
    }
    Ok(out)
}

/// The NVIDIA vendor-VFIO types a VF can create now (`nvidia/creatable_vgpu_types`).
pub fn read_vendor_types(sysfs: &Sysfs, vf: PciAddress) -> Result<Vec<VgpuType>, VgpuError> {
    let Some(text) = sysfs.attr(vf, CREATABLE)? else {
        return Ok(Vec::new());
    };
    let lines = or_warn(format!("{vf}/{CREATABLE}"), parse_creatable(&text)).unwrap_or_default();
    Ok(lines
        .into_iter()
        .map(|(id, name)| VgpuType {
            id: id.to_string(),
            name: Some(name),
            description: None,
            available_instances: Some(1),
            device_api: None,
            parent: vf,
            source: TypeSource::NvidiaVfio,
            details: TypeDetails::default(),
        })
        .collect())
}

/// A PF's SR-IOV state, its VFs' details from `inv` where it read them (else from sysfs);
/// `None` without `sriov_totalvfs` (or with one that does not parse).
pub fn read_sriov(
    sysfs: &Sysfs,
    inv: &Inventory,
    pf: PciAddress,
) -> Result<Option<Sriov>, VgpuError> {
    let Some(total) = sysfs.attr(pf, "sriov_totalvfs")? else {
        return Ok(None);
    };
    let Some(total_vfs) = or_warn(
        format!("{pf}/sriov_totalvfs"),
        parse_count("sriov_totalvfs", &total),
    ) else {
        return Ok(None);
    };
    let num_vfs = sysfs.attr(pf, "sriov_numvfs")?.and_then(|t| {
        or_warn(
            format!("{pf}/sriov_numvfs"),
            parse_count("sriov_numvfs", &t),
        )
    });
    let mut links: Vec<(u32, String)> = sysfs
        .device_entries(pf, ".")?
        .into_iter()
        .filter_map(|n| virtfn_index(&n).map(|i| (i, n)))
        .collect();
    links.sort();
    let mut vfs = Vec::new();
    for (_, name) in links {
        let Some(address) = sysfs
            .device_link(pf, &name)?
            .as_deref()
            .and_then(address_at_end)
        else {
            tracing::warn!("{pf}/{name}: not a link to a PCI function; skipped");
            continue;
        };
        let (driver, iommu_group) = match inv.device(address) {
            Some(d) => (d.driver.clone(), d.iommu_group),
            None => (sysfs.driver(address)?, sysfs.iommu_group(address)?),
        };
        let current_type = sysfs
            .attr(address, "nvidia/current_vgpu_type")?
            .and_then(|t| {
                or_warn(
                    format!("{address}/nvidia/current_vgpu_type"),
                    parse_current_type(&t),
                )
            })
            .flatten();
        vfs.push(VirtualFunction {
            address,
            driver,
            iommu_group,
            current_type,
        });
    }
    Ok(Some(Sriov {
        total_vfs,
        num_vfs,
        vfs,
    }))
}

/// What one GPU offers in fractions, given the host's mdev instances; `None` when nothing
/// (no SR-IOV, no types, no instances). Types and instances count on the GPU's named
/// function and on its VFs.
pub fn read_gpu(
    sysfs: &Sysfs,
    inv: &Inventory,
    gpu: &Gpu,
    instances: &[MdevInstance],
) -> Result<Option<GpuVgpus>, VgpuError> {
    let sriov = read_sriov(sysfs, inv, gpu.address)?;
    let vfs: Vec<PciAddress> = sriov
        .iter()
        .flat_map(|s| s.vfs.iter().map(|v| v.address))
        .collect();
    let mut types = read_mdev_types(sysfs, gpu.address)?;
    for vf in &vfs {
        types.extend(read_mdev_types(sysfs, *vf)?);
        types.extend(read_vendor_types(sysfs, *vf)?);
    }
    let instances: Vec<MdevInstance> = instances
        .iter()
        .filter(|i| i.parent == gpu.address || vfs.contains(&i.parent))
        .cloned()
        .collect();
    let v = GpuVgpus {
        sriov,
        types,
        instances,
    };
    Ok((!v.is_empty()).then_some(v))
}

/// What every GPU of `inv` offers in fractions, by GPU address (`None`: nothing).
pub fn read_all(
    sysfs: &Sysfs,
    inv: &Inventory,
) -> Result<BTreeMap<PciAddress, Option<GpuVgpus>>, VgpuError> {
    let instances = read_instances(sysfs)?;
    inv.gpus
        .iter()
        .map(|g| Ok((g.address, read_gpu(sysfs, inv, g, &instances)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_descriptions_give_frame_buffer_heads_resolution_and_instances() {
        let d = parse_description(
            "num_heads=4, frl_config=60, framebuffer=2048M, max_resolution=7680x4320, max_instance=8",
        )
        .unwrap();
        assert_eq!(d.framebuffer_mib, Some(2048));
        assert_eq!(d.max_heads, Some(4));
        assert_eq!(d.max_resolution.as_deref(), Some("7680x4320"));
        assert_eq!(d.max_instances, Some(8));
        assert_eq!(d.gvt, None);
        // Unknown keys are ignored; a G unit counts 1024 MiB.
        let d = parse_nvidia_description("framebuffer=24G, new_key=x").unwrap();
        assert_eq!(d.framebuffer_mib, Some(24 * 1024));
        assert_eq!(d.max_heads, None);
    }

    #[test]
    fn malformed_nvidia_descriptions_are_errors_that_name_the_value() {
        for (bad, needle) in [
            (
                "num_heads=four, framebuffer=2048M",
                "\"four\" is not a count",
            ),
            ("num_heads=4, framebuffer=2048", "\"2048\" is not a size"),
            ("framebuffer=2048M, max_resolution=big", "not a resolution"),
            (
                "framebuffer=2048M, max_instance",
                "\"max_instance\" is not key=value",
            ),
            ("framebuffer=99999999999999999999M", "not a size"),
        ] {
            let e = parse_description(bad).unwrap_err();
            assert!(e.to_string().contains(needle), "{bad}: {e}");
            assert!(e.to_string().starts_with("malformed NVIDIA"), "{e}");
        }
    }

    #[test]
    fn gvt_descriptions_give_graphics_memory_and_their_own_lines() {
        // As the kernel's kvmgt prints it (`%dMB`), and with a later kernel's extra line.
        let text = "low_gm_size: 128MB\nhigh_gm_size: 512MB\nfence: 4\nresolution: 1920x1200\nweight: 4\naggregation: true\n";
        let d = parse_description(text).unwrap();
        assert_eq!(d.framebuffer_mib, Some(640));
        assert_eq!(d.max_resolution.as_deref(), Some("1920x1200"));
        assert_eq!(d.max_heads, None);
        assert_eq!(
            d.gvt,
            Some(GvtDetails {
                low_gm_mib: 128,
                high_gm_mib: 512,
                fence: Some(4),
                weight: Some(4)
            })
        );
        // With a space before the unit, as some documents write it.
        let d = parse_gvt_description("low_gm_size: 64 MB\nhigh_gm_size: 384 MB\n").unwrap();
        assert_eq!(d.framebuffer_mib, Some(448));
        for (bad, needle) in [
            ("low_gm_size: 128MB\n", "missing"),
            (
                "low_gm_size: lots\nhigh_gm_size: 512MB\n",
                "\"lots\" is not a size",
            ),
            (
                "low_gm_size: 128MB\nhigh_gm_size: 512MB\nweight four\n",
                "key: value",
            ),
            (
                "low_gm_size: 128MB\nhigh_gm_size: 512MB\nfence: -1\n",
                "not a count",
            ),
        ] {
            let e = parse_description(bad).unwrap_err();
            assert!(e.to_string().contains(needle), "{bad:?}: {e}");
            assert!(e.to_string().starts_with("malformed Intel GVT-g"), "{e}");
        }
    }

    #[test]
    fn other_descriptions_are_free_text() {
        for text in ["", "mtty serial port", "2 ports, 115200 baud"] {
            assert_eq!(parse_description(text).unwrap(), TypeDetails::default());
        }
    }

    #[test]
    fn creatable_types_are_id_name_lines() {
        let t = parse_creatable("1428 : NVIDIA H200X-141C\n1414 : NVIDIA H200X-1-18C\n").unwrap();
        assert_eq!(
            t,
            [
                (1428, "NVIDIA H200X-141C".to_owned()),
                (1414, "NVIDIA H200X-1-18C".to_owned())
            ]
        );
        // A heading line is skipped; nothing left is none.
        assert_eq!(
            parse_creatable("ID    : vGPU Name\n557   : NVIDIA L4-1B\n").unwrap(),
            [(557, "NVIDIA L4-1B".to_owned())]
        );
        assert!(parse_creatable("").unwrap().is_empty());
        for bad in ["1414 NVIDIA H200X-1-18C", "x14 : NVIDIA", "1414 : ", ":"] {
            let e = parse_creatable(bad).unwrap_err();
            assert!(e.to_string().contains("creatable_vgpu_types"), "{bad}: {e}");
        }
    }

    #[test]
    fn current_type_zero_is_unset() {
        assert_eq!(parse_current_type("0\n").unwrap(), None);
        assert_eq!(parse_current_type("1414\n").unwrap(), Some(1414));
        assert!(parse_current_type("NVIDIA H200X-1-18C").is_err());
    }

    #[test]
    fn counts_links_and_parents() {
        assert_eq!(parse_count("sriov_totalvfs", " 16\n").unwrap(), 16);
        let e = parse_count("sriov_totalvfs", "-1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "malformed sriov_totalvfs: \"-1\" is not a count"
        );
        assert_eq!(virtfn_index("virtfn12"), Some(12));
        for n in ["virtfn", "virtfnx", "physfn", "virtfn-1"] {
            assert_eq!(virtfn_index(n), None, "{n}");
        }
        assert_eq!(
            address_at_end(Path::new("../0000:41:00.4")).map(|a| a.to_string()),
            Some("0000:41:00.4".into())
        );
        assert_eq!(address_at_end(Path::new("../..")), None);
        let link = Path::new(
            "../../../devices/pci0000:00/0000:00:02.0/4b20d080-1b54-4048-85b3-a6a62d165c01",
        );
        assert_eq!(
            mdev_parent(link).map(|a| a.to_string()),
            Some("0000:00:02.0".into())
        );
        let virtual_parent =
            Path::new("../../../devices/virtual/mtty/mtty/83b8f4f2-509f-382f-3c1e-e6bfe0fa1001");
        assert_eq!(mdev_parent(virtual_parent), None);
        assert_eq!(mdev_parent(Path::new("x")), None);
    }

    #[test]
    fn vfio_means_vfio_pci_or_a_variant_driver() {
        for d in ["vfio-pci", "amd-vfio-pci", "xe-vfio-pci", "mlx5_vfio_pci"] {
            assert!(is_vfio_driver(d), "{d}");
        }
        for d in ["nvidia", "i915", "vfio", "pci-stub", "vfio-pci-x"] {
            assert!(!is_vfio_driver(d), "{d}");
        }
    }
}
