//! CloudStack 4.21+ on a KVM host: the GPU discovery the agent runs every minute
//! (`gpupass cloudstack discover`, with its last good answer kept), the completion of GPUs
//! CloudStack allocated itself (companion functions added by `transform`), the agent's
//! `agent.properties` as far as gpupass needs it, and the installer of the agent-side files.
//! Never calls libvirt: who holds what comes from libvirt's own files.

pub mod agent;
pub mod cache;
pub mod cli;
pub mod complete;
pub mod discover;
pub mod install;

use std::io;
use std::path::PathBuf;

use crate::fsutil::FsError;
use crate::host::sysfs::SysfsError;
use crate::libvirt::files::FilesError;
use crate::model::PciAddress;

/// Errors from the CloudStack integration.
#[derive(Debug, thiserror::Error)]
pub enum CloudstackError {
    /// The host root could not be read.
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
    /// libvirt's domain files could not be read.
    #[error(transparent)]
    Files(#[from] FilesError),
    /// The host's `pci.ids` (vendor and device names) exists but could not be read.
    #[error(transparent)]
    PciIds(#[from] crate::host::pci_ids::PciIdsError),
    /// The health file (quarantined GPUs) could not be read.
    #[error(transparent)]
    Health(#[from] crate::health::HealthError),
    /// The host root lists no PCI device at all (sysfs not mounted, or a transient failure):
    /// never an answer to give the agent.
    #[error("{root} lists no PCI devices")]
    NoPciDevices {
        /// The host root.
        root: PathBuf,
    },
    /// A companion function of a GPU CloudStack gave the domain is held by another domain.
    #[error("GPU {gpu} of domain '{domain}' cannot be completed: its function {function} is held by domain '{holder}'")]
    CompanionHeld {
        /// The GPU.
        gpu: PciAddress,
        /// The missing function.
        function: PciAddress,
        /// The domain being completed.
        domain: String,
        /// Who holds the function.
        holder: String,
    },
    /// The agent's scripts directory is missing: not a CloudStack KVM host (or another layout).
    #[error(
        "{dir} does not exist: not a CloudStack KVM agent host (install cloudstack-agent first)"
    )]
    NotCloudstackHost {
        /// The directory.
        dir: PathBuf,
    },
    /// A file could not be written, moved or removed.
    #[error("failed to {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: io::Error,
    },
    /// The run dir (last good answer) could not be used.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// The last good answer in the run dir is not a gpupass discovery answer.
    #[error("{path} is not a discovery answer; ignored")]
    BadCache {
        /// The file.
        path: PathBuf,
    },
}

impl CloudstackError {
    /// The documented exit code (the table in `gpupass --help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            CloudstackError::CompanionHeld { .. } => 5,
            _ => 1,
        }
    }
}
