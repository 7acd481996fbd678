//! Cluster mode: the inbox in PostgreSQL survives every herald process being killed (-9),
//! and the notification reaches the device on another node.

use std::time::Duration;

use serde_json::{Value, json};

use crate::nodes::{Device, Node, node_env};
use crate::pg::TestDb;
use crate::support::apns_double::ApnsDouble;
use crate::support::{API_KEY, TestVhost, wait_for};

async fn rows(db: &TestDb) -> i64 {
    let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    sqlx::query_scalar("SELECT count(*) FROM herald_inbox")
        .fetch_one(&mut c)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_offline_kill9_every_node_restart_connect_elsewhere_delivered() {
    let vhost = TestVhost::new();
    let db = TestDb::create().await;
    let apns = ApnsDouble::start().await;
    let mut env = node_env(&vhost.url, &apns);
    env.push(("HERALD__INBOX__URL".into(), db.url.clone()));

    let mut a = Node::start("a", &env, "api,gateway,dispatcher").await;
    let mut b = Node::start("b", &env, "gateway").await;
    let http = reqwest::Client::new();
    let res = http
        .post(format!("{}/v1/notify", a.base))
        .bearer_auth(API_KEY)
        .json(&json!({"targets": [{"device_id": "web-7"}], "data": {"k": "v"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for(
        Duration::from_secs(20),
        "the inbox row committed",
        || async { (rows(&db).await == 1).then_some(()) },
    )
    .await;

    a.kill9();
    b.kill9();

    // Restarted (new processes, new node ids): the device connects to a gateway that never
    // saw the notification.
    let _c = Node::start("c", &env, "api,dispatcher").await;
    let d = Node::start("d", &env, "gateway").await;
    let device = Device::start("web-7", vec![d.ws_url.clone()]);
    device.wait_got(&id).await;
    wait_for(Duration::from_secs(20), "the acked row deleted", || async {
        (rows(&db).await == 0).then_some(())
    })
    .await;
    assert_eq!(apns.request_count(), 0);
}
