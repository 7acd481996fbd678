//! The finer cases with in-process nodes (`Application` on port 0) sharing one vhost:
//! newer session wins across nodes, offline answered by the replica with no broker round
//! trip (one target or a 1,000-target fan-out), a silent node falls back at the hop deadline
//! and a dead one at its lease, a new dispatcher converges by snapshot, re-announcement
//! after a connection cut, admission rate limit.

use std::time::Duration;

use futures::StreamExt;
use herald::config::{Role, Settings};
use herald::directory::{Directory, LiveOutcome};
use herald::startup::Application;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
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
    // Short leases so a dead node is noticed quickly in tests (defaults: 500 ms / 1.5 s).
    s.cluster.heartbeat_interval = Duration::from_millis(100);
    s.cluster.node_lease = Duration::from_millis(500);
    s.retry.base_delay = Duration::from_millis(100);
    s.retry.max_delay = Duration::from_millis(400);
    apns.configure(&mut s);
    s
}

/// A gateway-only node, on a vhost where a dispatcher has declared its exchanges (a
/// gateway declares none and waits for them; here gateways start first).
async fn gateway_node(vhost: &TestVhost, apns: &ApnsDouble) -> gw::GwApp {
    let s = settings(vhost, apns, &[Role::Gateway]);
    vhost.declare_dispatcher_topology(&s).await;
    let app = gw::spawn(s).await;
    wait_for(Duration::from_secs(10), "directory registered", || async {
        let r = reqwest::get(format!("{}/readyz", app.base)).await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    app
}

/// A node with the API and the dispatcher, and its cluster directory.
struct DispatchNode {
    base: String,
    dir: Directory,
    metrics: herald::metrics::Metrics,
    shutdown: herald::shutdown::Shutdown,
}

impl DispatchNode {
    /// Messages this node's directory published, of one kind (deliver, snapshot_request…).
    fn published(&self, kind: &str) -> u64 {
        self.metrics
            .cluster_messages
            .with_label_values(&[kind])
            .get()
    }
}

async fn dispatch_node(vhost: &TestVhost, apns: &ApnsDouble) -> DispatchNode {
    dispatch_node_with(settings(vhost, apns, &[Role::Api, Role::Dispatcher])).await
}

async fn dispatch_node_with(s: Settings) -> DispatchNode {
    let app = Application::build(s).await.unwrap();
    let dir = app.directory().expect("cluster directory on a dispatcher");
    let cluster = app.cluster().expect("cluster mode").clone();
    assert!(cluster.wait_ready(Duration::from_secs(10)).await);
    let node = DispatchNode {
        base: format!("http://{}", app.addr()),
        dir,
        metrics: app.metrics().clone(),
        shutdown: app.shutdown_handle(),
    };
    tokio::spawn(app.run_until_stopped());
    node
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
    let d = dispatch_node(&vhost, &apns).await;
    let base = d.base.clone();

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
    // The dispatcher node is ready (its presence replica in sync) before the notify, as an
    // operator's load balancer would see it.
    let readyz = format!("{base}/readyz");
    wait_for(Duration::from_secs(10), "dispatcher /readyz 200", || {
        let readyz = readyz.clone();
        async move {
            let r = reqwest::get(&readyz).await.ok()?;
            r.status().is_success().then_some(())
        }
    })
    .await;
    let id = post(&base, "twice").await;
    let frame = tokio::time::timeout(Duration::from_secs(10), frames.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(frame["id"], id.as_str(), "delivered to the newer session");
    assert!(apns.requests().is_empty());
}

/// Issue 14 across nodes: a device's newer session on gateway node B closes its older one
/// on gateway node A; A (a gateway-only node) publishes one `session_replaced` event to
/// `herald.events`, naming both sessions and both peers (B's from its presence delta). The
/// gateways follow no presence: the dispatcher's replica sees the two claims and tells A,
/// once, to close the older session.
#[tokio::test]
async fn a_replacement_across_nodes_is_one_session_replaced_event_from_the_closing_node() {
    use lapin::options::{BasicGetOptions, QueueBindOptions};
    let vhost = TestVhost::new();
    let apns = ApnsDouble::start().await;
    let a = gateway_node(&vhost, &apns).await;
    let b = gateway_node(&vhost, &apns).await;
    let d = dispatch_node(&vhost, &apns).await;
    // The nodes declared herald.events; a subscriber binds its own queue to it.
    let conn = lapin::Connection::connect(&vhost.url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "sessions".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "sessions".into(),
        "herald.events".into(),
        "*.session_replaced".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let (mut old, old_hello) = gw::connect(&a, "roaming").await;
    let old_peer = gw::local_addr(&old).to_string();
    let (new, new_hello) = gw::connect(&b, "roaming").await;
    let new_peer = gw::local_addr(&new).to_string();
    let (code, _) = gw::expect_close(&mut old).await;
    assert_eq!(code, 4001);
    let got = wait_for(
        Duration::from_secs(10),
        "a session_replaced event on herald.events",
        || {
            let ch = ch.clone();
            async move {
                let m = ch
                    .basic_get("sessions".into(), BasicGetOptions { no_ack: true })
                    .await
                    .unwrap()?;
                // A message is a JSON array of events with its routing key.
                let batch: Vec<serde_json::Value> =
                    serde_json::from_slice(&m.delivery.data).unwrap();
                assert_eq!(batch.len(), 1, "one replacement, one event: {batch:?}");
                Some((
                    m.delivery.routing_key.to_string(),
                    batch.into_iter().next().unwrap(),
                ))
            }
        },
    )
    .await;
    let (key, e) = got;
    assert_eq!(key, "default.session_replaced");
    assert_eq!(e["type"], "session_replaced");
    assert_eq!(e["device_id"], "roaming");
    assert_eq!(
        e["old_session"],
        json!({"id": old_hello["session_id"], "peer": old_peer})
    );
    assert_eq!(
        e["new_session"],
        json!({"id": new_hello["session_id"], "peer": new_peer})
    );
    // Emitted by the node that closed the old session (counted once its confirm is in),
    // and only by it.
    let published = |n: &gw::GwApp| n.metric("herald_events_published_total{sink=\"rabbitmq\"}");
    wait_for(
        Duration::from_secs(5),
        "node A's event confirmed",
        || async { (published(&a) == 1.0).then_some(()) },
    )
    .await;
    assert_eq!(published(&b), 0.0);
    assert_eq!(
        d.published("supersede"),
        1,
        "one supersede, to the node with the older session"
    );
    drop(new);
}

/// A fake gateway node speaking the presence protocol by hand: it heartbeats, claims one
/// device, and swallows whatever reaches its node queue without ever replying (as if it
/// hung, or died after the broker routed to it).
struct Ghost {
    conn: lapin::Connection,
    frames: tokio::sync::mpsc::UnboundedReceiver<(Vec<u8>, String)>,
    heartbeats: tokio::task::JoinHandle<()>,
}

impl Ghost {
    async fn start(vhost: &TestVhost, device: &str) -> Ghost {
        // Presence carries the directory's key of the device: `app/device`.
        let device = gw::device(device).routing_key();
        let conn = lapin::Connection::connect(&vhost.url, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            "herald.node.ghost".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        let mut consumer = ch
            .basic_consume(
                "herald.node.ghost".into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let (tx, frames) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let kind = d.properties.kind().as_ref().map(|k| k.to_string());
                let _ = tx.send((d.data, kind.unwrap_or_default()));
            }
        });
        let epoch = uuid::Uuid::now_v7();
        let publish = |ch: lapin::Channel, body: serde_json::Value| async move {
            ch.basic_publish(
                "herald.presence".into(),
                "".into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap();
        };
        publish(
            ch.clone(),
            json!({"t": "delta", "node": "ghost", "epoch": epoch, "seq": 1,
                   "ops": [[device, uuid::Uuid::now_v7()]]}),
        )
        .await;
        let hb = ch.clone();
        let heartbeats = tokio::spawn(async move {
            loop {
                publish(
                    hb.clone(),
                    json!({"t": "heartbeat", "node": "ghost", "epoch": epoch, "seq": 1}),
                )
                .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Ghost {
            conn,
            frames,
            heartbeats,
        }
    }

    /// Stops heartbeating (the node queue stays, still swallowing).
    fn fall_silent(&self) {
        self.heartbeats.abort();
    }
}

/// Waits until `d`'s replica places `device` on a live node.
async fn wait_known(d: &DispatchNode, nodes: i64) {
    wait_for(
        Duration::from_secs(10),
        "replica learned the nodes",
        || async { (d.metrics.cluster_nodes.get() == nodes).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_comes_from_the_replica_and_a_silent_node_falls_back_at_the_hop_deadline() {
    let vhost = TestVhost::new();
    let apns = ApnsDouble::start().await;
    let mut s = settings(&vhost, &apns, &[Role::Api, Role::Dispatcher]);
    // The device's ack deadline is long; the broker hop's is short. A node that never says
    // "received" must cost the hop deadline only.
    s.gateway.ack_timeout = Duration::from_secs(30);
    s.cluster.hop_timeout = Duration::from_millis(300);
    let d = dispatch_node_with(s).await;
    let n = crate::support::fixtures::notification_with_data(10);

    // Nobody has this device: offline, answered locally, nothing published.
    assert_eq!(
        d.dir.deliver(&gw::device("nobody"), &n).await,
        LiveOutcome::Offline
    );
    assert_eq!(
        d.published("deliver"),
        0,
        "no broker round trip for offline"
    );

    let mut ghost = Ghost::start(&vhost, "ghost-dev").await;
    wait_known(&d, 1).await;
    let attempt = tokio::time::timeout(
        Duration::from_secs(20),
        d.dir.deliver(&gw::device("ghost-dev"), &n),
    )
    .await
    .expect("the hop deadline, not the 30 s ack deadline, ends a silent node's attempt");
    assert_eq!(attempt, LiveOutcome::NotAcked);
    assert_eq!(d.published("deliver"), 1);
    // Only the device's own frame crossed: the notification frame, no targets, no tokens.
    let (body, kind) = ghost.frames.recv().await.unwrap();
    assert_eq!(kind, "deliver");
    let frame: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(frame["type"], "notification");
    assert_eq!(frame["id"], n.id.to_string().as_str());
    assert!(frame.get("targets").is_none());

    // The ghost stops heartbeating: after its lease its device is offline, locally.
    ghost.fall_silent();
    wait_known(&d, 0).await;
    assert_eq!(
        d.dir.deliver(&gw::device("ghost-dev"), &n).await,
        LiveOutcome::Offline
    );
    assert_eq!(d.published("deliver"), 1, "a dead node costs no publish");

    // Through the whole pipeline: fallback to APNs.
    let id = post(&d.base, "ghost-dev").await;
    wait_for(Duration::from_secs(10), "fallback to APNs", || async {
        apns.requests()
            .iter()
            .any(|r| r.headers.get("apns-id") == Some(&id))
            .then_some(())
    })
    .await;
    ghost.conn.close(200, "done".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_dying_mid_delivery_fails_its_pending_deliveries_at_its_lease() {
    let vhost = TestVhost::new();
    let apns = ApnsDouble::start().await;
    let mut s = settings(&vhost, &apns, &[Role::Api, Role::Dispatcher]);
    // Both deadlines far away: only the lease can end the attempt early.
    s.gateway.ack_timeout = Duration::from_secs(60);
    s.cluster.hop_timeout = Duration::from_secs(60);
    let d = dispatch_node_with(s).await;
    let mut ghost = Ghost::start(&vhost, "doomed").await;
    wait_known(&d, 1).await;
    let dir = d.dir.clone();
    let attempt = tokio::spawn(async move {
        dir.deliver(
            &gw::device("doomed"),
            &crate::support::fixtures::notification_with_data(10),
        )
        .await
    });
    // The frame reached the node; then it "dies" without answering.
    let (_, kind) = ghost.frames.recv().await.unwrap();
    assert_eq!(kind, "deliver");
    ghost.fall_silent();
    let outcome = tokio::time::timeout(Duration::from_secs(20), attempt)
        .await
        .expect("the lease, not a 60 s deadline, ends the attempt")
        .unwrap();
    assert_eq!(outcome, LiveOutcome::NotAcked);
    ghost.conn.close(200, "done".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_fan_out_of_1000_targets_costs_no_broker_round_trip_per_target() {
    let vhost = TestVhost::new();
    let apns = ApnsDouble::start().await;
    let g = gateway_node(&vhost, &apns).await;
    let d = dispatch_node(&vhost, &apns).await;
    // One device online (on the gateway node), 999 offline.
    let (ws, _) = gw::connect(&g, "fan-0").await;
    let mut frames = gw::spawn_acker(ws);
    wait_for(Duration::from_secs(10), "replica knows fan-0", || async {
        (d.metrics.cluster_devices.get() == 1).then_some(())
    })
    .await;
    let targets: Vec<serde_json::Value> = (0..1000)
        .map(|k| json!({"device_id": format!("fan-{k}"), "apns": {"token": crate::APNS_TOKEN}}))
        .collect();
    let res = reqwest::Client::new()
        .post(format!("{}/v1/notify", d.base))
        .bearer_auth(API_KEY)
        .json(&json!({"targets": targets, "data": {"k": "v"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let id = res.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for(Duration::from_secs(30), "999 fallbacks to APNs", || async {
        let n = apns
            .requests()
            .iter()
            .filter(|r| r.headers.get("apns-id") == Some(&id))
            .count();
        (n == 999).then_some(())
    })
    .await;
    let frame = tokio::time::timeout(Duration::from_secs(10), frames.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(frame["id"], id.as_str(), "the online device got it live");
    // One publish for the one online target; none for the 999 offline ones.
    assert_eq!(d.published("deliver"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_dispatcher_converges_by_snapshot_and_delivers_live() {
    let vhost = TestVhost::new();
    let apns = ApnsDouble::start().await;
    let g = gateway_node(&vhost, &apns).await;
    let first = dispatch_node(&vhost, &apns).await;
    let (ws, _) = gw::connect(&g, "steady-dev").await;
    let mut frames = gw::spawn_acker(ws);
    let n = crate::support::fixtures::notification_with_data(10);
    wait_for(
        Duration::from_secs(10),
        "first replica knows it",
        || async { (first.metrics.cluster_devices.get() == 1).then_some(()) },
    )
    .await;
    assert_eq!(
        first.dir.deliver(&gw::device("steady-dev"), &n).await,
        LiveOutcome::Acked
    );
    first.shutdown.cancel();

    // A new dispatcher never saw the device connect: it learns it from a snapshot, and is
    // not ready before.
    let second = dispatch_node(&vhost, &apns).await;
    assert!(second.published("snapshot_request") >= 1);
    let mut n2 = n.clone();
    n2.id = herald::domain::NotificationId::generate();
    assert_eq!(
        second.dir.deliver(&gw::device("steady-dev"), &n2).await,
        LiveOutcome::Acked
    );
    let mut ids = Vec::new();
    while let Ok(Some(f)) = tokio::time::timeout(Duration::from_secs(1), frames.recv()).await {
        ids.push(f["id"].as_str().unwrap().to_owned());
    }
    assert!(ids.contains(&n2.id.to_string()));
    assert_eq!(
        g.metric("herald_gateway_sessions_opened_total"),
        1.0,
        "the device never reconnected"
    );
    assert!(apns.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_stream_re_register_sessions_without_the_device_reconnecting() {
    let vhost = TestVhost::new();
    let apns = ApnsDouble::start().await;
    let g = gateway_node(&vhost, &apns).await;
    let d = dispatch_node(&vhost, &apns).await;
    let base = d.base.clone();
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
    // A real upgrade: a plain GET spends no admission (it can never become a session).
    let res = match gw::try_connect(&app, Some(&gw::token("r-3"))).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => res,
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    };
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    let body: serde_json::Value = serde_json::from_slice(res.body().as_deref().unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "too_many_sessions");
    assert_eq!(
        app.metric("herald_gateway_sessions_refused_total{reason=\"too_many_sessions\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_on_another_node_that_never_acks_does_not_hold_the_dispatchers_only_slot() {
    let vhost = TestVhost::new();
    let apns = ApnsDouble::start().await;
    let mut gs = settings(&vhost, &apns, &[Role::Gateway]);
    gs.gateway.ack_timeout = Duration::from_secs(30);
    let g = gw::spawn(gs).await;
    let mut s = settings(&vhost, &apns, &[Role::Api, Role::Dispatcher]);
    s.gateway.ack_timeout = Duration::from_secs(30);
    s.queue.prefetch = 1;
    s.dispatcher.max_awaiting_ack = 4;
    let d = dispatch_node_with(s).await;
    let (silent_ws, _) = gw::connect(&g, "silent").await;
    let mut silent = gw::spawn_reader(silent_ws);
    let (acker_ws, _) = gw::connect(&g, "acker").await;
    let mut acker = gw::spawn_acker(acker_ws);
    wait_for(
        Duration::from_secs(10),
        "both devices in the replica",
        || async { (d.metrics.cluster_devices.get() >= 2).then_some(()) },
    )
    .await;

    let held = post(&d.base, "silent").await;
    let frame = tokio::time::timeout(Duration::from_secs(10), silent.recv())
        .await
        .expect("the silent device gets its frame")
        .unwrap();
    assert_eq!(frame["id"], held.as_str());
    // Its node said "received": the message waits only on the device, off the active budget.
    wait_for(
        Duration::from_secs(10),
        "the waiting message parked",
        || async { (d.metrics.dispatcher_parked.get() == 1).then_some(()) },
    )
    .await;
    let id = post(&d.base, "acker").await;
    let frame = tokio::time::timeout(Duration::from_secs(10), acker.recv())
        .await
        .expect("delivered while the only active slot's first message waits for an ack")
        .unwrap();
    assert_eq!(frame["id"], id.as_str());
    wait_for(
        Duration::from_secs(10),
        "the acker's delivery recorded",
        || async {
            let delivered = d
                .metrics
                .deliveries
                .with_label_values(&["default", "live", "delivered"])
                .get();
            (delivered >= 1).then_some(())
        },
    )
    .await;
    assert_eq!(
        d.metrics.dispatcher_parked.get(),
        1,
        "the first still waits"
    );
    assert!(apns.requests().is_empty(), "nothing fell back");
    d.shutdown.cancel();
}
