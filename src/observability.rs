//! Installs the tracing subscriber once: human lines on stderr (stdout carries XML and JSON), or
//! appended to a log file (the qemu hook: libvirt discards a successful hook's stderr). The log
//! file is never opened through a symlink and must belong to the user gpupass runs as.

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

/// `verbosity` 0 = warnings, 1 = info, 2+ = debug; `GPUPASS_LOG` (an env-filter) overrides.
/// With `log_file`, lines (with timestamps) go there instead of stderr; if it cannot be opened
/// (or is a symlink, not a regular file, or another user's), stderr it is, with a warning.
pub fn init(verbosity: u8, log_file: Option<&Path>) {
    let default = match verbosity {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter =
        || EnvFilter::try_from_env("GPUPASS_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    if let Some(path) = log_file {
        match crate::fsutil::open_nofollow(path, OpenOptions::new().create(true).append(true)) {
            Ok(f) => {
                // A second init (tests) is harmless: keep the first subscriber.
                let _ = tracing_subscriber::fmt()
                    .with_env_filter(filter())
                    .with_writer(Mutex::new(f))
                    .with_ansi(false)
                    .with_target(false)
                    .try_init();
                return;
            }
            Err(e) => eprintln!(
                "gpupass: warning: cannot log to a file: {}; logging to stderr",
                crate::hook::cli::error_chain(&e)
            ),
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .with_target(false)
        .try_init();
}
