//! Outcome events: what happened to each target, out to the callers' systems.
//!
//! Each final outcome (delivered live/apns/fcm, token dead, expired, dead-lettered, and the
//! offline inbox's stored, replayed, dropped) and each replaced session becomes one JSON
//! [`Event`] (documented in docs/events.md), published to the `{prefix}.events`
//! topic exchange on RabbitMQ (routing key `<app>.<type>.<channel>`, e.g.
//! `shop.token_dead.apns`; a message is a JSON array of up to `RABBIT_BATCH` events with
//! its key) and, when the app's `events.webhook_url` is set, POSTed to it in
//! batches on either backend: each app's events to its own webhook only, each POST signed
//! the Standard Webhooks way with that app's key ([`Webhook`], docs/events.md "Verifying").
//!
//! Emitting never blocks a delivery: events go through a bounded buffer and are dropped
//! (and counted) when it is full. Events report on deliveries; they must not hold them up.
//!
//! The dispatcher emits the delivery outcomes; the gateway emits `replayed` (an inbox entry
//! acked by its device) and `session_replaced` (a newer session of a device closed its
//! older one). A process with either role starts one [`Events`] and both roles share it.
//!
//! At shutdown both sinks stop on their node of the shutdown tree (`events`), which the
//! drain cancels only after the dispatcher and the gateway have finished: each sink then
//! sends what its buffer still holds, the RabbitMQ sink waits for its publishes' confirms,
//! and [`Events::flushed`] resolves when both are done (within the grace period).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AppConfig, EventsSettings, Secret};
use crate::domain::{AppId, DeviceId, DeviceKey, NotificationId, QueuedNotification};
use crate::metrics::Metrics;
use crate::queue::Queue;
use crate::queue::backoff_with_jitter;
use crate::queue::reconnect::Backoff;

/// RabbitMQ event messages awaiting their confirms at once. Few on purpose: while they
/// are out, new events gather in the sink's buffer and leave together in the next
/// messages, so under load one broker message carries many events (a persistent,
/// confirmed message per event cost the fallback path 12 µs of herald and 9 µs of broker
/// CPU per send, docs/benchmarks.md). 8 × `RABBIT_BATCH` events per confirm round trip
/// is far above any dispatcher's rate.
const RABBIT_IN_FLIGHT: usize = 8;

/// How long the RabbitMQ sink waits for more events to fill a message once it holds one.
/// The broker's cost is per message, not per event: without it, events trickling in at
/// 10k/s left in messages of one to three (each confirm comes back in ~0.2 ms), and the
/// broker spent 20 µs per send on them. 10 ms is nothing to a consumer of delivery
/// reports (the webhook waits up to `events.webhook_flush`, 1 s).
const RABBIT_LINGER: Duration = Duration::from_millis(10);

/// Events in one RabbitMQ message at most, all with the message's routing key (a JSON
/// array, like a webhook batch; ~30 KB at most with typical ids and tokens).
const RABBIT_BATCH: usize = 100;

/// TCP + TLS connect deadline of a webhook POST, apart from `events.webhook_timeout`: a
/// receiver that does not even accept connections fails fast into the backoff.
const WEBHOOK_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// No session and no working provider route: kept in the device's offline inbox, sent
    /// right after its next `hello` (within the ttl).
    Stored,
    /// Dropped from a device's inbox for a newer one (past `inbox.max_per_device` or
    /// `inbox.max_bytes_per_device`): never delivered.
    InboxOverflow,
    /// Dropped from a device's inbox because a newer notification with the same
    /// `collapse_key` took its place (`reason` names it): never delivered.
    Replaced,
    /// An offline-inbox entry sent by the gateway's replay after `hello` and acked by the
    /// device (channel `live`): the inbox's `delivered`. Emitted by the gateway.
    Replayed,
    /// A newer session of a device closed its older one (4001 "replaced"), on this node or
    /// across nodes: both sessions' ids and peer addresses, no notification. Emitted by the
    /// gateway that closed the older session.
    SessionReplaced,
}

