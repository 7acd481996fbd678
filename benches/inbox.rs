//! Inbox write throughput: rows/s into PostgreSQL through `Inbox::store_batch` (one
//! `herald_inbox_store` call per batch: device locks, expiry, collapse and bounds checks
//! included), beside a raw multi-row `INSERT … SELECT FROM unnest(…)` of the same rows into a
//! table of the same shape and indexes (`LIKE herald_inbox INCLUDING ALL`), in the same run,
//! on the same server. The ratio is the price of the inbox's rules (issue 12 aims ≥ 70%).
//!
//! ```text
//! cargo bench --bench inbox
//! BENCH_INBOX_ROWS=200000 BENCH_INBOX_CONCURRENCY=8 cargo bench --bench inbox
//! ```
//!
//! Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust; `HERALD_TEST_PG` overrides);
//! runs in its own throwaway database, dropped at the end.

#[path = "common/env.rs"]
mod env;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use herald::domain::{NotificationId, unix_millis};
use herald::inbox::{
    DEFAULT_APP, Inbox, InboxEntry, InboxLimits, InboxWrite, PoolSettings, PostgresInbox,
};
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, PgPool};
use tokio::sync::Mutex;

fn server_url() -> String {
    std::env::var("HERALD_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

async fn admin(sql: String) {
    let mut c = PgConnection::connect(&format!("{}/postgres", server_url()))
        .await
        .expect("PostgreSQL on 127.0.0.1:5432");
    c.execute(AssertSqlSafe(sql))
        .await
        .expect("admin statement");
}

/// `rows` writes spread over `devices` devices, each with a ~`frame_bytes` frame.
fn make_rows(rows: usize, devices: usize, frame_bytes: usize) -> Vec<InboxWrite> {
    let now = unix_millis(SystemTime::now());
    (0..rows)
        .map(|i| {
            let id = NotificationId::generate();
            let head = format!(r#"{{"type":"notification","id":"{id}","data":{{"m":""#);
            let frame = format!(
                "{head}{}\"}}}}",
                "x".repeat(frame_bytes.saturating_sub(head.len() + 3))
            );
            InboxWrite {
                app: DEFAULT_APP.into(),
                device_id: format!("device-{}", i % devices),
                entry: InboxEntry {
                    id,
                    accepted_at_ms: now + i as u64,
                    expires_at_ms: now + 86_400_000,
                    collapse_key: None,
                    frame: Bytes::from(frame),
                },
            }
        })
        .collect()
}

/// Runs `batches` through `concurrency` workers calling `write`; returns rows/s.
async fn drive<F, Fut>(batches: Vec<Vec<InboxWrite>>, concurrency: usize, write: F) -> f64
where
    F: Fn(Vec<InboxWrite>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let rows: usize = batches.iter().map(Vec::len).sum();
    let queue = Arc::new(Mutex::new(batches));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (queue, write) = (queue.clone(), write.clone());
            tokio::spawn(async move {
                loop {
                    let Some(batch) = queue.lock().await.pop() else {
                        break;
                    };
                    write(batch).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    rows as f64 / started.elapsed().as_secs_f64()
}

async fn raw_insert(pool: PgPool, batch: Vec<InboxWrite>) {
    let (mut apps, mut devices, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    let (mut accepted, mut expires) = (Vec::new(), Vec::new());
    let (mut collapse, mut sizes, mut frames) = (Vec::new(), Vec::new(), Vec::<&[u8]>::new());
    for w in &batch {
        apps.push(w.app.as_str());
        devices.push(w.device_id.as_str());
        ids.push(uuid::Uuid::parse_str(&w.entry.id.to_string()).unwrap());
        accepted.push(w.entry.accepted_at_ms as i64);
        expires.push(w.entry.expires_at_ms as i64);
        collapse.push(w.entry.collapse_key.as_deref());
        sizes.push(w.entry.frame.len() as i32);
        frames.push(w.entry.frame.as_ref());
    }
    sqlx::query(
        "INSERT INTO bench_raw \
         (app, device_id, id, accepted_at_ms, expires_at_ms, collapse_key, size_bytes, frame) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[], $4::bigint[], $5::bigint[], \
                              $6::text[], $7::int[], $8::bytea[])",
    )
    .bind(apps)
    .bind(devices)
    .bind(ids)
    .bind(accepted)
    .bind(expires)
    .bind(collapse)
    .bind(sizes)
    .bind(frames)
    .execute(&pool)
    .await
    .expect("raw insert");
}

#[tokio::main]
async fn main() {
    // `cargo nextest run --all-targets` lists every target's tests with `--list`: a bench
    // (harness = false) has none, and must not run the whole benchmark to say so.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rows: usize = env::env_or("BENCH_INBOX_ROWS", 60_000);
    let devices: usize = env::env_or("BENCH_INBOX_DEVICES", 20_000);
    let frame_bytes: usize = env::env_or("BENCH_INBOX_FRAME_BYTES", 300);
    let concurrency: usize = env::env_or("BENCH_INBOX_CONCURRENCY", 4);

    let db = format!("herald_bench_{}", uuid::Uuid::new_v4().simple());
    admin(format!(r#"CREATE DATABASE "{db}""#)).await;
    let url = format!("{}/{db}", server_url());
    let pg = PostgresInbox::connect(
        &url,
        PoolSettings {
            max_connections: concurrency as u32,
            acquire_timeout: Duration::from_secs(30),
        },
        InboxLimits {
            max_per_device: 100,
            max_bytes_per_device: 1024 * 1024,
        },
    )
    .await
    .expect("connect and migrate");
    let pool = pg.pool().clone();
    let inbox = Inbox::Postgres(Arc::new(pg));
    pool.execute("CREATE TABLE bench_raw (LIKE herald_inbox INCLUDING ALL)")
        .await
        .unwrap();

    println!(
        "inbox write throughput: {rows} rows over {devices} devices, ~{frame_bytes} B frames, \
         {concurrency} writers"
    );
    println!(
        "| batch | raw multi-row INSERT (rows/s) | inbox store_batch (rows/s) | inbox / raw |"
    );
    println!("|---:|---:|---:|---:|");
    for batch in [100usize, 500] {
        // Alternate raw and inbox twice and keep each one's best, so neither side gets
        // all of a noisy neighbour's bad moment (the machine is shared).
        let (mut raw_best, mut inbox_best) = (0f64, 0f64);
        for _round in 0..2 {
            for table in ["bench_raw", "herald_inbox"] {
                pool.execute(AssertSqlSafe(format!("TRUNCATE {table}")))
                    .await
                    .unwrap();
            }
            pool.execute("VACUUM ANALYZE").await.unwrap();
            let data = make_rows(rows, devices, frame_bytes);
            let batches: Vec<Vec<_>> = data.chunks(batch).map(<[_]>::to_vec).collect();
            let p = pool.clone();
            let raw = drive(batches.clone(), concurrency, move |b| {
                raw_insert(p.clone(), b)
            })
            .await;
            let ib = inbox.clone();
            let stored = drive(batches, concurrency, move |b| {
                let ib = ib.clone();
                async move {
                    let r = ib.store_batch(b).await.expect("store_batch");
                    assert!(r.dropped.is_empty(), "no bound applies in this bench");
                }
            })
            .await;
            raw_best = raw_best.max(raw);
            inbox_best = inbox_best.max(stored);
        }
        println!(
            "| {batch} | {raw_best:.0} | {inbox_best:.0} | {:.0}% |",
            100.0 * inbox_best / raw_best
        );
    }
    let count = inbox.pending_count().await.unwrap();
    assert_eq!(count as usize, rows, "every row stored");
    inbox.close().await;
    admin(format!(r#"DROP DATABASE IF EXISTS "{db}" WITH (FORCE)"#)).await;
}
