//! The usage ledger: an append-only JSON-lines file under the state dir with one record when a
//! domain with GPUs starts and one when it is released; GPU-seconds are computed from it. A
//! record is one `write` of a whole line under an exclusive lock (waited for at most
//! [`LOCK_TIMEOUT`]), flushed to disk; if a crash ever left a torn last line, the next append
//! starts on a fresh line. Readers take the file as bytes, line by line, and skip (and report
//! by line number) any line that is not valid UTF-8 or not a record, so a bad line never loses
//! the records around it nor stops the ledger from being written.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fsutil::{self, FsError};
use crate::model::PciAddress;

/// The ledger's file name inside the state dir.
pub const LEDGER_FILE: &str = "usage.jsonl";
/// How long a writer waits for the ledger's lock (the hook's `started`/`release`, the agent):
/// appends take milliseconds, so a longer hold is a hung or hostile process.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// How many skipped line numbers a read keeps (it counts them all).
pub const MAX_SKIPPED_LINES_LISTED: usize = 20;

/// Errors from the ledger.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// The ledger could not be opened, locked, read or written.
    #[error("failed to access usage ledger {path}")]
    Io {
        /// The ledger file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: io::Error,
    },
    /// The state dir or the ledger is not safe to use, or its lock was held too long.
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// One ledger line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Record {
    /// A domain started holding these GPUs.
    Start {
        /// Unix seconds.
        ts: u64,
        /// Domain name.
        domain: String,
        /// Domain UUID (the session key), or its name when it has none.
        key: String,
        /// The GPUs (display functions).
        gpus: Vec<PciAddress>,
        /// The domain's owner, when it has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
    /// The domain was released.
    Stop {
        /// Unix seconds.
        ts: u64,
        /// Domain name.
        domain: String,
        /// The session key.
        key: String,
        /// The session's GPUs that were quarantined when it ended (a health check failed).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        quarantined: Vec<PciAddress>,
    },
}

/// The ledger file.
#[derive(Debug, Clone)]
pub struct Ledger {
    path: PathBuf,
}

/// Records read back, and which lines were skipped as torn or unreadable.
#[derive(Debug, Clone, Default)]
pub struct LedgerRead {
    /// Valid records, in order.
    pub records: Vec<Record>,
    /// Lines skipped.
    pub skipped: usize,
    /// The first [`MAX_SKIPPED_LINES_LISTED`] skipped lines' numbers (1-based).
    pub skipped_lines: Vec<usize>,
}

impl LedgerRead {
    fn skip(&mut self, line: usize) {
        self.skipped += 1;
        if self.skipped_lines.len() < MAX_SKIPPED_LINES_LISTED {
            self.skipped_lines.push(line);
        }
    }
}

/// Parses the ledger's bytes (pure): every complete line that is UTF-8 and a record is kept;
/// any other line, and a torn last line (no newline), is skipped by number.
pub fn parse_lines(bytes: &[u8]) -> LedgerRead {
    let mut out = LedgerRead::default();
    let mut lines = bytes.split(|b| *b == b'\n').enumerate().peekable();
    while let Some((i, line)) = lines.next() {
        let last = lines.peek().is_none();
        if last {
            // After the final newline: empty, or a line torn by a crash.
            if !line.is_empty() {
                out.skip(i + 1);
            }
            break;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match std::str::from_utf8(line)
            .ok()
            .and_then(|l| serde_json::from_str::<Record>(l).ok())
        {
            Some(r) => out.records.push(r),
            None => out.skip(i + 1),
        }
    }
    out
}

fn open_session<'a>(records: &'a [Record], key: &str) -> Option<&'a Record> {
    let mut open = None;
    for r in records {
        match r {
            Record::Start { key: k, .. } if k == key => open = Some(r),
            Record::Stop { key: k, .. } if k == key => open = None,
            _ => {}
        }
    }
    open
}

