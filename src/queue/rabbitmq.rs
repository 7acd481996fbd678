//! The RabbitMQ backend: quorum queues, persistent messages, publisher confirms, and a
//! supervisor that reconnects with backoff and re-declares the topology.
//!
//! Topology (names carry `queue.prefix`, default `herald`):
//!
//! ```text
//!  publish ─▶ {p}.work (direct exchange) ──"notify"──▶ {p}.work (quorum queue) ─▶ dispatcher
//!                 ▲                                        │ delivery-limit exceeded
//!                 │ dead-letter after TTL                  ▼
//!  retry ─▶ {p}.retry.<ms>ms (quorum, x-message-ttl)   {p}.dead (exchange) ──▶ {p}.dead (queue)
//! ```
//!
//! That is the `default` app's part, unchanged since before apps existed, so an existing
//! broker upgrades without PRECONDITION_FAILED. Every other configured app `<a>` has the
//! same shape beside it: `{p}.work.<a>` bound to the same work exchange with key
//! `notify.<a>`, and its own tiers `{p}.retry.<a>.<ms>ms` dead-lettering back with key
//! `notify.<a>` (a queue's `x-dead-letter-routing-key`, so a retry returns to its own app's
//! queue). Each app's queue has its own consumer and prefetch in the dispatcher, so one
//! app's backlog or slow deliveries never hold another app's messages. Dead letters share
//! `{p}.dead`. Broker metadata is O(apps × retry tiers), fixed by config.
//!
//! Only a process with the dispatcher role declares this topology ([`TopologyUse`]): the
//! API's broker user may then hold nothing but write on `{p}.work`, and the gateway's
//! nothing on the work topology at all (docs/deploy.md, "Broker users and what each can
//! do"). An API process checks on each connect that the work exchange exists, and waits
//! (not ready) until a dispatcher has declared it.
//!
//! Delays are built from per-delay TTL queues that dead-letter back to the work exchange,
//! because the broker here (Debian's RabbitMQ 3.10, no plugins) has no delayed-message
//! exchange. One queue per distinct delay keeps each queue FIFO-by-expiry: per-message TTLs
//! in one shared queue would stall behind a longer-lived head message.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::SelectAll;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::reconnect::{self, Backoff};
use super::{Delivery, DeliveryHandle, QueueError, QueueKind, backoff_with_jitter};
use crate::config::{QueueSettings, RetrySettings, Secret};
use crate::domain::{AppId, QueuedNotification, unix_millis};
use crate::metrics::Metrics;

/// Routing key of the `default` app's work messages on the work exchange; another app's is
/// `notify.<app>`.
const WORK_ROUTING_KEY: &str = "notify";
/// Routing key of dead letters on the dead exchange.
const DEAD_ROUTING_KEY: &str = "dead";
/// Header carrying why herald dead-lettered a message.
const REASON_HEADER: &str = "x-herald-reason";
/// Redeliveries of one message before the broker itself dead-letters it (a "poison" message
/// that crashes every dispatcher that takes it). High enough that shutdowns and node deaths,
/// which also count as redeliveries, never trip it for healthy work.
const DELIVERY_LIMIT: i64 = 20;
/// How long one connection attempt (TCP + AMQP handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a process does about the work topology each time it connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopologyUse {
    /// Declares all of it (the dispatcher: it consumes the work queue and publishes
    /// retries, dead letters and events, so its broker user holds these rights anyway).
    Declare,
    /// Declares nothing; checks (a passive declare, which needs no permission) that the
    /// work exchange exists, and does not count as connected until it does (the API: it
    /// only publishes to the work exchange).
    ExpectWorkExchange,
    /// Nothing on the work topology (a gateway-only process).
    Nothing,
}

/// One app's work queue, the routing key that reaches it, and its retry tiers.
#[derive(Debug, Clone)]
pub struct AppQueues {
    pub app: AppId,
    /// `notify` for `default` (as before apps), `notify.<app>` for the others.
    pub routing_key: String,
    /// `{prefix}.work` for `default`, `{prefix}.work.<app>` for the others.
    pub work_queue: String,
    /// (delay, queue name), ascending by delay: `{prefix}.retry.<ms>ms` for `default`,
    /// `{prefix}.retry.<app>.<ms>ms` for the others.
    pub retry_queues: Vec<(Duration, String)>,
}

