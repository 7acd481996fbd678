//! The production overlay's per-role broker users, for real: the exact permission regexes
//! of `deploy/k8s/overlays/production/broker-users.yaml` (read from that file, so the test
//! proves what ships) given to three users on a test vhost, one `herald serve` process per
//! role each with its own user, and every broker path driven through them: a live delivery
//! (api publish, dispatcher consume, directory routing, gateway reply through the replies
//! exchange), a retry (the default exchange into a retry queue), a dead letter, and outcome
//! events, the gateway's own among them (its `TopicPermission` on `herald.events`, applied
//! with `rabbitmqctl set_topic_permissions`). Then the negative side: what a role does not
//! need, it is refused, down to the routing keys of events it does not emit. And the start
//! order that follows from only the dispatcher declaring: the api and the gateway wait, not
//! ready and saying why, until a dispatcher has declared what they use.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::gw;
use crate::nodes::{Device, Node, node_env, notify};
use crate::support::apns_double::{ApnsDouble, Reply};
use crate::support::{TestVhost, rabbitmqctl, wait_for};

const USERS_YAML: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/k8s/overlays/production/broker-users.yaml"
);

/// role -> [configure, write, read], from the Permission objects of broker-users.yaml.
fn shipped_permissions() -> HashMap<String, [String; 3]> {
    let text = std::fs::read_to_string(USERS_YAML).expect("broker-users.yaml readable");
    let mut out = HashMap::new();
    for doc in text.split("\n---\n") {
        if !doc.contains("\nkind: Permission\n") {
            continue;
        }
        let field = |key: &str| -> String {
            let line = doc
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with(&format!("{key}: ")))
                .unwrap_or_else(|| panic!("no {key} in a Permission of {USERS_YAML}"));
            let value = line[key.len() + 2..].trim();
            value.trim_matches('\'').to_owned()
        };
        let user = doc
            .split("userReference:")
            .nth(1)
            .and_then(|r| r.lines().map(str::trim).find(|l| l.starts_with("name: ")))
            .expect("userReference.name")["name: herald-".len()..]
            .to_owned();
        out.insert(user, [field("configure"), field("write"), field("read")]);
    }
    out
}

/// role -> [exchange, write, read], from the TopicPermission objects of broker-users.yaml.
fn shipped_topic_permissions() -> HashMap<String, [String; 3]> {
    let text = std::fs::read_to_string(USERS_YAML).expect("broker-users.yaml readable");
    let mut out = HashMap::new();
    for doc in text.split("\n---\n") {
        if !doc.contains("\nkind: TopicPermission\n") {
            continue;
        }
        let field = |key: &str| -> String {
            let line = doc
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with(&format!("{key}: ")) || *l == format!("{key}:"))
                .unwrap_or_else(|| panic!("no {key} in a TopicPermission of {USERS_YAML}"));
            let value = line[key.len() + 1..].trim();
            value.trim_matches('\'').to_owned()
        };
        let user = doc
            .split("userReference:")
            .nth(1)
            .and_then(|r| r.lines().map(str::trim).find(|l| l.starts_with("name: ")))
            .expect("userReference.name")["name: herald-".len()..]
            .to_owned();
        let previous = out.insert(
            user.clone(),
            [field("exchange"), field("write"), field("read")],
        );
        assert!(previous.is_none(), "two TopicPermissions for herald-{user}");
    }
    out
}

/// Three broker users with the shipped permissions (and topic permissions) on the test's
/// vhost; deleted on drop (which deletes their permissions too).
struct RoleUsers {
    names: Vec<String>,
    vhost: String,
}

impl RoleUsers {
    fn create(vhost: &TestVhost) -> RoleUsers {
        let perms = shipped_permissions();
        let topic = shipped_topic_permissions();
        for role in ["dispatcher", "gateway"] {
            assert!(
                topic.contains_key(role),
                "no TopicPermission for herald-{role} in {USERS_YAML}: it could publish any event"
            );
        }
        let mut names = Vec::new();
        for role in ["api", "dispatcher", "gateway"] {
            let [configure, write, read] = perms
                .get(role)
                .unwrap_or_else(|| panic!("no Permission for herald-{role} in {USERS_YAML}"));
            let user = format!("{}-{role}", vhost.name);
            rabbitmqctl(&["add_user", &user, &user]);
            names.push(user.clone());
            rabbitmqctl(&[
                "set_permissions",
                "-p",
                &vhost.name,
                &user,
                configure,
                write,
                read,
            ]);
            if let Some([exchange, write, read]) = topic.get(role) {
                rabbitmqctl(&[
                    "set_topic_permissions",
                    "-p",
                    &vhost.name,
                    &user,
                    exchange,
                    write,
                    read,
                ]);
            }
        }
        RoleUsers {
            names,
            vhost: vhost.name.clone(),
        }
    }

