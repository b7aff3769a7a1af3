//! `gpupass serve`: resolves flags against the config file and runs the agent.

use std::path::PathBuf;
use std::time::Duration;

use gpupass::agent::server::ConnLimits;
use gpupass::agent::{self, ServeOptions, DEFAULT_SOCKET};

use crate::cli::Global;

/// The flags, as given.
#[derive(Debug, Clone)]
pub struct ServeFlags {
    /// `--socket`.
    pub socket: Option<PathBuf>,
    /// `--socket-group`.
    pub socket_group: Option<String>,
    /// `--tcp`.
    pub tcp: Option<std::net::SocketAddr>,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
    /// `--reconcile-seconds`.
    pub reconcile_seconds: Option<u64>,
    /// `--lock-timeout`.
    pub lock_timeout: Duration,
}

/// `gpupass serve`.
pub fn serve(g: &Global, f: ServeFlags) -> anyhow::Result<()> {
    let config = g.settings.clone();
    let s = config.serve.clone();
    let tcp = match f.tcp {
        Some(a) => Some(a),
        None => s.tcp_addr().map_err(anyhow::Error::msg)?,
    };
    let limits = ConnLimits::from_config(&s);
    let opts = ServeOptions {
        uri: g.uri.clone(),
        host_root: g.host_root.clone(),
        run_dir: g.run_dir.clone(),
        state_dir: g.state_dir.clone(),
        template: g.template()?,
        socket: f
            .socket
            .or(s.socket)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
        socket_group: f.socket_group.or(s.socket_group),
        tcp,
        token_file: f.token_file.or(s.token_file),
        reconcile_every: Duration::from_secs(
            f.reconcile_seconds.or(s.reconcile_seconds).unwrap_or(60),
        ),
        lock_timeout: f.lock_timeout,
        limits,
        config,
    };
    agent::serve(opts)?;
    Ok(())
}
