//! gpupass's own configuration file (TOML, default `/etc/gpupass/gpupass.toml`): directories,
//! the template directory, GPU aliases, rules that give a GPU request (and an owner) to domains
//! by name, owners' limits, opt-in guest options per GPU model, and the agent's API settings.
//! Unknown keys are errors, so a typo is caught instead of silently ignored.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::PciId;

/// The default config path; a missing file there means defaults.
pub const DEFAULT_CONFIG: &str = "/etc/gpupass/gpupass.toml";

/// Errors from loading the config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("failed to read config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: io::Error,
    },
    /// The file is not valid.
    #[error("invalid config {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, in one line.
        message: String,
    },
}

/// A named GPU model, e.g. `K4200 = { vendor_id = "10de", product_id = "11b4" }` — the same
/// fields as Nova's `pci_alias`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AliasConfig {
    /// Vendor ID in hex (`10de`).
    pub vendor_id: String,
    /// Device ID in hex (`11b4`).
    pub product_id: String,
}

impl AliasConfig {
    /// The vendor:device pair.
    pub fn id(&self) -> Option<PciId> {
        format!("{}:{}", self.vendor_id, self.product_id)
            .parse()
            .ok()
    }
}

/// A rule giving a GPU request to domains whose name matches a glob (CloudStack names VMs
/// `i-<account>-<id>-VM`, and cannot put gpupass metadata into their XML).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Glob on the domain name (`i-2-*-VM`).
    pub domain: String,
    /// How many GPUs.
    #[serde(default)]
    pub count: Option<u16>,
    /// Only this vendor:device.
    #[serde(default)]
    pub model: Option<String>,
    /// Or a model by alias name.
    #[serde(default)]
    pub alias: Option<String>,
    /// Or these GPU addresses.
    #[serde(default)]
    pub gpus: Vec<String>,
    /// Who the matching domains belong to (a CloudStack account…), for limits and usage.
    #[serde(default)]
    pub owner: Option<String>,
    /// HGX full passthrough: every GPU of the host's NVSwitch fabric and every NVSwitch, as one
    /// unit (no `count`, `model`, `alias` or `gpus` with it).
    #[serde(default)]
    pub hgx_full: bool,
}

/// Opt-in guest options for domains holding certain GPUs (`[[guest]]`), applied by the fit:
/// hiding the hypervisor from old NVIDIA consumer drivers (Code 43), a ROM BAR switched off or
/// replaced. An entry applies when every selector it gives matches (none = every GPU).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    /// Glob on the domain name.
    #[serde(default)]
    pub domain: Option<String>,
    /// GPUs of this vendor:device.
    #[serde(default)]
    pub model: Option<String>,
    /// Or of this alias's model.
    #[serde(default)]
    pub alias: Option<String>,
    /// `<features><kvm><hidden state='on'/></kvm></features>`.
    #[serde(default)]
    pub hide_hypervisor: bool,
    /// `<features><hyperv><vendor_id state='on' value='…'/></hyperv></features>` (1–12 letters
    /// or digits).
    #[serde(default)]
    pub hyperv_vendor_id: Option<String>,
    /// `off` (`<rom bar='off'/>`) or an absolute path (`<rom file='…'/>`), on each function of
    /// the GPU that has no `<rom>` yet.
    #[serde(default)]
    pub rom: Option<String>,
}

/// Nova's `pci_alias` entry, accepted as a JSON string: `{"name":"K4200","vendor_id":"10de",
/// "product_id":"11b4"}`. Nova's other keys are accepted and have no effect here.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NovaAlias {
    name: String,
    vendor_id: String,
    product_id: String,
    #[serde(default, rename = "device_type")]
    _device_type: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "numa_policy")]
    _numa_policy: Option<serde::de::IgnoredAny>,
}

/// The window a GPU-hours limit counts in: calendar periods in UTC.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// Since 00:00 UTC today.
    Day,
    /// Since Monday 00:00 UTC.
    Week,
    /// Since the 1st of the month, 00:00 UTC.
    #[default]
    Month,
}

impl Period {
    /// `day`, `week` or `month`.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }
}

