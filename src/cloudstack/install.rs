//! `cloudstack install`: puts gpupass's discovery shim at the agent's `gpudiscovery.sh` (the
//! original kept beside it, put back on uninstall) and the shell XML transformer into the agent's
//! hook directory, each written atomically (temp file, then rename: the agent never finds the
//! path missing or half written) and idempotently. The qemu hook is `hook::install`'s.

use std::fs;
use std::path::{Path, PathBuf};

use crate::cloudstack::agent::{AgentHooks, DISCOVERY_SCRIPT};
use crate::cloudstack::CloudstackError;
use crate::hook::install::sh_quote;
use crate::host::sysfs::confine;

/// The discovery shim, with `@EXEC@` to fill in.
const DISCOVERY_SHIM: &str = include_str!("../../hooks/cloudstack-gpudiscovery.sh");
/// The shell transformer; its `gpupass()` line is replaced with this host's command.
const TRANSFORMER: &str = include_str!("../../hooks/libvirt-vm-xml-transformer.sh");
/// The line of [`TRANSFORMER`] that runs gpupass.
const TRANSFORMER_EXEC_LINE: &str =
    "gpupass() { \"${GPUPASS_BIN:-/usr/local/bin/gpupass-hook}\" \"$@\"; }";
/// Marks a file as gpupass's (both scripts carry it).
const MARKER: &str = "# gpupass ";
/// The stock discovery script's backup, next to it.
pub const BACKUP_SUFFIX: &str = ".gpupass-orig";

/// `binary args…`, quoted for `sh`.
fn exec_words(binary: &Path, args: &[String]) -> String {
    let mut exec = sh_quote(&binary.display().to_string());
    for a in args {
        exec.push(' ');
        exec.push_str(&sh_quote(a));
    }
    exec
}

/// The discovery shim that runs `binary args… cloudstack discover`.
pub fn render_discovery(binary: &Path, args: &[String]) -> String {
    DISCOVERY_SHIM.replace("@EXEC@", &exec_words(binary, args))
}

/// The shell transformer that runs `binary args… transform`.
pub fn render_transformer(binary: &Path, args: &[String]) -> String {
    TRANSFORMER.replace(
        TRANSFORMER_EXEC_LINE,
        &format!("gpupass() {{ {} \"$@\"; }}", exec_words(binary, args)),
    )
}

fn io<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CloudstackError + 'a {
    move |source| CloudstackError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn is_ours(path: &Path) -> bool {
    fs::read_to_string(path).is_ok_and(|t| t.lines().nth(1).is_some_and(|l| l.starts_with(MARKER)))
}

/// Writes `text` (mode 0755) to `target` atomically, never through a link.
fn write_executable(target: &Path, text: &str) -> Result<(), CloudstackError> {
    crate::hook::install::replace_executable(target, text.as_bytes()).map_err(io("write", target))
}

/// What install or uninstall did, one line each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Done {
    /// Lines for the operator.
    pub lines: Vec<String>,
}

/// Refuses a root without the agent's scripts directory (checked before anything is written).
pub fn check_host(root: &Path) -> Result<(), CloudstackError> {
    let scripts = root.join(DISCOVERY_SCRIPT);
    let dir = scripts.parent().expect("DISCOVERY_SCRIPT has a directory");
    if dir.is_dir() {
        Ok(())
    } else {
        Err(CloudstackError::NotCloudstackHost {
            dir: dir.to_path_buf(),
        })
    }
}

/// Installs the discovery shim and the transformer under `root`, running `binary args…`.
pub fn install(
    root: &Path,
    hooks: &AgentHooks,
    binary: &Path,
    args: &[String],
) -> Result<Done, CloudstackError> {
    let mut done = Done::default();
    check_host(root)?;
    let target = confine(root, DISCOVERY_SCRIPT, false)?;
    let backup = PathBuf::from(format!("{}{BACKUP_SUFFIX}", target.display()));
    if target.exists() && !is_ours(&target) {
        // Keep the stock script (or a newer one a package upgrade put back) under a second
        // name, through a link renamed into place: the path itself never goes missing.
        let tmp = PathBuf::from(format!("{}.{}.tmp", backup.display(), std::process::id()));
        let _ = fs::remove_file(&tmp);
        fs::hard_link(&target, &tmp).map_err(io("keep a copy of", &target))?;
        fs::rename(&tmp, &backup).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io("keep a copy of", &target)(e)
        })?;
        done.lines
            .push(format!("kept the agent's script as {}", backup.display()));
    }
    write_executable(&target, &render_discovery(binary, args))?;
    done.lines.push(format!("installed {}", target.display()));

    let rel = hooks.basedir.strip_prefix("/").unwrap_or(&hooks.basedir);
    let rel = rel.join(&hooks.shell);
    let transformer = confine(root, &rel.display().to_string(), true)?;
    write_executable(&transformer, &render_transformer(binary, args))?;
    done.lines
        .push(format!("installed {}", transformer.display()));
    Ok(done)
}

