//! The dispatcher: consume queued notifications and deliver every target, live first, then
//! through APNs/FCM; settle each message once every target reached a final outcome.
//!
//! Per message (one task, at most `queue.prefetch` at once):
//!
//! 1. Unparseable → dead letter (`unparseable`). Past its ttl → an `expired` event per
//!    target, ack: dropped, never sent late.
//! 2. Each target (at most `dispatcher.target_concurrency` at once): the directory tries the
//!    live session; `Acked` is final. `Offline` or `NotAcked` → fallback through every route
//!    the target carries ([`target`]).
//! 3. Settle: targets that failed transiently go into one retry copy (only them, attempt+1,
//!    after an exponential, jittered delay, at least any provider Retry-After); when
//!    attempts run out, or on a configuration error, they go into one dead letter with the
//!    reason and the attempt history. Those copies are made safe first, then the original
//!    is acked, so a crash in between duplicates rather than loses.

mod target;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::RetrySettings;
use crate::directory::Directory;
use crate::domain::{AttemptRecord, QueuedNotification, Target, unix_millis};
use crate::events::{Event, EventKind, Events};
use crate::metrics::Metrics;
use crate::providers::Providers;
use crate::queue::{Delivery, Queue, QueueKind, backoff_with_jitter};

pub use target::TargetResult;

/// Everything a dispatcher needs; one per process running the dispatcher role.
pub struct Dispatcher {
    pub queue: Queue,
    pub directory: Option<Directory>,
    pub providers: Arc<Providers>,
    pub events: Events,
    pub metrics: Metrics,
    pub retry: RetrySettings,
    /// Messages handled at once (the consumer's prefetch).
    pub in_flight: usize,
    pub target_concurrency: usize,
}

/// A running dispatcher; [`DispatcherHandle::drain`] stops it.
pub struct DispatcherHandle {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl DispatcherHandle {
    /// Stops taking messages, lets in-flight ones finish within `grace`, then abandons the
    /// rest: their deliveries are dropped unsettled, so the queue gives them to another
    /// consumer (or to this node after a restart). Returns true if it drained in time.
    pub async fn drain(mut self, grace: Duration) -> bool {
        self.stop.cancel();
        match tokio::time::timeout(grace, &mut self.task).await {
            Ok(_) => true,
            Err(_) => {
                self.task.abort();
                false
            }
        }
    }
}

impl Dispatcher {
    pub fn spawn(self) -> DispatcherHandle {
        self.spawn_under(CancellationToken::new())
    }

    /// Runs until `stop` (the dispatcher's node of the shutdown tree) is cancelled, by
    /// [`DispatcherHandle::drain`] or by a parent.
    pub fn spawn_under(self, stop: CancellationToken) -> DispatcherHandle {
        let task = tokio::spawn(Arc::new(self).run(stop.clone()));
        DispatcherHandle { stop, task }
    }