/// What one owner may hold and use.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// GPUs held at once by all the owner's domains (running, or defined with GPUs).
    #[serde(default)]
    pub max_gpus: Option<u32>,
    /// GPU-hours the owner's domains may use per `period` (from the usage ledger); once used
    /// up, no new GPU is given to the owner until the next period.
    #[serde(default)]
    pub max_gpu_hours: Option<f64>,
    /// The window of `max_gpu_hours`.
    #[serde(default)]
    pub period: Period,
}

/// Where gpupass keeps its files; command-line flags and environment variables win.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PathsConfig {
    /// Host root (`--host-root`).
    pub host_root: Option<PathBuf>,
    /// Run dir: host lock, leases (`--run-dir`).
    pub run_dir: Option<PathBuf>,
    /// State dir: usage ledger, binding records (`--state-dir`).
    pub state_dir: Option<PathBuf>,
}

/// `gpupass serve`'s API settings; flags win.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// The API's unix socket (`--socket`).
    pub socket: Option<PathBuf>,
    /// Group that may use the socket (mode 0660); default: root's.
    pub socket_group: Option<String>,
    /// Also listen on this loopback TCP address (`127.0.0.1:7070`), with a bearer token.
    pub tcp: Option<String>,
    /// File holding the bearer token for TCP (must be readable by root only).
    pub token_file: Option<PathBuf>,
    /// Seconds between full reconciles with libvirt.
    pub reconcile_seconds: Option<u64>,
    /// What the agent does with a GPU a domain holds only part of (after a crash).
    #[serde(default)]
    pub repair_partial: RepairPartial,
    /// Milliseconds a client gets to send a request's headers (default 10000).
    pub header_timeout_ms: Option<u64>,
    /// Milliseconds a client gets to send a request's body (default 30000).
    pub body_timeout_ms: Option<u64>,
    /// Milliseconds an idle keep-alive connection stays open (default 5000).
    pub idle_timeout_ms: Option<u64>,
    /// Connections open at once on each listener (default 64).
    pub max_connections: Option<u64>,
    /// Milliseconds requests in flight get to finish at shutdown (default 2000).
    pub shutdown_grace_ms: Option<u64>,
}

/// `serve.repair_partial`: what the agent does with a GPU a domain holds only part of.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RepairPartial {
    /// Report it only (list, show, doctor, the API, metrics).
    #[default]
    Off,
    /// Attach the missing functions to that domain.
    Complete,
    /// Detach the functions the domain has.
    Detach,
}

impl ServeConfig {
    /// `tcp` as an address (an error names the key and the expected form).
    pub fn tcp_addr(&self) -> Result<Option<std::net::SocketAddr>, String> {
        self.tcp
            .as_deref()
            .map(|t| {
                t.parse()
                    .map_err(|_| format!("serve.tcp '{t}': give IP:PORT, e.g. 127.0.0.1:7070"))
            })
            .transpose()
    }
}

/// The configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GpupassConfig {
    /// A directory with a `hostdev-pci.xml` that replaces the built-in template.
    pub templates_dir: Option<PathBuf>,
    /// GPU models by name.
    #[serde(default)]
    pub aliases: BTreeMap<String, AliasConfig>,
    /// Requests for domains that carry no gpupass metadata; the first match wins.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// Aliases in Nova's `pci_alias` JSON form, one per string.
    #[serde(default)]
    pub pci_alias: Vec<String>,
    /// Limits per owner.
    #[serde(default)]
    pub limits: BTreeMap<String, LimitConfig>,
    /// Opt-in guest options for domains holding certain GPUs (`[[guest]]`).
    #[serde(default)]
    pub guest: Vec<GuestConfig>,
    /// Directories.
    #[serde(default)]
    pub paths: PathsConfig,
    /// The agent (`gpupass serve`).
    #[serde(default)]
    pub serve: ServeConfig,
    /// The CloudStack KVM agent's discovery (`gpupass cloudstack discover`).
    #[serde(default)]
    pub cloudstack: CloudstackConfig,
}

/// `[cloudstack]`: what the host's CloudStack agent understands.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CloudstackConfig {
    /// The agent parses PCI addresses with a domain (`0001:05:00.0`; CloudStack's fix for hosts
    /// with several PCI domains). Off: GPUs outside PCI domain 0000 are left out of
    /// `cloudstack discover`, with a warning, since older agents only understand `bb:ss.f`.
    #[serde(default)]
    pub pci_domains: bool,
}

