//! Who holds which PCI device, read from libvirt's own files under the host root, for code that
//! must never call libvirt (the qemu hook, where a call back into the daemon can deadlock):
//! `run/libvirt/qemu/<name>.xml` is each running domain's live XML (inside `<domstatus>`),
//! `etc/libvirt/qemu/<name>.xml` each defined domain's persistent XML. Reads them; writes only
//! its cache of what each file held ([`RUNNING_CACHE`], [`DEFINED_CACHE`] in the run dir), never
//! libvirt's files.
//!
//! The cache saves parsing every other domain's XML on every hook call. An entry is used only
//! while its file's device, inode, size, mtime and ctime are all what they were when it was read
//! (taken before reading), and only a file whose times were already [`RACY_MARGIN`] old then is
//! cached: any later write to it sets its ctime (which no program can set back) to a later time,
//! and libvirt replaces a file by renaming a new one over it (a new inode). A file that appears
//! is read; one that disappears drops out with its entry. So a cached view is exactly what
//! reading every file now would give, as long as the clock does not step back by more than
//! [`RACY_MARGIN`] between the read and the change.

use std::collections::BTreeMap;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::alloc::plan::Holdings;
use crate::fsutil;
use crate::model::{MdevUuid, PciAddress};
use crate::xml::domain;

/// Running domains' status XML, relative to the host root.
pub const STATUS_DIR: &str = "run/libvirt/qemu";
/// Defined domains' XML, relative to the host root.
pub const CONFIG_DIR: &str = "etc/libvirt/qemu";
/// The cache of what each running domain's status file holds, in the run dir.
pub const RUNNING_CACHE: &str = "libvirt-running.json";
/// The cache of what each defined domain's file holds, in the run dir.
pub const DEFINED_CACHE: &str = "libvirt-defined.json";
/// The directories read, relative to the host root: whether their domains run, their cache.
const RUNNING: (&str, bool, &str) = (STATUS_DIR, true, RUNNING_CACHE);
const DEFINED: (&str, bool, &str) = (CONFIG_DIR, false, DEFINED_CACHE);
/// A file changed less than this long before it was read is not cached: a change in the same
/// clock tick (or second, on a filesystem with coarse times) could leave its times as they were.
pub const RACY_MARGIN: Duration = Duration::from_secs(2);
/// The cache file's format; another version is ignored (and replaced).
const CACHE_VERSION: u32 = 2;

/// Errors from reading libvirt's files.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// A directory could not be listed.
    #[error("failed to read {path}")]
    Read {
        /// The directory.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: io::Error,
    },
}

/// What identifies one version of a file: if any of it differs, the file may have changed.
/// Times are nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    ctime: i64,
}

impl Stamp {
    /// `None` for times outside what nanoseconds in an `i64` can hold (before 1678, after
    /// 2262): such a file is read every time.
    fn of(m: &Metadata) -> Option<Self> {
        let ns = |s: i64, n: i64| s.checked_mul(1_000_000_000)?.checked_add(n);
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: ns(m.mtime(), m.mtime_nsec())?,
            ctime: ns(m.ctime(), m.ctime_nsec())?,
        })
    }

    /// Whether a file with this stamp, seen at `now` (ns since the epoch), may be cached: both
    /// its times at least [`RACY_MARGIN`] in the past (pure).
    fn settled(&self, now: i64) -> bool {
        let margin = i64::try_from(RACY_MARGIN.as_nanos()).unwrap_or(i64::MAX);
        let limit = now.saturating_sub(margin);
        self.mtime <= limit && self.ctime <= limit
    }
}

/// What one domain file contributes to the holdings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DomainHold {
    name: String,
    owner: Option<String>,
    pci: Vec<PciAddress>,
    /// Mediated devices of its mdev hostdevs.
    mdev: Vec<MdevUuid>,
}

/// One cached file: its stamp when read, and what it held (`None`: no `<hostdev>` at all).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    stamp: Stamp,
    hold: Option<DomainHold>,
}

/// One cache file: the directory it describes, and file name → entry.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Cache {
    version: u32,
    dir: String,
    files: BTreeMap<String, Entry>,
}

impl Cache {
    /// The cache `name` of `dir` in `run_dir` (a trusted directory): a missing, unreadable,
    /// torn or other directory's cache is an empty one.
    fn load(run_dir: &Path, name: &str, dir: &str) -> Self {
        fsutil::read_state(&run_dir.join(name))
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice::<Cache>(&b).ok())
            .filter(|c| c.version == CACHE_VERSION && c.dir == dir)
            .unwrap_or_else(|| Cache {
                version: CACHE_VERSION,
                dir: dir.to_owned(),
                files: BTreeMap::new(),
            })
    }

    /// Writes the cache. Best effort: failing to cache changes no result.
    fn save(&self, run_dir: &Path, name: &str) {
        let written = match serde_json::to_vec(self) {
            Ok(body) => fsutil::write_atomic(run_dir, name, &body).map_err(|e| {
                let cause = std::error::Error::source(&e).map(ToString::to_string);
                format!("{e}: {}", cause.unwrap_or_default())
            }),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = written {
            tracing::debug!("libvirt file cache not written: {e}");
        }
    }
}

