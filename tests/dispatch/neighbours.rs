//! Noisy neighbours: one app's flood of slow deliveries does not stop another app's live
//! deliveries (issue 11). Each app has its own work queue and its own in-flight budget.

use std::time::Duration;

use serde_json::json;

use crate::apps::{SHOP_KEY, Shop, notify_as};
use crate::delivery::on_both_backends;
use crate::gw;
use crate::harness::{Backend, World};
use crate::support::apns_double::Reply;
use crate::support::wait_for;

on_both_backends!(one_apps_flood_does_not_stop_another_apps_live_deliveries);

const SHOP_APNS_TOKEN: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

async fn one_apps_flood_does_not_stop_another_apps_live_deliveries(backend: Backend) {
    const BUDGET: u16 = 4;
    const FLOOD: usize = 40;
    let shop = Shop::start().await;
    // Shop's APNs never answers: each shop delivery holds its slot for the whole test.
    shop.apns.reply_always(Some(Reply::Hang));
    let w = World::start_with(backend, |s| {
        shop.configure(s);
        s.queue.prefetch = BUDGET;
        let apns = &mut s.apps.get_mut("shop").unwrap().apns;
        apns.timeout = Some(Duration::from_secs(300));
        // The hung deliveries are abandoned at the end, not waited for.
        s.http.shutdown_grace = Duration::from_millis(200);
    })
    .await;
    let (ws, _) = gw::connect(&w.app, "phone-1").await;
    let mut frames = gw::spawn_acker(ws);

    for i in 0..FLOOD {
        notify_as(
            &w,
            SHOP_KEY,
            json!({
                "targets": [{"device_id": format!("away-{i}"), "apns": {"token": SHOP_APNS_TOKEN}}],
                "notification": {"title": "Sale"},
            }),
        )
        .await;
    }
    // Shop's whole budget is held by deliveries its APNs does not answer; the rest of its
    // flood waits behind them.
    wait_for(
        Duration::from_secs(20),
        "shop's budget full of unanswered APNs requests",
        || async { (shop.apns.request_count() >= usize::from(BUDGET)).then_some(()) },
    )
    .await;

    // The default app's live notifications, queued after all of shop's, arrive one by one.
    for i in 0..5 {
        let id = w
            .notify(json!({"targets": [{"device_id": "phone-1"}], "data": {"n": i.to_string()}}))
            .await;
        let frame = tokio::time::timeout(Duration::from_secs(20), frames.recv())
            .await
            .expect("the default app's notification arrives while shop's flood is held")
            .unwrap();
        assert_eq!(frame["id"], id.as_str());
    }
    // All of that while shop's flood was still held: no answer came, so no more of shop's
    // work was taken than its budget, and every one of its messages is still queued.
    assert_eq!(shop.apns.request_count(), usize::from(BUDGET));
    match &w.vhost {
        // The last default notification's ack may still be on its way back when its frame
        // arrives: wait for its settlement to leave exactly shop's flood queued.
        None => {
            wait_for(
                Duration::from_secs(10),
                "only shop's flood left in the embedded queue",
                || async { (w.metric("herald_queue_depth") == FLOOD as f64).then_some(()) },
            )
            .await
        }
        // The broker's counts (ready + unacked) are sampled: wait for them to show it.
        Some(v) => {
            wait_for(
                Duration::from_secs(10),
                "shop's flood all in its queue",
                || {
                    let len = v.queue_len("herald.work.shop");
                    async move { (len == Some(FLOOD as u64)).then_some(()) }
                },
            )
            .await
        }
    }
    w.stop().await;
}
