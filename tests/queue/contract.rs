//! The queue contract, run against both backends: the embedded queue and RabbitMQ (a fresh
//! vhost per test on the real broker). Each `contract!` line is one behaviour, two tests.
//! Every backend here has a second app, `shop`, beside `default`: work is queued per app.

use std::collections::BTreeSet;
use std::time::Duration;

use herald::config::Settings;
use herald::domain::{AppId, QueuedNotification};
use herald::metrics::Metrics;
use herald::queue::{Queue, QueueKind};

use crate::support::fixtures::notification_for as notification;
use crate::support::{TestVhost, test_settings};

/// A queue under test, with the vhost it lives in (deleted when this drops).
struct Backend {
    queue: Queue,
    _vhost: Option<TestVhost>,
}

fn contract_settings(mut s: Settings) -> Settings {
    // Short retry delays so the retry path runs in a test: tiers 100, 200, 400 ms.
    s.retry.base_delay = Duration::from_millis(100);
    s.retry.max_delay = Duration::from_millis(400);
    s.retry.max_attempts = 3;
    s.apps.insert("shop".into(), Default::default());
    s
}

fn shop() -> AppId {
    AppId::parse("shop").unwrap()
}

/// A notification of the app `shop`.
fn shop_notification(device: &str) -> QueuedNotification {
    let mut n = notification(device);
    n.app = shop();
    n
}

impl Backend {
    async fn memory() -> Backend {
        let queue =
            Queue::from_settings(&contract_settings(test_settings()), &Metrics::new()).unwrap();
        Backend {
            queue,
            _vhost: None,
        }
    }

    async fn rabbitmq() -> Backend {
        let vhost = TestVhost::new();
        let queue =
            Queue::from_settings(&contract_settings(vhost.settings()), &Metrics::new()).unwrap();
        assert!(
            queue.wait_connected(Duration::from_secs(10)).await,
            "connects to RabbitMQ"
        );
        Backend {
            queue,
            _vhost: Some(vhost),
        }
    }
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn memory() {
                super::$name(super::Backend::memory().await).await
            }
            #[tokio::test]
            async fn rabbitmq() {
                super::$name(super::Backend::rabbitmq().await).await
            }
        }
    )*};
}

contract!(
    publish_then_consume_in_order,
    unsettled_delivery_is_redelivered,
    requeue_gives_it_back,
    retry_redelivers_the_updated_body_after_the_delay,
    dead_letter_parks_it_with_the_reason,
    ack_is_final,
    each_app_has_its_own_work_queue,
    one_apps_unacked_backlog_does_not_hold_another_apps_messages,
    a_retry_comes_back_to_its_own_apps_queue,
    consuming_every_app_takes_them_in_turn,
);

async fn next(c: &mut herald::queue::Consumer) -> herald::queue::Delivery {
    tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .expect("a delivery within 10 s")
        .expect("consumer open")
}

/// Nothing more arrives within `within`.
async fn assert_empty(c: &mut herald::queue::Consumer, within: Duration) {
    if let Ok(Some(d)) = tokio::time::timeout(within, c.next()).await {
        panic!("unexpected delivery: {}", String::from_utf8_lossy(&d.body));
    }
}

async fn publish_then_consume_in_order(b: Backend) {
    let sent: Vec<_> = (0..5).map(|i| notification(&format!("d{i}"))).collect();
    for n in &sent {
        b.queue.publish(n).await.unwrap();
    }
    let mut c = b.queue.consume(QueueKind::Work);
    for n in &sent {
        let d = next(&mut c).await;
        assert_eq!(d.body, n.to_json());
        assert!(!d.redelivered);
        assert_eq!(&d.notification().unwrap(), n);
        d.ack().await.unwrap();
    }
    b.queue.close().await;
}

async fn unsettled_delivery_is_redelivered(b: Backend) {
    let n = notification("d");
    b.queue.publish(&n).await.unwrap();
    let mut c = b.queue.consume(QueueKind::Work);
    let d = next(&mut c).await;
    drop(d); // a consumer that died mid-delivery
    let d = next(&mut c).await;
    assert!(d.redelivered);
    assert_eq!(d.body, n.to_json());
    d.ack().await.unwrap();
    b.queue.close().await;
}

async fn requeue_gives_it_back(b: Backend) {
    let n = notification("d");
    b.queue.publish(&n).await.unwrap();
    let mut c = b.queue.consume(QueueKind::Work);
    next(&mut c).await.requeue().await.unwrap();
    let d = next(&mut c).await;
    assert!(d.redelivered);
    assert_eq!(d.body, n.to_json());
    d.ack().await.unwrap();
    b.queue.close().await;
}

async fn retry_redelivers_the_updated_body_after_the_delay(b: Backend) {
    let n = notification("d");
    b.queue.publish(&n).await.unwrap();
    let mut c = b.queue.consume(QueueKind::Work);
    let d = next(&mut c).await;
    let mut updated = n.clone();
    updated.attempt = 1;
    let retried_at = std::time::Instant::now();
    d.retry(&updated, Duration::from_millis(150)).await.unwrap();
    let d = next(&mut c).await;
    // The 150 ms request rounds up to the 200 ms tier on RabbitMQ; never early.
    assert!(
        retried_at.elapsed() >= Duration::from_millis(150),
        "retried too early"
    );
    assert_eq!(d.notification().unwrap().attempt, 1);
    assert!(!d.redelivered, "a retry is a new message, not a redelivery");
    d.ack().await.unwrap();
    assert_empty(&mut c, Duration::from_millis(500)).await;
    b.queue.close().await;
}

