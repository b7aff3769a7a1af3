//! Which GPU goes to which domain: the pure planner (`plan`) and the host-wide lock (`lock`)
//! that makes decide-and-attach atomic across gpupass processes. Holds no state of its own:
//! who holds a GPU is read from libvirt every time.

pub mod lease;
pub mod lock;
pub mod plan;

use crate::model::{PciAddress, PciId};

/// Why an allocation request cannot be met.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum AllocError {
    /// The host has no IOMMU groups.
    #[error("the IOMMU is off on this host: no GPU can be passed through (run `gpupass show ADDR` for the fix)")]
    IommuOff,
    /// No GPU at that address.
    #[error("no GPU at {address} on this host (see `gpupass list`)")]
    UnknownGpu {
        /// The address asked for.
        address: PciAddress,
    },
    /// The address is an SR-IOV virtual function: a fraction of its PF, not a whole GPU.
    #[error("{address} is an SR-IOV virtual function, not a whole GPU: ask for it with `--vgpu vf --gpu {address}` (`gpupass list --json` lists it under its PF's vgpu.sriov.vfs)")]
    VirtualFunction {
        /// The address asked for.
        address: PciAddress,
    },
    /// `--vgpu vf` was given an address that is no SR-IOV virtual function.
    #[error("{address} is not an SR-IOV virtual function: `--vgpu vf` takes a VF's address (`gpupass list --json` lists them under each GPU's vgpu.sriov.vfs)")]
    NotVirtualFunction {
        /// The address asked for.
        address: PciAddress,
    },
    /// Another domain holds the VF, or its PF whole, or a device of its IOMMU group.
    #[error("virtual function {vf} is in use by domain '{domain}'{via}")]
    VfInUse {
        /// The VF asked for.
        vf: PciAddress,
        /// The domain that holds it.
        domain: String,
        /// How, when not the VF itself.
        via: String,
    },
    /// Not enough free, passable SR-IOV virtual functions.
    #[error(
        "no free virtual function: {wanted} wanted{model}, {free} free and passable ({detail})"
    )]
    NoFreeVf {
        /// How many were asked for.
        wanted: usize,
        /// How many were free.
        free: usize,
        /// ` of model VVVV:DDDD` or empty.
        model: String,
        /// Where the others are.
        detail: String,
    },
    /// SR-IOV virtual functions asked for where only whole GPUs are resolved.
    #[error("SR-IOV virtual functions are given by `gpupass attach --vgpu vf`, not by {place}")]
    VfNotResolved {
        /// Where.
        place: &'static str,
    },
    /// The GPU cannot be passed through.
    #[error("GPU {gpu} cannot be passed through: {reason}")]
    NotPassable {
        /// The GPU.
        gpu: PciAddress,
        /// Its blockers, joined.
        reason: String,
    },
    /// Another domain holds the GPU, or a GPU in its IOMMU group.
    #[error("GPU {gpu} is in use by domain '{domain}'{via}")]
    InUse {
        /// The GPU asked for.
        gpu: PciAddress,
        /// The domain that holds it.
        domain: String,
        /// How, when through an IOMMU group peer.
        via: String,
    },
    /// The GPU is already in this domain (every function, in every definition asked for).
    #[error("GPU {gpu} is already attached to domain '{domain}' ({impact})")]
    AlreadyAttached {
        /// The GPU.
        gpu: PciAddress,
        /// The domain.
        domain: String,
        /// Which definitions.
        impact: &'static str,
    },
    /// The GPU is not in the domain.
    #[error("GPU {gpu} is not attached to domain '{domain}' ({impact})")]
    NotAttached {
        /// The GPU.
        gpu: PciAddress,
        /// The domain.
        domain: String,
        /// Which definitions were looked at.
        impact: &'static str,
    },
    /// The owner's limit would be exceeded.
    #[error("owner '{owner}' may hold {max} GPU(s) at once and holds {held} (domains: {domains}); {wanted} more would exceed the limit")]
    LimitExceeded {
        /// The owner.
        owner: String,
        /// The limit.
        max: u32,
        /// GPUs held now.
        held: usize,
        /// GPUs asked for.
        wanted: usize,
        /// The owner's domains holding GPUs.
        domains: String,
    },
    /// The owner's GPU-hours for the period are used up.
    #[error("owner '{owner}' may use {max_hours} GPU-hour(s) per {period} and has used {used_hours:.2} since {since}; no more GPUs until the next {period}")]
    HoursExceeded {
        /// The owner.
        owner: String,
        /// The limit.
        max_hours: f64,
        /// GPU-hours used in the period.
        used_hours: f64,
        /// `day`, `week` or `month`.
        period: &'static str,
        /// The period's start (RFC 3339).
        since: String,
    },
    /// `--hgx-full` on a host without an NVSwitch.
    #[error("no HGX fabric on this host: no NVSwitch (NVIDIA class 0680) to give with its GPUs (see `gpupass list`)")]
    NoFabric,
    /// An NVSwitch of the fabric held by another domain.
    #[error("HGX full passthrough: NVSwitch {switch} is in use by domain '{domain}'")]
    SwitchInUse {
        /// The switch.
        switch: PciAddress,
        /// Who holds it.
        domain: String,
    },
    /// An NVSwitch of the fabric that cannot be passed through.
    #[error("HGX full passthrough: NVSwitch {switch} cannot be passed through: {reason}")]
    SwitchNotPassable {
        /// The switch.
        switch: PciAddress,
        /// Why.
        reason: String,
    },
    /// Not enough free, passable GPUs.
    #[error("no free GPU: {wanted} wanted{model}, {free} free and passable ({detail})")]
    NoFreeGpu {
        /// How many were asked for.
        wanted: usize,
        /// How many were free.
        free: usize,
        /// ` of model VVVV:DDDD` or empty.
        model: String,
        /// Where the others are.
        detail: String,
    },
}

impl AllocError {
    /// The documented exit code (the table in `gpupass --help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            AllocError::VfNotResolved { .. } => 2,
            AllocError::UnknownGpu { .. }
            | AllocError::VirtualFunction { .. }
            | AllocError::NotVirtualFunction { .. }
            | AllocError::NotAttached { .. } => 3,
            AllocError::InUse { .. }
            | AllocError::VfInUse { .. }
            | AllocError::AlreadyAttached { .. }
            | AllocError::SwitchInUse { .. } => 5,
            AllocError::NoFreeGpu { .. } | AllocError::NoFreeVf { .. } | AllocError::NoFabric => 6,
            AllocError::IommuOff
            | AllocError::NotPassable { .. }
            | AllocError::SwitchNotPassable { .. } => 7,
            AllocError::LimitExceeded { .. } | AllocError::HoursExceeded { .. } => 15,
        }
    }

    /// The error for an address that names no GPU of `inv`: a VF's says what it is.
    pub fn no_gpu(inv: &crate::host::discover::Inventory, address: PciAddress) -> Self {
        if inv.device(address).is_some_and(|d| d.virtfn) {
            AllocError::VirtualFunction { address }
        } else {
            AllocError::UnknownGpu { address }
        }
    }

    pub(crate) fn no_free(
        wanted: usize,
        free: usize,
        model: Option<PciId>,
        detail: String,
    ) -> Self {
        AllocError::NoFreeGpu {
            wanted,
            free,
            model: model.map(|m| format!(" of model {m}")).unwrap_or_default(),
            detail,
        }
    }
}
