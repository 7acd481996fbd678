//! Each provider outcome class does what is promised: token dead (event, no retry),
//! transient (retry only the failed target, recover), exhausted and config errors (dead
//! letter with reason and history), expiry (dropped with an event), and a 1000-target
//! fan-out with mixed outcomes settles once with every target accounted for.

use std::time::Duration;

use herald::queue::QueueKind;
use serde_json::json;

use crate::delivery::on_both_backends;
use crate::harness::{APNS_TOKEN, Backend, World, bind_events_queue};
use crate::support::apns_double::Reply;
use crate::support::fcm_double::FcmReply;
use crate::support::wait_for;

on_both_backends!(
    dead_token_is_reported_and_never_retried,
    transient_failure_retries_only_that_target_and_recovers,
    exhausted_attempts_dead_letter_with_reason_and_history,
    thousand_targets_with_mixed_outcomes_settle_once,
);

async fn dead_letter(w: &World) -> (serde_json::Value, String) {
    let mut dead = w.queue.consume(QueueKind::Dead);
    let d = tokio::time::timeout(Duration::from_secs(20), dead.next())
        .await
        .expect("a dead letter")
        .expect("queue open");
    let body: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
    let reason = d.dead_reason.clone().unwrap_or_default();
    d.ack().await.unwrap();
    (body, reason)
}

async fn dead_token_is_reported_and_never_retried(backend: Backend) {
    let w = World::start(backend).await;
    // On RabbitMQ the same event also goes to the herald.events topic exchange.
    let events_rx = match &w.vhost {
        Some(v) => Some(bind_events_queue(&v.url, "events", "*.token_dead.*").await),
        None => None,
    };
    w.apns
        .reply_for_token(APNS_TOKEN, Reply::reason(410, "Unregistered"));
    w.fcm.reply_for_token("fcm-dead", FcmReply::unregistered());
    let id = w
        .notify(json!({
            "targets": [
                {"device_id": "ios-1", "apns": {"token": APNS_TOKEN}},
                {"device_id": "android-1", "fcm": {"token": "fcm-dead"}}
            ],
            "data": {"k": "v"}
        }))
        .await;
    let dead = w.hook.wait("token_dead", 2).await;
    w.wait_settled().await;
    let apns_event = dead.iter().find(|e| e["channel"] == "apns").unwrap();
    assert_eq!(apns_event["token"], APNS_TOKEN);
    assert_eq!(apns_event["device_id"], "ios-1");
    assert_eq!(apns_event["notification_id"], id.as_str());
    let fcm_event = dead.iter().find(|e| e["channel"] == "fcm").unwrap();
    assert_eq!(fcm_event["token"], "fcm-dead");
    // Final: exactly one request each, no retry, no dead letter.
    assert_eq!(w.apns.request_count(), 1);
    assert_eq!(w.fcm.request_count(), 1);
    assert_eq!(w.deliveries("apns", "token_dead"), 1.0);
    assert_eq!(w.deliveries("fcm", "token_dead"), 1.0);
    assert_eq!(w.metric("herald_tokens_dead_total{provider=\"apns\"}"), 1.0);
    assert_eq!(w.metric("herald_retries_total{channel=\"apns\"}"), 0.0);
    if let Some((_conn, ch)) = events_rx {
        let keys = wait_for(
            Duration::from_secs(10),
            "token_dead events on the exchange",
            || {
                let ch = ch.clone();
                async move {
                    let mut keys = Vec::new();
                    while let Some(m) = ch
                        .basic_get(
                            "events".into(),
                            lapin::options::BasicGetOptions { no_ack: true },
                        )
                        .await
                        .unwrap()
                    {
                        keys.push(m.delivery.routing_key.to_string());
                    }
                    (!keys.is_empty()).then_some(keys)
                }
            },
        )
        .await;
        assert!(
            keys.iter()
                .any(|k| k == "default.token_dead.apns" || k == "default.token_dead.fcm"),
            "{keys:?}"
        );
    }
    w.stop().await;
}

async fn transient_failure_retries_only_that_target_and_recovers(backend: Backend) {
    let w = World::start(backend).await;
    // APNs is down for one request (503 with Retry-After 0), then recovers.
    w.apns
        .reply_next(1, Reply::reason(503, "ServiceUnavailable"));
    w.notify(json!({
        "targets": [
            {"device_id": "ios-1", "apns": {"token": APNS_TOKEN}},
            {"device_id": "android-1", "fcm": {"token": "fcm-ok"}}
        ],
        "data": {"k": "v"}
    }))
    .await;
    let delivered = w.hook.wait("delivered", 2).await;
    w.wait_settled().await;
    assert_eq!(
        w.apns.request_count(),
        2,
        "the failed APNs send was retried once"
    );
    assert_eq!(
        w.fcm.request_count(),
        1,
        "the FCM target, already delivered, was not re-sent"
    );
    assert_eq!(w.deliveries("apns", "transient"), 1.0);
    assert_eq!(w.deliveries("apns", "delivered"), 1.0);
    assert_eq!(w.metric("herald_retries_total{channel=\"apns\"}"), 1.0);
    let apns = delivered.iter().find(|e| e["channel"] == "apns").unwrap();
    assert_eq!(apns["attempt"], 2);
    assert!(w.hook.of("dead_lettered").is_empty());
    w.stop().await;
}