async fn dead_letter_parks_it_with_the_reason(b: Backend) {
    let n = notification("d");
    b.queue.publish(&n).await.unwrap();
    let mut c = b.queue.consume(QueueKind::Work);
    let d = next(&mut c).await;
    d.dead_letter(n.to_json(), "attempts_exhausted: apns 503 x3")
        .await
        .unwrap();
    let mut dead = b.queue.consume(QueueKind::Dead);
    let dl = next(&mut dead).await;
    assert_eq!(dl.body, n.to_json());
    assert_eq!(
        dl.dead_reason.as_deref(),
        Some("attempts_exhausted: apns 503 x3")
    );
    dl.ack().await.unwrap();
    assert_empty(&mut c, Duration::from_millis(300)).await;
    b.queue.close().await;
}

async fn ack_is_final(b: Backend) {
    let ids: BTreeSet<String> = {
        let mut ids = BTreeSet::new();
        for i in 0..20 {
            let n = notification(&format!("d{i}"));
            ids.insert(n.id.to_string());
            b.queue.publish(&n).await.unwrap();
        }
        ids
    };
    let mut c = b.queue.consume(QueueKind::Work);
    let mut got = BTreeSet::new();
    for _ in 0..20 {
        let d = next(&mut c).await;
        got.insert(d.notification().unwrap().id.to_string());
        d.ack().await.unwrap();
    }
    assert_eq!(got, ids);
    assert_empty(&mut c, Duration::from_millis(300)).await;
    b.queue.close().await;
}

async fn each_app_has_its_own_work_queue(b: Backend) {
    assert_eq!(b.queue.apps(), [AppId::default_app(), shop()]);
    let ours = shop_notification("s");
    let theirs = notification("d");
    b.queue.publish(&ours).await.unwrap();
    b.queue.publish(&theirs).await.unwrap();
    let mut default = b.queue.consume_app(&AppId::default_app(), 0);
    let mut shop = b.queue.consume_app(&shop(), 0);
    let d = next(&mut default).await;
    assert_eq!(d.body, theirs.to_json());
    d.ack().await.unwrap();
    let d = next(&mut shop).await;
    assert_eq!(d.body, ours.to_json());
    d.ack().await.unwrap();
    assert_empty(&mut default, Duration::from_millis(300)).await;
    assert_empty(&mut shop, Duration::from_millis(300)).await;
    b.queue.close().await;
}

/// The noisy neighbour at the queue: `shop` has a backlog and holds every message its
/// consumer was given, unsettled; `default`'s messages, queued after all of it, still
/// arrive one after another.
async fn one_apps_unacked_backlog_does_not_hold_another_apps_messages(b: Backend) {
    const BACKLOG: usize = 200;
    for i in 0..BACKLOG {
        b.queue
            .publish(&shop_notification(&format!("s{i}")))
            .await
            .unwrap();
    }
    let mut shop_consumer = b.queue.consume_app(&shop(), 0);
    // Taken and never settled: the slow deliveries holding shop's budget.
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(next(&mut shop_consumer).await);
    }
    let mut default = b.queue.consume_app(&AppId::default_app(), 0);
    for i in 0..5 {
        let n = notification(&format!("d{i}"));
        b.queue.publish(&n).await.unwrap();
        let d = next(&mut default).await;
        assert_eq!(d.body, n.to_json(), "default's message, not shop's backlog");
        d.ack().await.unwrap();
    }
    assert_eq!(held.len(), 10, "shop's deliveries still held meanwhile");
    drop(held);
    b.queue.close().await;
}

async fn a_retry_comes_back_to_its_own_apps_queue(b: Backend) {
    let n = shop_notification("s");
    b.queue.publish(&n).await.unwrap();
    let mut shop_consumer = b.queue.consume_app(&shop(), 0);
    let mut default = b.queue.consume_app(&AppId::default_app(), 0);
    let d = next(&mut shop_consumer).await;
    let mut updated = n.clone();
    updated.attempt = 1;
    d.retry(&updated, Duration::from_millis(150)).await.unwrap();
    let d = next(&mut shop_consumer).await;
    assert_eq!(d.notification().unwrap(), updated);
    d.ack().await.unwrap();
    assert_empty(&mut default, Duration::from_millis(300)).await;
    b.queue.close().await;
}

async fn consuming_every_app_takes_them_in_turn(b: Backend) {
    let mut sent = BTreeSet::new();
    for i in 0..3 {
        for n in [
            notification(&format!("d{i}")),
            shop_notification(&format!("s{i}")),
        ] {
            sent.insert(n.to_json());
            b.queue.publish(&n).await.unwrap();
        }
    }
    let mut all = b.queue.consume(QueueKind::Work);
    let mut got = BTreeSet::new();
    for _ in 0..6 {
        let d = next(&mut all).await;
        got.insert(d.body.clone());
        d.ack().await.unwrap();
    }
    assert_eq!(got, sent);
    b.queue.close().await;
}