/// The domain XML files of `dir` (regular files, symlinks followed, named `*.xml`), by name,
/// each with its metadata as listed.
fn xml_files(dir: &Path) -> Result<Vec<(PathBuf, Metadata)>, FilesError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(FilesError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut out: Vec<(PathBuf, Metadata)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "xml"))
        .filter_map(|p| {
            fs::metadata(&p)
                .ok()
                .filter(Metadata::is_file)
                .map(|m| (p, m))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Reads what one domain file holds; `None` when it cannot be read or parsed (logged: skipped,
/// as libvirt itself would not have written it) or has no `<hostdev>`. The outer `Option` is
/// whether the answer may be cached.
fn read_hold(path: &Path) -> Option<Option<DomainHold>> {
    let Ok(text) = fs::read_to_string(path) else {
        tracing::warn!(path = %path.display(), "cannot read libvirt domain file; skipped");
        return None;
    };
    // Most domains have no hostdev: skip parsing them.
    if !text.contains("<hostdev") {
        return Some(None);
    }
    match domain::parse(&text) {
        Ok(facts) => Some(Some(DomainHold {
            name: facts.name,
            owner: facts.owner,
            pci: facts.pci_hostdevs,
            mdev: facts.mdev_hostdevs,
        })),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "malformed libvirt domain file; skipped");
            None
        }
    }
}

/// Adds what the files of `dir` hold to `h`, each from the cache (`run dir`, `file name`)
/// while its stamp is unchanged, else read (and cached when settled at `now`).
fn add_from(
    dir: &Path,
    running: bool,
    skip: &str,
    h: &mut Holdings,
    cache: Option<(&Path, &str)>,
    now: i64,
) -> Result<(), FilesError> {
    let files = xml_files(dir)?;
    // Only a directory and file names that are text can be keys; others are read every time.
    let cache = cache.zip(dir.to_str());
    let mut before = match cache {
        Some(((run_dir, name), d)) => Cache::load(run_dir, name, d),
        None => Cache::default(),
    };
    let mut after = BTreeMap::new();
    let mut changed = false;
    for (path, meta) in files {
        // Taken before the file is read: a change after this leaves a different stamp.
        let stamp = Stamp::of(&meta);
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|_| cache.is_some());
        let old = name.and_then(|n| before.files.remove(n));
        let hold = match (name, old, stamp) {
            (Some(n), Some(e), Some(stamp)) if e.stamp == stamp => {
                let hold = e.hold.clone();
                after.insert(n.to_owned(), e);
                hold
            }
            (name, old, stamp) => {
                changed |= old.is_some();
                let read = read_hold(&path);
                if let (Some(n), Some(hold), Some(stamp)) = (name, &read, stamp) {
                    if stamp.settled(now) {
                        let hold = hold.clone();
                        after.insert(n.to_owned(), Entry { stamp, hold });
                        changed = true;
                    }
                }
                read.flatten()
            }
        };
        if let Some(d) = hold.filter(|d| d.name != skip) {
            h.set_owner(&d.name, d.owner.as_deref());
            for a in d.pci {
                h.add(a, &d.name, running);
            }
            for u in d.mdev {
                h.add_mdev(u, &d.name, running);
            }
        }
    }
    // Entries of files that are gone.
    changed |= !before.files.is_empty();
    if let (Some(((run_dir, name), _)), true) = (cache, changed) {
        before.files = after;
        before.save(run_dir, name);
    }
    Ok(())
}

/// Nanoseconds since the epoch.
fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// The holdings in the directories `dirs` (relative to `root`: whether their domains run, their
/// cache file), through the caches in `cache_dir`, as seen at `now`.
fn collect(
    root: &Path,
    skip: &str,
    cache_dir: Option<&Path>,
    dirs: &[(&str, bool, &str)],
    now: i64,
) -> Result<Holdings, FilesError> {
    let mut h = Holdings::default();
    for (dir, running, cache) in dirs {
        let cache = cache_dir.map(|d| (d, *cache));
        add_from(&root.join(dir), *running, skip, &mut h, cache, now)?;
    }
    Ok(h)
}

