//! Offline → connect → replay: order, bounds, expiry, collapse keys, at_most_once, and a
//! device that drops mid-replay.

use std::time::Duration;

use herald::config::Secret;
use serde_json::json;

use crate::support::wait_for;
use crate::{Backend, World, assert_nothing_more, gw, on_both_backends, read_and_ack};

on_both_backends!(
    offline_then_connect_arrives_after_hello_in_order_and_acks_remove_it,
    cap_of_100_keeps_the_newest_100_and_reports_50_overflows,
    an_expired_entry_is_never_sent_and_is_reaped_with_an_event,
    a_collapse_key_replaces_the_pending_entry,
    at_most_once_to_an_offline_device_is_never_delivered_later,
    a_device_that_drops_mid_replay_gets_the_remainder,
    a_replay_of_n_entries_emits_n_replayed_events,
    inbox_metrics_carry_the_app,
);

async fn offline_then_connect_arrives_after_hello_in_order_and_acks_remove_it(b: Backend) {
    let w = World::start(b).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(w.notify_offline("web-7", i).await);
        w.wait_stored(i + 1).await;
    }
    let stored = w.w.hook.wait("stored", 3).await;
    assert!(stored.iter().all(|e| e["device_id"] == "web-7"));
    assert_eq!(w.rows("web-7").await.unwrap_or(3), 3);
    // Nothing was retried or dead-lettered: the inbox took them.
    assert_eq!(w.metric("herald_retries_total{channel=\"live\"}"), 0.0);

    let (mut ws, hello) = gw::connect(&w.w.app, "web-7").await;
    assert_eq!(hello["type"], "hello");
    let got = read_and_ack(&mut ws, 3).await;
    assert_eq!(got, ids, "replayed in accepted order, same ids");
    w.wait_acked(3).await;
    w.wait_rows_gone("web-7").await;
    drop(ws);

    // A new session replays nothing: the acks removed them.
    let (mut ws, _) = gw::connect(&w.w.app, "web-7").await;
    assert_nothing_more(&w, &mut ws, "web-7").await;
    assert!(w.w.hook.of("dead_lettered").is_empty());
    w.stop().await;
}

async fn cap_of_100_keeps_the_newest_100_and_reports_50_overflows(b: Backend) {
    let w = World::start(b).await;
    let mut accepted = Vec::new();
    for i in 0..150 {
        accepted.push(w.notify_offline("web-cap", i).await);
    }
    let overflow = w.w.hook.wait("inbox_overflow", 50).await;
    w.wait_stored(150).await;
    let overflowed: Vec<String> = overflow
        .iter()
        .map(|e| e["notification_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        w.metric("herald_inbox_dropped_total{reason=\"overflow\"}"),
        50.0
    );

    let (mut ws, _) = gw::connect(&w.w.app, "web-cap").await;
    let mut frames = Vec::new();
    while frames.len() < 100 {
        let v = gw::next_json(&mut ws).await;
        if v["type"] == "notification" {
            gw::send_json(&mut ws, json!({"type": "ack", "id": v["id"]})).await;
            frames.push(v);
        }
    }
    let got: Vec<String> = frames
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_owned())
        .collect();
    // Every accepted id is either replayed or reported overflowed, never both.
    let mut all: Vec<String> = got.iter().chain(&overflowed).cloned().collect();
    all.sort();
    let mut expected = accepted.clone();
    expected.sort();
    assert_eq!(all, expected);
    // Replayed in accepted order, and the dropped ones are the oldest.
    let at = |f: &serde_json::Value| f["accepted_at_ms"].as_u64().unwrap();
    assert!(frames.windows(2).all(|p| at(&p[0]) <= at(&p[1])));
    let newest_dropped = overflowed
        .iter()
        .map(|id| accepted.iter().position(|a| a == id).unwrap())
        .max()
        .unwrap();
    let oldest_kept = got
        .iter()
        .map(|id| accepted.iter().position(|a| a == id).unwrap())
        .min()
        .unwrap();
    // Accepted order is by millisecond, then store order; within one millisecond the
    // dispatcher may store out of order, so compare by time, not by position alone.
    if newest_dropped > oldest_kept {
        let ms = |i: usize| {
            uuid::Uuid::parse_str(&accepted[i])
                .unwrap()
                .get_timestamp()
                .unwrap()
                .to_unix()
        };
        assert_eq!(ms(newest_dropped), ms(oldest_kept), "an older one was kept");
    }
    w.wait_acked(100).await;
    w.wait_rows_gone("web-cap").await;
    assert_nothing_more(&w, &mut ws, "web-cap").await;
    w.stop().await;
}

