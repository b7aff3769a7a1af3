//! Short leases on GPUs chosen by `transform` (or a migrate/restore rewrite) for a domain that has
//! not started yet, so two transforms in flight never pick the same GPU. One JSON file per domain
//! under `<run-dir>/leases/`, named by [`key`] (collision-free), written atomically. Whose lease
//! it is comes from the full name and UUID stored inside, never from the file name: a domain's
//! own lease is the one with its UUID, or with no UUID and its name (a transform before
//! `virsh define` gave it one). A lease ends when it expires or when the hook sees the domain
//! start or release.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::alloc::plan::Holdings;
use crate::fsutil::{self, FsError};
use crate::model::PciAddress;

/// Longest lease, in seconds (a day): `transform --lease-seconds` may ask for no more, and a
/// lease file that claims to run longer from now was not written by gpupass (or the clock went
/// back by more than a day): it is ignored and removed.
pub const MAX_LEASE_SECONDS: u64 = 86_400;

/// Longest name kept readable in a key (`name-…`, `hex-…`); longer names are hashed.
const READABLE_NAME_BYTES: usize = 100;

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
    /// The lease's file holds another domain's live lease (a SHA-256 collision of two names, or
    /// a file someone else wrote): refuse rather than take it over.
    #[error("lease {path} belongs to domain '{holder}', not '{domain}'")]
    Taken {
        /// The file.
        path: PathBuf,
        /// The domain it belongs to.
        holder: String,
        /// The domain that wanted it.
        domain: String,
    },
}

/// One lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The domain's full name.
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

impl Lease {
    /// True when this is the lease of the domain `name` with `uuid`: the UUIDs are the same, or
    /// the lease has no UUID and the names are the same (libvirt gives a domain defined without
    /// one a UUID, so a transform's lease may have none while the domain it was for has one).
    /// A lease with a UUID is never another UUID's, whatever the names say.
    pub fn belongs_to(&self, name: &str, uuid: Option<&str>) -> bool {
        match self.uuid.as_deref().and_then(normalize_uuid) {
            Some(own) => uuid.and_then(normalize_uuid).is_some_and(|u| u == own),
            None => self.domain == name,
        }
    }
}

/// A UUID as libvirt reads it (`virUUIDParse`): spaces around it, `-` or ` ` between byte pairs,
/// 32 hex digits; in the canonical lower-case hyphenated form. `None` when it is not one.
pub fn normalize_uuid(s: &str) -> Option<String> {
    let s = s.trim_matches(|c: char| c.is_ascii_whitespace());
    let mut digits = Vec::with_capacity(32);
    let mut chars = s.chars();
    while digits.len() < 32 {
        match chars.next()? {
            '-' | ' ' => continue,
            hi if hi.is_ascii_hexdigit() => {
                let lo = chars.next().filter(char::is_ascii_hexdigit)?;
                digits.push(hi.to_ascii_lowercase());
                digits.push(lo.to_ascii_lowercase());
            }
            _ => return None,
        }
    }
    if chars.any(|c| !c.is_ascii_whitespace()) {
        return None;
    }
    let d: String = digits.into_iter().collect();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &d[..8],
        &d[8..12],
        &d[12..16],
        &d[16..20],
        &d[20..]
    ))
}

/// The file-name key of a domain (also its usage session key): its UUID when it has one,
/// else `name-NAME` for a short plain name, `hex-HEX` for another short name, and
/// `sha256-HASH` of the full name for a long one. Distinct domains get distinct keys (the
/// prefixes keep the kinds apart, each kind is one-to-one up to SHA-256), and every key is a
/// valid file name of at most 205 bytes.
pub fn key(uuid: Option<&str>, name: &str) -> String {
    if let Some(u) = uuid.and_then(normalize_uuid) {
        return u;
    }
    let hex = |bytes: &[u8]| -> String { bytes.iter().map(|b| format!("{b:02x}")).collect() };
    if name.len() > READABLE_NAME_BYTES {
        format!("sha256-{}", hex(&Sha256::digest(name.as_bytes())))
    } else if !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        format!("name-{name}")
    } else {
        format!("hex-{}", hex(name.as_bytes()))
    }
}

/// The leases of one host.
#[derive(Debug, Clone)]
pub struct LeaseStore {
    dir: PathBuf,
}

/// How a lease file reads now.
enum Read {
    /// Absent, unreadable or not a lease.
    Nothing,
    /// Expired, or claiming to last longer than gpupass ever leases.
    Void,
    /// In force.
    Live(Lease),
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

