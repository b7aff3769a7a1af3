//! `gpupass serve`: the host agent. A watcher thread keeps a derived state from libvirt's
//! events and periodic reconciles (`watch`, `state`); an HTTP/JSON API on a unix socket, and
//! optionally on loopback TCP with a bearer token, serves it (`api`, `metrics`) on tokio, each
//! listener with timeouts and a connection cap (`server`).

pub mod api;
pub mod metrics;
pub mod server;
pub mod state;
pub mod watch;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::Duration;

use crate::agent::api::Api;
use crate::agent::server::ConnLimits;
use crate::agent::state::Snapshot;
use crate::agent::watch::{Msg, WatchOptions};
use crate::config::GpupassConfig;
use crate::libvirt::events;
use crate::libvirt::LibvirtError;
use crate::usage::Ledger;
use crate::xml::compose::HostdevTemplate;

/// The default API socket.
pub const DEFAULT_SOCKET: &str = "/run/gpupass/gpupass.sock";

/// Errors that stop the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The socket could not be set up.
    #[error("API socket {path}: {message}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Another agent answers on the socket.
    #[error("another gpupass serve is answering on {path}")]
    AlreadyServing {
        /// The socket path.
        path: PathBuf,
    },
    /// The TCP listener or its token is not usable.
    #[error("TCP API: {0}")]
    Tcp(String),
    /// libvirt's event loop could not start.
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    /// The async runtime or a thread could not start.
    #[error("starting the agent: {0}")]
    Runtime(#[source] io::Error),
    /// The run dir or state dir is not safe to use.
    #[error(transparent)]
    Dir(#[from] crate::fsutil::FsError),
}

/// How `gpupass serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// libvirt URI.
    pub uri: String,
    /// Host root.
    pub host_root: PathBuf,
    /// Run dir.
    pub run_dir: PathBuf,
    /// State dir (usage ledger).
    pub state_dir: PathBuf,
    /// Config.
    pub config: GpupassConfig,
    /// Hostdev template.
    pub template: HostdevTemplate,
    /// The unix socket.
    pub socket: PathBuf,
    /// Its group (mode 0660).
    pub socket_group: Option<String>,
    /// Loopback TCP address.
    pub tcp: Option<SocketAddr>,
    /// Bearer token file for TCP.
    pub token_file: Option<PathBuf>,
    /// Time between full reconciles.
    pub reconcile_every: Duration,
    /// Host-lock wait for attach/detach.
    pub lock_timeout: Duration,
    /// Timeouts and the connection cap of each listener.
    pub limits: ConnLimits,
}

fn socket_err(path: &Path, message: impl Into<String>) -> AgentError {
    AgentError::Socket {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// Binds the unix socket: parent made, a stale socket file replaced (a live one refused),
/// mode 0660, group set.
fn bind_socket(
    path: &Path,
    group: Option<&str>,
) -> Result<std::os::unix::net::UnixListener, AgentError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)
            .map_err(|e| socket_err(path, format!("creating its directory: {e}")))?;
    }
    match fs::symlink_metadata(path) {
        Ok(m) => {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() {
                return Err(socket_err(
                    path,
                    "exists and is not a socket; not replacing it",
                ));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(AgentError::AlreadyServing {
                    path: path.to_owned(),
                });
            }
            fs::remove_file(path)
                .map_err(|e| socket_err(path, format!("removing a stale socket: {e}")))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_err(path, e.to_string())),
    }
    let gid = match group {
        None => None,
        Some(g) => Some(
            nix::unistd::Group::from_name(g)
                .map_err(|e| socket_err(path, format!("looking up group '{g}': {e}")))?
                .ok_or_else(|| socket_err(path, format!("group '{g}' does not exist")))?
                .gid
                .as_raw(),
        ),
    };
    let listener = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| socket_err(path, format!("bind: {e}")))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o660))
        .map_err(|e| socket_err(path, format!("chmod 0660: {e}")))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| socket_err(path, format!("chown to group {gid}: {e}")))?;
    }
    listener
        .set_nonblocking(true)
        .map_err(|e| socket_err(path, e.to_string()))?;
    Ok(listener)
}

