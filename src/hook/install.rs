//! `install-hook`: writes the qemu hook shim (`hooks/qemu-hook.sh`, with this host's paths
//! filled in) into `<root>/etc/libvirt/hooks/qemu.d/gpupass`, atomically, and says whether the
//! running daemon must be told (libvirt reads its hook directory when it starts or on SIGHUP).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::hook::HookError;

/// The shim, with `@EXEC@` to fill in.
const SHIM: &str = include_str!("../../hooks/qemu-hook.sh");

/// Where the shim goes, relative to the root.
pub const HOOK_PATH: &str = "etc/libvirt/hooks/qemu.d/gpupass";

/// Quotes a word for `sh`.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The shim text that runs `binary` with `args` before `hook qemu "$@"`.
pub fn render(binary: &Path, args: &[String]) -> String {
    let mut exec = sh_quote(&binary.display().to_string());
    for a in args {
        exec.push(' ');
        exec.push_str(&sh_quote(a));
    }
    SHIM.replace("@EXEC@", &exec)
}

/// What install did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The shim's path.
    pub path: PathBuf,
    /// A running libvirtd that must get SIGHUP, by pid.
    pub reload_pid: Option<u32>,
}

/// A running libvirtd, found through `/proc` (only meaningful for the real root).
fn running_libvirtd(root: &Path) -> Option<u32> {
    if root != Path::new("/") {
        return None;
    }
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "libvirtd") {
            return Some(pid);
        }
    }
    None
}

/// Installs the shim under `root`.
pub fn install(root: &Path, binary: &Path, args: &[String]) -> Result<Installed, HookError> {
    let path = root.join(HOOK_PATH);
    let err = |source| HookError::Install {
        path: path.clone(),
        source,
    };
    // The hook directory is resolved under the root (a link leading out of it is refused), and
    // the shim is written to a new temp file there, never through a link, then renamed.
    let target = crate::host::sysfs::confine(root, HOOK_PATH, true)?;
    replace_executable(&target, render(binary, args).as_bytes()).map_err(err)?;
    Ok(Installed {
        path,
        reload_pid: running_libvirtd(root),
    })
}

/// Writes `body` (mode 0755) to `target` through a new temp file in its directory, renamed
/// over it: never through a link, never half-written (the hook shim, CloudStack's scripts).
pub fn replace_executable(target: &Path, body: &[u8]) -> std::io::Result<()> {
    let dir = target.parent().unwrap_or(Path::new("/"));
    let tmp = dir.join(format!(".gpupass.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp); // a crashed install's leftover of this pid
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(body)?;
        f.sync_data()?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
        fs::rename(&tmp, target)
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Removes the shim; absent is fine.
pub fn uninstall(root: &Path) -> Result<Installed, HookError> {
    let path = root.join(HOOK_PATH);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(HookError::Install { path, source }),
    }
    Ok(Installed {
        path,
        reload_pid: running_libvirtd(root),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_dir_linked_out_of_the_root_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("etc/libvirt")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("etc/libvirt/hooks")).unwrap();
        let err = install(root.path(), Path::new("/usr/local/bin/gpupass-hook"), &[]).unwrap_err();
        assert!(matches!(err, HookError::Sysfs(_)), "{err}");
        assert_eq!(
            fs::read_dir(outside.path()).unwrap().count(),
            0,
            "nothing written outside"
        );
    }

    #[test]
    fn installs_an_executable_shim_that_quotes_its_arguments() {
        let root = tempfile::tempdir().unwrap();
        let args = vec!["--host-root".to_string(), "/srv/it's here".to_string()];
        let got = install(root.path(), Path::new("/usr/local/bin/gpupass-hook"), &args).unwrap();
        assert_eq!(got.reload_pid, None, "not the real root");
        let text = fs::read_to_string(&got.path).unwrap();
        assert!(text.starts_with("#!/bin/sh\n"));
        assert!(
            text.contains("exec '/usr/local/bin/gpupass-hook' '--host-root' '/srv/it'\\''s here' hook qemu \"$@\""),
            "{text}"
        );
        let mode = fs::metadata(&got.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        uninstall(root.path()).unwrap();
        assert!(!got.path.exists());
        uninstall(root.path()).unwrap();
    }
}