impl Ledger {
    /// The ledger under `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(LEDGER_FILE),
        }
    }

    fn err(&self, source: io::Error) -> UsageError {
        UsageError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Reads every record; a missing ledger (or state dir) is empty. The state dir must be
    /// trusted ([`fsutil::check_dir`]).
    pub fn read(&self) -> Result<LedgerRead, UsageError> {
        if let Some(dir) = self.path.parent() {
            match fsutil::check_dir(dir) {
                Err(e) if e.is_not_found() => return Ok(LedgerRead::default()),
                r => r?,
            }
        }
        let read = parse_lines(&fsutil::read_state(&self.path)?.unwrap_or_default());
        self.warn_skipped(&read);
        Ok(read)
    }

    /// Says once per read which lines were skipped.
    fn warn_skipped(&self, read: &LedgerRead) {
        if read.skipped > 0 {
            let listed: Vec<String> = read.skipped_lines.iter().map(usize::to_string).collect();
            let more = if read.skipped > listed.len() {
                ", …"
            } else {
                ""
            };
            tracing::warn!(
                "usage ledger {}: skipped {} torn or unreadable line(s) (line {}{more})",
                self.path.display(),
                read.skipped,
                listed.join(", ")
            );
        }
    }

    /// Opens the ledger locked for appending and returns it with its bytes and records.
    fn locked(&self) -> Result<(File, Vec<u8>, LedgerRead), UsageError> {
        if let Some(dir) = self.path.parent() {
            fsutil::private_dir(dir)?;
        }
        let mut f = fsutil::open_state(
            &self.path,
            OpenOptions::new().read(true).append(true).create(true),
        )?;
        fsutil::lock(&f, &self.path, LOCK_TIMEOUT)?;
        let mut bytes = Vec::new();
        f.seek(SeekFrom::Start(0)).map_err(|e| self.err(e))?;
        f.read_to_end(&mut bytes).map_err(|e| self.err(e))?;
        let read = parse_lines(&bytes);
        self.warn_skipped(&read);
        if bytes.last().is_some_and(|b| *b != b'\n') {
            // Start the next record on a fresh line; the torn bytes stay a skipped line.
            f.write_all(b"\n").map_err(|e| self.err(e))?;
        }
        Ok((f, bytes, read))
    }

    fn append(&self, f: &mut File, r: &Record) -> Result<(), UsageError> {
        let mut line = serde_json::to_vec(r).expect("a record serializes");
        line.push(b'\n');
        f.write_all(&line)
            .and_then(|()| f.sync_data())
            .map_err(|e| self.err(e))
    }

    /// Appends `record` (of session `key`) under the ledger's lock when the session is open
    /// (`open`) or closed (`!open`) as the record needs, and, with `seen` (a byte length from
    /// [`Ledger::end`]), when no record of `key` was appended since. A line that was being
    /// written at `seen` counts as appended since. Returns the ledger's length in bytes after
    /// the write, `None` when nothing was written.
    fn append_if(
        &self,
        key: &str,
        open: bool,
        seen: Option<u64>,
        record: &Record,
    ) -> Result<Option<u64>, UsageError> {
        let (mut f, bytes, read) = self.locked()?;
        if let Some(seen) = seen {
            let cut = usize::try_from(seen).map_or(bytes.len(), |n| n.min(bytes.len()));
            let from = bytes[..cut]
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
            if touches(&parse_lines(&bytes[from..]).records, key) {
                return Ok(None);
            }
        }
        if open_session(&read.records, key).is_some() != open {
            return Ok(None);
        }
        self.append(&mut f, record)?;
        let end = f.metadata().map_err(|e| self.err(e))?.len();
        Ok(Some(end))
    }

    /// Opens a session; does nothing when one is already open for `key` (a repeated event).
    /// Returns whether a record was written.
    pub fn start(
        &self,
        domain: &str,
        key: &str,
        gpus: &[PciAddress],
        owner: Option<&str>,
        ts: u64,
    ) -> Result<bool, UsageError> {
        let r = start_record(domain, key, gpus, owner, ts);
        Ok(self.append_if(key, false, None, &r)?.is_some())
    }

    /// Closes the open session of `key`; does nothing when none is open (libvirt also calls
    /// release after a start that was blocked). Returns whether a record was written.
    pub fn stop(&self, domain: &str, key: &str, ts: u64) -> Result<bool, UsageError> {
        let r = stop_record(domain, key, ts);
        Ok(self.append_if(key, true, None, &r)?.is_some())
    }

    /// [`Ledger::stop`] that first runs `check` with the open session's GPUs (none when no
    /// session is open), under the ledger's lock, and marks the stop record with the GPUs it
    /// returns that are the session's: `check` runs the health check of what the domain gave
    /// back and returns what is quarantined. Returns whether a record was written.
    pub fn stop_checked(
        &self,
        domain: &str,
        key: &str,
        ts: u64,
        check: impl FnOnce(&[PciAddress]) -> Vec<PciAddress>,
    ) -> Result<bool, UsageError> {
        let (mut f, _, read) = self.locked()?;
        let session = match open_session(&read.records, key) {
            Some(Record::Start { gpus, .. }) => Some(gpus.clone()),
            _ => None,
        };
        let quarantined = check(session.as_deref().unwrap_or_default());
        let Some(gpus) = session else {
            return Ok(false);
        };
        let mut r = stop_record(domain, key, ts);
        if let Record::Stop { quarantined: q, .. } = &mut r {
            *q = quarantined
                .into_iter()
                .filter(|g| gpus.contains(g))
                .collect();
        }
        self.append(&mut f, &r)?;
        Ok(true)
    }

    /// The ledger's length in bytes now (0 when it does not exist yet), without reading it:
    /// what a later [`Ledger::start_since`] or [`Ledger::stop_since`] compares against.
    pub fn end(&self) -> Result<u64, UsageError> {
        match fs::symlink_metadata(&self.path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(self.err(e)),
        }
    }

    /// [`Ledger::start`] for a writer whose view of the domain is from when the ledger ended at
    /// `seen` ([`Ledger::end`]; the agent reads libvirt, then writes what the ledger lacks): a record of
    /// `key` appended since then (the hook's stop of a domain the view still shows running) is
    /// newer than the view, and nothing is written; the next look at libvirt decides. Returns
    /// the ledger's length after the write, the writer's new `seen` for this key.
    pub fn start_since(
        &self,
        domain: &str,
        key: &str,
        gpus: &[PciAddress],
        owner: Option<&str>,
        ts: u64,
        seen: u64,
    ) -> Result<Option<u64>, UsageError> {
        let r = start_record(domain, key, gpus, owner, ts);
        self.append_if(key, false, Some(seen), &r)
    }

    /// [`Ledger::stop`] with the same rule as [`Ledger::start_since`]: a session of `key` opened
    /// since the view was taken (the hook's start of a domain the view still shows stopped) is
    /// left open.
    pub fn stop_since(
        &self,
        domain: &str,
        key: &str,
        ts: u64,
        seen: u64,
    ) -> Result<Option<u64>, UsageError> {
        self.stop_since_marked(domain, key, ts, seen, &[])
    }

    /// [`Ledger::stop_since`], the record marked with the session's GPUs that were
    /// `quarantined` when it ended.
    pub fn stop_since_marked(
        &self,
        domain: &str,
        key: &str,
        ts: u64,
        seen: u64,
        quarantined: &[PciAddress],
    ) -> Result<Option<u64>, UsageError> {
        let mut r = stop_record(domain, key, ts);
        if let Record::Stop { quarantined: q, .. } = &mut r {
            q.extend_from_slice(quarantined);
        }
        self.append_if(key, true, Some(seen), &r)
    }
}

