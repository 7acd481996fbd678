//! The PostgreSQL inbox: the cluster's offline inbox, shared by every node and surviving
//! restarts of all of them.
//!
//! Crate: sqlx (postgres, runtime-tokio, rustls on aws-lc-rs, migrate; no macros). Its
//! pool reconnects on its own, its migrator versions the schema and serializes nodes that
//! start together with an advisory lock, and it is the Rust PostgreSQL client most services
//! use. tokio-postgres + deadpool would need a third crate (refinery) for migrations. The
//! compile-time-checked `query!` macros are off: they need a database (or an offline cache)
//! at build time, and the inbox has five statements. So the migrations are embedded with
//! `include_str!` and handed to `Migrator::with_migrations` (what `sqlx::migrate!` expands
//! to, without the proc-macro crate).
//!
//! A store is one statement, `SELECT … FROM herald_inbox_store(arrays…)` (a PL/pgSQL
//! function from the migration): one round trip and one implicit transaction for a whole
//! batch, with the device locks, expiry, collapse and bounds inside it. When it returns, the
//! rows are committed, so the dispatcher can ack the queue message.
//!
//! Expiry is a batched reaper (`DELETE … WHERE (key) IN (SELECT … WHERE expires_at_ms <=
//! now ORDER BY expires_at_ms LIMIT n FOR UPDATE SKIP LOCKED) RETURNING …`), not time
//! partitions: every expired row needs its own `expired` event (dropping a partition gives
//! no ids), ttl varies per notification from seconds to 28 days (so a partition would mix
//! many expiries), and the table stays small (≤ devices × max_per_device rows, most acked
//! within seconds), so an indexed delete of a few thousand rows is cheap. Pending reads
//! filter `expires_at_ms > now` themselves, so an expired row is never sent even before it
//! is reaped. SKIP LOCKED lets every node run the reaper without waiting on each other.
//!
//! Connection loss: `test_before_acquire` is off (a ping per operation would double the
//! round trips of every store and ack), so an operation on a connection the server closed
//! (restart, `pg_terminate_backend`, failover) fails with [`InboxError::Unavailable`]; sqlx
//! then discards that connection and the next operation opens a new one. The dispatcher
//! nacks and retries on that error, so nothing is lost.

use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Row, SqlSafeStr};

use super::{
    Cursor, DropReason, Dropped, ExpiredEntry, InboxError, InboxLimits, InboxWrite, PendingEntry,
    StoreReport, id_from_uuid, id_to_uuid,
};
use crate::config::InboxSettings;
use crate::domain::NotificationId;