impl AppQueues {
    /// The retry queue for a requested delay: the shortest one at least that long, else
    /// the longest.
    pub fn retry_queue(&self, delay: Duration) -> &str {
        self.retry_queues
            .iter()
            .find(|(d, _)| *d >= delay)
            .or(self.retry_queues.last())
            .map(|(_, q)| q.as_str())
            .expect("at least one retry delay (retry.max_attempts >= 1)")
    }
}

/// Exchange and queue names, and the retry delays, derived from the prefix, the retry
/// config and the apps.
#[derive(Debug, Clone)]
pub struct Topology {
    pub work_exchange: String,
    /// The `default` app's work queue (`apps[0].work_queue`).
    pub work_queue: String,
    pub dead_exchange: String,
    pub dead_queue: String,
    /// Topic exchange for outcome events (`delivered.live`, `token_dead.apns`, …).
    pub events_exchange: String,
    /// The `default` app's retry queues (`apps[0].retry_queues`), ascending by delay.
    pub retry_queues: Vec<(Duration, String)>,
    /// Every app's queues, `default` first.
    pub apps: Vec<AppQueues>,
}

impl Topology {
    /// The topology for `apps` (`default` is always there, first, whether listed or not).
    pub fn new(prefix: &str, retry: &RetrySettings, apps: &[AppId]) -> Self {
        let mut delays: Vec<Duration> = (0..retry.max_attempts)
            .map(|k| {
                retry
                    .base_delay
                    .saturating_mul(2u32.saturating_pow(k.min(30)))
                    .min(retry.max_delay)
            })
            .collect();
        delays.dedup();
        let app_queues = |app: AppId| {
            // App names are [a-z0-9-], so `<prefix>.work.<app>` can never be another
            // app's `<prefix>.retry...` or the default's names.
            let (routing_key, work_queue, retry_prefix) = if app.is_default() {
                (
                    WORK_ROUTING_KEY.to_owned(),
                    format!("{prefix}.work"),
                    format!("{prefix}.retry"),
                )
            } else {
                (
                    format!("{WORK_ROUTING_KEY}.{app}"),
                    format!("{prefix}.work.{app}"),
                    format!("{prefix}.retry.{app}"),
                )
            };
            AppQueues {
                app,
                routing_key,
                work_queue,
                retry_queues: delays
                    .iter()
                    .map(|d| (*d, format!("{retry_prefix}.{}ms", d.as_millis())))
                    .collect(),
            }
        };
        let all: Vec<AppQueues> = std::iter::once(AppId::default_app())
            .chain(apps.iter().filter(|a| !a.is_default()).cloned())
            .map(app_queues)
            .collect();
        Topology {
            work_exchange: format!("{prefix}.work"),
            work_queue: all[0].work_queue.clone(),
            dead_exchange: format!("{prefix}.dead"),
            dead_queue: format!("{prefix}.dead"),
            events_exchange: format!("{prefix}.events"),
            retry_queues: all[0].retry_queues.clone(),
            apps: all,
        }
    }

    /// The queues of `app`; an app not in this topology (a message queued for an app since
    /// removed from config) uses `default`'s, whose dispatcher reports it.
    pub fn app(&self, app: &AppId) -> &AppQueues {
        self.apps
            .iter()
            .find(|a| &a.app == app)
            .unwrap_or(&self.apps[0])
    }

    /// The `default` app's retry queue for a requested delay (see [`AppQueues::retry_queue`]).
    pub fn retry_queue(&self, delay: Duration) -> &str {
        self.apps[0].retry_queue(delay)
    }

    /// Every queue this topology declares, for clean-up in tests and tooling.
    pub fn all_queues(&self) -> Vec<String> {
        let mut qs = vec![self.dead_queue.clone()];
        for app in &self.apps {
            qs.push(app.work_queue.clone());
            qs.extend(app.retry_queues.iter().map(|(_, q)| q.clone()));
        }
        qs
    }