fn start_record(
    domain: &str,
    key: &str,
    gpus: &[PciAddress],
    owner: Option<&str>,
    ts: u64,
) -> Record {
    Record::Start {
        ts,
        domain: domain.to_owned(),
        key: key.to_owned(),
        gpus: gpus.to_vec(),
        owner: owner.map(str::to_owned),
    }
}

fn stop_record(domain: &str, key: &str, ts: u64) -> Record {
    Record::Stop {
        ts,
        domain: domain.to_owned(),
        key: key.to_owned(),
        quarantined: Vec::new(),
    }
}

/// Whether any of `records` is about session `key`.
fn touches(records: &[Record], key: &str) -> bool {
    records.iter().any(|r| match r {
        Record::Start { key: k, .. } | Record::Stop { key: k, .. } => k == key,
    })
}

/// Seconds since the Unix epoch (0 on a clock before it): the ledger's and leases' time.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Parses `--since` (and the API's `?since=`): unix seconds, or `<n>[smhd]` ago.
pub fn parse_since(s: &str, now: u64) -> Option<u64> {
    if let Ok(t) = s.parse::<u64>() {
        return Some(t);
    }
    let (num, unit) = s.split_at(s.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    Some(now.saturating_sub(secs))
}

/// GPU-seconds of one domain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DomainUsage {
    /// Domain name (the latest seen).
    pub domain: String,
    /// Session key (UUID or name).
    pub key: String,
    /// GPU-seconds in the window.
    pub gpu_seconds: u64,
    /// Per GPU.
    pub gpus: BTreeMap<PciAddress, u64>,
    /// A session is open now (counted up to `now`).
    pub running: bool,
    /// The domain's owner, when it has one.
    pub owner: Option<String>,
    /// GPUs a session of it ended on that were quarantined then (a health check failed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ended_on_quarantined: Vec<PciAddress>,
}

