//! Live first; fallback on no session, on a dead heartbeat, on a missing ack; the exact
//! requests the provider doubles received.

use std::time::Duration;

use serde_json::json;

use crate::gw;
use crate::harness::{APNS_TOKEN, Backend, World};
use crate::support::wait_for;

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn memory() {
                super::$name(crate::harness::Backend::Memory).await
            }
            #[tokio::test]
            async fn rabbitmq() {
                super::$name(crate::harness::Backend::Rabbit).await
            }
        }
    )*};
}
pub(crate) use on_both_backends;

on_both_backends!(
    live_wins_when_the_device_is_connected,
    offline_falls_back_to_apns
);

fn apns_body(device: &str) -> serde_json::Value {
    json!({
        "targets": [{"device_id": device, "apns": {"token": APNS_TOKEN}}],
        "notification": {"title": "Hi", "body": "You have a message"},
        "data": {"thread": "t-1"},
        "collapse_key": "inbox",
        "ttl": "1h"
    })
}

async fn live_wins_when_the_device_is_connected(backend: Backend) {
    let w = World::start(backend).await;
    let (ws, _) = gw::connect(&w.app, "phone-1").await;
    let mut frames = gw::spawn_acker(ws);
    let id = w
        .notify(json!({
            "targets": [{"device_id": "phone-1", "apns": {"token": APNS_TOKEN}, "fcm": {"token": "fcm-1"}}],
            "notification": {"title": "Hi"},
            "data": {"k": "v"}
        }))
        .await;
    let frame = tokio::time::timeout(Duration::from_secs(10), frames.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(frame["type"], "notification");
    assert_eq!(frame["id"], id.as_str());
    assert_eq!(frame["data"]["k"], "v");
    let delivered = w.hook.wait("delivered", 1).await;
    assert_eq!(delivered[0]["channel"], "live");
    assert_eq!(delivered[0]["notification_id"], id.as_str());
    w.wait_settled().await;
    assert_eq!(w.deliveries("live", "delivered"), 1.0);
    // Nothing went to Apple or Google.
    assert_eq!(w.apns.request_count(), 0);
    assert_eq!(w.fcm.request_count(), 0);
    assert_eq!(w.metric("herald_fallbacks_total{reason=\"offline\"}"), 0.0);
    w.stop().await;
}

async fn offline_falls_back_to_apns(backend: Backend) {
    let w = World::start(backend).await;
    let id = w.notify(apns_body("phone-2")).await;
    w.hook.wait("delivered", 1).await;
    w.wait_settled().await;

    let reqs = w.apns.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, format!("/3/device/{APNS_TOKEN}"));
    assert_eq!(r.headers["apns-id"], id);
    assert_eq!(r.headers["apns-topic"], w.apns.topic);
    assert_eq!(r.headers["apns-push-type"], "alert");
    assert_eq!(r.headers["apns-priority"], "10");
    assert_eq!(r.headers["apns-collapse-id"], "inbox");
    let expiration: u64 = r.headers["apns-expiration"].parse().unwrap();
    let now = crate::support::apns_double::unix_now();
    assert!(
        expiration > now + 3500 && expiration <= now + 3600,
        "ttl 1h → {expiration}"
    );
    let jwt = r.jwt.as_ref().expect("a verified provider JWT");
    assert_eq!(
        (jwt.alg.as_str(), jwt.kid.as_str(), jwt.iss.as_str()),
        ("ES256", w.apns.key_id.as_str(), w.apns.team_id.as_str())
    );
    assert_eq!(r.body["aps"]["alert"]["title"], "Hi");
    assert_eq!(r.body["aps"]["alert"]["body"], "You have a message");
    assert_eq!(r.body["thread"], "t-1");
    assert_eq!(r.body["herald_id"], id.as_str());

    assert_eq!(w.metric("herald_fallbacks_total{reason=\"offline\"}"), 1.0);
    assert_eq!(w.deliveries("apns", "delivered"), 1.0);
    assert_eq!(w.hook.of("delivered")[0]["channel"], "apns");
    w.stop().await;
}

