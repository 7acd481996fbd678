//! The reconnect supervisor: one loop for everything that holds broker resources and must
//! get them back after a cut (the queue backend's connection, the cluster directory's
//! channels, and the next directory's).
//!
//! A *round* sets the resource up, serves until it breaks, and returns `Ok(())`; a round
//! that cannot set up returns the error. After a round that was up, the next one starts at
//! once (the cut is usually over, or the round's own setup waits for what it needs); after
//! a failed one, the loop waits a jittered, growing delay so a fleet of nodes does not
//! retry in step. It ends when `stop` is cancelled, which each round should also watch.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::backoff_with_jitter;

/// The delays between failed rounds: `min·2^failures`, capped at `max`, full jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

/// Runs `round` until `stop`. `round(reconnecting)` is told whether a round was up before
/// (for a "re-connected" metric or log line).
pub async fn supervise<F, Fut>(what: &str, stop: &CancellationToken, backoff: Backoff, mut round: F)
where
    F: FnMut(bool) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut failures: u32 = 0;
    let mut was_up = false;
    while !stop.is_cancelled() {
        match round(was_up).await {
            Ok(()) => {
                failures = 0;
                was_up = true;
                if !stop.is_cancelled() {
                    tracing::warn!("{what}: lost; reconnecting");
                }
            }
            Err(e) => {
                if stop.is_cancelled() {
                    return;
                }
                failures += 1;
                let delay = backoff_with_jitter(failures, backoff.min, backoff.max);
                tracing::warn!(error = format!("{e:#}"), attempt = failures, retry_in = ?delay, "{what}: cannot connect");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_failures_with_backoff_and_stops_on_cancel() {
        let stop = CancellationToken::new();
        let rounds = Arc::new(AtomicU32::new(0));
        let backoff = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let task = tokio::spawn({
            let (stop, rounds) = (stop.clone(), rounds.clone());
            async move {
                supervise("test", &stop.clone(), backoff, |was_up| {
                    let (stop, rounds) = (stop.clone(), rounds.clone());
                    async move {
                        let n = rounds.fetch_add(1, Ordering::SeqCst);
                        // Rounds 0 and 1 fail; round 2 is up until cancelled.
                        assert!(!was_up);
                        if n < 2 {
                            anyhow::bail!("refused");
                        }
                        stop.cancelled().await;
                        Ok(())
                    }
                })
                .await
            }
        });
        while rounds.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.cancel();
        task.await.unwrap();
        assert_eq!(rounds.load(Ordering::SeqCst), 3, "no round after stop");
    }
}