    /// Declares everything, idempotently. A queue that exists with other arguments fails
    /// with PRECONDITION_FAILED, which the supervisor logs (naming the queue) and retries.
    pub async fn declare(&self, ch: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let queue_durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for ex in [&self.work_exchange, &self.dead_exchange] {
            ch.exchange_declare(
                ex.as_str().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
        }
        ch.exchange_declare(
            self.events_exchange.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
        ch.queue_declare(
            self.dead_queue.as_str().into(),
            queue_durable,
            quorum_args(),
        )
        .await?;
        ch.queue_bind(
            self.dead_queue.as_str().into(),
            self.dead_exchange.as_str().into(),
            DEAD_ROUTING_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

        for app in &self.apps {
            declare_app(ch, app, &self.work_exchange, &self.dead_exchange).await?;
        }
        Ok(())
    }
}

/// One app's work queue (bound to the work exchange with the app's routing key) and its
/// retry tiers, each dead-lettering back to the work exchange with that same key. The
/// arguments are the same for every app, and for `default` exactly those it had before
/// apps existed.
async fn declare_app(
    ch: &Channel,
    app: &AppQueues,
    work_exchange: &str,
    dead_exchange: &str,
) -> lapin::Result<()> {
    let queue_durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut work_args = quorum_args();
    dead_letter_to(&mut work_args, dead_exchange, DEAD_ROUTING_KEY);
    work_args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(DELIVERY_LIMIT),
    );
    ch.queue_declare(app.work_queue.as_str().into(), queue_durable, work_args)
        .await?;
    ch.queue_bind(
        app.work_queue.as_str().into(),
        work_exchange.into(),
        app.routing_key.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    for (delay, name) in &app.retry_queues {
        let mut args = quorum_args();
        // Every message waits exactly `delay`, then dead-letters back to its app's queue.
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(delay.as_millis() as i64),
        );
        dead_letter_to(&mut args, work_exchange, &app.routing_key);
        ch.queue_declare(name.as_str().into(), queue_durable, args)
            .await?;
    }
    Ok(())
}

/// Quorum queues: replicated (Raft) and durable; the queue type RabbitMQ recommends for
/// data safety. On a single node they behave the same, so dev and production match.
fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// Broker-side dead-lettering that cannot lose the message: quorum queues' at-least-once
/// strategy (RabbitMQ ≥ 3.10) keeps it in the source queue until the target confirms. That
/// strategy requires the reject-publish overflow mode.
fn dead_letter_to(args: &mut FieldTable, exchange: &str, routing_key: &str) {
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(exchange.into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(routing_key.into()),
    );
    args.insert(
        "x-dead-letter-strategy".into(),
        AMQPValue::LongString("at-least-once".into()),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
}

/// Properties of every message herald publishes.
fn message_properties(message_id: Option<String>) -> BasicProperties {
    let mut p = BasicProperties::default()
        // 2 = persistent: written to disk (quorum queues persist everything anyway, but
        // the flag keeps the intent explicit and survives a queue-type change).
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_app_id("herald".into())
        .with_timestamp(unix_millis(std::time::SystemTime::now()) / 1000);
    if let Some(id) = message_id {
        p = p.with_message_id(id.into());
    }
    p
}

/// One live connection and its confirm-mode publishing channel.
struct Link {
    conn: Connection,
    publish: Channel,
}

pub struct RabbitQueue {
    url: Secret,
    topology: Topology,
    topology_use: TopologyUse,
    /// True while the last connection attempt found the work exchange missing (an API
    /// process started before any dispatcher declared it), for `/readyz`.
    awaiting_topology: AtomicBool,
    settings: QueueSettings,
    metrics: Metrics,
    link: watch::Sender<Option<Arc<Link>>>,
    /// Poked when a publish finds the link broken, so the supervisor reconnects at once
    /// instead of waiting to notice.
    broken: Notify,
    closed: CancellationToken,
}

impl RabbitQueue {
    /// Creates the backend and starts its connection supervisor.
    pub fn start(
        url: Secret,
        topology: Topology,
        topology_use: TopologyUse,
        settings: QueueSettings,
        metrics: Metrics,
        stop: CancellationToken,
    ) -> Arc<Self> {
        metrics.broker_connected.set(0);
        let q = Arc::new(RabbitQueue {
            url,
            topology,
            topology_use,
            awaiting_topology: AtomicBool::new(false),
            settings,
            metrics,
            link: watch::channel(None).0,
            broken: Notify::new(),
            closed: stop,
        });
        tokio::spawn(q.clone().supervise());
        q
    }

    pub fn is_connected(&self) -> bool {
        self.link.borrow().is_some()
    }

    /// True while this (API) process waits for a dispatcher to declare the work exchange:
    /// the broker answers, but there is nothing to publish to yet.
    pub fn awaiting_topology(&self) -> bool {
        self.awaiting_topology.load(Ordering::Relaxed)
    }

    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.current_link())
            .await
            .is_ok_and(|l| l.is_some())
    }

    pub async fn close(&self) {
        self.closed.cancel();
        if let Some(link) = self.link.send_replace(None) {
            let _ = link.conn.close(200, "herald shutting down".into()).await;
        }
        self.metrics.broker_connected.set(0);
    }

    /// The connection supervisor (the shared reconnect loop): connect, declare, publish the
    /// link, wait for it to break, repeat. Runs until `close`.
    async fn supervise(self: Arc<Self>) {
        let backoff = Backoff {
            min: self.settings.reconnect_min,
            max: self.settings.reconnect_max,
        };
        reconnect::supervise(
            "RabbitMQ connection",
            &self.closed,
            backoff,
            |reconnecting| self.connection_round(reconnecting),
        )
        .await
    }

    /// One connection's life: up until it breaks (`Ok`), or an error setting it up.
    async fn connection_round(&self, reconnecting: bool) -> anyhow::Result<()> {
        let link = Arc::new(self.connect().await?);
        if reconnecting {
            self.metrics.broker_reconnects.inc();
        }
        let mut events = link.conn.events_listener();
        self.link.send_replace(Some(link.clone()));
        self.metrics.broker_connected.set(1);
        tracing::info!(queue = %self.topology.work_queue, "connected to RabbitMQ");
        // Wait for the link to break: an error event, a publish that found it broken, a
        // status check (belt and braces), or shutdown (`close` then ends the link).
        let mut check = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                ev = events.next() => match ev {
                    // A channel-level error on another channel of this connection (the
                    // cluster directory's, which sets its own channels up again; e.g. a
                    // gateway waiting for a dispatcher to declare the presence exchange):
                    // the connection and the publishing channel are fine.
                    Some(lapin::Event::Error(e))
                        if e.is_amqp_soft_error() && link.publish.status().connected() =>
                    {
                        tracing::debug!(error = %e, "RabbitMQ channel error");
                    }
                    Some(lapin::Event::Error(e)) => {
                        tracing::warn!(error = %e, "RabbitMQ connection error");
                        break;
                    }
                    Some(lapin::Event::ConnectionBlocked(reason)) => {
                        tracing::warn!(%reason, "RabbitMQ blocked publishing (resource alarm)");
                    }
                    Some(_) => {}
                    None => break,
                },
                // A publish saw an error; the permit may be stale (from the previous
                // link), so believe it only if this link is unhealthy.
                _ = self.broken.notified() => {
                    if !link.conn.status().connected() || !link.publish.status().connected() {
                        break;
                    }
                }
                _ = check.tick() => {
                    if !link.conn.status().connected() || !link.publish.status().connected() {
                        break;
                    }
                }
                _ = self.closed.cancelled() => return Ok(()),
            }
        }
        self.link.send_replace(None);
        self.metrics.broker_connected.set(0);
        let _ = link.conn.close(320, "herald reconnecting".into()).await;
        Ok(())
    }

    async fn connect(&self) -> anyhow::Result<Link> {
        let mut uri: lapin::uri::AMQPUri = self
            .url
            .expose()
            .parse()
            .map_err(|e| anyhow::anyhow!("queue.url: {e}"))?;
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(self.settings.heartbeat_secs);
        }
        // The connection name shows in the broker's management tools and lets operators
        // (and tests) find this process's connections.
        let props = ConnectionProperties::default().with_connection_name(
            format!(
                "herald {} pid {}",
                self.topology.work_queue,
                std::process::id()
            )
            .into(),
        );
        let conn = tokio::time::timeout(
            CONNECT_TIMEOUT,
            super::tls::connect(uri, props, &self.settings.ca_file),
        )
        .await
        .map_err(|_| anyhow::anyhow!("connection timed out after {CONNECT_TIMEOUT:?}"))
        .and_then(|c| c)
        .inspect_err(|_| self.awaiting_topology.store(false, Ordering::Relaxed))?;
        let publish = conn.create_channel().await?;
        match self.topology_use {
            TopologyUse::Declare => {
                if let Err(e) = self.topology.declare(&publish).await {
                    let _ = conn.close(200, "topology declaration failed".into()).await;
                    return Err(anyhow::anyhow!(
                        "declaring exchanges and queues {:?}: {e}",
                        self.topology.all_queues()
                    ));
                }
            }
            TopologyUse::ExpectWorkExchange => {
                let exists = publish
                    .exchange_declare(
                        self.topology.work_exchange.as_str().into(),
                        ExchangeKind::Direct,
                        ExchangeDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await;
                if let Err(e) = exists {
                    self.awaiting_topology.store(true, Ordering::Relaxed);
                    let _ = conn.close(200, "work exchange missing".into()).await;
                    return Err(anyhow::anyhow!(
                        "the work exchange {} is not there yet ({e}); a dispatcher declares it when it connects: start one (same queue.prefix and vhost), this process retries",
                        self.topology.work_exchange
                    ));
                }
            }
            TopologyUse::Nothing => {}
        }
        self.awaiting_topology.store(false, Ordering::Relaxed);
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Link { conn, publish })
    }

    /// A new channel on the current connection, waiting (at most `queue.publish_timeout`)
    /// for one if the broker is away. For the cluster directory, which supervises its own
    /// channels on this process's one connection rather than opening a second connection:
    /// one heartbeat, one entry in the broker's tools, and one cut (`close_all_connections`,
    /// a broker restart) takes both down together, so there is one recovery to reason about.
    pub async fn create_channel(&self) -> Result<Channel, QueueError> {
        let link =
            match tokio::time::timeout(self.settings.publish_timeout, self.current_link()).await {
                Ok(Some(link)) => link,
                Ok(None) => return Err(QueueError::Closed),
                Err(_) => {
                    return Err(QueueError::Unavailable(
                        "not connected to RabbitMQ".to_owned(),
                    ));
                }
            };
        link.conn
            .create_channel()
            .await
            .map_err(|e| QueueError::Unavailable(e.to_string()))
    }

    /// True once `close` was called.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    pub fn settings(&self) -> &QueueSettings {
        &self.settings
    }

    /// The current link, waiting for one if the broker is away.
    async fn current_link(&self) -> Option<Arc<Link>> {
        let mut rx = self.link.subscribe();
        tokio::select! {
            r = rx.wait_for(|l| l.is_some()) => r.ok().and_then(|l| l.clone()),
            _ = self.closed.cancelled() => None,
        }
    }

    /// The queue names this backend declares and consumes.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Publishes to the work exchange with the notification's app's routing key, so it
    /// lands in that app's work queue.
    pub async fn publish(&self, n: &QueuedNotification) -> Result<(), QueueError> {
        self.publish_to(
            &self.topology.work_exchange,
            &self.topology.app(&n.app).routing_key,
            n.to_json(),
            message_properties(Some(n.id.to_string())),
            true,
        )
        .await
    }

    /// Publishes one persistent, mandatory message and waits for the broker's confirm, all
    /// within `queue.publish_timeout`. Confirms are pipelined: many publishes share the
    /// channel and each awaits its own confirm, so throughput is not one round trip per
    /// message.
    async fn publish_to(
        &self,
        exchange: &str,
        routing_key: &str,
        body: Vec<u8>,
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), QueueError> {
        let timeout = self.settings.publish_timeout;
        let deadline = Instant::now() + timeout;
        let link = match tokio::time::timeout_at(deadline, self.current_link()).await {
            Ok(Some(link)) => link,
            Ok(None) => return Err(QueueError::Closed),
            Err(_) => {
                return Err(QueueError::Unavailable(
                    "not connected to RabbitMQ".to_owned(),
                ));
            }
        };
        let confirm = tokio::time::timeout_at(deadline, async {
            link.publish
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    // mandatory: an unroutable message comes back instead of vanishing
                    // (e.g. someone deleted the binding); it is then a failure, not a 202.
                    BasicPublishOptions {
                        mandatory,
                        ..Default::default()
                    },
                    &body,
                    properties,
                )
                .await?
                .await
        })
        .await;
        match confirm {
            Err(_) => Err(QueueError::Timeout(timeout)),
            Ok(Err(e)) => {
                if !link.publish.status().connected() {
                    self.broken.notify_one();
                }
                Err(QueueError::Unavailable(e.to_string()))
            }
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(QueueError::Refused(format!(
                "unroutable: nothing bound to {exchange} with key {routing_key}"
            ))),
            Ok(Ok(Confirmation::Nack(_))) => Err(QueueError::Refused("nacked".to_owned())),
            Ok(Ok(Confirmation::NotRequested)) => Err(QueueError::Refused(
                "channel not in confirm mode".to_owned(),
            )),
        }
    }

    pub async fn publish_retry(
        &self,
        next: &QueuedNotification,
        delay: Duration,
    ) -> Result<(), QueueError> {
        // The default exchange routes by queue name, so retry queues need no bindings. The
        // tier is the notification's app's, so the copy comes back to that app's queue. Only
        // the dispatcher publishes retries, and its broker user needs `amq.default` anyway
        // (deliveries and snapshot requests go to gateways' node queues by name).
        self.publish_to(
            "",
            self.topology.app(&next.app).retry_queue(delay),
            next.to_json(),
            message_properties(Some(next.id.to_string())),
            true,
        )
        .await
    }

    pub async fn publish_dead(&self, body: Vec<u8>, reason: &str) -> Result<(), QueueError> {
        let mut headers = FieldTable::default();
        headers.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
        self.publish_to(
            &self.topology.dead_exchange,
            DEAD_ROUTING_KEY,
            body,
            message_properties(None).with_headers(headers),
            true,
        )
        .await
    }

    /// Events are published without `mandatory`: an events exchange nobody has bound a
    /// queue to yet simply drops them, which is the subscriber's choice, not an error.
    pub async fn publish_event(&self, routing_key: &str, body: Vec<u8>) -> Result<(), QueueError> {
        self.publish_to(
            &self.topology.events_exchange,
            routing_key,
            body,
            message_properties(None),
            false,
        )
        .await
    }

    /// A consumer of the dead letters, or of every app's work queue (one consumer per queue
    /// on one channel, each with the prefetch).
    pub fn consume(self: &Arc<Self>, kind: QueueKind) -> RabbitConsumer {
        self.consumer(
            match kind {
                QueueKind::Work => self
                    .topology
                    .apps
                    .iter()
                    .map(|a| a.work_queue.clone())
                    .collect(),
                QueueKind::Dead => vec![self.topology.dead_queue.clone()],
            },
            0,
        )
    }

    /// A consumer of one app's work queue, on its own channel with its own prefetch:
    /// `queue.prefetch + headroom` (room for messages the dispatcher holds off its active
    /// budget, dispatch/slot.rs; capped at the AMQP 16 bits, which settings validation
    /// keeps the sum within).
    pub fn consume_app(self: &Arc<Self>, app: &AppId, headroom: usize) -> RabbitConsumer {
        self.consumer(vec![self.topology.app(app).work_queue.clone()], headroom)
    }

    fn consumer(self: &Arc<Self>, queues: Vec<String>, headroom: usize) -> RabbitConsumer {
        let prefetch = usize::from(self.settings.prefetch)
            .saturating_add(headroom)
            .min(usize::from(u16::MAX)) as u16;
        RabbitConsumer {
            queue: self.clone(),
            queues,
            prefetch,
            current: None,
        }
    }
}

