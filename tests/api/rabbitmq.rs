//! The cluster path against the real broker: what the API queues is on RabbitMQ exactly,
//! durably, and survives the broker dropping herald's connections.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::BasicGetOptions;
use lapin::{Connection, ConnectionProperties};
use serde_json::json;

use crate::support::{TestVhost, api_only, spawn_app, wait_for};

async fn raw_channel(vhost: &TestVhost) -> (Connection, lapin::Channel) {
    let conn = Connection::connect(&vhost.url, ConnectionProperties::default())
        .await
        .expect("raw connection to the test vhost");
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

/// Drains a queue with basic.get, returning every body.
async fn drain(ch: &lapin::Channel, queue: &str) -> Vec<Vec<u8>> {
    let mut bodies = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        bodies.push(m.delivery.data);
    }
    bodies
}

#[tokio::test]
async fn accepted_notification_is_a_persistent_message_on_a_durable_quorum_queue() {
    let vhost = TestVhost::new();
    vhost.declare_dispatcher_topology(&vhost.settings()).await;
    let app = spawn_app(api_only(vhost.settings())).await;
    assert!(app.queue.wait_connected(Duration::from_secs(10)).await);

    let body = json!({
        "targets": [{"device_id": "phone-42", "fcm": {"token": "tok"}}],
        "notification": {"title": "Hi"},
        "ttl": "90s"
    });
    let res = app.post_notify(&body).await;
    assert_eq!(res.status(), 202);
    let id = res.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let queues =
        crate::support::rabbitmqctl(&["list_queues", "-p", &vhost.name, "name", "type", "durable"]);
    assert!(
        queues.lines().any(|l| l == "herald.work\tquorum\ttrue"),
        "{queues}"
    );
    assert!(
        queues.lines().any(|l| l == "herald.dead\tquorum\ttrue"),
        "{queues}"
    );

    let (_conn, ch) = raw_channel(&vhost).await;
    let msg = ch
        .basic_get("herald.work".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the accepted notification is on the queue");
    let props = &msg.delivery.properties;
    assert_eq!(*props.delivery_mode(), Some(2), "persistent");
    assert_eq!(
        props.message_id().as_ref().map(|s| s.as_str()),
        Some(id.as_str())
    );
    assert_eq!(
        props.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );

    let queued: serde_json::Value = serde_json::from_slice(&msg.delivery.data).unwrap();
    let accepted = queued["accepted_at_ms"].as_u64().unwrap();
    // Byte for byte, in the message format's field order.
    let expected = format!(
        concat!(
            r#"{{"id":"{id}","app":"default","accepted_at_ms":{acc},"expires_at_ms":{exp},"priority":"high","#,
            r#""notification":{{"title":"Hi"}},"apns":{{"push_type":"alert"}},"android":{{}},"#,
            r#""targets":[{{"device_id":"phone-42","fcm":{{"token":"tok"}}}}],"attempt":0}}"#
        ),
        id = id,
        acc = accepted,
        exp = accepted + 90_000
    );
    assert_eq!(String::from_utf8(msg.delivery.data).unwrap(), expected);
    app.stop().await;
}

/// `rabbitmqctl close_all_connections` (for this test's vhost) twice while clients post:
/// herald reconnects by itself, and every notification that got a 202 is on the queue.
#[tokio::test]
async fn connections_killed_mid_stream_lose_no_accepted_notification() {
    let vhost = TestVhost::new();
    vhost.declare_dispatcher_topology(&vhost.settings()).await;
    let app = Arc::new(spawn_app(api_only(vhost.settings())).await);
    assert!(app.queue.wait_connected(Duration::from_secs(10)).await);

    let accepted = Arc::new(Mutex::new(BTreeSet::new()));
    let refused = Arc::new(Mutex::new(0u32));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut clients = Vec::new();
    for c in 0..4 {
        let (app, accepted, refused, stop) =
            (app.clone(), accepted.clone(), refused.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.is_cancelled() && i < 2000 {
                let res = app
                    .post_notify(&crate::support::notify_body(&[&format!("c{c}-{i}")]))
                    .await;
                match res.status().as_u16() {
                    202 => {
                        let v: serde_json::Value = res.json().await.unwrap();
                        accepted
                            .lock()
                            .unwrap()
                            .insert(v["id"].as_str().unwrap().to_owned());
                    }
                    503 => *refused.lock().unwrap() += 1,
                    s => panic!("unexpected status {s}"),
                }
                i += 1;
            }
        }));
    }
    let count = || accepted.lock().unwrap().len();
    for round in 1..=2 {
        let before = count();
        wait_for(Duration::from_secs(30), "posts flowing", || async {
            (count() >= before + 50).then_some(())
        })
        .await;
        vhost.close_all_connections();
        // herald notices, reconnects and accepts again, with no help from the test.
        let after_cut = count();
        wait_for(
            Duration::from_secs(30),
            "accepting again after the cut",
            || async { (count() >= after_cut + 50).then_some(()) },
        )
        .await;
        let metrics = app.get("/metrics").await.text().await.unwrap();
        let reconnects: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("herald_broker_reconnects_total "))
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!(
            reconnects >= round,
            "round {round}: {reconnects} reconnects"
        );
    }
    stop.cancel();
    for c in clients {
        c.await.unwrap();
    }

    let accepted = accepted.lock().unwrap().clone();
    let (_conn, ch) = raw_channel(&vhost).await;
    let on_queue: BTreeSet<String> = drain(&ch, "herald.work")
        .await
        .iter()
        .map(|b| {
            serde_json::from_slice::<serde_json::Value>(b).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let missing: Vec<_> = accepted.difference(&on_queue).collect();
    assert!(
        missing.is_empty(),
        "{} accepted notifications missing from the queue: {missing:?}",
        missing.len()
    );
    eprintln!(
        "accepted {}, refused with 503 {}, on queue {}",
        accepted.len(),
        refused.lock().unwrap(),
        on_queue.len()
    );
    Arc::try_unwrap(app)
        .ok()
        .expect("clients finished")
        .stop()
        .await;
}
