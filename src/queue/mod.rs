//! The queue contract: durable hand-off from the API to the dispatcher.
//!
//! Two backends, one contract (proven by `tests/api/queue_contract.rs`, run against both):
//!
//! - `publish` returns `Ok` only once the message is safe: for RabbitMQ, after the broker's
//!   publisher confirm of a persistent message on a quorum queue; for the embedded queue,
//!   once it is in the bounded in-process queue. Otherwise it returns an error and the
//!   caller answers 503: nothing is half-accepted.
//! - A consumer gets each message at least once. A delivery is settled exactly one way:
//!   `ack` (done), `retry` (re-queued after a delay, with the updated body), `dead_letter`
//!   (parked with a reason), or `requeue` (given back now, e.g. at shutdown). A delivery that
//!   is dropped unsettled, or whose consumer dies, is redelivered with `redelivered = true`.
//! - `retry` and `dead_letter` first make the new copy safe, then ack the original, so a
//!   crash between the two can duplicate a message but never lose it.
//! - Work is queued per app: a notification goes to its app's work queue, and its retry
//!   copies come back to that same queue. [`Queue::consume_app`] reads one app's work, so
//!   the dispatcher gives each app its own consumer and in-flight budget and one app's
//!   backlog never waits in front of another's (ARCHITECTURE.md, Decisions).

mod memory;
mod rabbitmq;
pub mod reconnect;
pub mod tls;

use std::sync::Arc;

use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::config::{Role, Settings};
use crate::domain::{AppId, QueuedNotification};
use crate::metrics::Metrics;

pub use memory::MemoryQueue;
pub use rabbitmq::{RabbitQueue, Topology, TopologyUse};

/// Why a publish or a settlement did not happen. The API maps every variant to 503.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the broker is unavailable: {0}")]
    Unavailable(String),
    #[error("the broker did not confirm within {0:?}")]
    Timeout(Duration),
    #[error("the embedded queue is full ({0} messages)")]
    Full(usize),
    #[error("the embedded queue is full ({0} bytes, queue.memory_max_bytes)")]
    FullBytes(usize),
    #[error("the broker refused the message: {0}")]
    Refused(String),
    #[error("the queue is shut down")]
    Closed,
}

impl QueueError {
    /// The `reason` label of `herald_queue_publish_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            QueueError::Unavailable(_) | QueueError::Closed => "unavailable",
            QueueError::Timeout(_) => "timeout",
            QueueError::Full(_) | QueueError::FullBytes(_) => "full",
            QueueError::Refused(_) => "nacked",
        }
    }
}

/// Why [`Delivery::retry`] or [`Delivery::dead_letter`] did not complete. The two differ in
/// what happened: the caller records the copy only if it exists.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// The new copy was not made safe. The original is left unsettled, so it comes back
    /// whole.
    #[error("the copy was not made safe: {0}")]
    Publish(QueueError),
    /// The new copy is safe but the ack of the original failed, so it comes back too: a
    /// duplicate, never a loss.
    #[error("the copy is safe but the ack failed: {0}")]
    Ack(QueueError),
}

/// Which queue a consumer reads: the work queue, or the dead letters (for operators and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueKind {
    Work,
    Dead,
}

/// A queue backend. An enum rather than a trait object: there are exactly two, and the
/// compiler then checks every call site handles both.
#[derive(Clone)]
pub enum Queue {
    Memory(Arc<MemoryQueue>),
    Rabbit(Arc<RabbitQueue>),
}

impl Queue {
    /// Builds the backend the settings ask for. The RabbitMQ backend connects in the
    /// background (with backoff), so a process starts, reports not-ready and answers 503
    /// while the broker is away, instead of failing to start.
    pub fn from_settings(settings: &Settings, metrics: &Metrics) -> anyhow::Result<Queue> {
        Self::from_settings_under(settings, metrics, CancellationToken::new())
    }

