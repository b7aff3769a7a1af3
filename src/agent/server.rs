//! Serves the API router on one listener (the unix socket or loopback TCP) with the limits a
//! root daemon needs against slow and idle clients: hyper's header read timeout, an idle
//! keep-alive timeout, a cap on open connections, and a shutdown that gives requests in flight
//! a bounded grace and then drops every connection. The body read timeout is a layer of the
//! router (`api`). Decides nothing about requests.
//!
//! At the cap, a new connection takes the place of the longest-idle one (no request in
//! progress: a client trickling its headers, or a keep-alive connection between requests); when
//! every connection is serving a request, the new one is closed at once. So a flood of slow
//! connections can neither hold more than the cap of file handles nor lock out a real client.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::serve::Listener;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tower_service::Service;

use crate::config::ServeConfig;

/// The limits on one listener's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Time a client gets to send a request's headers (the whole head, from the first poll).
    pub header_timeout: Duration,
    /// Time a client gets to send a request's body.
    pub body_timeout: Duration,
    /// Time a keep-alive connection may sit between requests.
    pub idle_timeout: Duration,
    /// Connections open at once on the listener.
    pub max_connections: usize,
    /// Time requests in flight get to finish once shutdown starts.
    pub shutdown_grace: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(5),
            max_connections: 64,
            shutdown_grace: Duration::from_secs(2),
        }
    }
}

impl ConnLimits {
    /// The `[serve]` settings over the defaults (their ranges are checked when the config is
    /// read; an out-of-range count saturates rather than wraps).
    pub fn from_config(s: &ServeConfig) -> Self {
        let d = Self::default();
        let ms = |v: Option<u64>, default: Duration| v.map_or(default, Duration::from_millis);
        Self {
            header_timeout: ms(s.header_timeout_ms, d.header_timeout),
            body_timeout: ms(s.body_timeout_ms, d.body_timeout),
            idle_timeout: ms(s.idle_timeout_ms, d.idle_timeout),
            max_connections: s.max_connections.map_or(d.max_connections, |n| {
                usize::try_from(n).unwrap_or(usize::MAX)
            }),
            shutdown_grace: ms(s.shutdown_grace_ms, d.shutdown_grace),
        }
    }
}

/// One open connection, as the accept loop sees it.
struct Conn {
    id: u64,
    /// Requests being handled (hyper's HTTP/1 handles one at a time: 0 or 1).
    in_flight: AtomicUsize,
    /// Since when it has had no request in progress (accepted, or last response produced).
    idle_since: Mutex<Instant>,
    /// Whether it has had a request (then the idle keep-alive timeout applies).
    served: Mutex<bool>,
    /// Close it now: its place is taken.
    evict: Notify,
}

impl Conn {
    fn new(id: u64) -> Self {
        Self {
            id,
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            served: Mutex::new(false),
            evict: Notify::new(),
        }
    }