    fn url(&self, role: &str) -> String {
        let user = format!("{}-{role}", self.vhost);
        format!("amqp://{user}:{user}@127.0.0.1:5672/{}", self.vhost)
    }
}

impl Drop for RoleUsers {
    fn drop(&mut self) {
        for user in &self.names {
            let _ = std::process::Command::new("rabbitmqctl")
                .args(["-q", "delete_user", user])
                .output();
        }
    }
}

fn env_for(base: &[(String, String)], url: String) -> Vec<(String, String)> {
    let mut env: Vec<_> = base
        .iter()
        .filter(|(k, _)| k != "HERALD__QUEUE__URL")
        .cloned()
        .collect();
    env.push(("HERALD__QUEUE__URL".into(), url));
    env
}

async fn metric(http: &reqwest::Client, node: &Node, name: &str) -> f64 {
    let text = http
        .get(format!("{}/metrics", node.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in {}'s /metrics", node.name))
}

/// A publish as `url`'s user, confirmed: Ok if the broker took it, Err with the broker's
/// refusal otherwise (ACCESS_REFUSED closes the channel).
async fn try_publish(url: &str, exchange: &str, key: &str) -> Result<(), String> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| e.to_string())?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let result = async {
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await?
        .await
    }
    .await
    .map(|_| ())
    .map_err(|e| e.to_string());
    let _ = conn.close(200, "done".into()).await;
    result
}

/// A declaration as `url`'s user: Ok if the broker allowed it, Err with its refusal.
async fn try_declare_exchange(url: &str, exchange: &str) -> Result<(), String> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| e.to_string())?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    let result = ch
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string());
    let _ = conn.close(200, "done".into()).await;
    result
}

