//! gpupass's own configuration file (TOML, default `/etc/gpupass/gpupass.toml`): the template
//! directory, GPU aliases, and rules that give a GPU request to domains by name. Unknown keys are
//! errors, so a typo is caught instead of silently ignored.

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
}

/// The configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
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
        let config: Self = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            message: e.message().to_owned(),
            path: path.clone(),
        })?;
        config
            .validate()
            .map_err(|message| ConfigError::Invalid { path, message })?;
        Ok(config)
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
        for (i, r) in self.rules.iter().enumerate() {
            glob::Pattern::new(&r.domain)
                .map_err(|e| format!("rules[{i}].domain '{}': {e}", r.domain))?;
            crate::request::from_rule(r, self).map_err(|e| format!("rules[{i}]: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
