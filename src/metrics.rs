//! Every metric herald exports, in one place, registered at start-up.
//!
//! Label sets that are known in advance (channels, outcomes, reasons) are pre-created at
//! zero so dashboards and alerts see a series before the first event, and `rate()` over a
//! counter's first increment is not lost.
//!
//! The metrics a user slices by app (accepted, deliveries, fallbacks, tokens dead, retries,
//! dead letters, active and refused sessions, the offline inbox's writes, replays, acks,
//! drops and pending entries) carry an `app` label. Apps come from the
//! config, so the label set stays bounded: [`Metrics::new`] pre-creates `default`'s series,
//! [`Metrics::register_app`] another app's. Where no app is known yet (an unparseable
//! queued message, a connect with a bad token) the label is empty, which Prometheus shows
//! as no `app` label at all.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets from 1 ms to 30 s: covers an in-process publish, a broker confirm, a live
/// delivery and a slow provider.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The `channel` label values: `dispatch::Channel::as_str` of each channel (a unit test
/// there keeps the two equal; this module depends on nothing of herald's, so it does not
/// name the enum).
pub const CHANNELS: &[&str] = &["live", "apns", "fcm"];
pub const OUTCOMES: &[&str] = &[
    "delivered",
    "token_dead",
    "transient",
    "config_error",
    "expired",
];

/// The `reason` label values of `herald_inbox_dropped_total`.
pub const INBOX_DROP_REASONS: &[&str] = &["overflow", "replaced", "expired"];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub notifications_accepted: IntCounterVec,
    pub targets_accepted: IntCounterVec,
    pub queue_publish_duration: Histogram,
    pub queue_publish_failures: IntCounterVec,
    pub broker_connected: IntGauge,
    pub broker_reconnects: IntCounter,
    pub consumers_running: IntGauge,
    pub queue_depth: IntGauge,
    pub sessions_active: IntGaugeVec,
    pub sessions_opened: IntCounter,
    pub sessions_closed: IntCounterVec,
    pub sessions_refused: IntCounterVec,
    pub ping_rtt: Histogram,
    pub frames: IntCounterVec,
    pub frames_unwritable: IntCounter,
    pub acks: IntCounter,
    pub ack_timeouts: IntCounter,
    pub deliveries: IntCounterVec,
    pub fallbacks: IntCounterVec,
    pub provider_duration: HistogramVec,
    pub retries: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub delivery_latency: HistogramVec,
    pub tokens_dead: IntCounterVec,
    pub events_published: IntCounterVec,
    pub events_dropped: IntCounterVec,
    pub cluster_messages: IntCounterVec,
    pub cluster_nodes: IntGauge,
    pub cluster_devices: IntGauge,
    /// Messages parked by the dispatcher: waiting only for devices' acks, off the active
    /// budget (dispatch/slot.rs).
    pub dispatcher_parked: IntGauge,
    /// Offline inbox (src/inbox/): entries written, replayed, acked after replay, dropped
    /// (overflow / replaced / expired), and the sampled pending rows, by app; store failures
    /// (a database or memory-bound problem, shared by every app) without one.
    pub inbox_writes: IntCounterVec,
    pub inbox_store_failures: IntCounter,
    pub inbox_replayed: IntCounterVec,
    pub inbox_acked: IntCounterVec,
    pub inbox_dropped: IntCounterVec,
    pub inbox_pending: IntGaugeVec,
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