    fn read(path: &Path, now: u64) -> Read {
        let Some(lease) = fsutil::read_state(path)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice::<Lease>(&b).ok())
        else {
            return Read::Nothing;
        };
        // No lease holds longer than a day after its file was written, whatever it says.
        let written = fs::symlink_metadata(path)
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(now, |d| d.as_secs().min(now));
        if lease.expires.min(written.saturating_add(MAX_LEASE_SECONDS)) <= now {
            return Read::Void;
        }
        if lease.expires - now > MAX_LEASE_SECONDS {
            tracing::warn!(
                path = %path.display(),
                expires = lease.expires,
                "lease runs longer than gpupass ever leases: ignored"
            );
            return Read::Void;
        }
        Read::Live(lease)
    }

    /// Unexpired leases other than those of the domain `name` with `uuid` (see
    /// [`Lease::belongs_to`]), as holdings (`lease:<domain>`). Unreadable files are ignored;
    /// void ones (expired, or longer than [`MAX_LEASE_SECONDS`] from now or from when they were
    /// written) are removed; a leases directory that is not trusted ([`fsutil::check_dir`]:
    /// gpupass never wrote a lease there) is ignored whole.
    pub fn holdings_except(&self, name: &str, uuid: Option<&str>, now: u64, into: &mut Holdings) {
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
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let lease = match Self::read(&p, now) {
                Read::Nothing => continue,
                Read::Void => {
                    let _ = fs::remove_file(&p);
                    continue;
                }
                Read::Live(lease) => lease,
            };
            if lease.belongs_to(name, uuid) {
                continue;
            }
            let holder = format!("lease:{}", lease.domain);
            into.set_owner(&holder, lease.owner.as_deref());
            for f in &lease.functions {
                into.add(*f, &holder, false);
            }
        }
    }

    /// Writes (replaces) the lease of its domain atomically ([`fsutil::write_atomic`]: a trusted
    /// directory, a new temp file never through a symlink, then rename). Refuses when the file
    /// holds another domain's live lease.
    pub fn put(&self, lease: &Lease, now: u64) -> Result<(), LeaseError> {
        let key = key(lease.uuid.as_deref(), &lease.domain);
        let path = self.path(&key);
        if let Read::Live(old) = Self::read(&path, now) {
            if !old.belongs_to(&lease.domain, lease.uuid.as_deref()) {
                return Err(LeaseError::Taken {
                    path,
                    holder: old.domain,
                    domain: lease.domain.clone(),
                });
            }
        }
        let body = serde_json::to_vec(lease).expect("a lease serializes");
        fsutil::write_atomic(&self.dir, &format!("{key}.json"), &body)?;
        Ok(())
    }

    /// Removes the leases of the domain `name` with `uuid`: the one under its key and the one a
    /// transform made before it had a UUID. Absent is fine; another domain's is left alone.
    pub fn remove_own(&self, name: &str, uuid: Option<&str>) -> Result<(), LeaseError> {
        fsutil::check_dir_if_exists(&self.dir)?;
        let mut keys = vec![key(uuid, name)];
        keys.push(key(None, name));
        keys.dedup();
        for k in keys {
            let path = self.path(&k);
            let mine = fsutil::read_state(&path)
                .ok()
                .flatten()
                .and_then(|b| serde_json::from_slice::<Lease>(&b).ok())
                .is_none_or(|l| l.belongs_to(name, uuid));
            if !mine {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(LeaseError::Write { path, source }),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(domain: &str, uuid: Option<&str>, expires: u64) -> Lease {
        Lease {
            domain: domain.into(),
            uuid: uuid.map(str::to_owned),
            functions: vec!["0000:18:00.0".parse().unwrap()],
            expires,
            owner: None,
        }
    }

    fn holders(store: &LeaseStore, name: &str, uuid: Option<&str>, now: u64) -> Vec<String> {
        let mut h = Holdings::default();
        store.holdings_except(name, uuid, now, &mut h);
        h.holders(&["0000:18:00.0".parse().unwrap()])
            .iter()
            .map(|x| x.domain.clone())
            .collect()
    }

    const U: &str = "c7a5fdbd-edaf-9455-926a-d65c16db1809";

    #[test]
    fn leases_hold_until_they_expire_or_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LeaseStore::new(dir.path());
        let a = key(Some("C7A5FDBD-EDAF-9455-926A-D65C16DB1809"), "vm-a");
        assert_eq!(a, U);
        assert_eq!(key(None, "i-2-34-VM"), "name-i-2-34-VM");
        assert_eq!(key(Some("not-a-uuid"), "../x"), "hex-2e2e2f78");
        store.put(&lease("vm-a", Some(U), 1000), 0).unwrap();
        assert!(store.path(&a).exists());
        assert_eq!(holders(&store, "other", None, 999), ["lease:vm-a"]);
        assert!(
            holders(&store, "renamed", Some(U), 999).is_empty(),
            "its own lease does not block it"
        );
        assert!(holders(&store, "other", None, 1000).is_empty(), "expired");
        assert!(!store.path(&a).exists(), "expired leases are cleaned up");
        store.put(&lease("vm-a", Some(U), 1000), 0).unwrap();
        store.remove_own("vm-a", Some(U)).unwrap();
        assert!(!store.path(&a).exists());
        store.remove_own("vm-a", Some(U)).unwrap();
    }

    #[test]
    fn long_names_that_share_a_prefix_never_share_a_lease() {
        let dir = tempfile::tempdir().unwrap();
        let store = LeaseStore::new(dir.path());
        let long = |c: char| format!("audit-{}{c}", "a".repeat(100));
        assert_ne!(key(None, &long('1')), key(None, &long('2')));
        store.put(&lease(&long('1'), None, 1000), 0).unwrap();
        // The second domain sees the first one's lease as someone else's.
        assert_eq!(
            holders(&store, &long('2'), None, 10),
            [format!("lease:{}", long('1'))]
        );
        assert!(holders(&store, &long('1'), None, 10).is_empty());
        // Even under the same file name, a lease is only ever its own domain's.
        fs::rename(
            store.path(&key(None, &long('1'))),
            store.path(&key(None, &long('2'))),
        )
        .unwrap();
        assert_eq!(holders(&store, &long('2'), None, 10).len(), 1);
        let err = store.put(&lease(&long('2'), None, 1000), 10).unwrap_err();
        assert!(matches!(err, LeaseError::Taken { .. }), "{err}");
        store.remove_own(&long('2'), None).unwrap();
        assert_eq!(holders(&store, "x", None, 10).len(), 1, "not removed");
    }

    #[test]
    fn a_lease_without_uuid_is_its_named_domains_once_it_has_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = LeaseStore::new(dir.path());
        store.put(&lease("t1", None, 1000), 0).unwrap();
        // `virsh define` gave t1 a UUID: its lease is still its own.
        assert!(holders(&store, "t1", Some(U), 10).is_empty());
        assert_eq!(holders(&store, "t2", Some(U), 10), ["lease:t1"]);
        // A lease with a UUID is never another UUID's, whatever the name.
        let l = lease("t1", Some(U), 1000);
        assert!(!l.belongs_to("t1", Some("00000000-0000-0000-0000-000000000001")));
        assert!(!l.belongs_to("t1", None));
        assert!(l.belongs_to("t9", Some(&U.to_uppercase())));
        // Starting removes the lease made under its name.
        store.remove_own("t1", Some(U)).unwrap();
        assert!(holders(&store, "t2", None, 10).is_empty());
    }

    #[test]
    fn a_lease_longer_than_gpupass_gives_is_void() {
        let dir = tempfile::tempdir().unwrap();
        let store = LeaseStore::new(dir.path());
        store.put(&lease("squat", None, u64::MAX), 0).unwrap();
        store
            .put(&lease("fine", None, 100 + MAX_LEASE_SECONDS), 0)
            .unwrap();
        assert_eq!(holders(&store, "x", None, 100), ["lease:fine"]);
        assert!(!store.path(&key(None, "squat")).exists(), "removed");
    }

    #[test]
    fn uuids_are_read_as_libvirt_reads_them() {
        for ok in [
            U,
            " C7A5FDBD-EDAF-9455-926A-D65C16DB1809\n",
            "c7a5fdbdedaf9455926ad65c16db1809",
            "c7-a5-fd-bd-ed-af-94-55-92-6a-d6-5c-16-db-18-09",
        ] {
            assert_eq!(normalize_uuid(ok).as_deref(), Some(U), "{ok:?}");
        }
        for bad in [
            "",
            "c7a5",
            "c7a5fdbd-edaf-9455-926a-d65c16db1809x",
            "{c7a5fdbd-edaf-9455-926a-d65c16db1809}",
            "c-7a5fdbdedaf9455926ad65c16db1809",
        ] {
            assert_eq!(normalize_uuid(bad), None, "{bad:?}");
        }
    }
}
