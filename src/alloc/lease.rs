//! Short leases on GPUs chosen by `transform` (or a migrate/restore rewrite) for a domain that has
//! not started yet, so two transforms in flight never pick the same GPU. One JSON file per domain
//! under `<run-dir>/leases/`, keyed by the domain's UUID (else its name), written atomically.
//! A lease ends when it expires or when the hook sees the domain start or release.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use crate::alloc::plan::Holdings;
use crate::fsutil::{self, FsError};
use crate::model::PciAddress;

/// Errors from the lease store.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// A lease file could not be written or removed.
    #[error("failed to write lease {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: io::Error,
    },
    /// The leases directory is not safe to use.
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// The longest a lease may hold from when its file was written: a lease file that claims more
/// (a hostile or corrupt one) holds only this long.
pub const MAX_LEASE_SECONDS: u64 = 86_400;

/// One lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The domain's name.
    pub domain: String,
    /// Its UUID, when known.
    pub uuid: Option<String>,
    /// Every PCI function leased (all functions of each GPU).
    pub functions: Vec<PciAddress>,
    /// Unix time (seconds) after which the lease is void.
    pub expires: u64,
    /// The domain's owner, for limits.
    #[serde(default)]
    pub owner: Option<String>,
}

/// The file-name key of a domain: its UUID when it is one, else its name, hex-encoded when it
/// has characters a file name should not.
pub fn key(uuid: Option<&str>, name: &str) -> String {
    if let Some(u) = uuid.and_then(|u| uuid::Uuid::parse_str(u).ok()) {
        return u.hyphenated().to_string();
    }
    if !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        format!("name-{name}")
    } else {
        let hex: String = name.bytes().take(100).map(|b| format!("{b:02x}")).collect();
        format!("hex-{hex}")
    }
}

/// The leases of one host.
#[derive(Debug, Clone)]
pub struct LeaseStore {
    dir: PathBuf,
}

impl LeaseStore {
    /// Leases under `run_dir/leases`.
    pub fn new(run_dir: &Path) -> Self {
        Self {
            dir: run_dir.join("leases"),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    /// The leases directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Unexpired leases other than `own_key`'s, as holdings (`lease:<domain>`). Unreadable or
    /// expired files are ignored (and expired ones removed); so is a leases directory that is
    /// not trusted ([`fsutil::check_dir`]: gpupass never wrote a lease there).
    pub fn holdings_except(&self, own_key: &str, now: u64, into: &mut Holdings) {
        if let Err(e) = fsutil::check_dir(&self.dir) {
            if !e.is_not_found() {
                tracing::warn!("ignoring leases: {e}");
            }
            return;
        }
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Some(k) = p.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if k == own_key || p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let Some(lease) = fsutil::read_state(&p)
                .ok()
                .flatten()
                .and_then(|b| serde_json::from_slice::<Lease>(&b).ok())
            else {
                continue;
            };
            let written = e
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(now, |d| d.as_secs().min(now));
            if lease.expires.min(written.saturating_add(MAX_LEASE_SECONDS)) <= now {
                let _ = fs::remove_file(&p);
                continue;
            }
            let holder = format!("lease:{}", lease.domain);
            into.set_owner(&holder, lease.owner.as_deref());
            for f in &lease.functions {
                into.add(*f, &holder, false);
            }
        }
    }

    /// Writes (replaces) a lease atomically: a temp file, then rename ([`fsutil::write_atomic`]:
    /// a trusted directory, no symlink followed, crashed writers' temp files removed).
    pub fn put(&self, key: &str, lease: &Lease) -> Result<(), LeaseError> {
        let body = serde_json::to_vec(lease).expect("a lease serializes");
        fsutil::write_atomic(&self.dir, &format!("{key}.json"), &body)?;
        Ok(())
    }

    /// Removes a lease; absent is fine.
    pub fn remove(&self, key: &str) -> Result<(), LeaseError> {
        fsutil::check_dir_if_exists(&self.dir)?;
        let path = self.path(key);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(LeaseError::Write { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_hold_until_they_expire_or_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LeaseStore::new(dir.path());
        let a = key(Some("C7A5FDBD-EDAF-9455-926A-D65C16DB1809"), "vm-a");
        assert_eq!(a, "c7a5fdbd-edaf-9455-926a-d65c16db1809");
        assert_eq!(key(None, "i-2-34-VM"), "name-i-2-34-VM");
        assert_eq!(key(Some("not-a-uuid"), "../x"), "hex-2e2e2f78");
        let lease = Lease {
            domain: "vm-a".into(),
            uuid: None,
            functions: vec!["0000:18:00.0".parse().unwrap()],
            expires: 1000,
            owner: None,
        };
        store.put(&a, &lease).unwrap();
        let mut h = Holdings::default();
        store.holdings_except("other", 999, &mut h);
        assert_eq!(h.holders(&lease.functions)[0].domain, "lease:vm-a");
        let mut own = Holdings::default();
        store.holdings_except(&a, 999, &mut own);
        assert!(
            own.holders(&lease.functions).is_empty(),
            "its own lease does not block it"
        );
        let mut later = Holdings::default();
        store.holdings_except("other", 1000, &mut later);
        assert!(later.holders(&lease.functions).is_empty(), "expired");
        assert!(!store.path(&a).exists(), "expired leases are cleaned up");
        store.remove(&a).unwrap();
    }
}