impl EventKind {
    fn as_str(self) -> &'static str {
        match self {
            EventKind::Delivered => "delivered",
            EventKind::TokenDead => "token_dead",
            EventKind::Expired => "expired",
            EventKind::DeadLettered => "dead_lettered",
            EventKind::Stored => "stored",
            EventKind::InboxOverflow => "inbox_overflow",
            EventKind::Replaced => "replaced",
            EventKind::Replayed => "replayed",
            EventKind::SessionReplaced => "session_replaced",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// The notification's (or the session's) app.
    pub app: AppId,
    /// Absent on events about a session rather than a notification (`session_replaced`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notification_id: Option<String>,
    pub device_id: String,
    /// live, apns or fcm; absent when no channel was tried (expired).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<&'static str>,
    /// The provider token, on token_dead only: the caller needs it to delete the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Delivery attempts made, counting this one. Absent (0) where it is not known: an
    /// inbox entry reaped or dropped after it left the queue.
    #[serde(skip_serializing_if = "is_zero")]
    pub attempt: u32,
    /// `session_replaced` only: the closed session and the one that took its place.
    #[serde(flatten)]
    pub sessions: Option<Replacement>,
    /// RFC 3339, UTC, milliseconds.
    pub at: String,
}

/// The two sessions of a `session_replaced` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Replacement {
    /// The session closed with 4001.
    pub old_session: SessionInfo,
    /// The session that replaced it.
    pub new_session: SessionInfo,
}

/// One device session as the gateway saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionInfo {
    /// The `session_id` its `hello` carried (a UUIDv7).
    pub id: String,
    /// The device's address, `ip:port` of the TCP peer, or only `ip` when it came from
    /// `X-Forwarded-For` (a trusted proxy's hop: the device's port is not known). Absent
    /// when the node that holds the session did not say (a node from before this field).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

impl Event {
    pub fn new(kind: EventKind, n: &QueuedNotification, device: &DeviceId) -> Event {
        Event {
            kind,
            app: n.app.clone(),
            notification_id: Some(n.id.to_string()),
            device_id: device.to_string(),
            channel: None,
            token: None,
            reason: None,
            attempt: n.attempt + 1,
            sessions: None,
            at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        }
    }

    /// An event about notification `id` for `device` where only the ids are at hand (the
    /// offline inbox: its entries hold the frame, not the queued message). `app` is the
    /// inbox key's app, written from an [`AppId`]; one that no longer parses is `default`.
    pub fn about(
        kind: EventKind,
        app: &str,
        id: NotificationId,
        device: &str,
        attempt: u32,
    ) -> Event {
        Event {
            kind,
            app: AppId::parse(app).unwrap_or_default(),
            notification_id: Some(id.to_string()),
            device_id: device.to_owned(),
            channel: None,
            token: None,
            reason: None,
            attempt,
            sessions: None,
            at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        }
    }

