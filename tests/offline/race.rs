//! The notify/connect race: a notification stored while its device is connecting must
//! arrive in that session, not wait for the next reconnect. Thousands of interleavings:
//! each device connects while its notification is being accepted and dispatched, so the
//! live attempt, the inbox write and the session's replay land in every order.

use std::time::Duration;

use serde_json::json;

use crate::{Backend, World, gw};

mod notify_and_connect_at_once_never_waits_for_a_reconnect {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory() {
        super::race(crate::Backend::Memory, 2000).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::race(crate::Backend::Postgres, 1000).await
    }
}

/// Devices raced at once: enough to interleave, few enough for one HTTP worker.
const WAVE: usize = 50;

async fn race(b: Backend, devices: usize) {
    let w = World::start_with(b, |s| {
        // Admission is not what this test is about.
        s.gateway.max_session_rate = 1_000_000;
        s.gateway.session_burst = 1_000_000;
        // A live attempt that finds the session still registering times out quickly.
        s.gateway.ack_timeout = Duration::from_millis(300);
    })
    .await;
    let app = &w.w.app;
    let mut missing = Vec::new();
    for wave in 0..devices.div_ceil(WAVE) {
        let mut tasks = Vec::new();
        for i in wave * WAVE..((wave + 1) * WAVE).min(devices) {
            let w = &w;
            tasks.push(async move {
                let device = format!("race-{i}");
                let body =
                    json!({"targets": [{"device_id": device}], "data": {"i": i.to_string()}});
                let notify = w.notify(body);
                let session = async {
                    let (ws, _) = gw::connect(app, &device).await;
                    gw::spawn_acker(ws)
                };
                let (id, mut frames) = tokio::join!(notify, session);
                // The first notification frame of this session must be it; the wait is
                // bounded well under any reconnect the device would make.
                let got = tokio::time::timeout(Duration::from_secs(10), async {
                    while let Some(v) = frames.recv().await {
                        if v["type"] == "notification" {
                            return Some(v["id"].as_str().unwrap().to_owned());
                        }
                    }
                    None
                })
                .await;
                match got {
                    Ok(Some(got)) if got == id => None,
                    other => Some((device, id, other)),
                }
            });
        }
        for r in futures::future::join_all(tasks).await {
            missing.extend(r);
        }
    }
    let stored = w.metric("herald_inbox_writes_total");
    let live = w.metric("herald_deliveries_total{channel=\"live\",outcome=\"delivered\"}");
    eprintln!(
        "race over {devices} devices: {live} delivered live first, {stored} stored then replayed"
    );
    assert!(
        missing.is_empty(),
        "not delivered in the session: {missing:?}"
    );
    w.stop().await;
}