/// The schema's versioned migrations, embedded in the binary (the `migrations/` directory).
/// Append new ones; never edit an applied one (sqlx checks their checksums at start).
fn migrator() -> Migrator {
    let migrations = [
        (1, "inbox", include_str!("../../migrations/0001_inbox.sql")),
        (
            2,
            "inbox store fast path",
            include_str!("../../migrations/0002_inbox_store_fast_path.sql"),
        ),
    ];
    Migrator::with_migrations(
        migrations
            .into_iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    version,
                    description.into(),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

/// Connection pool knobs, from `[inbox]`.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
}

impl PoolSettings {
    pub fn from_settings(s: &InboxSettings) -> Self {
        PoolSettings {
            max_connections: s.pool_size,
            acquire_timeout: s.connect_timeout,
        }
    }
}

pub struct PostgresInbox {
    pool: PgPool,
    limits: InboxLimits,
}

impl PostgresInbox {
    /// Connects to `url`, applies pending migrations, and returns the inbox. Fails with
    /// [`InboxError::Unavailable`] if the database cannot be reached within
    /// `acquire_timeout`. The URL (it holds a password) never appears in errors or logs.
    pub async fn connect(
        url: &str,
        pool: PoolSettings,
        limits: InboxLimits,
    ) -> Result<Self, InboxError> {
        let options: PgConnectOptions = url
            .parse::<PgConnectOptions>()
            .map_err(|_| InboxError::Database("inbox.url is not a valid postgres:// URL".into()))?
            .application_name("herald");
        let pool = PgPoolOptions::new()
            .max_connections(pool.max_connections)
            .acquire_timeout(pool.acquire_timeout)
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(classify)?;
        migrator().run(&pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => classify(e),
            other => InboxError::Database(format!("applying the inbox migrations: {other}")),
        })?;
        Ok(PostgresInbox { pool, limits })
    }

    /// The pool, for tests and benches that need to look at the database directly.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn store_batch(&self, writes: Vec<InboxWrite>) -> Result<StoreReport, InboxError> {
        let n = writes.len();
        let (mut apps, mut devices, mut ids) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut accepted, mut expires, mut collapse, mut frames) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for w in &writes {
            apps.push(w.app.as_str());
            devices.push(w.device_id.as_str());
            ids.push(id_to_uuid(w.entry.id));
            accepted.push(w.entry.accepted_at_ms as i64);
            expires.push(w.entry.expires_at_ms as i64);
            collapse.push(w.entry.collapse_key.as_deref());
            frames.push(w.entry.frame.as_ref());
        }
        let rows = sqlx::query(
            "SELECT r_app, r_device_id, r_id, r_reason, r_by \
             FROM herald_inbox_store($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(apps)
        .bind(devices)
        .bind(ids)
        .bind(accepted)
        .bind(expires)
        .bind(collapse)
        .bind(frames)
        .bind(i32::try_from(self.limits.max_per_device).unwrap_or(i32::MAX))
        .bind(i64::try_from(self.limits.max_bytes_per_device).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        let mut report = StoreReport::default();
        for row in rows {
            let reason: String = row.try_get("r_reason").map_err(classify)?;
            let reason = match reason.as_str() {
                "expired" => DropReason::Expired,
                "overflow" => DropReason::Overflow,
                "replaced" => DropReason::Replaced {
                    by: id_from_uuid(row.try_get("r_by").map_err(classify)?),
                },
                other => {
                    return Err(InboxError::Database(format!(
                        "herald_inbox_store returned an unknown reason {other:?}"
                    )));
                }
            };
            report.dropped.push(Dropped {
                app: row.try_get("r_app").map_err(classify)?,
                device_id: row.try_get("r_device_id").map_err(classify)?,
                id: id_from_uuid(row.try_get("r_id").map_err(classify)?),
                reason,
            });
        }
        Ok(report)
    }

    pub async fn pending(
        &self,
        app: &str,
        device_id: &str,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<Vec<PendingEntry>, InboxError> {
        let after = after.unwrap_or(Cursor {
            accepted_at_ms: i64::MIN,
            seq: i64::MIN,
        });
        // The row comparison is an index range on herald_inbox_pending.
        let rows = sqlx::query(
            "SELECT seq, id, accepted_at_ms, expires_at_ms, collapse_key, frame \
             FROM herald_inbox \
             WHERE app = $1 AND device_id = $2 AND (accepted_at_ms, seq) > ($3, $4) \
               AND expires_at_ms > (extract(epoch FROM now()) * 1000)::bigint \
             ORDER BY accepted_at_ms, seq LIMIT $5",
        )
        .bind(app)
        .bind(device_id)
        .bind(after.accepted_at_ms)
        .bind(after.seq)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.into_iter()
            .map(|row| {
                let accepted: i64 = row.try_get("accepted_at_ms")?;
                let expires: i64 = row.try_get("expires_at_ms")?;
                let frame: Vec<u8> = row.try_get("frame")?;
                Ok(PendingEntry {
                    cursor: Cursor {
                        accepted_at_ms: accepted,
                        seq: row.try_get("seq")?,
                    },
                    id: id_from_uuid(row.try_get("id")?),
                    accepted_at_ms: accepted as u64,
                    expires_at_ms: expires as u64,
                    collapse_key: row.try_get("collapse_key")?,
                    frame: frame.into(),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(classify)
    }

    pub async fn ack(
        &self,
        app: &str,
        device_id: &str,
        id: NotificationId,
    ) -> Result<bool, InboxError> {
        let done =
            sqlx::query("DELETE FROM herald_inbox WHERE app = $1 AND device_id = $2 AND id = $3")
                .bind(app)
                .bind(device_id)
                .bind(id_to_uuid(id))
                .execute(&self.pool)
                .await
                .map_err(classify)?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn reap_expired(&self, batch: usize) -> Result<Vec<ExpiredEntry>, InboxError> {
        let rows = sqlx::query(
            "DELETE FROM herald_inbox WHERE (app, device_id, id) IN ( \
                 SELECT app, device_id, id FROM herald_inbox \
                 WHERE expires_at_ms <= (extract(epoch FROM now()) * 1000)::bigint \
                 ORDER BY expires_at_ms LIMIT $1 FOR UPDATE SKIP LOCKED) \
             RETURNING app, device_id, id",
        )
        .bind(i64::try_from(batch).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.into_iter()
            .map(|row| {
                Ok(ExpiredEntry {
                    app: row.try_get("app")?,
                    device_id: row.try_get("device_id")?,
                    id: id_from_uuid(row.try_get("id")?),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(classify)
    }

    pub async fn pending_count(&self) -> Result<u64, InboxError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM herald_inbox")
            .fetch_one(&self.pool)
            .await
            .map_err(classify)?;
        Ok(n as u64)
    }

    /// One `GROUP BY app` over the table (the pending index's leading column serves it).
    pub async fn pending_by_app(&self) -> Result<Vec<(String, u64)>, InboxError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT app, count(*) FROM herald_inbox GROUP BY app ORDER BY app")
                .fetch_all(&self.pool)
                .await
                .map_err(classify)?;
        Ok(rows.into_iter().map(|(app, n)| (app, n as u64)).collect())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Sorts a sqlx error into retry-later or not. Transient: the connection or pool failed,
/// or the server said so by SQLSTATE: class 08 (connection exception), 53 (insufficient
/// resources, e.g. too many connections), 57P01-57P03 (admin/crash shutdown, cannot
/// connect now: a restart or `pg_terminate_backend`), 40001/40P01 (serialization failure,
/// deadlock: retry the transaction). Messages carry no URL or password: sqlx's errors
/// describe the failure, not the connection string.
fn classify(e: sqlx::Error) -> InboxError {
    use sqlx::Error as E;
    match &e {
        E::Io(_)
        | E::Tls(_)
        | E::Protocol(_)
        | E::PoolTimedOut
        | E::PoolClosed
        | E::WorkerCrashed
        | E::BeginFailed => InboxError::Unavailable(e.to_string()),
        E::Database(db) => {
            let code = db.code().unwrap_or_default();
            let transient = code.starts_with("08")
                || code.starts_with("53")
                || matches!(&*code, "57P01" | "57P02" | "57P03" | "40001" | "40P01");
            if transient {
                InboxError::Unavailable(e.to_string())
            } else {
                InboxError::Database(e.to_string())
            }
        }
        _ => InboxError::Database(e.to_string()),
    }
}