    /// As [`Queue::from_settings`], with the RabbitMQ backend's supervisor stopping when
    /// `stop` (the root of the process's shutdown tree) is cancelled; `close` cancels it.
    pub fn from_settings_under(
        settings: &Settings,
        metrics: &Metrics,
        stop: CancellationToken,
    ) -> anyhow::Result<Queue> {
        let apps = settings.app_ids();
        Ok(match settings.queue_url()? {
            None => Queue::Memory(Arc::new(MemoryQueue::new(
                settings.queue.memory_capacity,
                settings.queue.memory_max_bytes,
                &apps,
                metrics.clone(),
            ))),
            Some(url) => Queue::Rabbit(RabbitQueue::start(
                url,
                Topology::new(&settings.queue.prefix, &settings.retry, &apps),
                // The work topology is the dispatcher's (it consumes it): the API and the
                // gateway then need no configure rights on it (docs/deploy.md).
                if settings.has_role(Role::Dispatcher) {
                    TopologyUse::Declare
                } else if settings.has_role(Role::Api) {
                    TopologyUse::ExpectWorkExchange
                } else {
                    TopologyUse::Nothing
                },
                settings.queue.clone(),
                metrics.clone(),
                stop,
            )),
        })
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Queue::Memory(_) => "embedded",
            Queue::Rabbit(_) => "rabbitmq",
        }
    }

    /// Queues a notification durably on its app's work queue (see the module docs for what
    /// `Ok` promises).
    pub async fn publish(&self, n: &QueuedNotification) -> Result<(), QueueError> {
        match self {
            Queue::Memory(q) => q.publish(&n.app, n.to_json()),
            Queue::Rabbit(q) => q.publish(n).await,
        }
    }

    /// Queues `n` to be delivered after `delay` (a retry), back on its app's work queue.
    /// Safe once `Ok`, like `publish`.
    pub async fn publish_retry(
        &self,
        n: &QueuedNotification,
        delay: Duration,
    ) -> Result<(), QueueError> {
        match self {
            Queue::Memory(q) => {
                q.schedule_retry(&n.app, n.to_json(), delay);
                Ok(())
            }
            Queue::Rabbit(q) => q.publish_retry(n, delay).await,
        }
    }

    /// Parks `body` in the dead-letter queue with `reason`. Safe once `Ok`.
    pub async fn publish_dead(&self, body: Vec<u8>, reason: &str) -> Result<(), QueueError> {
        match self {
            Queue::Memory(q) => {
                q.park_dead(body, reason);
                Ok(())
            }
            Queue::Rabbit(q) => q.publish_dead(body, reason).await,
        }
    }

    /// Publishes an outcome event to the `{prefix}.events` topic exchange (RabbitMQ only;
    /// the embedded backend has no event bus and returns `Ok` without doing anything).
    pub async fn publish_event(&self, routing_key: &str, body: Vec<u8>) -> Result<(), QueueError> {
        match self {
            Queue::Memory(_) => Ok(()),
            Queue::Rabbit(q) => q.publish_event(routing_key, body).await,
        }
    }

    /// Starts a consumer of the dead letters, or of every app's work (for tools and tests
    /// that inspect what was queued; the dispatcher consumes per app, [`Queue::consume_app`]).
    pub fn consume(&self, kind: QueueKind) -> Consumer {
        match self {
            Queue::Memory(q) => Consumer::Memory(q.consume(kind)),
            Queue::Rabbit(q) => Consumer::Rabbit(Box::new(q.consume(kind))),
        }
    }

    /// Starts a consumer of one app's work queue, with its own prefetch (RabbitMQ) so the
    /// messages it holds are that app's budget alone: `queue.prefetch + headroom`, the
    /// headroom being room for messages the dispatcher holds off its active budget
    /// (dispatch/slot.rs). The embedded queue has no prefetch: its consumer takes a
    /// message only when asked.
    pub fn consume_app(&self, app: &AppId, headroom: usize) -> Consumer {
        match self {
            Queue::Memory(q) => Consumer::Memory(q.consume_app(app)),
            Queue::Rabbit(q) => Consumer::Rabbit(Box::new(q.consume_app(app, headroom))),
        }
    }

    /// The apps with their own work queue, `default` first: the ones in config.
    pub fn apps(&self) -> Vec<AppId> {
        match self {
            Queue::Memory(q) => q.apps().to_vec(),
            Queue::Rabbit(q) => q.topology().apps.iter().map(|a| a.app.clone()).collect(),
        }
    }

    /// True while publishes can succeed: always for the embedded queue, while connected
    /// for RabbitMQ.
    pub fn is_connected(&self) -> bool {
        match self {
            Queue::Memory(_) => true,
            Queue::Rabbit(q) => q.is_connected(),
        }
    }

    /// True while an API process waits for a dispatcher to declare the work exchange
    /// (RabbitMQ only).
    pub fn awaiting_topology(&self) -> bool {
        match self {
            Queue::Memory(_) => false,
            Queue::Rabbit(q) => q.awaiting_topology(),
        }
    }

    /// Waits until connected (or the timeout passes); true if connected.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        match self {
            Queue::Memory(_) => true,
            Queue::Rabbit(q) => q.wait_connected(timeout).await,
        }
    }

    /// Closes the backend: consumers end, further publishes fail.
    pub async fn close(&self) {
        match self {
            Queue::Memory(q) => q.close(),
            Queue::Rabbit(q) => q.close().await,
        }
    }
}

