//! One shutdown signal that reaches every loop, and the process signals that trigger it.
//!
//! Every long-running task holds a clone of [`Shutdown`] and selects on `cancelled()`. The
//! drain order lives in `startup.rs`: stop accepting, drain requests and sessions, stop
//! consuming, close the queue, all inside `http.shutdown_grace`.

use tokio_util::sync::CancellationToken;

pub type Shutdown = CancellationToken;

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