/// Reads the bearer token: the file must belong to the agent's user, be readable by it only,
/// and hold at least 16 characters.
pub fn read_token(path: &Path) -> Result<String, AgentError> {
    let m = fs::metadata(path)
        .map_err(|e| AgentError::Tcp(format!("token file {}: {e}", path.display())))?;
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != me {
        return Err(AgentError::Tcp(format!(
            "token file {} belongs to uid {}, not to the agent's user (uid {me})",
            path.display(),
            m.uid()
        )));
    }
    if m.mode() & 0o077 != 0 {
        return Err(AgentError::Tcp(format!(
            "token file {} is readable by others (mode {:o}); chmod 600 it",
            path.display(),
            m.mode() & 0o777
        )));
    }
    let token = fs::read_to_string(path)
        .map_err(|e| AgentError::Tcp(format!("token file {}: {e}", path.display())))?
        .trim()
        .to_owned();
    if token.len() < 16 {
        return Err(AgentError::Tcp(format!(
            "token in {} is shorter than 16 characters",
            path.display()
        )));
    }
    Ok(token)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the agent runs until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutting down");
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn serve(opts: ServeOptions) -> Result<(), AgentError> {
    crate::fsutil::private_dir(&opts.run_dir)?;
    crate::fsutil::private_dir(&opts.state_dir)?;
    let token = match (&opts.tcp, &opts.token_file) {
        (Some(a), _) if !a.ip().is_loopback() => {
            return Err(AgentError::Tcp(format!("{a} is not a loopback address")))
        }
        (Some(_), None) => return Err(AgentError::Tcp("--tcp needs --token-file".into())),
        (Some(_), Some(f)) => Some(Arc::new(read_token(f)?)),
        (None, _) => None,
    };
    events::start_event_loop()?;
    let listener = bind_socket(&opts.socket, opts.socket_group.as_deref())?;
    if opts.socket_group.is_some() && opts.socket.parent() == Some(opts.run_dir.as_path()) {
        // The run dir is 0750 (gpupass's own): the socket's group must be able to enter it.
        fs::metadata(&opts.socket)
            .and_then(|m| std::os::unix::fs::chown(&opts.run_dir, None, Some(m.gid())))
            .map_err(|e| {
                socket_err(
                    &opts.socket,
                    format!("giving its directory to the socket's group: {e}"),
                )
            })?;
    }
    let shared = Arc::new(RwLock::new(Arc::new(Snapshot::default())));
    let (tx, rx) = mpsc::channel();
    let ledger = Ledger::new(&opts.state_dir);
    let watch_opts = WatchOptions {
        uri: opts.uri.clone(),
        host_root: opts.host_root.clone(),
        ledger: ledger.clone(),
        health: crate::health::store::HealthStore::new(&opts.state_dir),
        config: opts.config.clone(),
        reconcile_every: opts.reconcile_every,
        max_backoff: Duration::from_secs(30),
        repair: watch::RepairOptions::from_config(
            &opts.config,
            &opts.run_dir,
            &opts.template,
            &ledger,
            opts.host_root == Path::new("/"),
        ),
    };
    let watcher = {
        let (shared, tx) = (Arc::clone(&shared), tx.clone());
        std::thread::Builder::new()
            .name("gpupass-watch".into())
            .spawn(move || watch::run(watch_opts, shared, tx, rx))
            .map_err(AgentError::Runtime)?
    };
    let api = Arc::new(Api {
        shared,
        tx: tx.clone(),
        uri: opts.uri.clone(),
        host_root: opts.host_root.clone(),
        run_dir: opts.run_dir.clone(),
        ledger,
        health: crate::health::store::HealthStore::new(&opts.state_dir),
        config: opts.config.clone(),
        template: opts.template.clone(),
        lock_timeout: opts.lock_timeout,
        manage_drivers: opts.host_root == Path::new("/"),
        decisions: Mutex::new(BTreeMap::new()),
        body_timeout: opts.limits.body_timeout,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("gpupass-api")
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    let result = runtime.block_on(async {
        let unix = tokio::net::UnixListener::from_std(listener)
            .map_err(|e| socket_err(&opts.socket, e.to_string()))?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut servers = tokio::task::JoinSet::new();
        let limits = opts.limits;
        servers.spawn(server::serve(
            unix,
            api::router(Arc::clone(&api), None),
            limits,
            stop_rx.clone(),
        ));
        if let (Some(addr), Some(token)) = (opts.tcp, token) {
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| AgentError::Tcp(format!("bind {addr}: {e}")))?;
            let app = api::router(Arc::clone(&api), Some(token));
            servers.spawn(server::serve(tcp, app, limits, stop_rx));
            tracing::info!(%addr, "API also on TCP (bearer token)");
        }
        tracing::info!(socket = %opts.socket.display(), uri = %opts.uri, "gpupass agent serving");
        shutdown_signal().await;
        let _ = stop_tx.send(true);
        // Each listener bounds its own drain by the grace; this bounds them all the same.
        let all = async { while servers.join_next().await.is_some() {} };
        let bound = limits.shutdown_grace.saturating_add(Duration::from_secs(1));
        if tokio::time::timeout(bound, all).await.is_err() {
            tracing::warn!("API listeners did not stop within the shutdown grace; exiting");
        }
        servers.abort_all();
        Ok::<(), AgentError>(())
    });
    let _ = tx.send(Msg::Shutdown);
    // A libvirt call stuck on a hung daemon must not keep the agent from exiting.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !watcher.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if watcher.is_finished() {
        let _ = watcher.join();
    } else {
        tracing::warn!("the libvirt watcher did not stop within 5 s; exiting without it");
    }
    let _ = fs::remove_file(&opts.socket);
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_must_be_private_and_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        fs::write(&f, "0123456789abcdef\n").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token(&f).unwrap(), "0123456789abcdef");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(read_token(&f)
            .unwrap_err()
            .to_string()
            .contains("readable by others"));
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&f, "short\n").unwrap();
        assert!(read_token(&f)
            .unwrap_err()
            .to_string()
            .contains("shorter than 16"));
        assert!(read_token(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run/api.sock");
        // A socket nobody answers on (left by a killed agent).
        drop(bind_socket(&p, None).unwrap());
        let l = bind_socket(&p, None).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // Someone answers now.
        let err = bind_socket(&p, None).unwrap_err();
        assert!(matches!(err, AgentError::AlreadyServing { .. }), "{err}");
        drop(l);
        let file = dir.path().join("plain");
        fs::write(&file, "x").unwrap();
        assert!(bind_socket(&file, None)
            .unwrap_err()
            .to_string()
            .contains("not a socket"));
        assert!(
            bind_socket(&dir.path().join("s2"), Some("no-such-group-gpupass"))
                .unwrap_err()
                .to_string()
                .contains("does not exist")
        );
    }
}