impl GpupassConfig {
    /// Loads `path`, or the default path when `None` (missing default = defaults).
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !required => {
                return Ok(Self::default())
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        Self::parse(&text).map_err(|message| ConfigError::Invalid { path, message })
    }

    /// Parses and checks a config text (pure): Nova-form aliases are folded into `aliases`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut config: Self = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        for (i, json) in std::mem::take(&mut config.pci_alias).iter().enumerate() {
            let a: NovaAlias =
                serde_json::from_str(json).map_err(|e| format!("pci_alias[{i}]: {e}"))?;
            if config.aliases.contains_key(&a.name) {
                return Err(format!("pci_alias[{i}]: alias {} is defined twice", a.name));
            }
            config.aliases.insert(
                a.name,
                AliasConfig {
                    vendor_id: a.vendor_id,
                    product_id: a.product_id,
                },
            );
        }
        config.validate()?;
        Ok(config)
    }

    /// The `[[guest]]` entries that apply to a GPU of model `id` in domain `domain`.
    pub fn guest_options(&self, domain: &str, id: PciId) -> Vec<&GuestConfig> {
        self.guest
            .iter()
            .filter(|g| {
                g.domain
                    .as_deref()
                    .is_none_or(|d| glob::Pattern::new(d).is_ok_and(|p| p.matches(domain)))
                    && g.model
                        .as_deref()
                        .is_none_or(|m| m.parse::<PciId>().ok() == Some(id))
                    && g.alias
                        .as_deref()
                        .is_none_or(|a| self.aliases.get(a).and_then(AliasConfig::id) == Some(id))
            })
            .collect()
    }

    /// The owner of a domain without metadata: the first rule matching its name that names one.
    pub fn rule_owner(&self, domain: &str) -> Option<&str> {
        self.rules
            .iter()
            .filter(|r| glob::Pattern::new(&r.domain).is_ok_and(|p| p.matches(domain)))
            .find_map(|r| r.owner.as_deref())
    }

    /// Checks fields that serde cannot (pure).
    pub fn validate(&self) -> Result<(), String> {
        for (name, a) in &self.aliases {
            if a.id().is_none() {
                return Err(format!(
                    "alias {name}: vendor_id/product_id must be 4 hex digits each"
                ));
            }
        }
        for (i, g) in self.guest.iter().enumerate() {
            let at = format!("guest[{i}]");
            if !g.hide_hypervisor && g.hyperv_vendor_id.is_none() && g.rom.is_none() {
                return Err(format!(
                    "{at}: set hide_hypervisor, hyperv_vendor_id or rom (it does nothing)"
                ));
            }
            if let Some(v) = &g.hyperv_vendor_id {
                if v.is_empty() || v.len() > 12 || !v.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return Err(format!(
                        "{at}.hyperv_vendor_id '{v}': 1 to 12 letters or digits"
                    ));
                }
            }
            if let Some(r) = &g.rom {
                let safe = r
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"'\"<>&".contains(&b));
                if r != "off" && !(r.starts_with('/') && safe) {
                    return Err(format!(
                        "{at}.rom '{r}': \"off\" or an absolute path (no quotes, <, > or &)"
                    ));
                }
            }
            if let Some(m) = &g.model {
                if m.parse::<PciId>().is_err() {
                    return Err(format!("{at}.model '{m}': expected VVVV:DDDD"));
                }
            }
            if let Some(a) = &g.alias {
                if !self.aliases.contains_key(a) {
                    return Err(format!("{at}.alias '{a}' is not defined"));
                }
            }
            if let Some(d) = &g.domain {
                if glob::Pattern::new(d).is_err() {
                    return Err(format!("{at}.domain '{d}' is not a valid glob"));
                }
            }
        }
        for (owner, l) in &self.limits {
            if owner.trim().is_empty() {
                return Err("limits: an owner name is empty".into());
            }
            if l.max_gpus.is_none() && l.max_gpu_hours.is_none() {
                return Err(format!(
                    "limits.{owner}: set max_gpus, max_gpu_hours, or both"
                ));
            }
            if let Some(h) = l.max_gpu_hours {
                if !h.is_finite() || h < 0.0 {
                    return Err(format!(
                        "limits.{owner}.max_gpu_hours must be a number of hours >= 0"
                    ));
                }
            }
        }
        if let Some(a) = self.serve.tcp_addr()? {
            if !a.ip().is_loopback() {
                return Err(format!(
                    "serve.tcp '{a}': only a loopback address is allowed (the API can change domains)"
                ));
            }
            if self.serve.token_file.is_none() {
                return Err("serve.tcp needs serve.token_file (the bearer token)".into());
            }
        }
        if self
            .serve
            .reconcile_seconds
            .is_some_and(|s| !(1..=86_400).contains(&s))
        {
            return Err("serve.reconcile_seconds must be from 1 to 86400".into());
        }
        let s = &self.serve;
        for (key, v, min, max) in [
            ("header_timeout_ms", s.header_timeout_ms, 1, 3_600_000),
            ("body_timeout_ms", s.body_timeout_ms, 1, 3_600_000),
            ("idle_timeout_ms", s.idle_timeout_ms, 1, 3_600_000),
            ("max_connections", s.max_connections, 1, 4096),
            ("shutdown_grace_ms", s.shutdown_grace_ms, 0, 60_000),
        ] {
            if v.is_some_and(|v| !(min..=max).contains(&v)) {
                return Err(format!("serve.{key} must be between {min} and {max}"));
            }
        }
        for (i, r) in self.rules.iter().enumerate() {
            glob::Pattern::new(&r.domain)
                .map_err(|e| format!("rules[{i}].domain '{}': {e}", r.domain))?;
            if r.owner.as_deref().is_some_and(|o| o.trim().is_empty()) {
                return Err(format!("rules[{i}].owner is empty"));
            }
            crate::request::from_rule(r, self).map_err(|e| format!("rules[{i}]: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_options_are_checked_and_matched_by_every_selector_given() {
        for (bad, why) in [
            ("[[guest]]\nmodel = \"10de:1e07\"\n", "does nothing"),
            (
                "[[guest]]\nhyperv_vendor_id = \"much-too-long-id\"\n",
                "1 to 12",
            ),
            ("[[guest]]\nrom = \"relative.rom\"\n", "absolute path"),
            ("[[guest]]\nrom = \"/x/a'b.rom\"\n", "absolute path"),
            (
                "[[guest]]\nrom = \"off\"\nalias = \"nope\"\n",
                "not defined",
            ),
            ("[[guest]]\nrom = \"off\"\nmodel = \"10de\"\n", "VVVV:DDDD"),
            ("[[guest]]\nrom = \"off\"\nbogus = 1\n", "unknown field"),
        ] {
            let err = GpupassConfig::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let c = GpupassConfig::parse(
            "[aliases]\nTI = { vendor_id = \"10de\", product_id = \"1e07\" }\n[[guest]]\ndomain = \"win-*\"\nalias = \"TI\"\nhide_hypervisor = true\n[[guest]]\nrom = \"/srv/roms/a.rom\"\n",
        )
        .unwrap();
        let ti: PciId = "10de:1e07".parse().unwrap();
        let t4: PciId = "10de:1eb8".parse().unwrap();
        assert_eq!(c.guest_options("win-1", ti).len(), 2);
        assert_eq!(
            c.guest_options("linux-1", ti).len(),
            1,
            "only the catch-all"
        );
        assert_eq!(c.guest_options("win-1", t4).len(), 1);
    }

    #[test]
    fn paths_serve_and_limits_are_checked() {
        let c = GpupassConfig::parse(
            "[paths]\nstate_dir = \"/srv/gp\"\n[serve]\nsocket = \"/run/x.sock\"\nsocket_group = \"gpupass\"\ntcp = \"127.0.0.1:7070\"\ntoken_file = \"/etc/gpupass/token\"\n[limits]\nacct = { max_gpu_hours = 12.5, period = \"week\" }\n",
        )
        .unwrap();
        assert_eq!(c.paths.state_dir.unwrap(), PathBuf::from("/srv/gp"));
        assert_eq!(c.serve.socket_group.as_deref(), Some("gpupass"));
        assert_eq!(c.limits["acct"].period, Period::Week);
        assert_eq!(c.limits["acct"].max_gpus, None);
        for (bad, want) in [
            (
                "[serve]\ntcp = \"0.0.0.0:7070\"\ntoken_file = \"/t\"\n",
                "only a loopback",
            ),
            (
                "[serve]\ntcp = \"127.0.0.1:7070\"\n",
                "needs serve.token_file",
            ),
            (
                "[serve]\ntcp = \"localhost\"\ntoken_file = \"/t\"\n",
                "give IP:PORT",
            ),
            (
                "[limits]\nacct = {}\n",
                "set max_gpus, max_gpu_hours, or both",
            ),
            (
                "[limits]\nacct = { max_gpu_hours = -1.0 }\n",
                "max_gpu_hours must be",
            ),
            (
                "[limits]\nacct = { max_gpus = 1, period = \"year\" }\n",
                "unknown variant `year`",
            ),
            ("[paths]\nrundir = \"/x\"\n", "unknown field `rundir`"),
            ("[serve]\nreconcile_seconds = 0\n", "from 1 to 86400"),
            ("[serve]\nreconcile_seconds = 86401\n", "from 1 to 86400"),
            (
                "[serve]\nheader_timeout_ms = 0\n",
                "serve.header_timeout_ms must be between 1 and 3600000",
            ),
            (
                "[serve]\nbody_timeout_ms = 9223372036854775807\n",
                "serve.body_timeout_ms must be between 1 and 3600000",
            ),
            (
                "[serve]\nmax_connections = 0\n",
                "serve.max_connections must be between 1 and 4096",
            ),
            (
                "[serve]\nshutdown_grace_ms = 60001\n",
                "serve.shutdown_grace_ms must be between 0 and 60000",
            ),
            ("[serve]\nidle_timeout_ms = -1\n", "expected u64"),
        ] {
            let err = GpupassConfig::parse(bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn loads_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        fs::write(
            &good,
            r#"templates_dir = "/etc/gpupass/templates"
[aliases]
K4200 = { vendor_id = "10de", product_id = "11b4" }
[[rules]]
domain = "i-*-VM"
count = 1
alias = "K4200"
"#,
        )
        .unwrap();
        let c = GpupassConfig::load(Some(&good)).unwrap();
        assert_eq!(
            c.templates_dir.unwrap(),
            PathBuf::from("/etc/gpupass/templates")
        );
        assert_eq!(c.aliases["K4200"].id().unwrap().to_string(), "10de:11b4");
        assert_eq!(c.rules[0].domain, "i-*-VM");
        let bad = dir.path().join("bad.toml");
        fs::write(&bad, "template_dir = \"x\"\n").unwrap();
        let err = GpupassConfig::load(Some(&bad)).unwrap_err().to_string();
        assert!(err.contains("unknown field `template_dir`"), "{err}");
        fs::write(
            &bad,
            "[[rules]]\ndomain = \"x\"\ncount = 1\nalias = \"nope\"\n",
        )
        .unwrap();
        let err = GpupassConfig::load(Some(&bad)).unwrap_err().to_string();
        assert!(err.contains("unknown alias"), "{err}");
        fs::write(
            &bad,
            "[aliases]\nX = { vendor_id = \"10dex\", product_id = \"1\" }\n",
        )
        .unwrap();
        assert!(GpupassConfig::load(Some(&bad)).is_err());
        assert!(GpupassConfig::load(Some(&dir.path().join("missing.toml"))).is_err());
    }

    #[test]
    fn nova_aliases_owners_and_limits() {
        let c = GpupassConfig::parse(
            r#"pci_alias = ['{"name": "A100", "vendor_id": "10de", "product_id": "20b0", "device_type": "type-PCI"}']
[[rules]]
domain = "i-2-*-VM"
count = 1
alias = "A100"
owner = "account-2"
[limits]
account-2 = { max_gpus = 2 }
"#,
        )
        .unwrap();
        assert_eq!(c.aliases["A100"].id().unwrap().to_string(), "10de:20b0");
        assert_eq!(c.rule_owner("i-2-9-VM"), Some("account-2"));
        assert_eq!(c.rule_owner("i-3-9-VM"), None);
        assert_eq!(c.limits["account-2"].max_gpus, Some(2));
        for (bad, why) in [
            ("pci_alias = ['{\"name\": \"x\"}']", "missing field"),
            ("pci_alias = ['{\"name\":\"x\",\"vendor_id\":\"10de\",\"product_id\":\"1\",\"colour\":1}']", "unknown field"),
            ("[limits]\nacct = { max_gpu = 1 }", "unknown field"),
            ("[[rules]]\ndomain = \"x\"\ncount = 1\nowner = \" \"", "owner is empty"),
        ] {
            let err = GpupassConfig::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
