//! Hook mode: the libvirt qemu hook (`gpupass hook qemu DOMAIN OP SUBOP EXTRA`) and the XML
//! filter `gpupass transform` that the CloudStack agent shim calls. Never calls libvirt (a hook
//! that calls back into the daemon can deadlock): who holds which GPU comes from libvirt's own
//! files, leases and the lock live in the run dir, the usage ledger in the state dir.

pub mod args;
pub mod cli;
pub mod decisions;
pub mod install;
pub mod resolve;
pub mod run;

use std::io;

use crate::alloc::lease::LeaseError;
use crate::alloc::lock::LockError;
use crate::alloc::AllocError;
use crate::cloudstack::CloudstackError;
use crate::config::ConfigError;
use crate::fsutil::FsError;
use crate::host::sysfs::SysfsError;
use crate::libvirt::files::FilesError;
use crate::request::RequestError;
use crate::usage::UsageError;
use crate::xml::rewrite::MAX_XML_BYTES;
use crate::xml::XmlError;

/// Errors from hook mode.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The domain XML is malformed or not a domain.
    #[error(transparent)]
    Xml(#[from] XmlError),
    /// The domain's GPU request is invalid.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The request cannot be met on this host.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// The host root could not be read.
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
    /// libvirt's domain files could not be read.
    #[error(transparent)]
    Files(#[from] FilesError),
    /// A lease could not be written.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The ledger could not be written.
    #[error(transparent)]
    Usage(#[from] UsageError),
    /// The host lock.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The config.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The run dir or state dir is not safe to use.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// A CloudStack integration step failed.
    #[error(transparent)]
    Cloudstack(#[from] CloudstackError),
    /// The health file (quarantined GPUs) could not be read.
    #[error(transparent)]
    Health(#[from] crate::health::HealthError),
    /// The domain could not be fitted to its GPUs.
    #[error(transparent)]
    Fit(#[from] crate::fit::FitError),
    /// `prepare` refuses the start, for this reason.
    #[error("{0}")]
    Blocked(String),
    /// stdin could not be read.
    #[error("failed to read the domain XML from stdin")]
    Stdin(#[source] io::Error),
    /// stdin is larger than any domain.
    #[error("the domain XML on stdin is over the {MAX_XML_BYTES}-byte limit")]
    TooLarge,
    /// stdin is not UTF-8.
    #[error("the domain XML on stdin is not UTF-8")]
    NotUtf8,
    /// install-hook could not write or remove the hook.
    #[error("failed to install the hook at {path}")]
    Install {
        /// The file.
        path: std::path::PathBuf,
        /// The IO error.
        #[source]
        source: io::Error,
    },
}

impl HookError {
    /// The documented exit code (the table in `gpupass --help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            HookError::Xml(_)
            | HookError::Request(_)
            | HookError::Config(_)
            | HookError::TooLarge
            | HookError::NotUtf8 => 2,
            HookError::Alloc(a) => a.exit_code(),
            HookError::Cloudstack(c) => c.exit_code(),
            HookError::Lock(LockError::Timeout { .. }) => 12,
            _ => 1,
        }
    }
}
