//! Safe file operations in gpupass's own directories (the run dir, the state dir and what is
//! below them): a directory is trusted only when it belongs to the user gpupass runs as and
//! nobody else may write to it; files are created 0600 and never opened through a symlink; a
//! replaced file goes through a uniquely named temp file that a crashed writer's successor
//! removes; locks are waited for up to a deadline, never forever. Writes nothing outside the
//! directory it is given.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// Mode of a directory gpupass creates: its user only, plus reading by its group (the agent's
/// socket group may need to reach the socket).
pub const DIR_MODE: u32 = 0o750;
/// Mode of every file gpupass creates in its directories. Nobody else may open them: `flock`
/// works through a read-only handle, so a readable lock file would let anyone hang gpupass.
pub const FILE_MODE: u32 = 0o600;
/// Every temp file gpupass writes starts with this, followed by `<pid>.<seq>.<nanos>`.
pub const TEMP_PREFIX: &str = ".gpupass-tmp.";
/// A temp file older than this is a crashed writer's, whatever its pid.
pub const STALE_TEMP: Duration = Duration::from_secs(60);

/// Errors from file operations in gpupass's directories.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// A directory or file is not safe to keep gpupass's state in.
    #[error("refusing {path}: {reason}")]
    Untrusted {
        /// The directory or file.
        path: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
    /// An IO operation failed.
    #[error("failed to {action} {path}")]
    Io {
        /// What was being done (`open`, `create`, `rename into place`, …).
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: io::Error,
    },
    /// Another process held a lock past the deadline.
    #[error("timed out after {:.1}s waiting for the lock on {path} (another process holds it)", waited.as_secs_f64())]
    LockTimeout {
        /// The locked file.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
}

impl FsError {
    /// Whether the error is a missing file or directory.
    pub fn is_not_found(&self) -> bool {
        matches!(self, FsError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FsError + 'a {
    move |source| FsError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

fn untrusted(path: &Path, reason: String) -> FsError {
    FsError::Untrusted {
        path: path.to_owned(),
        reason,
    }
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Why a directory with this owner and mode is not trusted by a process running as `me`; `None`
/// when it is (pure).
pub fn dir_distrust(owner: u32, mode: u32, me: u32) -> Option<String> {
    if owner != me {
        return Some(format!(
            "it belongs to uid {owner}, not to uid {me} that gpupass runs as (chown it, or remove it and let gpupass create it)"
        ));
    }
    if mode & 0o022 != 0 {
        let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
            (true, true) => "its group and everyone",
            (true, false) => "its group",
            _ => "everyone",
        };
        return Some(format!(
            "it is writable by {who} (mode {:o}; chmod go-w it)",
            mode & 0o7777
        ));
    }
    None
}

/// Checks that `path` is a directory gpupass may keep state in: owned by the running user and
/// not writable by its group or others. A symlink is followed only when the link itself is the
/// user's too.
pub fn check_dir(path: &Path) -> Result<(), FsError> {
    let me = euid();
    let link = fs::symlink_metadata(path).map_err(io_err("inspect", path))?;
    if link.file_type().is_symlink() && link.uid() != me {
        return Err(untrusted(
            path,
            format!(
                "it is a symlink that belongs to uid {}, not to uid {me}",
                link.uid()
            ),
        ));
    }
    let m = fs::metadata(path).map_err(io_err("inspect", path))?;
    if !m.is_dir() {
        return Err(untrusted(path, "it is not a directory".into()));
    }
    match dir_distrust(m.uid(), m.mode(), me) {
        Some(reason) => Err(untrusted(path, reason)),
        None => Ok(()),
    }
}

/// Like [`check_dir`], but a directory that does not exist is fine (nothing to distrust).
pub fn check_dir_if_exists(path: &Path) -> Result<(), FsError> {
    match check_dir(path) {
        Err(e) if e.is_not_found() => Ok(()),
        r => r,
    }
}

/// Creates `path` (mode [`DIR_MODE`], parents too) when missing, then [`check_dir`]s it.
pub fn private_dir(path: &Path) -> Result<(), FsError> {
    if let Err(e) = fs::symlink_metadata(path) {
        if e.kind() != io::ErrorKind::NotFound {
            return Err(io_err("inspect", path)(e));
        }
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(path)
            .map_err(io_err("create directory", path))?;
    }
    check_dir(path)
}

/// Opens `path` with `opts`, never through a symlink (`O_NOFOLLOW`), creating it (if `opts`
/// say so) with mode [`FILE_MODE`]; refuses anything but a regular file of the running user.
pub fn open_nofollow(path: &Path, opts: &mut OpenOptions) -> Result<File, FsError> {
    let f = opts
        .mode(FILE_MODE)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(nix::libc::ELOOP) {
                untrusted(path, "it is a symlink".into())
            } else {
                io_err("open", path)(e)
            }
        })?;
    let m = f.metadata().map_err(io_err("inspect", path))?;
    if !m.is_file() {
        return Err(untrusted(path, "it is not a regular file".into()));
    }
    let me = euid();
    if m.uid() != me {
        return Err(untrusted(
            path,
            format!("it belongs to uid {}, not to uid {me}", m.uid()),
        ));
    }
    Ok(f)
}

/// [`open_nofollow`] for gpupass's own state files: a file left readable by others by an older
/// gpupass is narrowed to [`FILE_MODE`].
pub fn open_state(path: &Path, opts: &mut OpenOptions) -> Result<File, FsError> {
    let f = open_nofollow(path, opts)?;
    let mode = f.metadata().map_err(io_err("inspect", path))?.mode();
    if mode & 0o077 != 0 {
        f.set_permissions(fs::Permissions::from_mode(FILE_MODE))
            .map_err(io_err("chmod 600", path))?;
    }
    Ok(f)
}

/// Reads a state file whole (never through a symlink); `None` when it does not exist.
pub fn read_state(path: &Path) -> Result<Option<Vec<u8>>, FsError> {
    let mut f = match open_nofollow(path, OpenOptions::new().read(true)) {
        Ok(f) => f,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(io_err("read", path))?;
    Ok(Some(buf))
}

/// Takes an exclusive `flock` on `file` (opened from `path`), polling until `timeout` has
/// passed: a lock held by a hung or hostile process becomes an error naming the file.
pub fn lock(file: &File, path: &Path, timeout: Duration) -> Result<(), FsError> {
    let start = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(fs::TryLockError::WouldBlock) => {}
            Err(fs::TryLockError::Error(e)) => return Err(io_err("lock", path)(e)),
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(FsError::LockTimeout {
                path: path.to_owned(),
                waited,
            });
        }
        std::thread::sleep((timeout - waited).min(Duration::from_millis(20)));
    }
}

/// Opens (creating it 0600 in a checked directory) the lock file `path` and locks it, waiting
/// up to `timeout`. The lock lasts as long as the returned file is open.
pub fn lock_file(path: &Path, timeout: Duration) -> Result<File, FsError> {
    if let Some(dir) = path.parent() {
        private_dir(dir)?;
    }
    let f = open_state(
        path,
        OpenOptions::new().create(true).truncate(false).write(true),
    )?;
    lock(&f, path, timeout)?;
    Ok(f)
}

/// A fresh temp-file name: [`TEMP_PREFIX`]`<pid>.<seq>.<nanos>`.
fn temp_name() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{TEMP_PREFIX}{}.{}.{nanos}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// The writer's pid in a temp-file name: gpupass's own form, and the `.<key>.<pid>.tmp` form
/// older versions left in `leases/` (pure).
pub fn temp_pid(name: &str) -> Option<Option<u32>> {
    if let Some(rest) = name.strip_prefix(TEMP_PREFIX) {
        return Some(rest.split('.').next().and_then(|p| p.parse().ok()));
    }
    let legacy = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    Some(legacy.rsplit('.').next().and_then(|p| p.parse().ok()))
}

fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw <= 0 {
        return false;
    }
    // Signal 0 only asks whether the process exists; EPERM means it does (another user's).
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// Removes temp files of writers that died (their pid is gone) or are older than
/// [`STALE_TEMP`]; returns how many. Best effort: what cannot be removed stays.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let now = SystemTime::now();
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(temp_pid) else {
            continue;
        };
        let Ok(m) = e.metadata() else { continue };
        let old = m
            .modified()
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age > STALE_TEMP);
        let dead = pid.is_none_or(|p| !pid_alive(p));
        if (old || dead) && !m.is_dir() && fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(dir = %dir.display(), removed, "removed temp files of crashed writers");
    }
    removed
}