    fn idle_since(&self) -> Instant {
        *self.idle_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long it has been idle after a request; `None` while a request is in progress or
    /// before the first one (hyper's header timeout covers that).
    fn idle_after_request(&self) -> Option<Duration> {
        let served = *self.served.lock().unwrap_or_else(|e| e.into_inner());
        (served && self.in_flight.load(Ordering::SeqCst) == 0).then(|| self.idle_since().elapsed())
    }
}

/// Marks a request in progress on its connection for as long as it lives.
struct Busy(Arc<Conn>);

impl Busy {
    fn new(c: Arc<Conn>) -> Self {
        c.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(c)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        *self.0.served.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The open connections of one listener.
#[derive(Default)]
struct Registry {
    conns: Mutex<BTreeMap<u64, Arc<Conn>>>,
}

impl Registry {
    /// Takes `c` in; at the cap, closes the longest-idle connection for it, or refuses it
    /// (false) when every connection is serving a request.
    fn admit(&self, c: &Arc<Conn>, max: usize) -> bool {
        let mut m = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        while m.len() >= max {
            let victim = m
                .values()
                .filter(|c| c.in_flight.load(Ordering::SeqCst) == 0)
                .min_by_key(|c| c.idle_since())
                .map(|c| c.id);
            let Some(v) = victim.and_then(|id| m.remove(&id)) else {
                return false;
            };
            v.evict.notify_one();
        }
        m.insert(c.id, Arc::clone(c));
        true
    }

    fn remove(&self, id: u64) {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

/// Serves `router` on `listener` within `limits` until `stop` turns true; then stops
/// accepting, lets requests in flight finish for at most `limits.shutdown_grace` and drops
/// every connection still open.
pub async fn serve<L>(
    mut listener: L,
    router: Router,
    limits: ConnLimits,
    mut stop: watch::Receiver<bool>,
) where
    L: Listener,
{
    let registry = Arc::new(Registry::default());
    let mut tasks = JoinSet::new();
    let mut next_id: u64 = 0;
    let mut last_warned: Option<Instant> = None;
    loop {
        tokio::select! {
            (io, _addr) = listener.accept() => {
                next_id = next_id.wrapping_add(1);
                let conn = Arc::new(Conn::new(next_id));
                if !registry.admit(&conn, limits.max_connections) {
                    drop(io);
                    // At most one line a minute however hard the listener is hit.
                    if last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        last_warned = Some(Instant::now());
                        tracing::warn!(
                            max = limits.max_connections,
                            "API connection refused: every connection is serving a request"
                        );
                    }
                    continue;
                }
                tasks.spawn(connection(
                    io,
                    conn,
                    router.clone(),
                    limits,
                    stop.clone(),
                    Arc::clone(&registry),
                ));
            }
            // Reap finished connections so the set does not grow.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    break;
                }
            }
        }
    }
    // Closes the listening socket now: nothing new is accepted during the grace.
    drop(listener);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(limits.shutdown_grace, drain)
        .await
        .is_err()
    {
        tracing::info!(
            open = tasks.len(),
            "closing API connections still open after the shutdown grace"
        );
    }
    tasks.shutdown().await;
}

/// One connection: hyper's HTTP/1 with the header timeout, closed when idle too long after a
/// request, when its place is taken, or (after any request in flight) at shutdown.
async fn connection<I>(
    io: I,
    conn: Arc<Conn>,
    router: Router,
    limits: ConnLimits,
    mut stop: watch::Receiver<bool>,
    registry: Arc<Registry>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let conn = Arc::clone(&conn);
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let mut router = router.clone();
            let busy = Busy::new(Arc::clone(&conn));
            async move {
                let response = router.call(req.map(Body::new)).await;
                drop(busy);
                response
            }
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let http = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(http);
    let mut stopping = *stop.borrow();
    if stopping {
        http.as_mut().graceful_shutdown();
    }
    loop {
        let idle = conn.idle_after_request();
        let wait = idle.map_or(limits.idle_timeout, |d| {
            limits.idle_timeout.saturating_sub(d)
        });
        tokio::select! {
            r = http.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "API connection ended");
                }
                break;
            }
            () = conn.evict.notified() => {
                tracing::debug!("API connection closed to make room for a new one");
                break;
            }
            r = stop.changed(), if !stopping => {
                if r.is_err() || *stop.borrow() {
                    stopping = true;
                    // Idle connections close now; a request in flight finishes first.
                    http.as_mut().graceful_shutdown();
                }
            }
            () = tokio::time::sleep(wait) => {
                if conn
                    .idle_after_request()
                    .is_some_and(|d| d >= limits.idle_timeout)
                {
                    tracing::debug!("API connection idle too long; closed");
                    break;
                }
            }
        }
    }
    registry.remove(conn.id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_longest_idle_connection_makes_room() {
        let r = Registry::default();
        let conns: Vec<Arc<Conn>> = (1..=3).map(|i| Arc::new(Conn::new(i))).collect();
        for c in &conns {
            assert!(r.admit(c, 3));
        }
        // 1 is serving a request; 2 has been idle longest of the others.
        let busy = Busy::new(Arc::clone(&conns[0]));
        *conns[2].idle_since.lock().unwrap() = Instant::now();
        let new = Arc::new(Conn::new(4));
        assert!(r.admit(&new, 3));
        let open: Vec<u64> = r.conns.lock().unwrap().keys().copied().collect();
        assert_eq!(open, [1, 3, 4]);
        // Every one busy: the next is refused.
        let _b3 = Busy::new(Arc::clone(&conns[2]));
        let _b4 = Busy::new(Arc::clone(&new));
        assert!(!r.admit(&Arc::new(Conn::new(5)), 3));
        drop(busy);
        assert!(conns[0].idle_after_request().is_some());
        assert!(r.admit(&Arc::new(Conn::new(6)), 3));
        let open: Vec<u64> = r.conns.lock().unwrap().keys().copied().collect();
        assert_eq!(open, [3, 4, 6]);
    }

    #[test]
    fn limits_come_from_the_config_over_the_defaults() {
        let d = ConnLimits::from_config(&ServeConfig::default());
        assert_eq!(d, ConnLimits::default());
        assert_eq!(d.header_timeout, Duration::from_secs(10));
        let c = ServeConfig {
            header_timeout_ms: Some(250),
            max_connections: Some(8),
            shutdown_grace_ms: Some(0),
            ..ServeConfig::default()
        };
        let l = ConnLimits::from_config(&c);
        assert_eq!(l.header_timeout, Duration::from_millis(250));
        assert_eq!(l.max_connections, 8);
        assert_eq!(l.shutdown_grace, Duration::ZERO);
        assert_eq!(l.body_timeout, Duration::from_secs(30));
    }
}
