//! The last good discovery answer, kept in the run dir so a transient failure never gives the
//! agent an empty or partial list (it would mark the host's GPUs `Error`). Written atomically
//! (temp file, then rename) and only when it changed; read back only when it parses as an answer.

use std::path::{Path, PathBuf};

use crate::cloudstack::discover::GpuList;
use crate::cloudstack::CloudstackError;
use crate::fsutil;

/// The file, in the run dir.
pub const CACHE_FILE: &str = "cloudstack-gpus.json";

/// Where the last good answer lives.
pub fn path(run_dir: &Path) -> PathBuf {
    run_dir.join(CACHE_FILE)
}

/// Keeps `json` (an answer just printed) as the last good one, unless it is already that.
pub fn save(run_dir: &Path, json: &str) -> Result<(), CloudstackError> {
    if fsutil::read_state(&path(run_dir)).ok().flatten().as_deref() == Some(json.as_bytes()) {
        return Ok(());
    }
    fsutil::write_atomic(run_dir, CACHE_FILE, json.as_bytes())?;
    Ok(())
}

/// The last good answer, `None` when there is none; one that does not parse as an answer is an
/// error (never printed).
pub fn load(run_dir: &Path) -> Result<Option<String>, CloudstackError> {
    let file = path(run_dir);
    let Some(bytes) = fsutil::read_state(&file)? else {
        return Ok(None);
    };
    let text =
        String::from_utf8(bytes).map_err(|_| CloudstackError::BadCache { path: file.clone() })?;
    if serde_json::from_str::<GpuList>(&text).is_err() {
        return Err(CloudstackError::BadCache { path: file });
    }
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_and_returns_only_a_whole_answer() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        assert_eq!(load(&run).unwrap(), None);
        save(&run, "{\"gpus\":[]}\n").unwrap();
        assert_eq!(load(&run).unwrap().as_deref(), Some("{\"gpus\":[]}\n"));
        std::fs::write(path(&run), "{\"gpus\":[{\"pci_address\":").unwrap();
        assert!(matches!(load(&run), Err(CloudstackError::BadCache { .. })));
    }
}
