//! The drain at SIGTERM: deliveries in flight finish, and their outcome events still reach
//! the webhook (the event sinks stop only after the dispatcher has drained).

use std::time::Duration;

use serde_json::json;

use crate::gw;
use crate::harness::{Backend, World};
use crate::support::wait_for;

#[tokio::test]
async fn events_of_deliveries_in_flight_at_sigterm_reach_the_webhook() {
    // A long ack timeout: the delivery is still waiting for its ack when the drain begins.
    let w = World::start_with(Backend::Memory, |s| {
        s.gateway.ack_timeout = Duration::from_secs(10);
    })
    .await;
    let (mut ws, _hello) = gw::connect(&w.app, "phone-1").await;
    let id = w
        .notify(json!({"targets": [{"device_id": "phone-1"}], "data": {"k": "v"}}))
        .await;
    let frame = gw::next_json(&mut ws).await;
    assert_eq!(frame["type"], "notification", "{frame}");
    assert_eq!(frame["id"], id.as_str());

    // What SIGTERM does; then wait until the drain has visibly begun.
    w.app.shutdown.cancel();
    let http = reqwest::Client::new();
    wait_for(
        Duration::from_secs(5),
        "readiness 503 (draining)",
        || async {
            let r = http
                .get(format!("{}/readyz", w.app.base))
                .send()
                .await
                .ok()?;
            (r.status() == 503).then_some(())
        },
    )
    .await;

    // The device acks the in-flight notification only now, during the drain.
    gw::send_json(&mut ws, json!({"type": "ack", "id": id})).await;
    let delivered = w.hook.wait("delivered", 1).await;
    assert_eq!(delivered[0]["notification_id"], id.as_str());
    assert_eq!(delivered[0]["channel"], "live");
    assert_eq!(
        w.metric("herald_events_dropped_total{reason=\"buffer_full\",sink=\"webhook\"}"),
        0.0
    );
    // And the process stops within its grace period.
    let stopped = tokio::time::timeout(Duration::from_secs(10), w.app.task)
        .await
        .expect("the drain ends within the grace period");
    stopped
        .expect("the app task")
        .expect("the app stops cleanly");
}
