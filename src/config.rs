//! gpupass's own configuration file (TOML, default `/etc/gpupass/gpupass.toml`). Unknown keys
//! are errors, so a typo is caught instead of silently ignored.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;

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

/// The configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GpupassConfig {
    /// A directory with a `hostdev-pci.xml` that replaces the built-in template.
    pub templates_dir: Option<PathBuf>,
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
        toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            message: e.message().to_owned(),
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        fs::write(&good, "templates_dir = \"/etc/gpupass/templates\"\n").unwrap();
        let c = GpupassConfig::load(Some(&good)).unwrap();
        assert_eq!(
            c.templates_dir.unwrap(),
            PathBuf::from("/etc/gpupass/templates")
        );
        let bad = dir.path().join("bad.toml");
        fs::write(&bad, "template_dir = \"x\"\n").unwrap();
        let err = GpupassConfig::load(Some(&bad)).unwrap_err().to_string();
        assert!(err.contains("unknown field `template_dir`"), "{err}");
        assert!(GpupassConfig::load(Some(&dir.path().join("missing.toml"))).is_err());
    }
}