/// A consumer that survives reconnections: when its channel dies it waits for the
/// supervisor's next link and consumes again.
pub struct RabbitConsumer {
    queue: Arc<RabbitQueue>,
    /// The queues it reads (usually one: an app's work queue, or the dead letters).
    queues: Vec<String>,
    prefetch: u16,
    current: Option<(Channel, SelectAll<lapin::Consumer>)>,
}

impl RabbitConsumer {
    async fn start(&self) -> Result<(Channel, SelectAll<lapin::Consumer>), lapin::Error> {
        let Some(link) = self.queue.current_link().await else {
            return Err(lapin::Error::from(
                lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed),
            ));
        };
        let ch = link.conn.create_channel().await?;
        // Prefetch bounds the unacked messages this consumer holds: its in-flight work, and
        // what another node must wait for if this one dies. Not `global`: the limit is per
        // consumer, so each queue read here has its own.
        ch.basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let mut consumers = Vec::with_capacity(self.queues.len());
        for name in &self.queues {
            consumers.push(
                ch.basic_consume(
                    name.as_str().into(),
                    "".into(),
                    // no_ack false: manual acks, so unacked work returns to the queue if
                    // this node dies.
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?,
            );
        }
        Ok((ch, futures::stream::select_all(consumers)))
    }