/// A stream of deliveries from one queue. The RabbitMQ consumer is boxed: it is much
/// larger than the in-memory one and there are only a few consumers per process.
pub enum Consumer {
    Memory(memory::MemoryConsumer),
    Rabbit(Box<rabbitmq::RabbitConsumer>),
}

impl Consumer {
    /// The next delivery; `None` once the queue is closed. On RabbitMQ this rides out broker
    /// reconnections: it resumes consuming on the new connection.
    pub async fn next(&mut self) -> Option<Delivery> {
        match self {
            Consumer::Memory(c) => c.next().await,
            Consumer::Rabbit(c) => c.next().await,
        }
    }
}

/// One message handed to a consumer, to be settled exactly once.
pub struct Delivery {
    /// The message body as queued (JSON of a [`QueuedNotification`]).
    pub body: Vec<u8>,
    /// True if this message was handed out before and not settled.
    pub redelivered: bool,
    /// For a dead letter: why it was dead-lettered.
    pub dead_reason: Option<String>,
    handle: DeliveryHandle,
}

enum DeliveryHandle {
    Memory(memory::MemoryHandle),
    Rabbit(rabbitmq::RabbitHandle),
}

impl Delivery {
    pub fn notification(&self) -> Result<QueuedNotification, serde_json::Error> {
        QueuedNotification::from_json(&self.body)
    }

    /// Done: remove the message from the queue.
    pub async fn ack(self) -> Result<(), QueueError> {
        match self.handle {
            DeliveryHandle::Memory(h) => {
                h.ack();
                Ok(())
            }
            DeliveryHandle::Rabbit(h) => h.ack().await,
        }
    }

    /// Re-queue `next` (the updated notification: remaining targets, attempt count) to be
    /// delivered again after `delay`, then ack this delivery.
    pub async fn retry(
        self,
        next: &QueuedNotification,
        delay: Duration,
    ) -> Result<(), SettleError> {
        let published = self.queue().publish_retry(next, delay).await;
        self.ack_after(published).await
    }

    /// Park `body` in the dead-letter queue with `reason`, then ack this delivery.
    pub async fn dead_letter(self, body: Vec<u8>, reason: &str) -> Result<(), SettleError> {
        let published = self.queue().publish_dead(body, reason).await;
        self.ack_after(published).await
    }

    /// Acks once the copy is safe; a copy that is not leaves this delivery unsettled
    /// (dropped here, so it is redelivered).
    async fn ack_after(self, published: Result<(), QueueError>) -> Result<(), SettleError> {
        published.map_err(SettleError::Publish)?;
        self.ack().await.map_err(SettleError::Ack)
    }

    /// The queue this delivery came from, to publish its follow-up copies before acking.
    pub fn queue(&self) -> Queue {
        match &self.handle {
            DeliveryHandle::Memory(h) => Queue::Memory(h.queue()),
            DeliveryHandle::Rabbit(h) => Queue::Rabbit(h.queue()),
        }
    }

    /// Give the message back now, for another consumer (used when shutting down).
    pub async fn requeue(self) -> Result<(), QueueError> {
        match self.handle {
            DeliveryHandle::Memory(h) => {
                h.requeue();
                Ok(())
            }
            DeliveryHandle::Rabbit(h) => h.requeue().await,
        }
    }
}

/// Exponential backoff with "equal jitter": a random delay in `[cap/2, cap]` where
/// `cap = min(max, min·2^attempt)`. The jitter spreads many herald nodes reconnecting to a
/// restarted broker; the floor keeps one node from hammering it with near-zero delays.
pub fn backoff_with_jitter(attempt: u32, min: Duration, max: Duration) -> Duration {
    let cap = min
        .saturating_mul(2u32.saturating_pow(attempt.min(30)))
        .min(max);
    let millis = cap.as_millis().max(1) as u64;
    Duration::from_millis(rand::random_range(millis / 2..=millis))
}
