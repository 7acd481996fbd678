//! Outcome events: what happened to each target, out to the callers' systems.
//!
//! Each final outcome (delivered live/apns/fcm, token dead, expired, dead-lettered) becomes
//! one JSON [`Event`] (documented in docs/events.md), published to the `{prefix}.events`
//! topic exchange on RabbitMQ (routing key `<app>.<type>.<channel>`, e.g.
//! `shop.token_dead.apns`) and, when the app's `events.webhook_url` is set, POSTed to it in
//! batches on either backend: each app's events to its own webhook only.
//!
//! Emitting never blocks a delivery: events go through a bounded buffer and are dropped
//! (and counted) when it is full. Events report on deliveries; they must not hold them up.
//!
//! At shutdown both sinks stop on their node of the shutdown tree (`events`), which the
//! drain cancels only after the dispatcher has finished: each sink then sends what its
//! buffer still holds, the RabbitMQ sink waits for its publishes' confirms, and
//! [`Events::flushed`] resolves when both are done (within the grace period).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AppConfig, EventsSettings};
use crate::domain::{AppId, DeviceId, QueuedNotification};
use crate::metrics::Metrics;
use crate::queue::Queue;

/// RabbitMQ event publishes awaiting their confirms at once.
const RABBIT_IN_FLIGHT: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The target got it: acked live, or accepted by APNs/FCM.
    Delivered,
    /// APNs/FCM said the token will never work again: delete it.
    TokenDead,
    /// The notification's ttl passed before delivery; it was dropped, not sent late.
    Expired,
    /// Retries exhausted or a configuration error: parked in the dead-letter queue.
    DeadLettered,
}

impl EventKind {
    fn as_str(self) -> &'static str {
        match self {
            EventKind::Delivered => "delivered",
            EventKind::TokenDead => "token_dead",
            EventKind::Expired => "expired",
            EventKind::DeadLettered => "dead_lettered",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// The notification's app.
    pub app: AppId,
    pub notification_id: String,
    pub device_id: String,
    /// live, apns or fcm; absent when no channel was tried (expired).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<&'static str>,
    /// The provider token, on token_dead only: the caller needs it to delete the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Delivery attempts made, counting this one.
    pub attempt: u32,
    /// RFC 3339, UTC, milliseconds.
    pub at: String,
}

impl Event {
    pub fn new(kind: EventKind, n: &QueuedNotification, device: &DeviceId) -> Event {
        Event {
            kind,
            app: n.app.clone(),
            notification_id: n.id.to_string(),
            device_id: device.to_string(),
            channel: None,
            token: None,
            reason: None,
            attempt: n.attempt + 1,
            at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        }
    }

    pub fn channel(mut self, channel: &'static str) -> Event {
        self.channel = Some(channel);
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Event {
        self.reason = Some(reason.into());
        self
    }

    pub fn token(mut self, token: impl Into<String>) -> Event {
        self.token = Some(token.into());
        self
    }

    /// `<app>.<type>` or `<app>.<type>.<channel>`: subscribers bind e.g. `shop.#` (one
    /// app), `*.token_dead.*` (every app's dead tokens) or `#`. App names cannot hold a `.`,
    /// so the words never shift.
    pub fn routing_key(&self) -> String {
        match self.channel {
            Some(ch) => format!("{}.{}.{ch}", self.app, self.kind.as_str()),
            None => format!("{}.{}", self.app, self.kind.as_str()),
        }
    }
}

/// Where events go. Cheap to clone.
#[derive(Clone)]
pub struct Events {
    sinks: Arc<Vec<Sink>>,
    metrics: Metrics,
    /// The sink tasks and their publishes in flight.
    tasks: TaskTracker,
}

/// One sink's buffer: RabbitMQ takes every app's events (the routing key names the app),
/// a webhook only its own app's.
struct Sink {
    name: &'static str,
    /// `None`: every app's events.
    app: Option<AppId>,
    tx: mpsc::Sender<Event>,
}

impl Events {
    /// Starts the sink tasks: RabbitMQ when the queue is RabbitMQ, and one webhook per app
    /// that configures one (`events.webhook_url` for `default`, `[apps.<name>.events]` for
    /// the others), each with its own buffer, so one app's slow webhook cannot drop another
    /// app's events. All stop when `stop` is cancelled, after sending what they hold.
    pub fn start(
        settings: &EventsSettings,
        apps: &[AppConfig],
        queue: &Queue,
        metrics: &Metrics,
        stop: &CancellationToken,
    ) -> anyhow::Result<Events> {
        let tasks = TaskTracker::new();
        let mut sinks = Vec::new();
        if matches!(queue, Queue::Rabbit(_)) {
            let (tx, rx) = mpsc::channel(settings.buffer);
            tasks.spawn(rabbit_sink(
                rx,
                queue.clone(),
                metrics.clone(),
                stop.clone(),
                tasks.clone(),
            ));
            sinks.push(Sink {
                name: "rabbitmq",
                app: None,
                tx,
            });
        }
        for app in apps.iter().filter(|a| !a.webhook_url.is_empty()) {
            let (tx, rx) = mpsc::channel(settings.buffer);
            let client = reqwest::Client::builder()
                .timeout(settings.webhook_timeout)
                .build()?;
            let settings = EventsSettings {
                webhook_url: app.webhook_url.clone(),
                ..settings.clone()
            };
            tasks.spawn(webhook_sink(
                rx,
                client,
                settings,
                metrics.clone(),
                stop.clone(),
            ));
            sinks.push(Sink {
                name: "webhook",
                app: Some(app.id.clone()),
                tx,
            });
        }
        tasks.close();
        Ok(Events {
            sinks: Arc::new(sinks),
            metrics: metrics.clone(),
            tasks,
        })
    }