    /// `session_replaced`: `device`'s session `old` was closed for `new`.
    pub fn session_replaced(device: &DeviceKey, old: SessionInfo, new: SessionInfo) -> Event {
        Event {
            kind: EventKind::SessionReplaced,
            app: device.app.clone(),
            notification_id: None,
            device_id: device.device.to_string(),
            channel: None,
            token: None,
            reason: None,
            attempt: 0,
            sessions: Some(Replacement {
                old_session: old,
                new_session: new,
            }),
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

fn is_zero(n: &u32) -> bool {
    *n == 0
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
            // Settings::apps refuses a URL without a key; checked again here because
            // `Events::start` is public and a sink that cannot sign must not exist.
            let key = app.webhook_key.clone().with_context(|| {
                format!(
                    "{}events.webhook_url is set but {}events.webhook_secret is not",
                    app.key_prefix, app.key_prefix
                )
            })?;
            let hook = Webhook::new(&app.webhook_url, key, settings)?;
            let (tx, rx) = mpsc::channel(settings.buffer);
            tasks.spawn(hook.run(rx, metrics.clone(), stop.clone()));
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
            let why = match sink.tx.try_send(event.clone()) {
                Ok(()) => continue,
                Err(mpsc::error::TrySendError::Full(_)) => "buffer_full",
                // The sink has stopped (the drain is over): only an event emitted after
                // the grace period ran out gets here.
                Err(mpsc::error::TrySendError::Closed(_)) => "stopped",
            };
            self.metrics
                .events_dropped
                .with_label_values(&[sink.name, why])
                .inc();
        }
    }
}

/// Publishes events to the events exchange: each message a JSON array of up to
/// `RABBIT_BATCH` events with the same routing key, `RABBIT_IN_FLIGHT` messages awaiting
/// their confirms at once. It waits for a free slot before taking events, then takes every
/// event already waiting and what arrives within `RABBIT_LINGER` while the message has
/// room: an event waits 10 ms at most, and the broker sees one message per hundred events
/// under load instead of one per event. Once `stop` is cancelled it publishes what the
/// buffer still holds and returns; its publishes are on `tasks`, so [`Events::flushed`]
/// waits for their confirms too.
async fn rabbit_sink(
    mut rx: mpsc::Receiver<Event>,
    queue: Queue,
    metrics: Metrics,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(RABBIT_IN_FLIGHT));
    let mut taken = Vec::with_capacity(RABBIT_BATCH);
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = tokio::select! {
            e = rx.recv() => e,
            _ = stop.cancelled() => rx.try_recv().ok(),
        };
        let Some(first) = first else { return };
        taken.push(first);
        // Whatever is waiting, then more for up to `RABBIT_LINGER` while the batch has
        // room (not once stopping: then what the buffer holds goes at once).
        let linger = tokio::time::sleep(RABBIT_LINGER);
        tokio::pin!(linger);
        while taken.len() < RABBIT_BATCH {
            match rx.try_recv() {
                Ok(e) => {
                    taken.push(e);
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) if stop.is_cancelled() => break,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            tokio::select! {
                e = rx.recv() => match e {
                    Some(e) => taken.push(e),
                    None => break,
                },
                _ = &mut linger => break,
                _ = stop.cancelled() => {}
            }
        }
        // One slot per message: the one in hand for the first routing key, a new one for
        // each other key among the events taken.
        let mut held = Some(permit);
        for group in by_routing_key(taken.drain(..)) {
            let permit = match held.take() {
                Some(p) => p,
                None => match slots.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let (queue, metrics) = (queue.clone(), metrics.clone());
            tasks.spawn(async move {
                publish_batch(&queue, &metrics, &group).await;
                drop(permit);
            });
        }
    }
}

/// One message of `events` (all with the same routing key), counted when confirmed.
async fn publish_batch(queue: &Queue, metrics: &Metrics, events: &[Event]) {
    let n = events.len() as u64;
    let body = serde_json::to_vec(events).expect("events serialize");
    match queue.publish_event(&events[0].routing_key(), body).await {
        Ok(()) => metrics
            .events_published
            .with_label_values(&["rabbitmq"])
            .inc_by(n),
        Err(e) => {
            tracing::warn!(
                error = %e,
                kind = events[0].kind.as_str(),
                events = n,
                "events not published"
            );
            metrics
                .events_dropped
                .with_label_values(&["rabbitmq", "failed"])
                .inc_by(n);
        }
    }
}

/// `events` split by routing key (app, type, channel), each group in arrival order and the
/// groups in the order of their first event. Linear in groups: a batch holds a handful of
/// keys at most.
fn by_routing_key(events: impl Iterator<Item = Event>) -> Vec<Vec<Event>> {
    let mut groups: Vec<Vec<Event>> = Vec::new();
    for e in events {
        let same = |g: &&mut Vec<Event>| {
            let head = &g[0];
            head.kind == e.kind && head.channel == e.channel && head.app == e.app
        };
        match groups.iter_mut().find(same) {
            Some(g) => g.push(e),
            None => groups.push(vec![e]),
        }
    }
    groups
}

pub use crate::checks::{SigningKey, check_webhook_url, read_ca_file};

/// One webhook endpoint: its URL, the key that signs for it, and a client of its own
/// (redirects off, `events.ca_file` trusted). Everything per endpoint lives here, so each
/// app of a multi-app install can have one with its own URL and key.
pub struct Webhook {
    /// Never logged: it may hold a credential. reqwest errors are logged `without_url()`.
    url: reqwest::Url,
    key: SigningKey,
    client: reqwest::Client,
    batch: usize,
    flush: Duration,
    attempts: u32,
    backoff: Backoff,
    retry_after_max: Duration,
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Webhook([redacted url])")
    }
}

/// What one failed attempt says about the next.
enum Failure {
    /// Retry after the backoff.
    Retry,
    /// The receiver asked (429/503 with Retry-After) not to be retried before this.
    RetryAfter(Duration),
}

