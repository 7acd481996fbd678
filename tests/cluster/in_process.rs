//! The finer cases with in-process nodes (`Application` on port 0) sharing one vhost:
//! newer session wins across nodes, unroutable = offline, no reply = fallback, re-registration
//! after a connection cut, admission rate limit.

use std::time::{Duration, Instant};

use futures::StreamExt;
use herald::config::{Role, Settings};
use herald::directory::{Directory, LiveOutcome};
use herald::startup::Application;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::json;

use crate::gw;
use crate::support::apns_double::ApnsDouble;
use crate::support::{API_KEY, TestVhost, wait_for};

fn settings(vhost: &TestVhost, apns: &ApnsDouble, roles: &[Role]) -> Settings {
    let mut s = gw::settings();
    s.queue.url = vhost.settings().queue.url;
    s.roles = roles.to_vec();
    s.cluster.reply_margin = Duration::from_millis(200);
    s.retry.base_delay = Duration::from_millis(100);
    s.retry.max_delay = Duration::from_millis(400);
    apns.configure(&mut s);
    s
}

/// A gateway-only node.
async fn gateway_node(vhost: &TestVhost, apns: &ApnsDouble) -> gw::GwApp {
    let app = gw::spawn(settings(vhost, apns, &[Role::Gateway])).await;
    wait_for(Duration::from_secs(10), "directory registered", || async {
        let r = reqwest::get(format!("{}/readyz", app.base)).await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    app
}

/// A node with the API and the dispatcher, and its cluster directory.
async fn dispatch_node(
    vhost: &TestVhost,
    apns: &ApnsDouble,
) -> (String, Directory, herald::shutdown::Shutdown) {
    let app = Application::build(settings(vhost, apns, &[Role::Api, Role::Dispatcher]))
        .await
        .unwrap();
    let dir = app.directory().expect("cluster directory on a dispatcher");
    let cluster = app.cluster().expect("cluster mode").clone();
    assert!(cluster.wait_ready(Duration::from_secs(10)).await);
    let base = format!("http://{}", app.addr());
    let shutdown = app.shutdown_handle();
    tokio::spawn(app.run_until_stopped());
    (base, dir, shutdown)
}

async fn post(base: &str, device: &str) -> String {
    let res = reqwest::Client::new()
        .post(format!("{base}/v1/notify"))
        .bearer_auth(API_KEY)
        .json(&json!({
            "targets": [{"device_id": device, "apns": {"token": crate::APNS_TOKEN}}],
            "data": {"k": "v"},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    res.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newer_session_on_another_node_replaces_the_older() {
    let vhost = TestVhost::new();
    let apns = ApnsDouble::start().await;
    let a = gateway_node(&vhost, &apns).await;
    let b = gateway_node(&vhost, &apns).await;
    let (base, _, _stop) = dispatch_node(&vhost, &apns).await;

    let (mut old, _) = gw::connect(&a, "twice").await;
    let (new, _) = gw::connect(&b, "twice").await;
    let (code, reason) = gw::expect_close(&mut old).await;
    assert_eq!(code, 4001, "older session closed as replaced: {reason}");
    wait_for(
        Duration::from_secs(5),
        "old session unregistered",
        || async { (!a.directory.is_connected(&gw::device("twice"))).then_some(()) },
    )
    .await;

    let mut frames = gw::spawn_acker(new);
    let id = post(&base, "twice").await;
    let frame = tokio::time::timeout(Duration::from_secs(10), frames.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(frame["id"], id.as_str(), "delivered to the newer session");
    assert!(apns.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_is_offline_from_the_broker_and_no_reply_means_fallback() {
    let vhost = TestVhost::new();
    let apns = ApnsDouble::start().await;
    let (base, dir, _stop) = dispatch_node(&vhost, &apns).await;
    let n = crate::support::fixtures::notification_with_data(10);

    // Nothing bound for this device: the broker returns the publish, well before any
    // deadline (ack_timeout 300 ms + reply_margin 200 ms).
    let started = Instant::now();
    assert_eq!(
        dir.deliver(&gw::device("nobody"), &n).await,
        LiveOutcome::Offline
    );
    assert!(started.elapsed() < Duration::from_millis(300));

    // A "node" that is bound for the device but never answers (as if it died after the
    // broker routed to it): the lookup gives up at the deadline and the dispatcher falls
    // back.
    let conn = lapin::Connection::connect(&vhost.url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.queue_bind(
        q.name().clone(),
        "herald.sessions".into(),
        // The directory's routing key of default's device `ghost`.
        gw::device("ghost").routing_key().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut swallowed = ch
        .basic_consume(
            q.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(
        dir.deliver(&gw::device("ghost"), &n).await,
        LiveOutcome::NotAcked
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(2),
        "gave up at the deadline: {waited:?}"
    );
    assert!(swallowed.next().await.is_some(), "the ghost got it");
    conn.close(200, "done".into()).await.unwrap();

    let id = post(&base, "ghost").await;
    wait_for(Duration::from_secs(10), "fallback to APNs", || async {
        apns.requests()
            .iter()
            .any(|r| r.headers.get("apns-id") == Some(&id))
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_stream_re_register_sessions_without_the_device_reconnecting() {
    let vhost = TestVhost::new();
    let apns = ApnsDouble::start().await;
    let g = gateway_node(&vhost, &apns).await;
    let (base, _, _stop) = dispatch_node(&vhost, &apns).await;
    let (ws, _) = gw::connect(&g, "stay").await;
    let mut frames = gw::spawn_acker(ws);
    let http = reqwest::Client::new();

    // A stream with the cut in the middle: every 202 is delivered, live or via APNs.
    let mut accepted = Vec::new();
    for k in 0..300 {
        if k == 150 {
            vhost.close_all_connections();
        }
        let res = http
            .post(format!("{base}/v1/notify"))
            .bearer_auth(API_KEY)
            .json(&json!({
                "targets": [{"device_id": "stay", "apns": {"token": crate::APNS_TOKEN}}],
                "data": {"k": "v"},
            }))
            .send()
            .await
            .unwrap();
        if res.status() == 202 {
            let v: serde_json::Value = res.json().await.unwrap();
            accepted.push(v["id"].as_str().unwrap().to_owned());
        }
    }
    let mut live = std::collections::HashSet::new();
    wait_for(
        Duration::from_secs(30),
        "every accepted notification delivered",
        || {
            while let Ok(f) = frames.try_recv() {
                if f["type"] == "notification" {
                    live.insert(f["id"].as_str().unwrap().to_owned());
                }
            }
            let fallback: std::collections::HashSet<String> = apns
                .requests()
                .into_iter()
                .filter_map(|r| r.headers.get("apns-id").cloned())
                .collect();
            let missing = accepted
                .iter()
                .filter(|id| !live.contains(*id) && !fallback.contains(*id))
                .count();
            async move { (missing == 0).then_some(()) }
        },
    )
    .await;
    eprintln!(
        "connection cut: {} accepted, {} live",
        accepted.len(),
        live.len()
    );

    // After the cut the same session (no reconnect) is routable again.
    wait_for(Duration::from_secs(10), "gateway ready again", || async {
        let r = reqwest::get(format!("{}/readyz", g.base)).await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let before = apns.requests().len();
    let id = post(&base, "stay").await;
    let got = loop {
        let f = tokio::time::timeout(Duration::from_secs(10), frames.recv())
            .await
            .expect("a frame")
            .expect("session still open");
        if f["id"] == id.as_str() {
            break f;
        }
    };
    assert_eq!(got["type"], "notification");
    assert_eq!(apns.requests().len(), before, "live, not fallback");
    assert_eq!(g.metric("herald_gateway_sessions_opened_total"), 1.0);
}

#[tokio::test]
async fn new_sessions_past_the_admission_rate_get_503_too_many_sessions() {
    let mut s = gw::settings();
    s.gateway.max_session_rate = 1;
    s.gateway.session_burst = 2;
    let app = gw::spawn(s).await;
    let _a = gw::connect(&app, "r-1").await;
    let _b = gw::connect(&app, "r-2").await;
    let res = reqwest::Client::new()
        .get(format!("{}/v1/connect", app.base))
        .bearer_auth(gw::token("r-3"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_sessions");
    assert_eq!(
        app.metric("herald_gateway_sessions_refused_total{reason=\"too_many_sessions\"}"),
        1.0
    );
}
