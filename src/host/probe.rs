//! Gathers the facts `gpupass doctor` judges, from the host root (read-only): the inventory,
//! vfio modules and `/dev/vfio/vfio`, IOMMU parameters, the CPU vendor, and which processes hold
//! each GPU's device nodes (`/dev/dri/*` from the GPU's `drm/` directory, `/dev/nvidiaN` from the
//! NVIDIA driver's `proc/driver/nvidia/gpus/<bdf>/information`). Libvirt's facts are added by the
//! caller.

use std::collections::{BTreeMap, BTreeSet};

use crate::hook::install::HOOK_PATH;
use crate::host::discover::discover;
use crate::host::doctor::{HostFacts, NodeHolder, VFIO_MODULES};
use crate::host::sysfs::{Sysfs, SysfsError};

/// Reads everything but libvirt.
pub fn gather(sysfs: &Sysfs) -> Result<HostFacts, SysfsError> {
    let inv = discover(sysfs)?;
    let cmdline = sysfs.cmdline()?;
    let modules = VFIO_MODULES
        .iter()
        .map(|m| (*m, sysfs.module_loaded(m)))
        .collect();
    let unsafe_param = sysfs
        .module_param("vfio_iommu_type1", "allow_unsafe_interrupts")?
        .is_some_and(|v| matches!(v.as_str(), "Y" | "y" | "1"));
    let unsafe_cmdline = cmdline.split_whitespace().any(|w| {
        matches!(
            w,
            "vfio_iommu_type1.allow_unsafe_interrupts=1"
                | "vfio_iommu_type1.allow_unsafe_interrupts=Y"
        )
    });

    let holders = node_holders(sysfs, &inv)?;
    Ok(HostFacts {
        cpu_vendor: sysfs.cpu_vendor()?,
        modules,
        dev_vfio: sysfs.exists("dev/vfio/vfio"),
        unsafe_interrupts: unsafe_param || unsafe_cmdline,
        holders,
        libvirt: None,
        hook_installed: sysfs.exists(HOOK_PATH),
        cloudstack: crate::cloudstack::agent::read(sysfs.root()).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the CloudStack agent's agent.properties");
            None
        }),
        cmdline,
        inv,
    })
}

/// Processes holding each GPU's device nodes (`/dev/dri/*`, `/dev/nvidiaN`), by GPU address.
pub fn node_holders(
    sysfs: &Sysfs,
    inv: &crate::host::discover::Inventory,
) -> Result<BTreeMap<crate::model::PciAddress, Vec<NodeHolder>>, SysfsError> {
    let mut nodes_of: BTreeMap<String, crate::model::PciAddress> = BTreeMap::new();
    for gpu in &inv.gpus {
        for f in &gpu.functions {
            for n in sysfs.drm_nodes(*f)? {
                nodes_of.insert(format!("/dev/dri/{n}"), gpu.address);
            }
            if let Some(minor) = sysfs.nvidia_minor(*f)? {
                nodes_of.insert(format!("/dev/nvidia{minor}"), gpu.address);
            }
        }
    }
    let wanted: BTreeSet<String> = nodes_of.keys().cloned().collect();
    let mut holders: BTreeMap<crate::model::PciAddress, Vec<NodeHolder>> = BTreeMap::new();
    for (pid, comm, node) in sysfs.fd_holders(&wanted) {
        if let Some(gpu) = nodes_of.get(&node) {
            holders
                .entry(*gpu)
                .or_default()
                .push(NodeHolder { pid, comm, node });
        }
    }

    Ok(holders)
}
