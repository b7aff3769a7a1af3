//! The hook's decision counters: `<run-dir>/hook-decisions.json`, `{"prepare/allowed": 12, …}`,
//! updated under a lock file and replaced atomically, so the agent's `/metrics` can export
//! what the hook decided in processes it never sees. Bounded in size; on tmpfs it starts over at
//! boot like any counter. Failing to count never changes a decision.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// The counters file in the run dir.
pub const FILE: &str = "hook-decisions.json";
const LOCK: &str = "hook-decisions.lock";

/// Reads the counters; missing or unreadable = none.
pub fn read(run_dir: &Path) -> BTreeMap<String, u64> {
    fs::read_to_string(run_dir.join(FILE))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// Adds one to `op/result`.
pub fn record(run_dir: &Path, op: &str, result: &str) -> io::Result<()> {
    fs::create_dir_all(run_dir)?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(run_dir.join(LOCK))?;
    lock.lock()?;
    let mut counts = read(run_dir);
    *counts.entry(format!("{op}/{result}")).or_default() += 1;
    let tmp = run_dir.join(format!("{FILE}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(&counts).map_err(io::Error::other)?)?;
    drop(f);
    fs::rename(&tmp, run_dir.join(FILE))
}

#[cfg(test)]
mod tests {
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
}
