//! Installs the tracing subscriber once: human lines on stderr (stdout carries XML and JSON).

use tracing_subscriber::EnvFilter;

/// `verbosity` 0 = warnings, 1 = info, 2+ = debug; `GPUPASS_LOG` (an env-filter) overrides.
pub fn init(verbosity: u8) {
    let default = match verbosity {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_env("GPUPASS_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .try_init();
}
