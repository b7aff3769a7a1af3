//! The CloudStack KVM agent's files as gpupass needs them: where `agent.properties` lives, the
//! hook keys in it (with the agent's defaults), and which XML transformer is active. Parsing is
//! pure; [`read`] reads the file under a root. Never writes.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The agent's configuration, relative to the root.
pub const AGENT_PROPERTIES: &str = "etc/cloudstack/agent/agent.properties";
/// `agent.hooks.basedir`'s default.
pub const DEFAULT_HOOKS_DIR: &str = "/etc/cloudstack/agent/hooks";
/// `agent.hooks.libvirt_vm_xml_transformer.script`'s default (Groovy).
pub const DEFAULT_GROOVY: &str = "libvirt-vm-xml-transformer.groovy";
/// `agent.hooks.libvirt_vm_xml_transformer.shell_script`'s default (4.21+).
pub const DEFAULT_SHELL: &str = "libvirt-vm-xml-transformer.sh";
/// The agent's stock discovery script, relative to the root (package layout).
pub const DISCOVERY_SCRIPT: &str =
    "usr/share/cloudstack-common/scripts/vm/hypervisor/kvm/gpudiscovery.sh";

/// `key=value` lines of a Java properties file (`#`/`!` comments; `:` also separates). Enough
/// for the agent's file: no line continuations or escapes in the keys gpupass reads.
pub fn parse(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let Some(i) = line.find(['=', ':']) else {
            continue;
        };
        out.insert(line[..i].trim().to_owned(), line[i + 1..].trim().to_owned());
    }
    out
}

/// The agent's hook settings, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentHooks {
    /// `agent.hooks.basedir`.
    pub basedir: PathBuf,
    /// `agent.hooks.libvirt_vm_xml_transformer.script`.
    pub groovy: String,
    /// `agent.hooks.libvirt_vm_xml_transformer.shell_script`.
    pub shell: String,
}

impl AgentHooks {
    /// From parsed properties (pure).
    pub fn from_properties(p: &BTreeMap<String, String>) -> Self {
        let get = |k: &str, d: &str| {
            p.get(k)
                .filter(|v| !v.is_empty())
                .cloned()
                .unwrap_or_else(|| d.to_owned())
        };
        Self {
            basedir: PathBuf::from(get("agent.hooks.basedir", DEFAULT_HOOKS_DIR)),
            groovy: get(
                "agent.hooks.libvirt_vm_xml_transformer.script",
                DEFAULT_GROOVY,
            ),
            shell: get(
                "agent.hooks.libvirt_vm_xml_transformer.shell_script",
                DEFAULT_SHELL,
            ),
        }
    }

    /// The transformer scripts, under `root`: the agent runs each one that exists.
    pub fn transformers(&self, root: &Path) -> [PathBuf; 2] {
        let dir = root.join(self.basedir.strip_prefix("/").unwrap_or(&self.basedir));
        [dir.join(&self.groovy), dir.join(&self.shell)]
    }
}

/// What `doctor` needs to know about a CloudStack agent on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentFacts {
    /// The hook settings.
    pub hooks: AgentHooks,
    /// The transformer scripts that exist (the agent runs them), as paths under the root.
    pub transformers: Vec<PathBuf>,
}

/// The agent's facts under `root`; `None` when `agent.properties` is absent (not a CloudStack
/// host).
pub fn read(root: &Path) -> io::Result<Option<AgentFacts>> {
    let text = match fs::read_to_string(root.join(AGENT_PROPERTIES)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let hooks = AgentHooks::from_properties(&parse(&text));
    let transformers = hooks
        .transformers(root)
        .into_iter()
        .filter(|p| p.is_file())
        .collect();
    Ok(Some(AgentFacts {
        hooks,
        transformers,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_hook_keys_with_the_agent_s_defaults() {
        let p = parse(
            "# comment\n! also\nagent.hooks.basedir = /opt/hooks\nhost=10.0.0.1\nagent.hooks.libvirt_vm_xml_transformer.shell_script:gp.sh\nbroken line\n",
        );
        assert_eq!(p.get("host").map(String::as_str), Some("10.0.0.1"));
        let h = AgentHooks::from_properties(&p);
        assert_eq!(h.basedir, PathBuf::from("/opt/hooks"));
        assert_eq!(h.shell, "gp.sh");
        assert_eq!(h.groovy, DEFAULT_GROOVY);
        let [g, s] = h.transformers(Path::new("/r"));
        assert_eq!(
            g,
            PathBuf::from("/r/opt/hooks/libvirt-vm-xml-transformer.groovy")
        );
        assert_eq!(s, PathBuf::from("/r/opt/hooks/gp.sh"));
        let d = AgentHooks::from_properties(&BTreeMap::new());
        assert_eq!(d.basedir, PathBuf::from(DEFAULT_HOOKS_DIR));
        assert_eq!(d.shell, DEFAULT_SHELL);
    }

    #[test]
    fn a_host_without_agent_properties_is_not_a_cloudstack_host() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(read(root.path()).unwrap(), None);
        let etc = root.path().join("etc/cloudstack/agent");
        fs::create_dir_all(etc.join("hooks")).unwrap();
        fs::write(etc.join("agent.properties"), "host=x\n").unwrap();
        fs::write(etc.join("hooks").join(DEFAULT_SHELL), "#!/bin/sh\n").unwrap();
        let f = read(root.path()).unwrap().unwrap();
        assert_eq!(f.transformers, [etc.join("hooks").join(DEFAULT_SHELL)]);
    }
}
