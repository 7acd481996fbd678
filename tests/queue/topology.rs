//! The RabbitMQ topology per app: a broker that already holds the topology of a herald from
//! before apps (one shared work queue) takes the per-app one without PRECONDITION_FAILED,
//! keeps what was queued, and each app gets its own work queue and retry tiers.

use std::time::Duration;

use herald::config::Settings;
use herald::domain::AppId;
use herald::metrics::Metrics;
use herald::queue::Queue;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

use crate::support::fixtures::notification_for;
use crate::support::{TestVhost, rabbitmqctl, wait_for};

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

/// Declares, by hand, exactly what herald declared before work was queued per app (prefix
/// `herald`, retry tiers 100 and 200 ms): the arguments are spelled out here rather than
/// taken from the code under test, so a change to them fails this test. Then queues one
/// message the old way (routing key `notify`).
async fn declare_the_topology_before_apps(url: &str, queued: &[u8]) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let queue_durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for (ex, kind) in [
        ("herald.work", ExchangeKind::Direct),
        ("herald.dead", ExchangeKind::Direct),
        ("herald.events", ExchangeKind::Topic),
    ] {
        ch.exchange_declare(ex.into(), kind, durable, FieldTable::default())
            .await
            .unwrap();
    }
    let dead_letter = |exchange: &str, key: &str| {
        vec![
            ("x-queue-type", s("quorum")),
            ("x-dead-letter-exchange", s(exchange)),
            ("x-dead-letter-routing-key", s(key)),
            ("x-dead-letter-strategy", s("at-least-once")),
            ("x-overflow", s("reject-publish")),
        ]
    };
    ch.queue_declare(
        "herald.dead".into(),
        queue_durable,
        args(&[("x-queue-type", s("quorum"))]),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "herald.dead".into(),
        "herald.dead".into(),
        "dead".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut work = dead_letter("herald.dead", "dead");
    work.push(("x-delivery-limit", AMQPValue::LongLongInt(20)));
    ch.queue_declare("herald.work".into(), queue_durable, args(&work))
        .await
        .unwrap();
    ch.queue_bind(
        "herald.work".into(),
        "herald.work".into(),
        "notify".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for ms in [100i64, 200] {
        let mut retry = dead_letter("herald.work", "notify");
        retry.push(("x-message-ttl", AMQPValue::LongLongInt(ms)));
        ch.queue_declare(
            format!("herald.retry.{ms}ms").as_str().into(),
            queue_durable,
            args(&retry),
        )
        .await
        .unwrap();
    }
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.basic_publish(
        "herald.work".into(),
        "notify".into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        queued,
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    conn.close(200, "done".into()).await.unwrap();
}

fn settings(vhost: &TestVhost) -> Settings {
    let mut s = vhost.settings();
    s.retry.base_delay = Duration::from_millis(100);
    s.retry.max_delay = Duration::from_millis(200);
    s.retry.max_attempts = 2;
    s.apps.insert("shop".into(), Default::default());
    s
}

#[tokio::test]
async fn per_app_queues_declare_over_the_topology_from_before_apps() {
    let vhost = TestVhost::new();
    let old = notification_for("queued-before-the-upgrade");
    declare_the_topology_before_apps(&vhost.url, &old.to_json()).await;

    let queue = Queue::from_settings(&settings(&vhost), &Metrics::new()).unwrap();
    assert!(
        queue.wait_connected(Duration::from_secs(10)).await,
        "the new topology declares over the old one (no PRECONDITION_FAILED)"
    );
    // What was queued before the upgrade is still there, for the default app's consumer.
    let mut default = queue.consume_app(&AppId::default_app(), 0);
    let d = tokio::time::timeout(Duration::from_secs(10), default.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.body, old.to_json());
    d.ack().await.unwrap();

    // The new app's queues sit beside the default's.
    let listed = rabbitmqctl(&[
        "list_queues",
        "-p",
        &vhost.name,
        "--no-table-headers",
        "name",
    ]);
    let mut names: Vec<&str> = listed
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "herald.dead",
            "herald.retry.100ms",
            "herald.retry.200ms",
            "herald.retry.shop.100ms",
            "herald.retry.shop.200ms",
            "herald.work",
            "herald.work.shop",
        ]
    );
    let mut shop_n = notification_for("s");
    shop_n.app = AppId::parse("shop").unwrap();
    queue.publish(&shop_n).await.unwrap();
    // The broker's counts are sampled: wait for them rather than read them once.
    wait_for(
        Duration::from_secs(20),
        "shop's message in shop's queue",
        || {
            let lens = (
                vhost.queue_len("herald.work.shop"),
                vhost.queue_len("herald.work"),
            );
            async move { (lens == (Some(1), Some(0))).then_some(()) }
        },
    )
    .await;
    queue.close().await;
}
