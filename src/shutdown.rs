//! One shutdown signal, one ordered tree of stop tokens, and the process signals.
//!
//! [`Shutdown`] is the signal: SIGTERM/SIGINT (or a test) cancels it, `/readyz` turns 503,
//! and `startup.rs` begins the drain. The drain stops the roles through a [`StopTree`],
//! leaves first, each awaited before the next, all inside `http.shutdown_grace`:
//!
//! ```text
//! queue        the broker connection (RabbitQueue's supervisor); closed last
//! └ directory  the cluster directory's supervisor and consumers
//!   └ http     the HTTP server: requests in flight finish
//!     └ events     the webhook and exchange sinks: send what the drain produced
//!       └ gateway      sessions: in-flight acks finish, then "reconnect elsewhere"
//!         └ dispatcher     stop consuming; finish the messages in hand
//!           └ reaper           the inbox reaper: stops with the dispatcher (its events
//!                              go to the sinks, which drain after it)
//! ```
//!
//! The event sinks stop after both event sources, the dispatcher and the gateway (whose
//! sessions emit `replayed` and `session_replaced`), so every event the drain produced is
//! in their buffers when they are told to stop. They are never paused: while the gateway
//! says goodbye to its sessions they keep sending, so a slow webhook does not delay the
//! goodbye; stopping them only means "send what you hold, then end".
//!
//! Each child outlives nothing it depends on: the dispatcher delivers live through the
//! gateway and emits events, the gateway emits events, the sinks publish on the queue,
//! sessions unbind through the directory. And cancelling a parent cancels its subtree, so
//! when the grace period runs out, cancelling the root still reaches every loop.

use tokio_util::sync::CancellationToken;

pub type Shutdown = CancellationToken;

/// The stop tokens of one process, in drain order (see the module docs).
#[derive(Debug, Clone)]
pub struct StopTree {
    pub queue: CancellationToken,
    pub directory: CancellationToken,
    pub http: CancellationToken,
    pub gateway: CancellationToken,
    pub events: CancellationToken,
    pub dispatcher: CancellationToken,
    pub reaper: CancellationToken,
}

impl StopTree {
    pub fn new() -> StopTree {
        let queue = CancellationToken::new();
        let directory = queue.child_token();
        let http = directory.child_token();
        let events = http.child_token();
        let gateway = events.child_token();
        let dispatcher = gateway.child_token();
        let reaper = dispatcher.child_token();
        StopTree {
            queue,
            directory,
            http,
            gateway,
            events,
            dispatcher,
            reaper,
        }
    }
}

impl Default for StopTree {
    fn default() -> Self {
        StopTree::new()
    }
}

/// Resolves on SIGTERM (Kubernetes' stop) or SIGINT (Ctrl-C).
pub async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received: shutting down"),
        _ = term => tracing::info!("SIGTERM received: shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_stops_alone_and_a_parent_stops_its_subtree() {
        let tree = StopTree::new();
        tree.dispatcher.cancel();
        assert!(
            tree.reaper.is_cancelled(),
            "the reaper stops with the dispatcher"
        );
        assert!(!tree.gateway.is_cancelled(), "a leaf stops first, alone");
        tree.gateway.cancel();
        assert!(
            !tree.events.is_cancelled(),
            "the sinks outlive the gateway, whose sessions emit events"
        );
        tree.events.cancel();
        assert!(!tree.http.is_cancelled() && !tree.queue.is_cancelled());
        tree.queue.cancel();
        assert!(tree.http.is_cancelled() && tree.directory.is_cancelled());
    }
}
