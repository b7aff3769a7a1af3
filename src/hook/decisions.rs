//! The hook's decision counters: `<run-dir>/hook-decisions.json`, `{"prepare/allowed": 12, …}`,
//! updated under a lock file (waited for at most [`LOCK_TIMEOUT`]) and replaced atomically, so the agent's `/metrics` can export
//! what the hook decided in processes it never sees. Bounded in size; on tmpfs it starts over at
//! boot like any counter. Failing to count never changes a decision.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::fsutil::{self, FsError};

/// The counters file in the run dir.
pub const FILE: &str = "hook-decisions.json";
const LOCK: &str = "hook-decisions.lock";
/// How long a hook waits for another process's count before giving up counting (libvirt waits
/// for the hook on every start).
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads the counters; missing, unreadable or in an untrusted run dir = none.
pub fn read(run_dir: &Path) -> BTreeMap<String, u64> {
    if fsutil::check_dir(run_dir).is_err() {
        return BTreeMap::new();
    }
    fsutil::read_state(&run_dir.join(FILE))
        .ok()
        .flatten()
        .and_then(|t| serde_json::from_slice(&t).ok())
        .unwrap_or_default()
}

/// Adds one to `op/result`, waiting at most [`LOCK_TIMEOUT`] for the lock.
pub fn record(run_dir: &Path, op: &str, result: &str) -> Result<(), FsError> {
    record_within(run_dir, op, result, LOCK_TIMEOUT)
}

fn record_within(run_dir: &Path, op: &str, result: &str, timeout: Duration) -> Result<(), FsError> {
    let _lock = fsutil::lock_file(&run_dir.join(LOCK), timeout)?;
    let mut counts = read(run_dir);
    let n = counts.entry(format!("{op}/{result}")).or_default();
    *n = n.saturating_add(1);
    let body = serde_json::to_vec(&counts).expect("counters serialize");
    fsutil::write_atomic(run_dir, FILE, &body)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn counts_add_up_and_survive_a_torn_file() {
        let dir = tempfile::tempdir().unwrap();
        record(dir.path(), "prepare", "allowed").unwrap();
        record(dir.path(), "prepare", "allowed").unwrap();
        record(dir.path(), "prepare", "blocked").unwrap();
        let c = read(dir.path());
        assert_eq!(c["prepare/allowed"], 2);
        assert_eq!(c["prepare/blocked"], 1);
        fs::write(dir.path().join(FILE), "{\"prepare/allo").unwrap();
        record(dir.path(), "transform", "ok").unwrap();
        assert_eq!(read(dir.path()).len(), 1);
    }

    #[test]
    fn a_held_lock_gives_up_counting_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let _held = fsutil::lock_file(&dir.path().join(LOCK), LOCK_TIMEOUT).unwrap();
        let err = record_within(dir.path(), "prepare", "allowed", Duration::from_millis(100))
            .unwrap_err();
        assert!(err.to_string().contains(LOCK), "{err}");
    }
}