async fn readyz(http: &reqwest::Client, node: &Node) -> (u16, serde_json::Value) {
    let r = http
        .get(format!("{}/readyz", node.base))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// A device session on `ws_url`, after its hello.
async fn open_session(
    ws_url: &str,
    device: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut req = ws_url.into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", gw::token(device)).parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("connects");
    let hello = ws.next().await.expect("a frame").expect("a frame");
    assert!(hello.to_text().unwrap().contains("\"hello\""), "{hello}");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_runs_with_only_its_shipped_broker_permissions() {
    let vhost = TestVhost::new();
    let users = RoleUsers::create(&vhost);
    let apns = ApnsDouble::start().await;
    let base = node_env(&vhost.url, &apns);
    let http = reqwest::Client::new();
    // The api and the gateway first, on a fresh vhost: they declare nothing, so they wait
    // for a dispatcher, not ready, and say what they wait for.
    let api = Node::spawn("api", &env_for(&base, users.url("api")), "api").await;
    let gateway = Node::spawn("gw", &env_for(&base, users.url("gateway")), "gateway").await;
    wait_for(
        Duration::from_secs(10),
        "the api waiting for the work exchange",
        || async {
            let (status, body) = readyz(&http, &api).await;
            (status == 503 && body["checks"]["queue"] == "waiting_for_topology").then_some(())
        },
    )
    .await;
    let (status, body) = readyz(&http, &gateway).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["checks"]["directory"], "unregistered", "{body}");
    let res = http
        .post(format!("{}/v1/notify", api.base))
        .bearer_auth(crate::support::API_KEY)
        .json(&serde_json::json!({"targets": [{"device_id": "early"}], "data": {"k": "v"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    let dispatcher = Node::start(
        "disp",
        &env_for(&base, users.url("dispatcher")),
        "dispatcher",
    )
    .await;
    api.wait_ready().await;
    gateway.wait_ready().await;

    // A test-owned queue (as guest) on the events exchange: the dispatcher's events land.
    let guest = Connection::connect(&vhost.url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = guest.create_channel().await.unwrap();
    ch.queue_declare(
        "test.events".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "test.events".into(),
        "herald.events".into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // And one for the gateway's own events, which its topic permission must let through.
    ch.queue_declare(
        "test.sessions".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "test.sessions".into(),
        "herald.events".into(),
        "*.session_replaced".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    // Live, across processes: api -> work queue -> dispatcher (replica fed over
    // herald.presence) -> gateway's node queue -> device ack -> reply through
    // herald.replies into the dispatcher's reply queue.
    let device = Device::start("phone-perm", vec![gateway.ws_url.clone()]);
    device.wait_sessions(1).await;
    let id = notify(&http, &api.base, "phone-perm").await.expect("202");
    device.wait_got(&id).await;

    // Offline, APNs answers 503 once: a retry through the default exchange and a retry
    // queue, which dead-letters back to work; the second attempt is delivered.
    apns.reply_next(1, Reply::reason(503, "ServiceUnavailable"));
    let before = apns.request_count();
    let id = notify(&http, &api.base, "phone-away").await.expect("202");
    wait_for(
        Duration::from_secs(20),
        "the retried APNs attempt",
        || async { (apns.request_count() >= before + 2).then_some(()) },
    )
    .await;

    // Offline, APNs refuses herald's credentials: a dead letter to herald.dead.
    apns.reply_next(1, Reply::reason(403, "InvalidProviderToken"));
    notify(&http, &api.base, "phone-gone").await.expect("202");
    wait_for(Duration::from_secs(20), "a dead letter", || async {
        (vhost.queue_len("herald.dead") == Some(1)).then_some(())
    })
    .await;
    wait_for(Duration::from_secs(10), "outcome events", || async {
        (vhost.queue_len("test.events").unwrap_or(0) >= 3).then_some(())
    })
    .await;
    let _ = id;

    // The gateway's own event, through its topic permission: a second session of a device
    // closes the first (4001), and the gateway publishes <app>.session_replaced.
    let mut first = open_session(&gateway.ws_url, "phone-twice").await;
    let _second = open_session(&gateway.ws_url, "phone-twice").await;
    let closed = loop {
        match first.next().await {
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            _ => break None,
        }
    };
    assert_eq!(closed, Some(4001), "the first session is replaced");
    let key = wait_for(
        Duration::from_secs(10),
        "the gateway's session_replaced event",
        || {
            let ch = ch.clone();
            async move {
                let m = ch
                    .basic_get("test.sessions".into(), BasicGetOptions { no_ack: true })
                    .await
                    .unwrap()?;
                Some(m.delivery.routing_key.to_string())
            }
        },
    )
    .await;
    assert_eq!(key, "default.session_replaced");

    // Nothing was refused along the way: a refused operation closes its channel (the
    // queue's: the process reconnects; the directory's: it sets its channels up again) and
    // lapin logs the ACCESS_REFUSED.
    for node in [&api, &gateway, &dispatcher] {
        assert_eq!(
            metric(&http, node, "herald_broker_reconnects_total").await,
            0.0,
            "{} reconnected: a broker operation was refused",
            node.name
        );
        assert_eq!(
            node.refusals.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "{} logged a broker refusal",
            node.name
        );
    }

    // What a role does not need, it cannot do.
    let refused = |r: Result<(), String>, what: &str| {
        let e = r.expect_err(what);
        assert!(
            e.contains("ACCESS_REFUSED") || e.contains("403"),
            "{what}: {e}"
        );
    };
    let (api_url, gw_url, disp_url) = (
        users.url("api"),
        users.url("gateway"),
        users.url("dispatcher"),
    );
    refused(
        try_publish(&api_url, "herald.presence", "").await,
        "api forging a gateway's presence",
    );
    refused(
        try_publish(&api_url, "", "herald.work").await,
        "api publishing through the default exchange",
    );
    refused(
        try_publish(&api_url, "herald.events", "default.delivered.live").await,
        "api forging an outcome event",
    );
    refused(
        try_publish(&api_url, "herald.replies", "herald.reply.x").await,
        "api forging a gateway's reply",
    );
    refused(
        try_declare_exchange(&api_url, "herald.work").await,
        "api (re)declaring the work topology",
    );
    refused(
        try_publish(&gw_url, "herald.work", "notify").await,
        "gateway queueing a notification",
    );
    refused(
        try_publish(&gw_url, "", "herald.work").await,
        "gateway writing into the work queue by name (default exchange)",
    );
    refused(
        try_publish(&gw_url, "", "herald.node.other").await,
        "gateway writing into another node's queue (default exchange)",
    );
    refused(
        try_publish(&gw_url, "herald.dead", "dead").await,
        "gateway writing a dead letter",
    );
    refused(
        try_declare_exchange(&gw_url, "herald.presence").await,
        "gateway (re)declaring the presence exchange",
    );
    refused(
        try_declare_exchange(&gw_url, "herald.work").await,
        "gateway (re)declaring the work topology",
    );
    refused(
        try_publish(&disp_url, "herald.presence", "").await,
        "dispatcher forging a gateway's presence",
    );
    refused(
        try_publish(&disp_url, "herald.replies", "herald.reply.x").await,
        "dispatcher forging a gateway's reply",
    );
    // Topic permissions: each role publishes the routing keys of its own events on
    // herald.events, and no other (a forged token_dead makes a backend delete a token).
    refused(
        try_publish(&gw_url, "herald.events", "default.token_dead.apns").await,
        "gateway forging a dead token",
    );
    refused(
        try_publish(&gw_url, "herald.events", "default.delivered.live").await,
        "gateway forging a delivery",
    );
    refused(
        try_publish(&disp_url, "herald.events", "default.session_replaced").await,
        "dispatcher forging a gateway's event",
    );
    for key in ["default.session_replaced", "default.replayed.live"] {
        try_publish(&gw_url, "herald.events", key)
            .await
            .unwrap_or_else(|e| panic!("the gateway publishes {key}: {e}"));
    }
    for key in [
        "default.delivered.live",
        "shop.token_dead.apns",
        "default.expired",
    ] {
        try_publish(&disp_url, "herald.events", key)
            .await
            .unwrap_or_else(|e| panic!("the dispatcher publishes {key}: {e}"));
    }
    try_publish(&gw_url, "herald.replies", "herald.reply.x")
        .await
        .expect("the gateway answers through the replies exchange");

    let _ = guest.close(200, "done".into()).await;
}

/// Only the dispatcher declares: the api and the gateway, alone on a fresh vhost, create
/// nothing at all and stay not ready; then a dispatcher alone creates the whole topology
/// it and the others use (RabbitMQ checks more on creation than on a re-declaration: read
/// on a queue with a dead-letter exchange).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_dispatcher_creates_the_topology_on_a_fresh_vhost() {
    let apns = ApnsDouble::start().await;
    let http = reqwest::Client::new();
    let vhost = TestVhost::new();
    let users = RoleUsers::create(&vhost);
    let env = |role: &str| env_for(&node_env(&vhost.url, &apns), users.url(role));
    let api = Node::spawn("api", &env("api"), "api").await;
    let gateway = Node::spawn("gateway", &env("gateway"), "gateway").await;
    // The api has looked for the work exchange; the gateway is connected (its directory
    // looks for the presence exchange before it declares its own queues).
    wait_for(Duration::from_secs(10), "both looking", || async {
        let (_, body) = readyz(&http, &api).await;
        (body["checks"]["queue"] == "waiting_for_topology"
            && metric(&http, &gateway, "herald_broker_connected").await == 1.0)
            .then_some(())
    })
    .await;
    for node in [&api, &gateway] {
        let (status, body) = readyz(&http, node).await;
        assert_eq!(status, 503, "{} alone is ready: {body}", node.name);
    }
    let queues = rabbitmqctl(&["list_queues", "-p", &vhost.name, "name"]);
    let exchanges = rabbitmqctl(&["list_exchanges", "-p", &vhost.name, "name"]);
    assert!(
        !queues.contains("herald") && !exchanges.contains("herald"),
        "the api or the gateway declared something: {queues} {exchanges}"
    );
    drop((api, gateway));

    // Node::start waits for /readyz 200: connected, topology declared, consumers up.
    let node = Node::start("dispatcher", &env("dispatcher"), "dispatcher").await;
    let queues = rabbitmqctl(&["list_queues", "-p", &vhost.name, "name"]);
    for q in ["herald.work", "herald.dead", "herald.retry.100ms"] {
        assert!(
            queues.lines().any(|l| l == q),
            "the dispatcher did not create {q}: {queues}"
        );
    }
    assert!(
        queues.lines().any(|l| l.starts_with("herald.reply.")),
        "no reply queue: {queues}"
    );
    let exchanges = rabbitmqctl(&["list_exchanges", "-p", &vhost.name, "name"]);
    for x in [
        "herald.work",
        "herald.dead",
        "herald.events",
        "herald.presence",
        "herald.replies",
    ] {
        assert!(
            exchanges.lines().any(|l| l == x),
            "the dispatcher did not create {x}: {exchanges}"
        );
    }
    assert_eq!(node.refusals.load(std::sync::atomic::Ordering::Relaxed), 0);
    drop(node);
}
