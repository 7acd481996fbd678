//! A device that holds a frame without acking it does not hold the dispatcher's active
//! budget (src/dispatch/slot.rs): with `queue.prefetch = 1`, another device's notification
//! is delivered while the first still waits for its ack.

use std::time::Duration;

use serde_json::json;

use crate::delivery::on_both_backends;
use crate::gw;
use crate::harness::{Backend, World};
use crate::support::wait_for;

on_both_backends!(a_device_that_never_acks_does_not_hold_the_only_active_slot);

const PARKED: &str = "herald_dispatcher_parked_messages";

async fn a_device_that_never_acks_does_not_hold_the_only_active_slot(backend: Backend) {
    let w = World::start_with(backend, |s| {
        s.queue.prefetch = 1;
        // Long enough that "the other device got its frame" cannot be the silent device's
        // ack deadline running out first.
        s.gateway.ack_timeout = Duration::from_secs(30);
        s.dispatcher.max_awaiting_ack = 4;
    })
    .await;
    let (silent_ws, _) = gw::connect(&w.app, "silent").await;
    let mut silent = gw::spawn_reader(silent_ws);
    let (acker_ws, _) = gw::connect(&w.app, "acker").await;
    let mut acker = gw::spawn_acker(acker_ws);

    let held = w
        .notify(json!({"targets": [{"device_id": "silent"}], "data": {"n": "1"}}))
        .await;
    let frame = tokio::time::timeout(Duration::from_secs(10), silent.recv())
        .await
        .expect("the silent device gets its frame")
        .unwrap();
    assert_eq!(frame["id"], held.as_str());
    // Its message now waits only on the ack: parked, off the active budget.
    wait_for(
        Duration::from_secs(10),
        "the waiting message parked",
        || async { (w.metric(PARKED) == 1.0).then_some(()) },
    )
    .await;

    let id = w
        .notify(json!({"targets": [{"device_id": "acker"}], "data": {"n": "2"}}))
        .await;
    let frame = tokio::time::timeout(Duration::from_secs(10), acker.recv())
        .await
        .expect("delivered while the only active slot's first message waits for an ack")
        .unwrap();
    assert_eq!(frame["id"], id.as_str());
    wait_for(
        Duration::from_secs(10),
        "acker's delivery recorded",
        || async { (w.deliveries("live", "delivered") >= 1.0).then_some(()) },
    )
    .await;
    // And the first is still waiting, not settled by its deadline.
    assert_eq!(
        w.metric(PARKED),
        1.0,
        "the silent device's message still parked"
    );
    assert_eq!(
        w.metric("herald_fallbacks_total{reason=\"ack_timeout\"}"),
        0.0
    );
}