impl Webhook {
    /// A webhook to `url`, signed with `key`; batching, retry and TLS settings from
    /// `settings` (URL and key are arguments, not read from it, so a caller with several
    /// endpoints shares the rest).
    pub fn new(
        url: &Secret,
        key: SigningKey,
        settings: &EventsSettings,
    ) -> anyhow::Result<Webhook> {
        let url = check_webhook_url(url.expose())
            .map_err(|e| anyhow::anyhow!("events.webhook_url: {e}"))?;
        let mut builder = reqwest::Client::builder()
            .timeout(settings.webhook_timeout)
            .connect_timeout(WEBHOOK_CONNECT_TIMEOUT.min(settings.webhook_timeout))
            // A redirect is not followed (Standard Webhooks: 3xx is a failure; update the
            // URL instead): following it would send the events and their signature to a
            // host the operator never configured, and turn a POST into a GET on 301/302.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")));
        if !settings.ca_file.is_empty() {
            let certs = read_ca_file(&settings.ca_file)
                .map_err(|e| anyhow::anyhow!("events.ca_file: {e}"))?;
            // Added to the platform's roots, not instead of them.
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder
            .build()
            .context("building the webhook HTTP client (check events.ca_file)")?;
        Ok(Webhook {
            url,
            key,
            client,
            batch: settings.webhook_batch,
            flush: settings.webhook_flush,
            attempts: settings.webhook_attempts,
            backoff: Backoff {
                min: settings.webhook_backoff_min,
                max: settings.webhook_backoff_max,
            },
            retry_after_max: settings.webhook_retry_after_max,
        })
    }

    /// The sink loop: batches events from `rx` and POSTs them. Once `stop` is cancelled it
    /// sends what the buffer still holds and returns.
    pub async fn run(
        self,
        mut rx: mpsc::Receiver<Event>,
        metrics: Metrics,
        stop: CancellationToken,
    ) {
        loop {
            // Wait for the first event of a batch, then fill it for at most `flush`. Once
            // stopped, only what the buffer still holds: the dispatcher has finished, so
            // nothing more is coming.
            let first = tokio::select! {
                e = rx.recv() => e,
                _ = stop.cancelled() => rx.try_recv().ok(),
            };
            let Some(first) = first else { return };
            let mut batch = vec![first];
            let flush_at = tokio::time::Instant::now() + self.flush;
            while batch.len() < self.batch {
                match tokio::time::timeout_at(flush_at, rx.recv()).await {
                    Ok(Some(e)) => batch.push(e),
                    Ok(None) | Err(_) => break,
                }
            }
            self.post_batch(&metrics, &batch).await;
        }
    }

    /// POSTs one batch, retrying with jittered exponential backoff (and never before a
    /// Retry-After); a batch that keeps failing is dropped and counted, so a dead webhook
    /// cannot grow memory without bound.
    async fn post_batch(&self, metrics: &Metrics, batch: &[Event]) {
        // One body and one id for every attempt: the receiver dedupes on webhook-id
        // (Standard Webhooks: the id stays, the timestamp is the attempt's).
        let body = bytes::Bytes::from(serde_json::to_vec(batch).expect("events serialize"));
        let id = format!("msg_{}", uuid::Uuid::now_v7().simple());
        for attempt in 1..=self.attempts {
            let failure = match self.post(&id, &body, attempt).await {
                Ok(()) => {
                    metrics
                        .events_published
                        .with_label_values(&["webhook"])
                        .inc_by(batch.len() as u64);
                    return;
                }
                Err(f) => f,
            };
            if attempt == self.attempts {
                break;
            }
            let backoff = backoff_with_jitter(attempt, self.backoff.min, self.backoff.max);
            let delay = match failure {
                Failure::Retry => backoff,
                Failure::RetryAfter(wait) if wait > self.retry_after_max => {
                    tracing::warn!(
                        retry_after = ?wait,
                        limit = ?self.retry_after_max,
                        "event webhook asked to wait longer than events.webhook_retry_after_max; batch dropped"
                    );
                    break;
                }
                Failure::RetryAfter(wait) => wait.max(backoff),
            };
            tokio::time::sleep(delay).await;
        }
        metrics
            .events_dropped
            .with_label_values(&["webhook", "failed"])
            .inc_by(batch.len() as u64);
    }

    /// One signed attempt.
    async fn post(&self, id: &str, body: &bytes::Bytes, attempt: u32) -> Result<(), Failure> {
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let res = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp)
            .header("webhook-signature", self.key.sign(id, timestamp, body))
            .body(body.clone())
            .send()
            .await;
        let res = match res {
            Ok(r) => r,
            Err(e) => {
                // reqwest's message names the URL, which may hold a credential.
                tracing::warn!(error = %e.without_url(), attempt, "event webhook unreachable");
                return Err(Failure::Retry);
            }
        };
        let status = res.status();
        if status.is_success() {
            return Ok(());
        }
        if status.is_redirection() {
            tracing::warn!(%status, attempt, "event webhook answered a redirect, which is not followed; point events.webhook_url at the final URL");
            return Err(Failure::Retry);
        }
        let wait = matches!(status.as_u16(), 429 | 503)
            .then(|| retry_after(res.headers()))
            .flatten();
        tracing::warn!(%status, attempt, retry_after = ?wait, "event webhook refused a batch");
        Err(wait.map_or(Failure::Retry, Failure::RetryAfter))
    }
}