/// Replaces `dir/name` with `body` atomically: a new 0600 temp file (created exclusively, never
/// through a symlink), synced, then renamed over the target (a symlink there is replaced, not
/// followed). The directory is created or checked first, and stale temp files in it removed.
pub fn write_atomic(dir: &Path, name: &str, body: &[u8]) -> Result<(), FsError> {
    private_dir(dir)?;
    remove_stale_temps(dir);
    let tmp = dir.join(temp_name());
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    let target = dir.join(name);
    let done = f
        .write_all(body)
        .and_then(|()| f.sync_data())
        .map_err(io_err("write", &tmp))
        .and_then(|()| fs::rename(&tmp, &target).map_err(io_err("rename into place", &target)));
    if done.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    done
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn distrust_names_owner_and_writers() {
        assert_eq!(dir_distrust(0, 0o40750, 0), None);
        assert_eq!(dir_distrust(0, 0o755, 0), None);
        assert!(dir_distrust(65534, 0o700, 0).unwrap().contains("uid 65534"));
        assert!(dir_distrust(0, 0o770, 0).unwrap().contains("its group"));
        assert!(dir_distrust(0, 0o1777, 0)
            .unwrap()
            .contains("its group and everyone"));
        assert!(dir_distrust(0, 0o703, 0).unwrap().contains("everyone"));
    }

    #[test]
    fn temp_names_are_recognised_with_their_pid() {
        let n = temp_name();
        assert_eq!(temp_pid(&n), Some(Some(std::process::id())));
        assert_eq!(temp_pid(".name-vm.1234.tmp"), Some(Some(1234)));
        assert_eq!(temp_pid(".gpupass-tmp.x"), Some(None));
        assert_eq!(temp_pid("name-vm.json"), None);
        assert_eq!(temp_pid(".hidden"), None);
        assert_ne!(temp_name(), temp_name());
    }

    #[test]
    fn atomic_writes_are_private_replace_symlinks_and_clean_up_dead_writers() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("run");
        let victim = d.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        private_dir(&dir).unwrap();
        symlink(&victim, dir.join("state.json")).unwrap();
        // A dead writer's temp file and one of an older gpupass.
        fs::write(dir.join(format!("{TEMP_PREFIX}{}.0.1", i32::MAX)), "x").unwrap();
        fs::write(dir.join(format!(".name-vm.{}.tmp", i32::MAX)), "x").unwrap();
        fs::write(
            dir.join(format!("{TEMP_PREFIX}{}.9.1", std::process::id())),
            "x",
        )
        .unwrap();
        write_atomic(&dir, "state.json", b"new").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(fs::read_to_string(dir.join("state.json")).unwrap(), "new");
        let meta = fs::symlink_metadata(dir.join("state.json")).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.mode() & 0o777, FILE_MODE);
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, DIR_MODE);
        let left: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}: a live writer's temp file stays");
    }

    #[test]
    fn opening_refuses_symlinks_and_narrows_old_modes() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        let link = d.path().join("link");
        symlink(&victim, &link).unwrap();
        let err = open_state(&link, OpenOptions::new().append(true).create(true)).unwrap_err();
        assert!(err.to_string().contains("is a symlink"), "{err}");
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
        open_state(&victim, OpenOptions::new().read(true)).unwrap();
        assert_eq!(fs::metadata(&victim).unwrap().mode() & 0o777, 0o600);
        assert!(read_state(&d.path().join("missing")).unwrap().is_none());
    }

    #[test]
    fn a_held_lock_times_out_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("x.lock");
        let held = lock_file(&path, Duration::from_secs(1)).unwrap();
        let t = Instant::now();
        let err = lock_file(&path, Duration::from_millis(200)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(matches!(err, FsError::LockTimeout { .. }), "{err}");
        assert!(err.to_string().contains("x.lock"), "{err}");
        drop(held);
        lock_file(&path, Duration::from_millis(200)).unwrap();
    }
}