/// Puts the agent's own discovery script back and removes the transformer (only files that are
/// gpupass's). Absent is fine.
pub fn uninstall(root: &Path, hooks: &AgentHooks) -> Result<Done, CloudstackError> {
    let mut done = Done::default();
    let target = root.join(DISCOVERY_SCRIPT);
    let backup = PathBuf::from(format!("{}{BACKUP_SUFFIX}", target.display()));
    if backup.is_file() {
        fs::rename(&backup, &target).map_err(io("put back", &target))?;
        done.lines.push(format!(
            "put back the agent's {} (from {})",
            target.display(),
            backup.display()
        ));
    } else if is_ours(&target) {
        fs::remove_file(&target).map_err(io("remove", &target))?;
        done.lines.push(format!(
            "removed {} (there was no original to put back: the agent needs one to start)",
            target.display()
        ));
    }
    let rel = hooks.basedir.strip_prefix("/").unwrap_or(&hooks.basedir);
    let transformer = root.join(rel).join(&hooks.shell);
    if is_ours(&transformer) {
        fs::remove_file(&transformer).map_err(io("remove", &transformer))?;
        done.lines
            .push(format!("removed {}", transformer.display()));
    }
    Ok(done)
}

/// The agent.properties lines that make the agent use the transformer.
pub fn properties_lines(hooks: &AgentHooks) -> String {
    format!(
        "agent.hooks.basedir={}\nagent.hooks.libvirt_vm_xml_transformer.shell_script={}\nagent.hooks.libvirt_vm_xml_transformer.method=transform\n",
        hooks.basedir.display(),
        hooks.shell
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn hooks() -> AgentHooks {
        AgentHooks::from_properties(&BTreeMap::new())
    }

    #[test]
    fn the_transformer_template_has_the_line_install_replaces() {
        assert!(TRANSFORMER.contains(TRANSFORMER_EXEC_LINE));
        assert!(DISCOVERY_SHIM.contains("@EXEC@"));
        let t = render_transformer(Path::new("/opt/gp's/gpupass-hook"), &["--run-dir".into()]);
        assert!(
            t.contains("gpupass() { '/opt/gp'\\''s/gpupass-hook' '--run-dir' \"$@\"; }"),
            "{t}"
        );
        assert!(!t.contains("GPUPASS_BIN:-"));
    }

    #[test]
    fn installs_keeps_the_original_and_puts_it_back() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let script = r.join(DISCOVERY_SCRIPT);
        fs::create_dir_all(script.parent().unwrap()).unwrap();
        fs::write(&script, "#!/bin/bash\n# stock\n").unwrap();
        let bin = Path::new("/usr/local/bin/gpupass-hook");
        install(r, &hooks(), bin, &[]).unwrap();
        // Twice: idempotent, the backup stays the stock script.
        let again = install(r, &hooks(), bin, &[]).unwrap();
        assert_eq!(again.lines.len(), 2, "{:?}", again.lines);
        let backup = PathBuf::from(format!("{}{BACKUP_SUFFIX}", script.display()));
        assert_eq!(
            fs::read_to_string(&backup).unwrap(),
            "#!/bin/bash\n# stock\n"
        );
        let shim = fs::read_to_string(&script).unwrap();
        assert!(shim.contains("exec '/usr/local/bin/gpupass-hook' cloudstack discover"));
        let t = r.join("etc/cloudstack/agent/hooks/libvirt-vm-xml-transformer.sh");
        assert_eq!(
            fs::metadata(&t).unwrap().permissions().mode() & 0o777,
            0o755
        );
        uninstall(r, &hooks()).unwrap();
        assert_eq!(
            fs::read_to_string(&script).unwrap(),
            "#!/bin/bash\n# stock\n"
        );
        assert!(!backup.exists() && !t.exists());
        uninstall(r, &hooks()).unwrap();
        assert!(script.exists(), "a second uninstall leaves the original");
    }

    #[test]
    fn refuses_a_host_without_the_agent() {
        let root = tempfile::tempdir().unwrap();
        let e = install(root.path(), &hooks(), Path::new("/x"), &[]).unwrap_err();
        assert!(
            e.to_string().contains("not a CloudStack KVM agent host"),
            "{e}"
        );
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 0);
    }
}
