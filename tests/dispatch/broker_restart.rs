//! The broker goes away under load and comes back: herald reports not-ready and answers 503
//! meanwhile, recovers by itself, and every notification it answered 202 for is delivered.
//!
//! This stops the machine's RabbitMQ application (`rabbitmqctl stop_app`), which would
//! break every other test running beside it, so it is `#[ignore]`d in the parallel run and
//! `scripts/test.sh` runs it alone afterwards (`--run-ignored only`).

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::harness::{APNS_TOKEN, Backend, World};
use crate::support::{API_KEY, wait_for};

/// Brings the broker back even if the test fails half way.
struct BrokerGuard;

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "start_app"])
            .output();
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "await_startup", "--timeout", "60"])
            .output();
    }
}

#[tokio::test]
#[ignore = "stops the machine's RabbitMQ; scripts/test.sh runs it alone"]
async fn broker_restart_under_load_loses_no_accepted_notification() {
    let w = Arc::new(World::start(Backend::Rabbit).await);
    let accepted = Arc::new(Mutex::new(BTreeSet::new()));
    let refused = Arc::new(Mutex::new(0u32));
    let stop = tokio_util::sync::CancellationToken::new();
    let poster = {
        let (w, accepted, refused, stop) =
            (w.clone(), accepted.clone(), refused.clone(), stop.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let mut i = 0;
            while !stop.is_cancelled() {
                let res = client
                    .post(format!("{}/v1/notify", w.app.base))
                    .bearer_auth(API_KEY)
                    .json(&json!({
                        "targets": [{"device_id": format!("ios-{i}"), "apns": {"token": APNS_TOKEN}}],
                        "data": {"k": "v"}
                    }))
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status() == 202 => {
                        let v: serde_json::Value = r.json().await.unwrap();
                        accepted
                            .lock()
                            .unwrap()
                            .insert(v["id"].as_str().unwrap().to_owned());
                    }
                    Ok(r) if r.status() == 503 => {
                        assert!(r.headers().contains_key("retry-after"));
                        *refused.lock().unwrap() += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    other => panic!("unexpected answer {other:?}"),
                }
                i += 1;
            }
        })
    };
    let count = || accepted.lock().unwrap().len();
    wait_for(Duration::from_secs(30), "posts flowing", || async {
        (count() >= 100).then_some(())
    })
    .await;

    let guard = BrokerGuard;
    rabbitmqctl(&["stop_app"]);
    // While the broker is away: not ready, and notify answers 503 (never a false 202).
    wait_for(Duration::from_secs(30), "readyz not ready", || async {
        let r = reqwest::get(format!("{}/readyz", w.app.base)).await.ok()?;
        (r.status() == 503).then_some(())
    })
    .await;
    wait_for(
        Duration::from_secs(30),
        "503s while the broker is away",
        || async { (*refused.lock().unwrap() >= 3).then_some(()) },
    )
    .await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup", "--timeout", "60"]);
    drop(guard);

    // herald recovers by itself.
    let after = count();
    wait_for(Duration::from_secs(60), "accepting again", || async {
        (count() >= after + 100).then_some(())
    })
    .await;
    wait_for(Duration::from_secs(30), "ready again", || async {
        let r = reqwest::get(format!("{}/readyz", w.app.base)).await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    stop.cancel();
    poster.await.unwrap();

    // Every 202 reached APNs (the devices are offline): nothing accepted was lost.
    let accepted = accepted.lock().unwrap().clone();
    let delivered = wait_for(
        Duration::from_secs(60),
        "every accepted notification at APNs",
        || async {
            let got: BTreeSet<String> = w
                .apns
                .requests()
                .into_iter()
                .filter_map(|r| r.headers.get("apns-id").cloned())
                .collect();
            accepted.is_subset(&got).then_some(got)
        },
    )
    .await;
    eprintln!(
        "accepted {}, refused with 503 {}, APNs requests {} ({} distinct)",
        accepted.len(),
        refused.lock().unwrap(),
        w.apns.request_count(),
        delivered.len()
    );
    Arc::try_unwrap(w)
        .ok()
        .expect("poster finished")
        .stop()
        .await;
}
