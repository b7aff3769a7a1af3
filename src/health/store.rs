//! The health file in the state dir, `health.json`: which GPUs are quarantined (reason, time,
//! who) and each checked function's AER counters (the next check's baseline). Replaced
//! atomically under its own lock file, waited for at most [`LOCK_TIMEOUT`]; never written when
//! nothing changed, so a healthy release costs one read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::health::{AerCounts, HealthError, Quarantine};
use crate::model::PciAddress;

/// The file's name in the state dir.
pub const FILE: &str = "health.json";
const LOCK: &str = "health.lock";
/// How long a writer waits for another's update (they take milliseconds).
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// What the health file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthState {
    /// Quarantined GPUs (display-function addresses).
    #[serde(default)]
    pub quarantined: BTreeMap<PciAddress, Quarantine>,
    /// AER counters of each function at its last check.
    #[serde(default)]
    pub aer: BTreeMap<PciAddress, AerCounts>,
}

impl HealthState {
    /// The quarantine of `gpu`, or of the GPU one of whose `functions` this is.
    pub fn quarantine_of(&self, functions: &[PciAddress]) -> Option<(PciAddress, &Quarantine)> {
        functions
            .iter()
            .find_map(|f| self.quarantined.get(f).map(|q| (*f, q)))
    }
}

/// The health file of a state dir.
#[derive(Debug, Clone)]
pub struct HealthStore {
    dir: PathBuf,
}

impl HealthStore {
    /// The store in `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.to_path_buf(),
        }
    }

    /// The file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Reads the file; a missing state dir or file is an empty state. The state dir must be
    /// trusted ([`fsutil::check_dir`]).
    pub fn read(&self) -> Result<HealthState, HealthError> {
        match fsutil::check_dir(&self.dir) {
            Err(e) if e.is_not_found() => return Ok(HealthState::default()),
            r => r?,
        }
        let path = self.path();
        match fsutil::read_state(&path)? {
            None => Ok(HealthState::default()),
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| HealthError::Corrupt {
                path,
                detail: e.to_string(),
            }),
        }
    }

    /// Changes the state under the lock: reads it, lets `f` change it, and writes it back
    /// atomically when it changed.
    pub fn update<R>(&self, f: impl FnOnce(&mut HealthState) -> R) -> Result<R, HealthError> {
        fsutil::private_dir(&self.dir)?;
        let _lock = fsutil::lock_file(&self.dir.join(LOCK), LOCK_TIMEOUT)?;
        let before = self.read()?;
        let mut state = before.clone();
        let out = f(&mut state);
        if state != before {
            let mut body = serde_json::to_vec_pretty(&state).expect("the health state serializes");
            body.push(b'\n');
            fsutil::write_atomic(&self.dir, FILE, &body)?;
        }
        Ok(out)
    }

    /// Quarantines `gpu` (keeping the first reason and time when it already is). Returns
    /// whether it was newly quarantined.
    pub fn quarantine(&self, gpu: PciAddress, q: Quarantine) -> Result<bool, HealthError> {
        self.update(|s| match s.quarantined.entry(gpu) {
            std::collections::btree_map::Entry::Occupied(_) => false,
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(q);
                true
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn q(reason: &str, since: u64) -> Quarantine {
        Quarantine {
            reason: reason.into(),
            since,
            by: "test".into(),
        }
    }

    #[test]
    fn quarantines_persist_keep_their_first_reason_and_write_only_changes() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("state");
        let s = HealthStore::new(&dir);
        assert_eq!(s.read().unwrap(), HealthState::default());
        let gpu: PciAddress = "0000:18:00.0".parse().unwrap();
        assert!(s.quarantine(gpu, q("fell off", 10)).unwrap());
        assert!(!s.quarantine(gpu, q("again", 20)).unwrap());
        let st = s.read().unwrap();
        assert_eq!(st.quarantined[&gpu], q("fell off", 10));
        let audio: PciAddress = "0000:18:00.1".parse().unwrap();
        assert_eq!(st.quarantine_of(&[audio, gpu]).unwrap().0, gpu);
        let before = fs::metadata(s.path()).unwrap().modified().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        s.update(|_| ()).unwrap();
        assert_eq!(fs::metadata(s.path()).unwrap().modified().unwrap(), before);
        s.update(|st| st.quarantined.clear()).unwrap();
        assert!(s.read().unwrap().quarantined.is_empty());
    }

    #[test]
    fn a_corrupt_file_is_an_error_that_names_it() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(FILE), "{\"quarantined\": [").unwrap();
        let e = HealthStore::new(d.path()).read().unwrap_err();
        assert!(matches!(e, HealthError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains(FILE), "{e}");
    }
}