async fn an_expired_entry_is_never_sent_and_is_reaped_with_an_event(b: Backend) {
    let w = World::start_with(b, |s| s.inbox.reap_interval = Duration::from_millis(100)).await;
    let id = w
        .notify(json!({"targets": [{"device_id": "web-ttl"}], "data": {"k": "v"}, "ttl": "1s"}))
        .await;
    w.wait_stored(1).await;
    let expired = w.w.hook.wait("expired", 1).await;
    assert_eq!(expired[0]["notification_id"], id.as_str());
    assert_eq!(expired[0]["device_id"], "web-ttl");
    assert_eq!(expired[0]["reason"], "ttl passed in the offline inbox");
    assert_eq!(
        w.metric("herald_inbox_dropped_total{reason=\"expired\"}"),
        1.0
    );
    assert_eq!(w.rows("web-ttl").await.unwrap_or(0), 0);
    let (mut ws, _) = gw::connect(&w.w.app, "web-ttl").await;
    assert_nothing_more(&w, &mut ws, "web-ttl").await;
    assert!(w.w.hook.of("dead_lettered").is_empty());
    w.stop().await;
}

async fn a_collapse_key_replaces_the_pending_entry(b: Backend) {
    let w = World::start(b).await;
    let body = |ck: Option<&str>, n: &str| {
        let mut v = json!({"targets": [{"device_id": "web-ck"}], "data": {"n": n}});
        if let Some(ck) = ck {
            v["collapse_key"] = json!(ck);
        }
        v
    };
    let a = w.notify(body(Some("score"), "a")).await;
    w.wait_stored(1).await;
    let b_id = w.notify(body(Some("score"), "b")).await;
    w.wait_stored(2).await;
    let c = w.notify(body(None, "c")).await;
    w.wait_stored(3).await;
    let replaced = w.w.hook.wait("replaced", 1).await;
    assert_eq!(replaced[0]["notification_id"], a.as_str());
    assert_eq!(
        replaced[0]["reason"],
        format!("replaced by {b_id} (same collapse_key)")
    );
    let (mut ws, _) = gw::connect(&w.w.app, "web-ck").await;
    assert_eq!(read_and_ack(&mut ws, 2).await, [b_id, c]);
    assert_nothing_more(&w, &mut ws, "web-ck").await;
    w.stop().await;
}

async fn at_most_once_to_an_offline_device_is_never_delivered_later(b: Backend) {
    let w = World::start(b).await;
    let body = json!({"targets": [{"device_id": "web-amo"}], "data": {"typing": "1"}, "qos": "at_most_once"});
    w.notify(body).await;
    w.w.wait_settled().await;
    assert_eq!(w.metric("herald_inbox_writes_total"), 0.0);
    assert_eq!(w.metric("herald_retries_total{channel=\"live\"}"), 0.0);
    assert_eq!(w.rows("web-amo").await.unwrap_or(0), 0);
    let (mut ws, _) = gw::connect(&w.w.app, "web-amo").await;
    assert_nothing_more(&w, &mut ws, "web-amo").await;
    assert!(w.w.hook.of("stored").is_empty());
    assert!(w.w.hook.of("dead_lettered").is_empty());
    // And at_most_once to a connected device is one live attempt that arrives.
    let id = w
        .notify(json!({"targets": [{"device_id": "web-amo"}], "data": {"typing": "2"}, "qos": "at_most_once"}))
        .await;
    assert_eq!(read_and_ack(&mut ws, 1).await, [id]);
    w.stop().await;
}

async fn a_device_that_drops_mid_replay_gets_the_remainder(b: Backend) {
    let w = World::start(b).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(w.notify_offline("web-drop", i).await);
        w.wait_stored(i + 1).await;
    }
    let (mut ws, _) = gw::connect(&w.w.app, "web-drop").await;
    let first = read_and_ack(&mut ws, 5).await;
    assert_eq!(first, ids[..5]);
    w.wait_acked(5).await;
    // Gone mid-replay, without a close frame.
    drop(ws);
    let (mut ws, _) = gw::connect(&w.w.app, "web-drop").await;
    let rest = read_and_ack(&mut ws, 15).await;
    assert_eq!(
        rest,
        ids[5..],
        "the remainder, in order, and not the acked five"
    );
    w.wait_acked(20).await;
    w.wait_rows_gone("web-drop").await;
    assert_nothing_more(&w, &mut ws, "web-drop").await;
    wait_for(Duration::from_secs(5), "no dead letters", || async {
        w.w.hook.of("dead_lettered").is_empty().then_some(())
    })
    .await;
    w.stop().await;
}