/// `Retry-After` as delay-seconds or an HTTP date (RFC 9110 §10.2.3). The providers parse
/// it the same way (src/providers/transport.rs, private to that module).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(e: &Event) -> serde_json::Value {
        let mut v = serde_json::to_value(e).unwrap();
        v.as_object_mut().unwrap().remove("at");
        v
    }

    /// A RabbitMQ message holds one routing key's events, in the order they came; the
    /// messages go in the order of each key's first event.
    #[test]
    fn a_batch_splits_by_routing_key_keeping_each_keys_order() {
        let id = NotificationId::generate();
        let ev = |app: &str, kind, channel, device: &str| {
            let e = Event::about(kind, app, id, device, 1);
            match channel {
                Some(ch) => e.channel(ch),
                None => e,
            }
        };
        use EventKind::{Delivered, Expired};
        let events = vec![
            ev("shop", Delivered, Some("apns"), "a"),
            ev("shop", Delivered, Some("live"), "b"),
            ev("shop", Delivered, Some("apns"), "c"),
            ev("default", Delivered, Some("apns"), "d"),
            ev("shop", Expired, None, "e"),
            ev("shop", Delivered, Some("apns"), "f"),
            ev("shop", Expired, None, "g"),
        ];
        let groups: Vec<(String, Vec<String>)> = by_routing_key(events.into_iter())
            .into_iter()
            .map(|g| {
                let key = g[0].routing_key();
                assert!(
                    g.iter().all(|e| e.routing_key() == key),
                    "one key per group"
                );
                (key, g.into_iter().map(|e| e.device_id).collect())
            })
            .collect();
        let want =
            |k: &str, ds: &[&str]| (k.to_owned(), ds.iter().map(|d| d.to_string()).collect());
        assert_eq!(
            groups,
            vec![
                want("shop.delivered.apns", &["a", "c", "f"]),
                want("shop.delivered.live", &["b"]),
                want("default.delivered.apns", &["d"]),
                want("shop.expired", &["e", "g"]),
            ]
        );
    }

    /// The gateway's two events, as subscribers match them: fields and routing keys.
    #[test]
    fn gateway_events_have_their_documented_shape() {
        let device = DeviceKey::parse_routing_key("shop/phone-42").unwrap();
        let (old, new) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let replaced = Event::session_replaced(
            &device,
            SessionInfo {
                id: old.to_string(),
                peer: Some("203.0.113.7:51234".into()),
            },
            SessionInfo {
                id: new.to_string(),
                peer: None,
            },
        );
        assert_eq!(replaced.routing_key(), "shop.session_replaced");
        assert_eq!(
            json(&replaced),
            serde_json::json!({
                "type": "session_replaced", "app": "shop", "device_id": "phone-42",
                "old_session": {"id": old.to_string(), "peer": "203.0.113.7:51234"},
                "new_session": {"id": new.to_string()},
            })
        );
        let id = NotificationId::generate();
        let replayed = Event::about(EventKind::Replayed, "shop", id, "web-7", 0).channel("live");
        assert_eq!(replayed.routing_key(), "shop.replayed.live");
        assert_eq!(
            json(&replayed),
            serde_json::json!({
                "type": "replayed", "app": "shop", "notification_id": id.to_string(),
                "device_id": "web-7", "channel": "live",
            })
        );
    }
}
