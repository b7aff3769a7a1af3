//! The subcommands: one thin function per verb over the library's core. `anyhow` lives here
//! and in `main.rs` only.

pub mod assign;
pub mod bind;
pub mod doctor;
pub mod fit;
pub mod health;
pub mod host_config;
pub mod list;
pub mod serve;
pub mod sriov;
pub mod xml;

use std::path::PathBuf;

use anyhow::Context;

use gpupass::config::GpupassConfig;
use gpupass::host::discover::{discover, Inventory};
use gpupass::host::sysfs::Sysfs;
use gpupass::xml::compose::HostdevTemplate;

/// Options every subcommand shares.
#[derive(Debug, Clone)]
pub struct Global {
    /// Host root.
    pub host_root: PathBuf,
    /// libvirt URI.
    pub uri: String,
    /// Run dir for the host lock.
    pub run_dir: PathBuf,
    /// State dir (binding records).
    pub state_dir: PathBuf,
    /// Config file, when given.
    pub config: Option<PathBuf>,
    /// The config, loaded once at start.
    pub settings: GpupassConfig,
}

impl Global {
    /// Reads the host root into an inventory.
    pub fn inventory(&self) -> anyhow::Result<Inventory> {
        let sysfs = Sysfs::new(&self.host_root);
        discover(&sysfs)
            .with_context(|| format!("reading host root {}", self.host_root.display()))?
            .with_quarantine(&self.state_dir)
            .context("reading the quarantined GPUs")
    }

    /// The hostdev template: the config's override directory, else the built-in one.
    pub fn template(&self) -> anyhow::Result<HostdevTemplate> {
        Ok(match &self.settings.templates_dir {
            Some(dir) => HostdevTemplate::from_dir(dir)?,
            None => HostdevTemplate::builtin(),
        })
    }
}

/// Prints JSON on stdout in one write, so a failure never leaves half a document.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value).context("serializing JSON")?;
    text.push('\n');
    print_all(&text)
}

/// Writes the whole text to stdout at once.
pub fn print_all(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("writing to stdout")
}