/// Holdings of running domains only (`run/libvirt/qemu`), leaving out domain `skip`. With
/// `cache_dir` (a trusted run dir), files unchanged since an earlier call are not read again.
pub fn running_holdings(
    root: &Path,
    skip: &str,
    cache_dir: Option<&Path>,
) -> Result<Holdings, FilesError> {
    collect(root, skip, cache_dir, &[RUNNING], now_ns())
}

/// Holdings of running and defined domains, leaving out domain `skip` (`cache_dir`: as for
/// [`running_holdings`]).
pub fn all_holdings(
    root: &Path,
    skip: &str,
    cache_dir: Option<&Path>,
) -> Result<Holdings, FilesError> {
    collect(root, skip, cache_dir, &[RUNNING, DEFINED], now_ns())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_and_config_files_and_skips_the_domain_itself() {
        let root = tempfile::tempdir().unwrap();
        let run = root.path().join(STATUS_DIR);
        let etc = root.path().join(CONFIG_DIR);
        fs::create_dir_all(&run).unwrap();
        fs::create_dir_all(&etc).unwrap();
        let dom = |name: &str, bus: &str| {
            format!("<domain type='kvm'><name>{name}</name><devices><hostdev mode='subsystem' type='pci'><source><address domain='0' bus='{bus}' slot='0' function='0'/></source></hostdev></devices></domain>")
        };
        fs::write(
            run.join("a.xml"),
            format!(
                "<domstatus state='running'>{}</domstatus>",
                dom("a", "0x18")
            ),
        )
        .unwrap();
        fs::write(etc.join("a.xml"), dom("a", "0x18")).unwrap();
        fs::write(etc.join("b.xml"), dom("b", "0x2a")).unwrap();
        fs::write(etc.join("broken.xml"), "<domain><hostdev>").unwrap();
        fs::write(etc.join("self.xml"), dom("self", "0x3a")).unwrap();
        let all = all_holdings(root.path(), "self", None).unwrap();
        let h18 = all.holders(&["0000:18:00.0".parse().unwrap()]);
        assert_eq!(h18.len(), 1);
        assert!(h18[0].running && h18[0].domain == "a");
        assert_eq!(
            all.holders(&["0000:2a:00.0".parse().unwrap()])[0].domain,
            "b"
        );
        assert!(all.holders(&["0000:3a:00.0".parse().unwrap()]).is_empty());
        let running = running_holdings(root.path(), "self", None).unwrap();
        assert!(running
            .holders(&["0000:2a:00.0".parse().unwrap()])
            .is_empty());
        assert!(all_holdings(&root.path().join("none"), "x", None)
            .unwrap()
            .holders(&[])
            .is_empty());
    }

    /// A status file of running domain `name` holding the GPU on bus `bus`.
    fn status(name: &str, bus: &str) -> String {
        format!("<domstatus state='running'><domain type='kvm'><name>{name}</name><devices><hostdev mode='subsystem' type='pci'><source><address domain='0' bus='{bus}' slot='0' function='0'/></source></hostdev></devices></domain></domstatus>")
    }

    struct Host {
        root: tempfile::TempDir,
        run: PathBuf,
    }

    impl Host {
        fn new() -> Self {
            let root = tempfile::tempdir().unwrap();
            let run = root.path().join("gpupass-run");
            fs::create_dir_all(root.path().join(STATUS_DIR)).unwrap();
            fs::create_dir_all(root.path().join(CONFIG_DIR)).unwrap();
            fsutil::private_dir(&run).unwrap();
            Self { root, run }
        }

        fn file(&self, dir: &str, name: &str) -> PathBuf {
            self.root.path().join(dir).join(name)
        }

        /// Who runs on bus `bus` (function 0), read through the cache as if at `now`.
        fn holder(&self, bus: &str, now: i64) -> Option<String> {
            let dirs = [RUNNING, DEFINED];
            let h = collect(self.root.path(), "self", Some(&self.run), &dirs, now).unwrap();
            let addr: PciAddress = format!("0000:{bus}:00.0").parse().unwrap();
            h.holders(&[addr])
                .into_iter()
                .find(|h| h.running)
                .map(|h| h.domain)
        }

        fn cache(&self, name: &str) -> Cache {
            serde_json::from_slice(&fs::read(self.run.join(name)).unwrap()).unwrap()
        }

        fn cached_files(&self) -> Vec<String> {
            let mut out = Vec::new();
            for name in [RUNNING_CACHE, DEFINED_CACHE] {
                if let Ok(b) = fs::read(self.run.join(name)) {
                    let c: Cache = serde_json::from_slice(&b).unwrap();
                    out.extend(c.files.keys().cloned());
                }
            }
            out
        }
    }

    /// Later than every file written so far has settled.
    fn later() -> i64 {
        now_ns() + 3 * i64::try_from(RACY_MARGIN.as_nanos()).unwrap()
    }

    /// Longer than a clock tick of the filesystem's timestamps (they are coarse).
    fn tick() {
        std::thread::sleep(Duration::from_millis(30));
    }

    #[test]
    fn only_files_settled_before_now_are_cached() {
        let s = Stamp {
            dev: 1,
            ino: 2,
            size: 3,
            mtime: 10_000_000_000,
            ctime: 10_000_000_000,
        };
        assert!(s.settled(12_000_000_000));
        assert!(!s.settled(11_999_999_999));
        assert!(!Stamp {
            ctime: 11_000_000_000,
            ..s
        }
        .settled(12_000_000_000));
        assert!(!Stamp {
            mtime: 11_000_000_000,
            ..s
        }
        .settled(12_000_000_000));
    }

    #[test]
    fn a_fresh_file_is_read_every_time_and_a_settled_one_is_cached() {
        let host = Host::new();
        fs::write(host.file(STATUS_DIR, "a.xml"), status("a", "0x18")).unwrap();
        fs::write(
            host.file(CONFIG_DIR, "b.xml"),
            "<domain><name>b</name></domain>",
        )
        .unwrap();
        // Just written: not cached, nothing to save.
        assert_eq!(host.holder("18", now_ns()).as_deref(), Some("a"));
        assert!(host.cached_files().is_empty());
        // Settled: cached, both the one with a hostdev and the one without.
        assert_eq!(host.holder("18", later()).as_deref(), Some("a"));
        let mut files = host.cached_files();
        files.sort();
        assert_eq!(files, ["a.xml", "b.xml"]);
        // The cache is what answers now: a (forged) entry with the file's own stamp wins.
        let mut c = host.cache(RUNNING_CACHE);
        let entry = c.files.get_mut("a.xml").unwrap();
        entry.hold.as_mut().unwrap().name = "from-cache".into();
        let forged = serde_json::to_vec(&c).unwrap();
        fs::write(host.run.join(RUNNING_CACHE), &forged).unwrap();
        assert_eq!(host.holder("18", later()).as_deref(), Some("from-cache"));
        // Not for another host root's directory.
        let other = Host::new();
        fs::write(other.file(STATUS_DIR, "a.xml"), status("a", "0x18")).unwrap();
        fs::write(other.run.join(RUNNING_CACHE), &forged).unwrap();
        assert_eq!(other.holder("18", later()).as_deref(), Some("a"));
        // The same files without the cache (or with another root's) read what is there.
        let plain = running_holdings(host.root.path(), "self", None).unwrap();
        assert_eq!(
            plain.holders(&["0000:18:00.0".parse().unwrap()])[0].domain,
            "a"
        );
    }

    #[test]
    fn a_changed_replaced_new_or_removed_file_is_read_again() {
        let host = Host::new();
        let a = host.file(STATUS_DIR, "a.xml");
        fs::write(&a, status("a", "0x18")).unwrap();
        assert_eq!(host.holder("18", later()).as_deref(), Some("a"));
        let mtime = fs::metadata(&a).unwrap().modified().unwrap();

        // Rewritten in place, same size, mtime put back: the ctime tells.
        tick();
        fs::write(&a, status("a", "0x28")).unwrap();
        fs::File::options()
            .write(true)
            .open(&a)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(host.holder("18", later()), None);
        assert_eq!(host.holder("28", later()).as_deref(), Some("a"));

        // Replaced by a rename (what libvirt does): a new inode.
        tick();
        let new = host.file(STATUS_DIR, "a.xml.new");
        fs::write(&new, status("z", "0x28")).unwrap();
        fs::rename(&new, &a).unwrap();
        assert_eq!(host.holder("28", later()).as_deref(), Some("z"));

        // A new running domain, and one that stopped.
        fs::write(host.file(STATUS_DIR, "b.xml"), status("b", "0x38")).unwrap();
        assert_eq!(host.holder("38", later()).as_deref(), Some("b"));
        fs::remove_file(&a).unwrap();
        assert_eq!(host.holder("28", later()), None);
        assert_eq!(host.cached_files(), ["b.xml"]);

        // A domain that lost its hostdev, and a torn cache file: read, not trusted.
        tick();
        fs::write(host.file(STATUS_DIR, "b.xml"), "<domstatus/>").unwrap();
        fs::write(host.run.join(RUNNING_CACHE), "{\"version\":1,\"dir\":").unwrap();
        assert_eq!(host.holder("38", later()), None);
        assert_eq!(host.cached_files(), ["b.xml"]);
    }
}
