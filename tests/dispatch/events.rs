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