    async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut consumer = self.queue.consume(QueueKind::Work);
        let slots = Arc::new(Semaphore::new(self.in_flight.max(1)));
        let mut tasks = JoinSet::new();
        loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("never closed"),
                _ = stop.cancelled() => break,
            };
            let delivery = tokio::select! {
                d = consumer.next() => match d {
                    Some(d) => d,
                    None => break,
                },
                _ = stop.cancelled() => break,
            };
            let me = self.clone();
            tasks.spawn(async move {
                me.handle(delivery).await;
                drop(permit);
            });
            while tasks.try_join_next().is_some() {}
        }
        // Stop consuming before waiting for in-flight work, so nothing new is prefetched.
        drop(consumer);
        while tasks.join_next().await.is_some() {}
    }

    async fn handle(self: &Arc<Self>, delivery: Delivery) {
        let n = match delivery.notification() {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "unparseable queued message: dead-lettering it");
                self.metrics
                    .dead_letters
                    .with_label_values(&["unparseable"])
                    .inc();
                let body = delivery.body.clone();
                if let Err(e) = delivery
                    .dead_letter(body, &format!("unparseable: {e}"))
                    .await
                {
                    tracing::warn!(error = %e, "could not dead-letter; it will be redelivered");
                }
                return;
            }
        };
        let span = tracing::info_span!("dispatch", id = %n.id, attempt = n.attempt + 1, targets = n.targets.len());
        self.dispatch(delivery, n).instrument(span).await
    }

    async fn dispatch(self: &Arc<Self>, delivery: Delivery, n: QueuedNotification) {
        if n.is_expired(SystemTime::now()) {
            for t in &n.targets {
                self.metrics
                    .deliveries
                    .with_label_values(&["none", "expired"])
                    .inc();
                self.events.emit(
                    Event::new(EventKind::Expired, &n, &t.device_id)
                        .reason("ttl passed before delivery"),
                );
            }
            tracing::info!("expired before delivery: dropped");
            settle_log(delivery.ack().await);
            return;
        }

        // Owned per-target futures (an Arc of the message, a clone of the target): a
        // stream of futures borrowing from this frame cannot be spawned.
        let shared = Arc::new(n.clone());
        let results: Vec<(Target, TargetResult)> = futures::stream::iter(n.targets.clone())
            .map(|t| {
                let (me, n) = (self.clone(), shared.clone());
                async move {
                    let result = target::deliver(&me, &n, &t).await;
                    (t, result)
                }
            })
            .buffer_unordered(self.target_concurrency.max(1))
            .collect()
            .await;

        let mut retry_targets = Vec::new();
        let mut dead_targets = Vec::new();
        let mut failures: BTreeMap<String, u32> = BTreeMap::new();
        let mut retry_after = Duration::ZERO;
        let mut config_errors = Vec::new();
        for (t, result) in results {
            match result {
                TargetResult::Done => {}
                TargetResult::Retry {
                    reason,
                    retry_after: after,
                    channel,
                } => {
                    *failures.entry(reason).or_default() += 1;
                    retry_after = retry_after.max(after.unwrap_or_default());
                    self.metrics.retries.with_label_values(&[channel]).inc();
                    retry_targets.push(t);
                }
                TargetResult::DeadLetter { reason } => {
                    *failures.entry(reason.clone()).or_default() += 1;
                    config_errors.push(reason);
                    dead_targets.push(t);
                }
            }
        }
        if retry_targets.is_empty() && dead_targets.is_empty() {
            settle_log(delivery.ack().await);
            return;
        }

        let attempt = n.attempt + 1;
        let mut history = n.history.clone();
        history.push(AttemptRecord {
            attempt,
            at_ms: unix_millis(SystemTime::now()),
            failures: failures.clone(),
        });
        let copy = |targets: Vec<Target>| QueuedNotification {
            targets,
            attempt,
            history: history.clone(),
            ..n.clone()
        };
        let queue = delivery.queue();

        let mut dead_reason = None;
        if !config_errors.is_empty() {
            dead_reason = Some((
                "config_error",
                format!("config_error: {}", config_errors[0]),
            ));
        }
        if !retry_targets.is_empty() {
            if attempt < self.retry.max_attempts {
                let delay =
                    backoff_with_jitter(attempt - 1, self.retry.base_delay, self.retry.max_delay)
                        .max(retry_after);
                let next = copy(std::mem::take(&mut retry_targets));
                if let Err(e) = queue.publish_retry(&next, delay).await {
                    // Not acked: the whole message comes back; delivered targets may get a
                    // duplicate (they dedupe by id), nothing is lost.
                    tracing::warn!(error = %e, "could not schedule the retry; leaving the message unacked");
                    return;
                }
                tracing::info!(targets = next.targets.len(), ?delay, "scheduled a retry");
            } else {
                let summary = failures
                    .iter()
                    .map(|(r, c)| format!("{r} x{c}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                dead_reason = Some((
                    "attempts_exhausted",
                    format!("attempts_exhausted after {attempt} attempts: {summary}"),
                ));
                dead_targets.append(&mut retry_targets);
            }
        }
        if let Some((label, reason)) = dead_reason {
            let dead = copy(dead_targets);
            if let Err(e) = queue.publish_dead(dead.to_json(), &reason).await {
                tracing::warn!(error = %e, "could not dead-letter; leaving the message unacked");
                return;
            }
            self.metrics.dead_letters.with_label_values(&[label]).inc();
            tracing::warn!(targets = dead.targets.len(), %reason, "dead-lettered");
            for t in &dead.targets {
                self.events.emit(
                    Event::new(EventKind::DeadLettered, &n, &t.device_id).reason(reason.clone()),
                );
            }
        }
        settle_log(delivery.ack().await);
    }
}

fn settle_log(result: Result<(), crate::queue::QueueError>) {
    if let Err(e) = result {
        // The broker will redeliver; at-least-once means a possible duplicate, not a loss.
        tracing::warn!(error = %e, "ack failed; the message will be redelivered");
    }
}