/// Issue 12: one `replayed` event per inbox entry the device acked after `hello`, channel
/// `live`, with the notification's id; nothing else for them (no `delivered`).
async fn a_replay_of_n_entries_emits_n_replayed_events(b: Backend) {
    const N: usize = 5;
    let w = World::start(b).await;
    let mut ids = Vec::new();
    for i in 0..N {
        ids.push(w.notify_offline("web-r", i).await);
    }
    w.wait_stored(N).await;
    let (mut ws, _) = gw::connect(&w.w.app, "web-r").await;
    assert_eq!(read_and_ack(&mut ws, N).await, ids);
    let replayed = w.w.hook.wait("replayed", N).await;
    let mut got: Vec<&str> = replayed
        .iter()
        .map(|e| e["notification_id"].as_str().unwrap())
        .collect();
    got.sort();
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(got, want, "one per entry");
    for e in &replayed {
        assert_eq!(e["app"], "default");
        assert_eq!(e["device_id"], "web-r");
        assert_eq!(e["channel"], "live");
        assert!(e.get("attempt").is_none(), "{e}");
    }
    // A live delivery after the replay is a `delivered` event, not a `replayed` one; the
    // events sink is FIFO, so every `replayed` (emitted before its ack was counted) is in by
    // the time this `delivered` arrives: exactly N.
    w.wait_acked(N).await;
    assert_nothing_more(&w, &mut ws, "web-r").await;
    w.w.hook.wait("delivered", 1).await;
    assert_eq!(w.w.hook.of("replayed").len(), N);
    assert!(
        w.w.hook
            .of("delivered")
            .iter()
            .all(|e| !ids.iter().any(|id| e["notification_id"] == id.as_str())),
        "no delivered event for a replayed entry"
    );
}

/// Issue 11: the inbox metrics a user slices by app carry it, pre-created at 0 for every
/// configured app, and one app's traffic counts under its name only.
async fn inbox_metrics_carry_the_app(b: Backend) {
    const SHOP_KEY: &str = "shop-api-key-0123456789";
    let w = World::start_with(b, |s| {
        s.apps.entry("shop".into()).or_default().api_keys = vec![Secret::new(SHOP_KEY)];
        s.inbox.reap_interval = Duration::from_millis(100);
    })
    .await;
    let text = w.w.app.metrics.render();
    for app in ["default", "shop"] {
        for series in [
            format!("herald_inbox_writes_total{{app=\"{app}\"}} 0"),
            format!("herald_inbox_replayed_total{{app=\"{app}\"}} 0"),
            format!("herald_inbox_acked_total{{app=\"{app}\"}} 0"),
            format!("herald_inbox_pending{{app=\"{app}\"}} 0"),
            format!("herald_inbox_dropped_total{{app=\"{app}\",reason=\"overflow\"}} 0"),
            format!("herald_inbox_dropped_total{{app=\"{app}\",reason=\"replaced\"}} 0"),
            format!("herald_inbox_dropped_total{{app=\"{app}\",reason=\"expired\"}} 0"),
        ] {
            assert!(text.contains(&series), "{series} pre-created");
        }
    }

    let res =
        w.w.http
            .post(format!("{}/v1/notify", w.w.app.base))
            .bearer_auth(SHOP_KEY)
            .json(&json!({"targets": [{"device_id": "web-shop"}], "data": {"k": "v"}}))
            .send()
            .await
            .unwrap();
    assert_eq!(res.status(), 202);
    w.wait_stored(1).await;
    assert_eq!(w.metric("herald_inbox_writes_total{app=\"shop\"}"), 1.0);
    assert_eq!(w.metric("herald_inbox_writes_total{app=\"default\"}"), 0.0);
    // The reaper's sample counts it under its app.
    wait_for(
        Duration::from_secs(10),
        "shop's pending entry sampled",
        || async { (w.metric("herald_inbox_pending{app=\"shop\"}") == 1.0).then_some(()) },
    )
    .await;
    assert_eq!(w.metric("herald_inbox_pending{app=\"default\"}"), 0.0);

    let (mut ws, _) = gw::connect_with(&w.w.app, &gw::token_in("shop", "web-shop")).await;
    assert_eq!(read_and_ack(&mut ws, 1).await.len(), 1);
    w.wait_acked(1).await;
    assert_eq!(w.metric("herald_inbox_replayed_total{app=\"shop\"}"), 1.0);
    assert_eq!(w.metric("herald_inbox_acked_total{app=\"shop\"}"), 1.0);
    assert_eq!(
        w.metric("herald_inbox_replayed_total{app=\"default\"}"),
        0.0
    );
    // Acked: the next sample has no shop entry, and the gauge says 0, not its last value.
    wait_for(
        Duration::from_secs(10),
        "shop's pending back to 0",
        || async { (w.metric("herald_inbox_pending{app=\"shop\"}") == 0.0).then_some(()) },
    )
    .await;
    w.stop().await;
}