/// The device reads the frame but never acks: after ack_timeout, FCM gets it.
#[tokio::test]
async fn missing_ack_falls_back_to_fcm() {
    let w = World::start(Backend::Memory).await;
    let (ws, _) = gw::connect(&w.app, "tablet-1").await;
    let mut frames = gw::spawn_reader(ws);
    let id = w
        .notify(json!({
            "targets": [{"device_id": "tablet-1", "fcm": {"token": "fcm-token-1"}}],
            "notification": {"title": "Hi", "body": "there"},
            "data": {"thread": "t-1"},
            "priority": "normal",
            "ttl": "10m",
            "android": {"channel_id": "messages"}
        }))
        .await;
    let frame = tokio::time::timeout(Duration::from_secs(10), frames.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        frame["id"],
        id.as_str(),
        "the device got the frame (and a duplicate via FCM)"
    );
    w.hook.wait("delivered", 1).await;
    w.wait_settled().await;

    let reqs = w.fcm.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert!(r.path.ends_with("/messages:send"), "{}", r.path);
    let granted: Vec<String> = w.fcm.grants().into_iter().map(|g| g.access_token).collect();
    assert!(
        granted.contains(r.access_token.as_ref().unwrap()),
        "bearer is an issued OAuth2 token"
    );
    let m = &r.body["message"];
    assert_eq!(m["token"], "fcm-token-1");
    assert_eq!(m["notification"]["title"], "Hi");
    assert_eq!(m["data"]["thread"], "t-1");
    assert_eq!(m["data"]["herald_id"], id.as_str());
    assert_eq!(m["android"]["priority"], "NORMAL");
    assert_eq!(m["android"]["notification"]["channel_id"], "messages");
    let ttl: u64 = m["android"]["ttl"]
        .as_str()
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!((590..=600).contains(&ttl), "remaining ttl {ttl}s");

    assert_eq!(
        w.metric("herald_fallbacks_total{reason=\"ack_timeout\"}"),
        1.0
    );
    assert_eq!(w.metric("herald_gateway_ack_timeouts_total"), 1.0);
    assert_eq!(w.deliveries("fcm", "delivered"), 1.0);
    assert_eq!(w.deliveries("live", "delivered"), 0.0);
    w.stop().await;
}

/// A device that stops answering pings is declared dead; the next notification falls back.
#[tokio::test]
async fn dead_heartbeat_falls_back() {
    let w = World::start(Backend::Memory).await;
    let (ws, _) = gw::connect(&w.app, "phone-3").await;
    // Never polled again: tungstenite answers pings only while read.
    wait_for(
        Duration::from_secs(10),
        "the session declared dead",
        || async { (w.app.closed("pong_timeout") >= 1.0).then_some(()) },
    )
    .await;
    w.notify(apns_body("phone-3")).await;
    w.hook.wait("delivered", 1).await;
    assert_eq!(w.apns.request_count(), 1);
    assert_eq!(w.metric("herald_fallbacks_total{reason=\"offline\"}"), 1.0);
    drop(ws);
    w.stop().await;
}

/// Cluster mode without an offline inbox (`inbox.url` unset): a target with no provider
/// route waits for its device by retrying, and is delivered live once the device connects
/// within the attempts. (With an inbox it is stored instead: tests/offline.)
#[tokio::test]
async fn live_only_target_is_retried_until_the_device_connects() {
    let w = World::start_with(Backend::Rabbit, |s| {
        s.retry.base_delay = Duration::from_millis(300);
        s.retry.max_delay = Duration::from_secs(2);
        s.retry.max_attempts = 6;
    })
    .await;
    let id = w
        .notify(json!({"targets": [{"device_id": "late-1"}], "data": {"k": "v"}}))
        .await;
    wait_for(Duration::from_secs(10), "a retry", || async {
        (w.metric("herald_retries_total{channel=\"live\"}") >= 1.0).then_some(())
    })
    .await;
    let (ws, _) = gw::connect(&w.app, "late-1").await;
    let mut frames = gw::spawn_acker(ws);
    let frame = tokio::time::timeout(Duration::from_secs(15), frames.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(frame["id"], id.as_str());
    w.hook.wait("delivered", 1).await;
    w.wait_settled().await;
    assert!(w.hook.of("dead_lettered").is_empty());
    w.stop().await;
}