async fn exhausted_attempts_dead_letter_with_reason_and_history(backend: Backend) {
    let w = World::start(backend).await;
    w.apns
        .reply_always(Some(Reply::reason(500, "InternalServerError")));
    let id = w
        .notify(json!({"targets": [{"device_id": "ios-1", "apns": {"token": APNS_TOKEN}}], "data": {"k": "v"}}))
        .await;
    let (body, reason) = dead_letter(&w).await;
    assert!(
        reason.starts_with("attempts_exhausted after 3 attempts"),
        "{reason}"
    );
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["attempt"], 3);
    assert_eq!(body["targets"][0]["device_id"], "ios-1");
    let history = body["history"].as_array().unwrap();
    assert_eq!(history.len(), 3);
    assert!(
        history[0]["failures"]
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with("apns:"))
    );
    assert_eq!(w.apns.request_count(), 3);
    let dl = w.hook.wait("dead_lettered", 1).await;
    assert_eq!(dl[0]["device_id"], "ios-1");
    assert_eq!(
        w.metric("herald_dead_letters_total{reason=\"attempts_exhausted\"}"),
        1.0
    );
    w.wait_settled().await;
    w.stop().await;
}

/// APNs not configured at all, yet a target carries an APNs token: a configuration error,
/// loud and dead-lettered at once, never retried.
#[tokio::test]
async fn config_error_is_dead_lettered_without_retries() {
    let w = World::start_with(Backend::Memory, |s| s.apns.key_file = String::new()).await;
    w.notify(json!({"targets": [{"device_id": "ios-1", "apns": {"token": APNS_TOKEN}}], "data": {"k": "v"}}))
        .await;
    let (_body, reason) = dead_letter(&w).await;
    assert!(
        reason.contains("config_error") && reason.contains("APNs is not configured"),
        "{reason}"
    );
    assert_eq!(w.metric("herald_retries_total{channel=\"apns\"}"), 0.0);
    assert_eq!(
        w.metric("herald_dead_letters_total{reason=\"config_error\"}"),
        1.0
    );
    assert_eq!(w.deliveries("apns", "config_error"), 1.0);
    w.stop().await;
}

/// A notification whose ttl passes while it waits for a retry is dropped with an event,
/// never sent late.
#[tokio::test]
async fn expired_notification_is_dropped_with_an_event() {
    let w = World::start_with(Backend::Memory, |s| {
        s.retry.base_delay = Duration::from_millis(1500);
        s.retry.max_delay = Duration::from_millis(1500);
    })
    .await;
    w.apns
        .reply_always(Some(Reply::reason(503, "ServiceUnavailable")));
    // No session and APNs failing: retried after 1.5 s, by which time the 1 s ttl passed.
    // (A target with no route at all would wait in the offline inbox: tests/offline.)
    w.notify(json!({"targets": [{"device_id": "gone-1", "apns": {"token": APNS_TOKEN}}], "data": {"k": "v"}, "ttl": "1s"}))
        .await;
    let expired = w.hook.wait("expired", 1).await;
    assert_eq!(expired[0]["device_id"], "gone-1");
    w.wait_settled().await;
    assert_eq!(w.deliveries("none", "expired"), 1.0);
    assert!(w.hook.of("dead_lettered").is_empty());
    assert!(w.hook.of("delivered").is_empty());
    w.stop().await;
}

async fn thousand_targets_with_mixed_outcomes_settle_once(backend: Backend) {
    let w = World::start(backend).await;
    let mut targets = Vec::new();
    let mut sessions = Vec::new();
    for i in 0..10 {
        let device = format!("live-{i}");
        let (ws, _) = crate::gw::connect(&w.app, &device).await;
        sessions.push(crate::gw::spawn_acker(ws));
        targets.push(json!({"device_id": device}));
    }
    for i in 0..490 {
        let token = format!("{i:064x}");
        if i < 100 {
            w.apns
                .reply_for_token(&token, Reply::reason(400, "BadDeviceToken"));
        }
        targets.push(json!({"device_id": format!("ios-{i}"), "apns": {"token": token}}));
    }
    for i in 0..500 {
        let token = format!("fcm-{i}");
        if i < 100 {
            w.fcm.reply_for_token(&token, FcmReply::unregistered());
        }
        targets.push(json!({"device_id": format!("android-{i}"), "fcm": {"token": token}}));
    }
    assert_eq!(targets.len(), 1000);
    w.notify(json!({"targets": targets, "data": {"k": "v"}}))
        .await;

    w.hook.wait("delivered", 800).await;
    w.hook.wait("token_dead", 200).await;
    w.wait_settled().await;
    // Every target accounted for exactly once: no retry, no dead letter, no duplicate.
    assert_eq!(w.deliveries("live", "delivered"), 10.0);
    assert_eq!(w.deliveries("apns", "delivered"), 390.0);
    assert_eq!(w.deliveries("apns", "token_dead"), 100.0);
    assert_eq!(w.deliveries("fcm", "delivered"), 400.0);
    assert_eq!(w.deliveries("fcm", "token_dead"), 100.0);
    assert_eq!(w.apns.request_count(), 490);
    assert_eq!(w.fcm.request_count(), 500);
    // A dead-token target also waits in its device's offline inbox where there is one
    // (the embedded backend; RabbitMQ here runs without inbox.url): a `stored` event more.
    let stored = match backend {
        Backend::Memory => 200,
        Backend::Rabbit => 0,
    };
    let stored_events = w.hook.wait("stored", stored).await;
    assert_eq!(stored_events.len(), stored);
    let events: Vec<_> = w
        .hook
        .events()
        .into_iter()
        .filter(|e| e["type"] != "stored")
        .collect();
    assert_eq!(events.len(), 1000, "one final event per target");
    let mut devices: Vec<&str> = events
        .iter()
        .map(|e| e["device_id"].as_str().unwrap())
        .collect();
    devices.sort();
    devices.dedup();
    assert_eq!(devices.len(), 1000);
    assert_eq!(
        w.metric("herald_retries_total{channel=\"apns\"}")
            + w.metric("herald_retries_total{channel=\"fcm\"}"),
        0.0
    );
    w.stop().await;
}
