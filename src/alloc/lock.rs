//! The host-wide lock: an exclusive `flock` on `<run-dir>/gpupass.lock`, held from reading who
//! holds which GPU until the attach is verified, so parallel gpupass processes never hand out
//! one GPU twice. The kernel drops it when the process dies: no stale lock after a crash.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::fsutil::{self, FsError};

/// Errors from taking the host lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The run dir or lock file could not be created, opened or trusted.
    #[error(transparent)]
    Open(FsError),
    /// Another process held the lock for longer than the timeout.
    #[error("timed out after {waited:?} waiting for the host lock {path} (another gpupass is attaching or detaching)")]
    Timeout {
        /// The lock file.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
}

/// The held lock; released on drop.
#[derive(Debug)]
pub struct HostLock {
    _file: File,
}

/// The lock file's name inside the run dir.
pub const LOCK_FILE: &str = "gpupass.lock";

impl HostLock {
    /// Takes the lock, waiting up to `timeout`. The run dir is created 0750 when missing and
    /// refused when another user owns it or may write to it; the lock file is 0600, so nobody
    /// else can open it to hold the lock.
    pub fn acquire(run_dir: &Path, timeout: Duration) -> Result<Self, LockError> {
        match fsutil::lock_file(&run_dir.join(LOCK_FILE), timeout) {
            Ok(file) => Ok(Self { _file: file }),
            Err(FsError::LockTimeout { path, waited }) => Err(LockError::Timeout { path, waited }),
            Err(e) => Err(LockError::Open(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_waits_then_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let held = HostLock::acquire(&run, Duration::from_secs(1)).unwrap();
        let err = HostLock::acquire(&run, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, LockError::Timeout { .. }), "{err}");
        drop(held);
        HostLock::acquire(&run, Duration::from_millis(100)).unwrap();
    }
}
