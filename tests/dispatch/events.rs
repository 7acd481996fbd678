//! The event webhook: batches retried when the receiver fails, dropped and counted when it
//! keeps failing; deliveries never wait for it.

use std::time::Duration;

use serde_json::json;

use crate::harness::{APNS_TOKEN, Backend, World};
use crate::support::wait_for;

#[tokio::test]
async fn a_failing_webhook_is_retried_until_it_accepts() {
    let w = World::start(Backend::Memory).await;
    w.hook.fail_next(2);
    let id = w
        .notify(json!({"targets": [{"device_id": "ios-1", "apns": {"token": APNS_TOKEN}}], "data": {"k": "v"}}))
        .await;
    let delivered = w.hook.wait("delivered", 1).await;
    assert_eq!(delivered[0]["notification_id"], id.as_str());
    assert_eq!(delivered.len(), 1, "the retried batch arrived once");
    // Counted once herald has read the 200, a moment after the receiver stored the batch.
    wait_for(
        Duration::from_secs(5),
        "the batch counted as published",
        || async {
            (w.metric("herald_events_published_total{sink=\"webhook\"}") == 1.0).then_some(())
        },
    )
    .await;
    assert_eq!(
        w.metric("herald_events_dropped_total{reason=\"failed\",sink=\"webhook\"}"),
        0.0
    );
    w.stop().await;
}

#[tokio::test]
async fn a_dead_webhook_drops_counted_batches_and_never_blocks_delivery() {
    let w = World::start_with(Backend::Memory, |s| s.events.webhook_attempts = 2).await;
    w.hook.fail_next(usize::MAX);
    w.notify(json!({"targets": [{"device_id": "ios-1", "apns": {"token": APNS_TOKEN}}], "data": {"k": "v"}}))
        .await;
    // The delivery itself completes regardless of the webhook.
    w.wait_settled().await;
    assert_eq!(w.apns.request_count(), 1);
    wait_for(
        Duration::from_secs(10),
        "the batch dropped after 2 attempts",
        || async {
            (w.metric("herald_events_dropped_total{reason=\"failed\",sink=\"webhook\"}") == 1.0)
                .then_some(())
        },
    )
    .await;
    assert!(w.hook.events().is_empty());
    w.stop().await;
}

/// On RabbitMQ each message is a JSON array of events with the message's routing key: a
/// burst that arrives while the sink is busy leaves in a few messages, `events.rs`'s
/// `RABBIT_BATCH` events at most each, split by key, none lost and each key's events in
/// the order they were emitted. The test runs on one thread and emits without yielding,
/// so the whole burst waits in the buffer when the sink first runs: the split is exact.
#[tokio::test]
async fn on_rabbitmq_a_burst_of_events_leaves_in_few_messages_one_routing_key_each() {
    use herald::events::{Event, EventKind, Events};
    use lapin::options::BasicGetOptions;

    let vhost = crate::support::TestVhost::new();
    let settings = vhost.settings();
    let metrics = herald::metrics::Metrics::new();
    let queue = herald::queue::Queue::from_settings(&settings, &metrics).unwrap();
    assert!(queue.wait_connected(Duration::from_secs(10)).await);
    let (conn, ch) = crate::harness::bind_events_queue(&vhost.url, "all", "#").await;

    let stop = tokio_util::sync::CancellationToken::new();
    let events = Events::start(&settings.events, &[], &queue, &metrics, &stop).unwrap();
    let id = herald::domain::NotificationId::generate();
    // 250 events: every fifth live, the rest apns.
    for i in 0..250 {
        let channel = if i % 5 == 0 { "live" } else { "apns" };
        let e = Event::about(EventKind::Delivered, "default", id, &format!("d{i}"), 1);
        events.emit(e.channel(channel));
    }
    stop.cancel();
    events.flushed().await;

    let mut messages = Vec::new();
    while let Some(m) = ch
        .basic_get("all".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let batch: Vec<serde_json::Value> = serde_json::from_slice(&m.delivery.data).unwrap();
        messages.push((m.delivery.routing_key.to_string(), batch));
    }
    // Taken 100, 100 and 50 at a time, each take split into its two keys.
    assert_eq!(
        messages.len(),
        6,
        "{:?}",
        messages
            .iter()
            .map(|(k, b)| (k, b.len()))
            .collect::<Vec<_>>()
    );
    let mut devices = std::collections::BTreeMap::<&str, Vec<String>>::new();
    for (key, batch) in &messages {
        assert!(batch.len() <= 100);
        for e in batch {
            assert_eq!(
                format!(
                    "{}.{}.{}",
                    e["app"].as_str().unwrap(),
                    e["type"].as_str().unwrap(),
                    e["channel"].as_str().unwrap()
                ),
                *key
            );
            devices
                .entry(key)
                .or_default()
                .push(e["device_id"].as_str().unwrap().to_owned());
        }
    }
    let want = |live: bool| -> Vec<String> {
        (0..250)
            .filter(|i| (i % 5 == 0) == live)
            .map(|i| format!("d{i}"))
            .collect()
    };
    assert_eq!(devices["default.delivered.live"], want(true));
    assert_eq!(devices["default.delivered.apns"], want(false));
    let text = metrics.render();
    assert_eq!(
        crate::support::metric_value(&text, "herald_events_published_total{sink=\"rabbitmq\"}"),
        Some(250.0)
    );
    let _ = conn.close(200, "done".into()).await;
    queue.close().await;
}