    pub async fn next(&mut self) -> Option<Delivery> {
        let mut failures = 0u32;
        loop {
            if self.queue.closed.is_cancelled() {
                self.stop();
                return None;
            }
            if self.current.is_none() {
                match self.start().await {
                    Ok(c) => {
                        self.current = Some(c);
                        self.queue.metrics.consumers_running.inc();
                    }
                    Err(e) => {
                        failures += 1;
                        if !self.queue.closed.is_cancelled() {
                            tracing::warn!(error = %e, "cannot start consumer; retrying");
                        }
                        let delay = backoff_with_jitter(
                            failures,
                            self.queue.settings.reconnect_min,
                            self.queue.settings.reconnect_max,
                        );
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = self.queue.closed.cancelled() => {}
                        }
                        continue;
                    }
                }
            }
            let (_, consumer) = self.current.as_mut().expect("started above");
            let next = tokio::select! {
                n = consumer.next() => n,
                _ = self.queue.closed.cancelled() => continue,
            };
            match next {
                Some(Ok(d)) => {
                    let dead_reason = dead_reason(&d.properties);
                    return Some(Delivery {
                        body: d.data,
                        redelivered: d.redelivered,
                        dead_reason,
                        handle: DeliveryHandle::Rabbit(RabbitHandle {
                            queue: self.queue.clone(),
                            acker: Some(d.acker),
                        }),
                    });
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer stream failed; restarting it");
                    self.stop();
                }
                None => {
                    tracing::warn!("consumer cancelled; restarting it");
                    self.stop();
                }
            }
        }
    }

    fn stop(&mut self) {
        if self.current.take().is_some() {
            self.queue.metrics.consumers_running.dec();
        }
    }
}