/// The usage summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UsageReport {
    /// Window start (unix seconds), 0 = everything.
    pub since: u64,
    /// Window end: now.
    pub until: u64,
    /// Per domain, by key.
    pub domains: Vec<DomainUsage>,
    /// GPU-seconds per owner.
    pub owners: BTreeMap<String, u64>,
    /// GPU-seconds per GPU.
    pub gpus: BTreeMap<PciAddress, u64>,
    /// All GPU-seconds.
    pub total_gpu_seconds: u64,
    /// Ledger lines skipped as torn or unreadable.
    pub skipped_lines: usize,
    /// The first of their line numbers (1-based).
    pub skipped_line_numbers: Vec<usize>,
}

/// Sums GPU-seconds between `since` and `now` (pure).
pub fn summarize(read: &LedgerRead, since: u64, now: u64) -> UsageReport {
    let mut by_key: BTreeMap<String, DomainUsage> = BTreeMap::new();
    let mut open: BTreeMap<String, (u64, Vec<PciAddress>)> = BTreeMap::new();
    let mut owner_of: BTreeMap<String, Option<String>> = BTreeMap::new();
    let charge = |by_key: &mut BTreeMap<String, DomainUsage>,
                  key: &str,
                  domain: &str,
                  from: u64,
                  to: u64,
                  gpus: &[PciAddress]| {
        let (from, to) = (from.max(since), to.min(now));
        let secs = to.saturating_sub(from);
        let u = by_key.entry(key.to_owned()).or_default();
        u.key = key.to_owned();
        u.domain = domain.to_owned();
        for g in gpus {
            let per = u.gpus.entry(*g).or_default();
            *per = per.saturating_add(secs);
            u.gpu_seconds = u.gpu_seconds.saturating_add(secs);
        }
    };
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for r in &read.records {
        match r {
            Record::Start {
                ts,
                domain,
                key,
                gpus,
                owner,
            } => {
                names.insert(key.clone(), domain.clone());
                owner_of.insert(key.clone(), owner.clone());
                open.insert(key.clone(), (*ts, gpus.clone()));
            }
            Record::Stop {
                ts,
                domain,
                key,
                quarantined,
            } => {
                if let Some((from, gpus)) = open.remove(key) {
                    charge(&mut by_key, key, domain, from, *ts, &gpus);
                    if *ts >= since && !quarantined.is_empty() {
                        if let Some(u) = by_key.get_mut(key) {
                            u.ended_on_quarantined.extend(quarantined);
                            u.ended_on_quarantined.sort();
                            u.ended_on_quarantined.dedup();
                        }
                    }
                }
            }
        }
    }
    for (key, (from, gpus)) in &open {
        let domain = names.get(key).cloned().unwrap_or_default();
        charge(&mut by_key, key, &domain, *from, now, gpus);
        if let Some(u) = by_key.get_mut(key) {
            u.running = true;
        }
    }
    let mut owners: BTreeMap<String, u64> = BTreeMap::new();
    for (key, u) in by_key.iter_mut() {
        u.owner = owner_of.get(key).cloned().flatten();
        if let Some(o) = &u.owner {
            let sum = owners.entry(o.clone()).or_default();
            *sum = sum.saturating_add(u.gpu_seconds);
        }
    }
    let domains: Vec<DomainUsage> = by_key.into_values().collect();
    let mut gpus: BTreeMap<PciAddress, u64> = BTreeMap::new();
    for (g, secs) in domains.iter().flat_map(|d| d.gpus.iter()) {
        let sum = gpus.entry(*g).or_default();
        *sum = sum.saturating_add(*secs);
    }
    UsageReport {
        since,
        until: now,
        owners,
        gpus,
        total_gpu_seconds: domains
            .iter()
            .fold(0u64, |t, d| t.saturating_add(d.gpu_seconds)),
        domains,
        skipped_lines: read.skipped,
        skipped_line_numbers: read.skipped_lines.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    #[test]
    fn a_writer_with_an_older_view_never_reopens_or_closes_what_the_hook_wrote_since() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::new(dir.path());
        let gpus = [g("0000:18:00.0")];
        assert!(l.start("l2", "k", &gpus, None, 10).unwrap());
        // The agent reads the ledger's length, then libvirt: l2 running with its GPU...
        let seen = l.end().unwrap();
        // ...and the hook records l2's stop before the agent writes.
        assert!(l.stop("l2", "k", 20).unwrap());
        // The agent's view (running, no open session) is older than that stop: no new session.
        assert_eq!(
            l.start_since("l2", "k", &gpus, None, 20, seen).unwrap(),
            None
        );
        assert_eq!(
            l.read().unwrap().records.len(),
            2,
            "only the hook's start and stop"
        );

        // The other way: the view says stopped, but the hook opened a session since.
        let seen = l.end().unwrap();
        assert!(l.start("l2", "k", &gpus, None, 30).unwrap());
        assert_eq!(l.stop_since("l2", "k", 30, seen).unwrap(), None);
        assert!(open_session(&l.read().unwrap().records, "k").is_some());

        // The agent's own writes do not block its next one (a live attach: stop, then start),
        // and records of other sessions do not matter.
        let seen = l.end().unwrap();
        assert!(l.start("other", "o", &gpus, None, 40).unwrap());
        let after = l.stop_since("l2", "k", 40, seen).unwrap().expect("closed");
        assert_eq!(after, l.end().unwrap());
        let two = [g("0000:18:00.0"), g("0000:2a:00.0")];
        assert!(l
            .start_since("l2", "k", &two, None, 40, after)
            .unwrap()
            .is_some());
        let r = l.read().unwrap();
        assert!(
            matches!(open_session(&r.records, "k"), Some(Record::Start { gpus, .. }) if gpus.len() == 2)
        );
    }

    #[test]
    fn sessions_open_close_and_repeat_idempotently() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::new(dir.path());
        assert!(
            !l.stop("vm", "k1", 5).unwrap(),
            "release after a blocked start writes nothing"
        );
        assert!(l
            .start(
                "vm",
                "k1",
                &[g("0000:18:00.0"), g("0000:2a:00.0")],
                Some("acct"),
                100
            )
            .unwrap());
        assert!(
            !l.start("vm", "k1", &[g("0000:18:00.0")], Some("acct"), 150)
                .unwrap(),
            "repeated start"
        );
        assert!(l.stop("vm", "k1", 160).unwrap());
        assert!(!l.stop("vm", "k1", 170).unwrap(), "release twice");
        assert!(l
            .start("other", "k2", &[g("0000:9a:00.0")], None, 200)
            .unwrap());
        let r = summarize(&l.read().unwrap(), 0, 300);
        assert_eq!(r.total_gpu_seconds, 2 * 60 + 100);
        let vm = r.domains.iter().find(|d| d.key == "k1").unwrap();
        assert_eq!(vm.gpus[&g("0000:2a:00.0")], 60);
        assert!(!vm.running);
        assert!(r.domains.iter().find(|d| d.key == "k2").unwrap().running);
        assert_eq!(r.owners["acct"], 120, "per owner");
        assert_eq!(r.owners.len(), 1);
        let windowed = summarize(&l.read().unwrap(), 150, 250);
        assert_eq!(windowed.total_gpu_seconds, 2 * 10 + 50);
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_never_glued_to_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::new(dir.path());
        l.start("vm", "k1", &[g("0000:18:00.0")], None, 100)
            .unwrap();
        // A crash in the middle of a write.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(LEDGER_FILE))
            .unwrap();
        f.write_all(b"{\"event\":\"stop\",\"ts\":1").unwrap();
        drop(f);
        assert_eq!(l.read().unwrap().skipped, 1);
        assert!(
            l.stop("vm", "k1", 130).unwrap(),
            "the torn line did not close the session"
        );
        let read = l.read().unwrap();
        assert_eq!(read.records.len(), 2);
        assert_eq!(read.skipped, 1);
        assert_eq!(summarize(&read, 0, 1000).total_gpu_seconds, 30);
    }

    #[test]
    fn a_corrupt_line_in_the_middle_is_skipped_by_number_and_writing_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::new(dir.path());
        l.start("vm", "k1", &[g("0000:18:00.0")], None, 100)
            .unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(LEDGER_FILE))
            .unwrap();
        // A cut multi-byte character, then a line that is UTF-8 but not a record.
        f.write_all(b"{\"event\":\"stop\",\"domain\":\"\xc3\"}\nnot json\n")
            .unwrap();
        drop(f);
        l.start("vm2", "k2", &[g("0000:2a:00.0")], None, 110)
            .unwrap();
        assert!(
            l.stop("vm", "k1", 130).unwrap(),
            "the ledger is still written"
        );
        let read = l.read().unwrap();
        assert_eq!(read.records.len(), 3);
        assert_eq!((read.skipped, read.skipped_lines.clone()), (2, vec![2, 3]));
        let r = summarize(&read, 0, 140);
        assert_eq!(r.total_gpu_seconds, 30 + 30);
        assert_eq!(r.skipped_line_numbers, vec![2, 3]);
    }

    #[test]
    fn parsing_never_fails_on_any_bytes() {
        for bytes in [
            &b""[..],
            b"\n\n",
            b"\xff\xfe\n",
            b"{",
            b"\n{\"event\":\"stop\",\"ts\":1,\"domain\":\"d\",\"key\":\"k\"}\n\xc3",
        ] {
            let r = parse_lines(bytes);
            assert!(r.skipped <= bytes.len());
        }
        let r =
            parse_lines(b"\n{\"event\":\"stop\",\"ts\":1,\"domain\":\"d\",\"key\":\"k\"}\n\xc3");
        assert_eq!((r.records.len(), r.skipped_lines), (1, vec![3]));
    }

    /// A small deterministic fuzz: random bytes written over one line of a valid ledger never
    /// stop the parse and never cost another line its record.
    #[test]
    fn corrupting_one_line_never_costs_another() {
        let line = |i: u64| {
            format!("{{\"event\":\"stop\",\"ts\":{i},\"domain\":\"d\u{e9}\",\"key\":\"k{i}\"}}\n")
        };
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2000 {
            let n = 1 + next() % 6;
            let bad = next() % n;
            let mut bytes = Vec::new();
            for i in 0..n {
                let mut l = line(i).into_bytes();
                if i == bad {
                    for _ in 0..=(next() % 4) {
                        let at = usize::try_from(next() % (l.len() as u64 - 1)).unwrap();
                        l[at] = match (next() % 256) as u8 {
                            b'\n' => 0xc3,
                            b => b,
                        };
                    }
                    if next() % 3 == 0 && i + 1 == n {
                        l.truncate(usize::try_from(next() % l.len() as u64).unwrap());
                    }
                }
                bytes.extend_from_slice(&l);
            }
            let r = parse_lines(&bytes);
            let good = usize::try_from(n - 1).unwrap();
            assert!(
                r.records.len() >= good,
                "{:?}",
                String::from_utf8_lossy(&bytes)
            );
            assert!(r.records.len() + r.skipped <= usize::try_from(n).unwrap());
        }
    }
}
