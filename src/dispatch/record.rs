//! The one place the dispatcher's outcomes become metrics, events and outcome logs.
//!
//! A target is recorded as soon as its attempt ends, so its `delivered` / `token_dead`
//! events do not wait for the other targets of a 1000-target message; the settlement is
//! recorded once it is carried out (its copies are safe).

use std::time::SystemTime;

use super::channel::Channel;
use super::settle::{DeadReason, Settlement};
use super::target::{TargetReport, fallback_reason};
use crate::directory::LiveOutcome;
use crate::domain::{DeviceId, QueuedNotification, Target, unix_millis};
use crate::events::{Event, EventKind};
use crate::inbox::{DropReason, ExpiredEntry, InboxError, StoreReport};
use crate::metrics::Metrics;
use crate::providers::ProviderOutcome;

/// Something that happened to a message, to be counted and reported.
pub enum Outcome<'a> {
    /// A queued body that does not parse was dead-lettered (no notification: no events).
    Unparseable,
    /// One target's attempt ended.
    Target(&'a QueuedNotification, &'a TargetReport),
    /// The message was settled.
    Settled(&'a QueuedNotification, &'a Settlement),
    /// Targets of `n` went to their devices' offline inbox (`devices`, committed); the store
    /// reported what it dropped (this notification or older ones of those devices).
    Stored(&'a QueuedNotification, &'a [&'a DeviceId], &'a StoreReport),
    /// Writing `targets` targets of `n` to the inbox failed: they are retried.
    StoreFailed(&'a QueuedNotification, usize, &'a InboxError),
    /// The reaper deleted these expired inbox entries.
    Reaped(&'a [ExpiredEntry]),
    /// The inbox's pending rows per app, sampled (apps with none left out).
    InboxPending(&'a [(String, u64)]),
}

/// Counts `outcome` in `metrics` and hands its events to `emit` (the dispatcher's
/// [`crate::events::Events`]; a Vec in tests).
pub fn record(metrics: &Metrics, mut emit: impl FnMut(Event), outcome: Outcome<'_>) {
    match outcome {
        Outcome::Unparseable => {
            metrics
                .dead_letters
                // No notification, so no app: the empty label.
                .with_label_values(&["", DeadReason::Unparseable.label()])
                .inc();
        }
        Outcome::Target(n, report) => target(metrics, &mut emit, n, report),
        Outcome::Settled(n, settlement) => settled(metrics, &mut emit, n, settlement),
        Outcome::Stored(n, devices, report) => stored(metrics, &mut emit, n, devices, report),
        Outcome::StoreFailed(n, targets, error) => {
            metrics.inbox_store_failures.inc();
            tracing::warn!(id = %n.id, targets, %error, "offline inbox write failed: retrying those targets");
        }
        Outcome::Reaped(entries) => {
            for e in entries {
                inbox_expired(metrics, &mut emit, &e.app, e.id, &e.device_id, 0);
            }
        }
        Outcome::InboxPending(by_app) => metrics.set_inbox_pending(by_app),
    }
}

fn stored(
    metrics: &Metrics,
    emit: &mut impl FnMut(Event),
    n: &QueuedNotification,
    devices: &[&DeviceId],
    report: &StoreReport,
) {
    // The attempt is known only for this notification; an older entry it pushed out left
    // the queue long ago.
    let attempt = |id| if id == n.id { n.attempt + 1 } else { 0 };
    for device in devices {
        let kept = !report
            .dropped
            .iter()
            .any(|d| d.id == n.id && d.device_id == device.as_str());
        if kept {
            metrics
                .inbox_writes
                .with_label_values(&[n.app.as_str()])
                .inc();
            emit(Event::new(EventKind::Stored, n, device));
        }
    }
    for d in &report.dropped {
        match d.reason {
            DropReason::Overflow => {
                metrics
                    .inbox_dropped
                    .with_label_values(&[d.app.as_str(), "overflow"])
                    .inc();
                emit(
                    Event::about(
                        EventKind::InboxOverflow,
                        &d.app,
                        d.id,
                        &d.device_id,
                        attempt(d.id),
                    )
                    .reason("inbox.max_per_device or inbox.max_bytes_per_device reached"),
                );
            }
            DropReason::Replaced { by } => {
                metrics
                    .inbox_dropped
                    .with_label_values(&[d.app.as_str(), "replaced"])
                    .inc();
                emit(
                    Event::about(
                        EventKind::Replaced,
                        &d.app,
                        d.id,
                        &d.device_id,
                        attempt(d.id),
                    )
                    .reason(format!("replaced by {by} (same collapse_key)")),
                );
            }
            DropReason::Expired => {
                inbox_expired(metrics, emit, &d.app, d.id, &d.device_id, attempt(d.id));
            }
        }
    }
}

/// An inbox entry whose ttl passed: dropped, never sent, reported like any expiry.
fn inbox_expired(
    metrics: &Metrics,
    emit: &mut impl FnMut(Event),
    app: &str,
    id: crate::domain::NotificationId,
    device: &str,
    attempt: u32,
) {
    metrics
        .inbox_dropped
        .with_label_values(&[app, "expired"])
        .inc();
    metrics
        .deliveries
        .with_label_values(&[app, "none", "expired"])
        .inc();
    emit(
        Event::about(EventKind::Expired, app, id, device, attempt)
            .reason("ttl passed in the offline inbox"),
    );
}

fn target(
    metrics: &Metrics,
    emit: &mut impl FnMut(Event),
    n: &QueuedNotification,
    r: &TargetReport,
) {
    let t = &r.target;
    let app = n.app.as_str();
    if r.live == LiveOutcome::Acked {
        metrics
            .deliveries
            .with_label_values(&[app, Channel::Live.as_str(), "delivered"])
            .inc();
        delivered(metrics, emit, n, t, Channel::Live);
    } else if let Some(reason) = fallback_reason(r.live).filter(|_| !r.routes.is_empty()) {
        // A target with no route is retried, not counted as a fallback: there is nothing
        // to fall back to.
        metrics.fallbacks.with_label_values(&[app, reason]).inc();
    }
    for route in &r.routes {
        let channel = route.channel;
        metrics
            .deliveries
            .with_label_values(&[app, channel.as_str(), route.outcome.label()])
            .inc();
        match &route.outcome {
            ProviderOutcome::Delivered => delivered(metrics, emit, n, t, channel),
            ProviderOutcome::TokenDead { reason } => {
                tracing::info!(device = %t.device_id, channel = channel.as_str(), %reason, "token dead");
                let mut event = Event::new(EventKind::TokenDead, n, &t.device_id)
                    .channel(channel.as_str())
                    .reason(reason.clone());
                if let Some(token) = token(t, channel) {
                    event = event.token(token);
                }
                emit(event);
            }
            ProviderOutcome::Transient { .. } => {}
            ProviderOutcome::ConfigError { reason } => {
                // Loud: this needs an operator, and every target on this provider fails
                // the same way until one acts.
                tracing::error!(device = %t.device_id, channel = channel.as_str(), %reason, "provider configuration error");
            }
        }
    }
}

fn delivered(
    metrics: &Metrics,
    emit: &mut impl FnMut(Event),
    n: &QueuedNotification,
    t: &Target,
    channel: Channel,
) {
    let latency_ms = unix_millis(SystemTime::now()).saturating_sub(n.accepted_at_ms);
    metrics
        .delivery_latency
        .with_label_values(&[channel.as_str()])
        .observe(latency_ms as f64 / 1000.0);
    emit(Event::new(EventKind::Delivered, n, &t.device_id).channel(channel.as_str()));
}

/// The token a provider channel used for `t`: the `token_dead` event carries it so the
/// caller can delete it.
fn token(t: &Target, channel: Channel) -> Option<&str> {
    match channel {
        Channel::Live => None,
        Channel::Apns => t.apns.as_ref().map(|r| r.token.as_str()),
        Channel::Fcm => t.fcm.as_ref().map(|r| r.token.as_str()),
    }
}

fn settled(
    metrics: &Metrics,
    emit: &mut impl FnMut(Event),
    n: &QueuedNotification,
    s: &Settlement,
) {
    if matches!(s, Settlement::Expired) {
        for t in &n.targets {
            // No channel was tried: the series pre-created for this case.
            metrics
                .deliveries
                .with_label_values(&[n.app.as_str(), "none", "expired"])
                .inc();
            emit(
                Event::new(EventKind::Expired, n, &t.device_id)
                    .reason("ttl passed before delivery"),
            );
        }
        tracing::info!("expired before delivery: dropped");
    }
    if let Some(retry) = s.retry() {
        for channel in &retry.channels {
            metrics
                .retries
                .with_label_values(&[n.app.as_str(), channel.as_str()])
                .inc();
        }
        tracing::info!(targets = retry.next.targets.len(), delay = ?retry.delay, "scheduled a retry");
    }
    if let Some(dead) = s.dead_letter() {
        metrics
            .dead_letters
            .with_label_values(&[n.app.as_str(), dead.why.label()])
            .inc();
        tracing::warn!(targets = dead.copy.targets.len(), reason = %dead.reason, "dead-lettered");
        for t in &dead.copy.targets {
            emit(Event::new(EventKind::DeadLettered, n, &t.device_id).reason(dead.reason.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::dispatch::settle::tests::{notification, report, transient};
    use crate::dispatch::settle::{DeadLetter, Retry, after_delivery};

    /// The JSON of `events` without their `at` (the clock), in emission order.
    fn json(events: &[Event]) -> Vec<serde_json::Value> {
        events
            .iter()
            .map(|e| {
                let mut v = serde_json::to_value(e).unwrap();
                v.as_object_mut().unwrap().remove("at").expect("an `at`");
                v
            })
            .collect()
    }

    fn deliveries(m: &Metrics, channel: &str, outcome: &str) -> u64 {
        m.deliveries
            .with_label_values(&["default", channel, outcome])
            .get()
    }

    fn record_all(m: &Metrics, outcomes: Vec<Outcome<'_>>) -> Vec<Event> {
        let mut events = Vec::new();
        for o in outcomes {
            record(m, |e| events.push(e), o);
        }
        events
    }

    #[test]
    fn targets_are_counted_once_per_channel_tried_with_their_events() {
        use LiveOutcome::*;
        let m = Metrics::new();
        let n = notification(&["phone-1", "ios-1", "android-1", "ios-2", "phone-2"]);
        let reports = [
            report(&n, 0, Acked, None),
            report(&n, 1, NotAcked, Some(ProviderOutcome::Delivered)),
            report(
                &n,
                2,
                Offline,
                Some(ProviderOutcome::TokenDead {
                    reason: "UNREGISTERED".into(),
                }),
            ),
            report(&n, 3, Offline, transient("503 ServiceUnavailable", None)),
            report(&n, 4, Offline, None),
        ];
        let events = record_all(&m, reports.iter().map(|r| Outcome::Target(&n, r)).collect());
        let id = n.id.to_string();
        assert_eq!(
            json(&events),
            [
                serde_json::json!({"type": "delivered", "app": "default", "notification_id": id, "device_id": "phone-1", "channel": "live", "attempt": 1}),
                serde_json::json!({"type": "delivered", "app": "default", "notification_id": id, "device_id": "ios-1", "channel": "apns", "attempt": 1}),
                serde_json::json!({"type": "token_dead", "app": "default", "notification_id": id, "device_id": "android-1", "channel": "fcm", "token": "fcm-android-1", "reason": "UNREGISTERED", "attempt": 1}),
            ]
        );
        assert_eq!(events[1].routing_key(), "default.delivered.apns");
        assert_eq!(deliveries(&m, "live", "delivered"), 1);
        assert_eq!(deliveries(&m, "apns", "delivered"), 1);
        assert_eq!(deliveries(&m, "fcm", "token_dead"), 1);
        assert_eq!(deliveries(&m, "apns", "transient"), 1);
        assert_eq!(
            m.fallbacks
                .with_label_values(&["default", "ack_timeout"])
                .get(),
            1
        );
        // android-1 and ios-2 fell back from offline; phone-2 had no route to fall back to.
        assert_eq!(
            m.fallbacks.with_label_values(&["default", "offline"]).get(),
            2
        );
        for ch in ["live", "apns"] {
            assert_eq!(
                m.delivery_latency
                    .with_label_values(&[ch])
                    .get_sample_count(),
                1
            );
        }
        assert_eq!(
            m.delivery_latency
                .with_label_values(&["fcm"])
                .get_sample_count(),
            0
        );
        // Retries are counted when the settlement schedules them, not per target.
        assert_eq!(m.retries.with_label_values(&["default", "apns"]).get(), 0);
    }

    #[test]
    fn an_expired_message_is_one_expired_event_per_target_without_a_channel() {
        let m = Metrics::new();
        let n = notification(&["ios-1", "phone-1"]);
        let events = record_all(&m, vec![Outcome::Settled(&n, &Settlement::Expired)]);
        let id = n.id.to_string();
        assert_eq!(
            json(&events),
            [
                serde_json::json!({"type": "expired", "app": "default", "notification_id": id, "device_id": "ios-1", "reason": "ttl passed before delivery", "attempt": 1}),
                serde_json::json!({"type": "expired", "app": "default", "notification_id": id, "device_id": "phone-1", "reason": "ttl passed before delivery", "attempt": 1}),
            ]
        );
        assert_eq!(events[0].routing_key(), "default.expired");
        assert_eq!(deliveries(&m, "none", "expired"), 2);
    }

    #[test]
    fn a_settlement_counts_its_retries_and_dead_letters_with_events() {
        use LiveOutcome::*;
        let m = Metrics::new();
        let n = notification(&["ios-1", "android-1", "phone-1", "ios-2"]);
        let reports = [
            report(&n, 0, Offline, transient("503", None)),
            report(&n, 1, Offline, transient("UNAVAILABLE", None)),
            report(&n, 2, Offline, None),
            report(
                &n,
                3,
                Offline,
                Some(ProviderOutcome::ConfigError {
                    reason: "bad topic".into(),
                }),
            ),
        ];
        let s = after_delivery(&n, &reports, SystemTime::now(), 5, |_| {
            Duration::from_secs(1)
        });
        assert!(matches!(
            s,
            Settlement::RetryAndDeadLetter(Retry { .. }, DeadLetter { .. })
        ));
        let events = record_all(&m, vec![Outcome::Settled(&n, &s)]);
        for (ch, count) in [("apns", 1), ("fcm", 1), ("live", 1)] {
            assert_eq!(
                m.retries.with_label_values(&["default", ch]).get(),
                count,
                "{ch}"
            );
        }
        assert_eq!(
            m.dead_letters
                .with_label_values(&["default", "config_error"])
                .get(),
            1
        );
        assert_eq!(
            json(&events),
            [
                serde_json::json!({"type": "dead_lettered", "app": "default", "notification_id": n.id.to_string(), "device_id": "ios-2", "reason": "config_error: apns: bad topic", "attempt": 1})
            ]
        );
        assert_eq!(events[0].routing_key(), "default.dead_lettered");

        // Out of attempts, the same failures are one dead letter and no retry.
        let m = Metrics::new();
        let s = after_delivery(&n, &reports, SystemTime::now(), 1, |_| Duration::ZERO);
        let events = record_all(&m, vec![Outcome::Settled(&n, &s)]);
        assert_eq!(events.len(), 4);
        assert_eq!(
            m.dead_letters
                .with_label_values(&["default", "attempts_exhausted"])
                .get(),
            1
        );
        for ch in ["live", "apns", "fcm"] {
            assert_eq!(
                m.retries.with_label_values(&["default", ch]).get(),
                0,
                "{ch}"
            );
        }
    }

    #[test]
    fn inbox_outcomes_are_events_and_counts() {
        use crate::inbox::Dropped;
        let m = Metrics::new();
        let n = notification(&["phone-1", "phone-2"]);
        let older = crate::domain::NotificationId::generate();
        let report = StoreReport {
            dropped: vec![
                Dropped {
                    app: "default".into(),
                    device_id: "phone-1".into(),
                    id: older,
                    reason: DropReason::Overflow,
                },
                Dropped {
                    app: "default".into(),
                    device_id: "phone-2".into(),
                    id: n.id,
                    reason: DropReason::Expired,
                },
            ],
        };
        let devices: Vec<&DeviceId> = n.targets.iter().map(|t| &t.device_id).collect();
        let reaped = [ExpiredEntry {
            app: "default".into(),
            device_id: "phone-3".into(),
            id: older,
        }];
        let events = record_all(
            &m,
            vec![
                Outcome::Stored(&n, &devices, &report),
                Outcome::Reaped(&reaped),
                Outcome::InboxPending(&[("default".to_owned(), 7)]),
            ],
        );
        let (id, older) = (n.id.to_string(), older.to_string());
        assert_eq!(
            json(&events),
            [
                serde_json::json!({"type": "stored", "app": "default", "notification_id": id, "device_id": "phone-1", "attempt": 1}),
                serde_json::json!({"type": "inbox_overflow", "app": "default", "notification_id": older, "device_id": "phone-1", "reason": "inbox.max_per_device or inbox.max_bytes_per_device reached"}),
                serde_json::json!({"type": "expired", "app": "default", "notification_id": id, "device_id": "phone-2", "reason": "ttl passed in the offline inbox", "attempt": 1}),
                serde_json::json!({"type": "expired", "app": "default", "notification_id": older, "device_id": "phone-3", "reason": "ttl passed in the offline inbox"}),
            ]
        );
        assert_eq!(m.inbox_writes.with_label_values(&["default"]).get(), 1);
        assert_eq!(
            m.inbox_dropped
                .with_label_values(&["default", "overflow"])
                .get(),
            1
        );
        assert_eq!(
            m.inbox_dropped
                .with_label_values(&["default", "expired"])
                .get(),
            2
        );
        assert_eq!(deliveries(&m, "none", "expired"), 2);
        assert_eq!(m.inbox_pending.with_label_values(&["default"]).get(), 7);
        // A later sample without the app: it has none left, not its last value.
        record_all(&m, vec![Outcome::InboxPending(&[])]);
        assert_eq!(m.inbox_pending.with_label_values(&["default"]).get(), 0);
    }

    #[test]
    fn an_unparseable_body_is_counted_as_a_dead_letter() {
        let m = Metrics::new();
        let events = record_all(&m, vec![Outcome::Unparseable]);
        assert!(events.is_empty());
        assert_eq!(
            m.dead_letters.with_label_values(&["", "unparseable"]).get(),
            1
        );
    }
}