fn histogram_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let m = Metrics {
            http_requests: counter_vec(
                &r,
                "herald_http_requests_total",
                "HTTP requests by route pattern, method and status.",
                &["route", "method", "status"],
            ),
            http_duration: histogram_vec(
                &r,
                "herald_http_request_duration_seconds",
                "HTTP request latency by route pattern.",
                &["route"],
            ),
            notifications_accepted: counter_vec(
                &r,
                "herald_notifications_accepted_total",
                "Notifications durably queued (answered 202), by app.",
                &["app"],
            ),
            targets_accepted: counter_vec(
                &r,
                "herald_notification_targets_accepted_total",
                "Targets in accepted notifications, by app.",
                &["app"],
            ),
            queue_publish_duration: histogram(
                &r,
                "herald_queue_publish_duration_seconds",
                "Time from publish to the queue's confirm.",
                LATENCY_BUCKETS,
            ),
            queue_publish_failures: counter_vec(
                &r,
                "herald_queue_publish_failures_total",
                "Publishes that did not get a confirm, by reason.",
                &["reason"],
            ),
            broker_connected: gauge(
                &r,
                "herald_broker_connected",
                "1 while the queue backend is connected (always 1 for the embedded queue).",
            ),
            broker_reconnects: counter(
                &r,
                "herald_broker_reconnects_total",
                "Successful broker reconnections after a lost connection.",
            ),
            consumers_running: gauge(
                &r,
                "herald_consumers_running",
                "Queue consumers currently running in this process.",
            ),
            queue_depth: gauge(
                &r,
                "herald_queue_depth",
                "Embedded queue: messages held (ready + unacknowledged).",
            ),
            sessions_active: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "herald_gateway_sessions_active",
                        "Device WebSocket sessions open on this node, by app.",
                    ),
                    &["app"],
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            sessions_opened: counter(
                &r,
                "herald_gateway_sessions_opened_total",
                "Device sessions opened.",
            ),
            sessions_closed: counter_vec(
                &r,
                "herald_gateway_sessions_closed_total",
                "Device sessions closed, by reason.",
                &["reason"],
            ),
            sessions_refused: counter_vec(
                &r,
                "herald_gateway_sessions_refused_total",
                "Device connections refused before a session existed, by app (empty when the token did not name one) and reason.",
                &["app", "reason"],
            ),
            ping_rtt: histogram(
                &r,
                "herald_gateway_ping_rtt_seconds",
                "Server ping to device pong round trip.",
                LATENCY_BUCKETS,
            ),
            frames: counter_vec(
                &r,
                "herald_gateway_frames_total",
                "WebSocket frames by direction (in, out).",
                &["direction"],
            ),
            frames_unwritable: counter(
                &r,
                "herald_gateway_frames_unwritable_total",
                "Notification frames this node could not write (larger than its outgoing buffer); dropped, session kept, delivery falls back.",
            ),
            acks: counter(
                &r,
                "herald_gateway_acks_total",
                "Notification frames acknowledged by devices.",
            ),
            ack_timeouts: counter(
                &r,
                "herald_gateway_ack_timeouts_total",
                "Notification frames not acknowledged within ack_timeout.",
            ),
            deliveries: counter_vec(
                &r,
                "herald_deliveries_total",
                "Per-target delivery attempts by app, channel and outcome.",
                &["app", "channel", "outcome"],
            ),
            fallbacks: counter_vec(
                &r,
                "herald_fallbacks_total",
                "Targets sent to APNs/FCM instead of live, by app and reason.",
                &["app", "reason"],
            ),
            provider_duration: histogram_vec(
                &r,
                "herald_provider_request_duration_seconds",
                "APNs/FCM request latency.",
                &["provider"],
            ),
            retries: counter_vec(
                &r,
                "herald_retries_total",
                "Targets scheduled for a delayed retry, by app and channel.",
                &["app", "channel"],
            ),
            dead_letters: counter_vec(
                &r,
                "herald_dead_letters_total",
                "Notifications dead-lettered, by app (empty when unparseable) and reason.",
                &["app", "reason"],
            ),
            delivery_latency: histogram_vec(
                &r,
                "herald_delivery_latency_seconds",
                "Acceptance to final delivery, by channel.",
                &["channel"],
            ),
            tokens_dead: counter_vec(
                &r,
                "herald_tokens_dead_total",
                "Provider tokens reported dead (unregistered / bad), by app and provider.",
                &["app", "provider"],
            ),
            events_published: counter_vec(
                &r,
                "herald_events_published_total",
                "Outcome events handed to a sink (rabbitmq, webhook).",
                &["sink"],
            ),
            events_dropped: counter_vec(
                &r,
                "herald_events_dropped_total",
                "Outcome events dropped, by sink and why (buffer_full, failed, stopped).",
                &["sink", "reason"],
            ),
            cluster_messages: counter_vec(
                &r,
                "herald_cluster_messages_published_total",
                "Messages the cluster directory published to the broker, by kind (deliver, reply, presence, heartbeat, snapshot, snapshot_request, supersede).",
                &["kind"],
            ),
            cluster_nodes: gauge(
                &r,
                "herald_cluster_nodes_alive",
                "Gateway nodes this process's directory replica holds a live lease for.",
            ),
            cluster_devices: gauge(
                &r,
                "herald_cluster_directory_devices",
                "Devices with a session on a live node, in this process's directory replica.",
            ),
            dispatcher_parked: gauge(
                &r,
                "herald_dispatcher_parked_messages",
                "Messages waiting only for devices' acks, off the dispatcher's active budget (queue.prefetch); at most dispatcher.max_awaiting_ack.",
            ),
            inbox_writes: counter_vec(
                &r,
                "herald_inbox_writes_total",
                "Notifications kept in a device's offline inbox (committed before the queue ack), by app.",
                &["app"],
            ),
            inbox_store_failures: counter(
                &r,
                "herald_inbox_store_failures_total",
                "Inbox writes that failed (database unavailable, memory inbox full); the targets are retried.",
            ),
            inbox_replayed: counter_vec(
                &r,
                "herald_inbox_replayed_total",
                "Inbox entries sent to a device by a replay after its hello, by app.",
                &["app"],
            ),
            inbox_acked: counter_vec(
                &r,
                "herald_inbox_acked_total",
                "Replayed inbox entries the device acked (their rows deleted), by app.",
                &["app"],
            ),
            inbox_dropped: counter_vec(
                &r,
                "herald_inbox_dropped_total",
                "Inbox entries dropped undelivered, by app and reason (overflow, replaced, expired).",
                &["app", "reason"],
            ),
            inbox_pending: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "herald_inbox_pending",
                        "Entries held in the offline inbox, by app (all devices; sampled every inbox.reap_interval).",
                    ),
                    &["app"],
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            registry: r,
        };
        for k in [
            "deliver",
            "reply",
            "presence",
            "heartbeat",
            "snapshot",
            "snapshot_request",
        ] {
            m.cluster_messages.with_label_values(&[k]);
        }
        for ch in CHANNELS {
            m.delivery_latency.with_label_values(&[ch]);
        }
        for p in ["apns", "fcm"] {
            m.provider_duration.with_label_values(&[p]);
        }
        m.register_app(crate::domain::AppId::DEFAULT);
        // Series no app can be known for yet.
        m.dead_letters.with_label_values(&["", "unparseable"]);
        m.sessions_refused.with_label_values(&["", "unauthorized"]);
        for r in ["unavailable", "timeout", "full", "nacked"] {
            m.queue_publish_failures.with_label_values(&[r]);
        }
        for sink in ["rabbitmq", "webhook"] {
            m.events_published.with_label_values(&[sink]);
            for why in ["buffer_full", "failed", "stopped"] {
                m.events_dropped.with_label_values(&[sink, why]);
            }
        }
        for d in ["in", "out"] {
            m.frames.with_label_values(&[d]);
        }
        for r in [
            "client_closed",
            "pong_timeout",
            "replaced",
            "shutdown",
            "protocol_error",
            "slow_consumer",
            "server_error",
        ] {
            m.sessions_closed.with_label_values(&[r]);
        }
        m
    }

    /// Pre-creates `app`'s series at zero (every configured app, at start).
    pub fn register_app(&self, app: &str) {
        for ch in CHANNELS {
            for o in OUTCOMES {
                self.deliveries.with_label_values(&[app, ch, o]);
            }
            self.retries.with_label_values(&[app, ch]);
        }
        // Outcomes reached without trying any channel (a notification past its ttl).
        self.deliveries.with_label_values(&[app, "none", "expired"]);
        for p in ["apns", "fcm"] {
            self.tokens_dead.with_label_values(&[app, p]);
        }
        for r in ["offline", "ack_timeout"] {
            self.fallbacks.with_label_values(&[app, r]);
        }
        for r in ["attempts_exhausted", "config_error"] {
            self.dead_letters.with_label_values(&[app, r]);
        }
        for r in ["shutting_down", "not_ready", "too_many_sessions"] {
            self.sessions_refused.with_label_values(&[app, r]);
        }
        for r in INBOX_DROP_REASONS {
            self.inbox_dropped.with_label_values(&[app, r]);
        }
        self.inbox_writes.with_label_values(&[app]);
        self.inbox_replayed.with_label_values(&[app]);
        self.inbox_acked.with_label_values(&[app]);
        self.inbox_pending.with_label_values(&[app]);
        self.notifications_accepted.with_label_values(&[app]);
        self.targets_accepted.with_label_values(&[app]);
        self.sessions_active.with_label_values(&[app]);
    }

    /// Sets the pending-entries gauge from one sample (`(app, entries)`, apps with none
    /// left out): an app missing from the sample had none, so its series goes to 0 rather
    /// than keep the last value.
    pub fn set_inbox_pending(&self, by_app: &[(String, u64)]) {
        use prometheus::core::Collector;
        for family in self.inbox_pending.collect() {
            for series in family.get_metric() {
                let Some(app) = series.get_label().iter().find(|l| l.name() == "app") else {
                    continue;
                };
                if !by_app.iter().any(|(a, _)| a == app.value()) {
                    self.inbox_pending.with_label_values(&[app.value()]).set(0);
                }
            }
        }
        for (app, n) in by_app {
            self.inbox_pending
                .with_label_values(&[app.as_str()])
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