    /// No sinks: events are only counted in metrics (tests of other parts, embedded
    /// installs with no webhook).
    pub fn none(metrics: &Metrics) -> Events {
        let tasks = TaskTracker::new();
        tasks.close();
        Events {
            sinks: Arc::new(Vec::new()),
            metrics: metrics.clone(),
            tasks,
        }
    }

    /// Resolves once both sinks have stopped (after their `stop` token) and sent what
    /// they held.
    pub async fn flushed(&self) {
        self.tasks.wait().await
    }

    pub fn emit(&self, event: Event) {
        let wanted = self
            .sinks
            .iter()
            .filter(|s| s.app.as_ref().is_none_or(|app| *app == event.app));
        for sink in wanted {
            if sink.tx.try_send(event.clone()).is_err() {
                self.metrics
                    .events_dropped
                    .with_label_values(&[sink.name, "buffer_full"])
                    .inc();
            }
        }
    }
}

/// Publishes each event to the events exchange, `RABBIT_IN_FLIGHT` at once. Once `stop` is
/// cancelled it publishes what the buffer still holds and returns; its publishes are on
/// `tasks`, so [`Events::flushed`] waits for their confirms too.
async fn rabbit_sink(
    mut rx: mpsc::Receiver<Event>,
    queue: Queue,
    metrics: Metrics,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(RABBIT_IN_FLIGHT));
    loop {
        let event = tokio::select! {
            e = rx.recv() => e,
            _ = stop.cancelled() => rx.try_recv().ok(),
        };
        let Some(event) = event else { return };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (queue, metrics) = (queue.clone(), metrics.clone());
        tasks.spawn(async move {
            let body = serde_json::to_vec(&event).expect("events serialize");
            match queue.publish_event(&event.routing_key(), body).await {
                Ok(()) => metrics
                    .events_published
                    .with_label_values(&["rabbitmq"])
                    .inc(),
                Err(e) => {
                    tracing::warn!(error = %e, kind = event.kind.as_str(), "event not published");
                    metrics
                        .events_dropped
                        .with_label_values(&["rabbitmq", "failed"])
                        .inc();
                }
            }
            drop(permit);
        });
    }
}

async fn webhook_sink(
    mut rx: mpsc::Receiver<Event>,
    client: reqwest::Client,
    settings: EventsSettings,
    metrics: Metrics,
    stop: CancellationToken,
) {
    loop {
        // Wait for the first event of a batch, then fill it for at most webhook_flush.
        // Once stopped, only what the buffer still holds: the dispatcher has finished, so
        // nothing more is coming.
        let first = tokio::select! {
            e = rx.recv() => e,
            _ = stop.cancelled() => rx.try_recv().ok(),
        };
        let Some(first) = first else { return };
        let mut batch = vec![first];
        let flush_at = tokio::time::Instant::now() + settings.webhook_flush;
        while batch.len() < settings.webhook_batch {
            match tokio::time::timeout_at(flush_at, rx.recv()).await {
                Ok(Some(e)) => batch.push(e),
                Ok(None) | Err(_) => break,
            }
        }
        post_batch(&client, &settings, &metrics, &batch).await;
    }
}

/// POSTs one batch, retrying with exponential backoff; a batch that keeps failing is
/// dropped and counted, so a dead webhook cannot grow memory without bound.
async fn post_batch(
    client: &reqwest::Client,
    settings: &EventsSettings,
    metrics: &Metrics,
    batch: &[Event],
) {
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=settings.webhook_attempts {
        let res = client.post(&settings.webhook_url).json(batch).send().await;
        match res {
            Ok(r) if r.status().is_success() => {
                metrics
                    .events_published
                    .with_label_values(&["webhook"])
                    .inc_by(batch.len() as u64);
                return;
            }
            Ok(r) => tracing::warn!(status = %r.status(), attempt, "event webhook refused a batch"),
            Err(e) => tracing::warn!(error = %e, attempt, "event webhook unreachable"),
        }
        if attempt < settings.webhook_attempts {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }
    metrics
        .events_dropped
        .with_label_values(&["webhook", "failed"])
        .inc_by(batch.len() as u64);
}