impl Drop for RabbitConsumer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Why a dead letter is dead: herald's own header, else the broker's `x-death` reason
/// (e.g. `delivery_limit` for a poison message).
fn dead_reason(p: &BasicProperties) -> Option<String> {
    let headers = p.headers().as_ref()?;
    let inner = headers.inner();
    if let Some(AMQPValue::LongString(s)) = inner.get(&ShortString::from(REASON_HEADER)) {
        return Some(s.to_string());
    }
    if let Some(AMQPValue::FieldArray(deaths)) = inner.get(&ShortString::from("x-death"))
        && let Some(AMQPValue::FieldTable(first)) = deaths.as_slice().first()
        && let Some(AMQPValue::LongString(r)) = first.inner().get(&ShortString::from("reason"))
    {
        return Some(format!("broker: {r}"));
    }
    None
}

/// Settles one broker delivery. Dropped unsettled, it nacks with requeue, mirroring the
/// embedded queue.
pub struct RabbitHandle {
    queue: Arc<RabbitQueue>,
    acker: Option<lapin::Acker>,
}

impl RabbitHandle {
    fn take(mut self) -> lapin::Acker {
        self.acker.take().expect("settled once")
    }

    pub async fn ack(self) -> Result<(), QueueError> {
        self.take()
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| QueueError::Unavailable(e.to_string()))
    }

    pub async fn requeue(self) -> Result<(), QueueError> {
        self.take()
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
            .map(|_| ())
            .map_err(|e| QueueError::Unavailable(e.to_string()))
    }

    pub fn queue(&self) -> Arc<RabbitQueue> {
        self.queue.clone()
    }
}

impl Drop for RabbitHandle {
    fn drop(&mut self) {
        if let Some(acker) = self.acker.take() {
            tokio::spawn(async move {
                let _ = acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    })
                    .await;
            });
        }
    }
}
