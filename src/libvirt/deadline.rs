//! A deadline on libvirt work done under the host lock: the process ends with exit 8 and one
//! line unless the guard is dropped in time. Owns no libvirt call itself.
//!
//! libvirt's client has no per-call timeout, and keepalive only notices a peer that stops
//! answering pings, not a daemon whose worker is stuck; the call itself cannot be interrupted.
//! Exiting is what releases the host lock (the kernel drops a dead process's `flock`); whatever
//! the change had done by then shows as a partly attached GPU that `list` flags and a rerun
//! completes or undoes. The agent is restarted by its service manager (`Restart=on-failure`)
//! and rebuilds its state from libvirt.

use std::sync::mpsc;
use std::time::Duration;

/// The exit code of a libvirt that did not answer in time (as unreachable).
pub const EXIT_LIBVIRT: i32 = 8;

/// Armed until dropped.
#[derive(Debug)]
pub struct Deadline {
    _armed: mpsc::Sender<()>,
}

impl Deadline {
    /// Arms the deadline: after `timeout`, prints `gpupass: error: WHAT: …` and exits 8.
    pub fn arm(timeout: Duration, what: String) -> Self {
        let (tx, rx) = mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("libvirt-deadline".into())
            .spawn(move || {
                // Dropping the sender (the operation ended) disconnects: no timeout.
                if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
                    eprintln!(
                        "gpupass: error: {what}: libvirt did not answer within {} s (--libvirt-timeout); stopped, which releases the host lock; check `gpupass list` for a GPU left partly attached",
                        timeout.as_secs()
                    );
                    // Runs no destructor; the stuck thread stays inside libvirt until the
                    // process is gone.
                    std::process::exit(EXIT_LIBVIRT);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("no libvirt deadline (thread: {e})");
        }
        Self { _armed: tx }
    }
}
