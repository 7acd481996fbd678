//! The offline inbox wired in (issue 12): notifications for a device with no session and no
//! provider route wait in its inbox and are replayed right after its next `hello`; QoS per
//! notification. Real sockets, the real broker (a vhost per test) and real PostgreSQL (a
//! database per test), on both backends: embedded (memory inbox) and cluster (RabbitMQ +
//! PostgreSQL inbox).

#[path = "../support/mod.rs"]
mod support;

use support::gateway as gw;

#[path = "../dispatch/harness.rs"]
#[allow(dead_code)]
mod harness;

#[path = "../inbox/pg.rs"]
#[allow(dead_code)]
mod pg;

#[path = "../cluster/nodes.rs"]
#[allow(dead_code)]
mod nodes;

mod cluster;
mod pg_restart;
mod race;
mod replay;

pub use harness::APNS_TOKEN;

use std::time::Duration;

use herald::config::{Secret, Settings};
use serde_json::{Value, json};

use support::wait_for;

/// Where the inbox lives: the embedded install (memory queue, memory inbox) or cluster mode
/// (RabbitMQ vhost + a PostgreSQL database, both this test's own).
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Memory,
    Postgres,
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn memory() {
                super::$name(crate::Backend::Memory).await
            }
            #[tokio::test]
            async fn postgres() {
                super::$name(crate::Backend::Postgres).await
            }
        }
    )*};
}
pub(crate) use on_both_backends;

/// A herald with every role (the dispatch tests' world: provider doubles, an events
/// webhook) and its inbox; on PostgreSQL the database lives as long as this.
pub struct World {
    pub w: harness::World,
    pub db: Option<pg::TestDb>,
}

impl World {
    pub async fn start(backend: Backend) -> World {
        Self::start_with(backend, |_| {}).await
    }

    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut Settings)) -> World {
        let db = match backend {
            Backend::Memory => None,
            Backend::Postgres => Some(pg::TestDb::create().await),
        };
        let url = db.as_ref().map(|d| d.url.clone());
        let queue = match backend {
            Backend::Memory => harness::Backend::Memory,
            Backend::Postgres => harness::Backend::Rabbit,
        };
        let w = harness::World::start_with(queue, |s| {
            // These tests read frames only when they expect one; heartbeats are not what
            // they are about (tests/gateway covers them), so a pause must not kill a session.
            s.gateway.ping_interval = Duration::from_secs(10);
            s.gateway.pong_timeout = Duration::from_secs(10);
            if let Some(url) = url {
                s.inbox.url = Secret::new(url);
            }
            tweak(s)
        })
        .await;
        World { w, db }
    }

    /// POSTs `body`; returns the id.
    pub async fn notify(&self, body: Value) -> String {
        self.w.notify(body).await
    }

    /// A data-only notification (no provider route) for `device`.
    pub async fn notify_offline(&self, device: &str, n: usize) -> String {
        self.notify(json!({"targets": [{"device_id": device}], "data": {"n": n.to_string()}}))
            .await
    }

    pub fn metric(&self, series: &str) -> f64 {
        self.w.metric(series)
    }

    /// Waits until `n` notifications were committed to inboxes in all.
    pub async fn wait_stored(&self, n: usize) {
        wait_for(
            Duration::from_secs(20),
            &format!("{n} inbox writes"),
            || async { (self.metric("herald_inbox_writes_total") >= n as f64).then_some(()) },
        )
        .await;
    }

    /// Waits until the device acked `n` replayed entries in all.
    pub async fn wait_acked(&self, n: usize) {
        wait_for(
            Duration::from_secs(20),
            &format!("{n} replay acks"),
            || async { (self.metric("herald_inbox_acked_total") >= n as f64).then_some(()) },
        )
        .await;
    }

    /// Inbox rows of `device` in the database (PostgreSQL only).
    pub async fn rows(&self, device: &str) -> Option<i64> {
        let db = self.db.as_ref()?;
        let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
            .await
            .unwrap();
        Some(
            sqlx::query_scalar("SELECT count(*) FROM herald_inbox WHERE device_id = $1")
                .bind(device)
                .fetch_one(&mut c)
                .await
                .unwrap(),
        )
    }

    /// Waits until `device` has no inbox rows left (PostgreSQL; the memory inbox is checked
    /// by a later session replaying nothing).
    pub async fn wait_rows_gone(&self, device: &str) {
        if self.db.is_none() {
            return;
        }
        wait_for(Duration::from_secs(20), "acked rows deleted", || async {
            (self.rows(device).await == Some(0)).then_some(())
        })
        .await;
    }

    pub async fn stop(self) {
        self.w.stop().await;
    }
}

/// Reads `n` notification frames, acking each; returns their ids in arrival order.
pub async fn read_and_ack(ws: &mut gw::Ws, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    while ids.len() < n {
        let v = gw::next_json(ws).await;
        if v["type"] != "notification" {
            continue;
        }
        let id = v["id"].as_str().unwrap().to_owned();
        gw::send_json(ws, json!({"type": "ack", "id": id})).await;
        ids.push(id);
    }
    ids
}

/// Proves the inbox had nothing more for this session: a fresh notification sent now is the
/// next notification frame the device reads.
pub async fn assert_nothing_more(w: &World, ws: &mut gw::Ws, device: &str) {
    let marker = w.notify_offline(device, 999_999).await;
    let next = read_and_ack(ws, 1).await;
    assert_eq!(
        next,
        [marker],
        "a frame other than the fresh one came first"
    );
}
