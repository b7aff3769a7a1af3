//! The host-wide lock: an exclusive `flock` on `<run-dir>/gpupass.lock`, held from reading who
//! holds which GPU until the attach is verified, so parallel gpupass processes never hand out
//! one GPU twice. The kernel drops it when the process dies: no stale lock after a crash.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Errors from taking the host lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The run dir or lock file could not be created or opened.
    #[error("failed to open lock file {path}")]
    Open {
        /// The lock file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: io::Error,
    },
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
    /// Takes the lock, waiting up to `timeout`.
    pub fn acquire(run_dir: &Path, timeout: Duration) -> Result<Self, LockError> {
        let path = run_dir.join(LOCK_FILE);
        let open_err = |source| LockError::Open {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(run_dir).map_err(open_err)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(open_err)?;
        let start = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Self { _file: file }),
                Err(fs::TryLockError::WouldBlock) => {}
                Err(fs::TryLockError::Error(source)) => return Err(open_err(source)),
            }
            if start.elapsed() >= timeout {
                return Err(LockError::Timeout {
                    path,
                    waited: start.elapsed(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
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
