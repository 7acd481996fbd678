//! The offline inbox: notifications that wait for a device with no session and no provider
//! route, to be replayed in accepted order right after its next `hello`.
//!
//! Two backends, one contract (proven by `tests/inbox/`, run against both):
//!
//! - [`Inbox::store`] / [`Inbox::store_batch`] return `Ok` only once the entries are safe:
//!   for PostgreSQL, once the one transaction that wrote them has committed; for the memory
//!   backend, once they are in the process's map. So the dispatcher may ack the queue
//!   message only after `Ok`; on `Err` nothing of that call was written, and the message
//!   must be retried (nacked), never acked.
//! - Per (app, device) the store keeps at most `inbox.max_per_device` entries and
//!   `inbox.max_bytes_per_device` frame bytes: past either, the oldest (in accepted order)
//!   are dropped. An entry with a `collapse_key` replaces the device's pending entry with the
//!   same key. Entries already expired are deleted. Every entry a call removes or refuses is
//!   reported back in [`StoreReport::dropped`] with its [`DropReason`], so the caller emits
//!   one `inbox_overflow` / `expired` event per id; nothing leaves the inbox unreported
//!   except by [`Inbox::ack`].
//! - Storing the same (app, device, id) twice keeps one entry: a redelivered queue message
//!   does not duplicate the inbox (the device dedupes on the id anyway).
//! - [`Inbox::pending`] pages through a device's unexpired entries in accepted order
//!   (`accepted_at_ms`, then store order); expired entries are never returned, even before
//!   the reaper deletes them.
//! - [`Inbox::ack`] deletes one entry; [`Inbox::reap_expired`] deletes expired entries in
//!   batches and returns them for `expired` events.
//!
//! The backend: embedded queue → [`MemoryInbox`] (same lifetime as the embedded queue: a
//! restart loses both); `inbox.url` set → [`PostgresInbox`]; cluster mode without
//! `inbox.url` → no inbox (today's retry-then-dead-letter).
//!
//! `app` is a plain string for now (`"default"`, [`DEFAULT_APP`]); every key is
//! (app, device_id) so multi-app support needs no schema change.

mod memory;
mod postgres;

use std::sync::Arc;

use bytes::Bytes;

use crate::config::Settings;
use crate::domain::NotificationId;

pub use memory::MemoryInbox;
pub use postgres::{PoolSettings, PostgresInbox};

/// The app every device belongs to until apps exist.
pub const DEFAULT_APP: &str = "default";

/// Why an inbox operation did not happen. Nothing of a failed call was written.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// The database is unreachable, the connection died (e.g. a PostgreSQL restart or
    /// `pg_terminate_backend`), or it asked to retry (serialization failure, too many
    /// connections). Retry later: the pool reconnects on its own.
    #[error("the inbox database is unavailable: {0}")]
    Unavailable(String),
    /// The memory backend's total bound (`inbox.memory_max_bytes`) is reached.
    #[error("the in-memory inbox is full ({0} bytes)")]
    Full(usize),
    /// The database refused the operation for a reason retrying will not fix (a schema or
    /// permission problem). Still nothing was written: do not ack the queue message.
    #[error("inbox database error: {0}")]
    Database(String),
}

impl InboxError {
    /// True when the same call may succeed later without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        matches!(self, InboxError::Unavailable(_) | InboxError::Full(_))
    }
}

/// Per-device bounds, from `[inbox]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxLimits {
    pub max_per_device: usize,
    pub max_bytes_per_device: usize,
}

impl InboxLimits {
    /// The per-device bounds the store enforces, from `[inbox]`.
    pub fn from_settings(s: &crate::config::InboxSettings) -> Self {
        InboxLimits {
            max_per_device: s.max_per_device,
            max_bytes_per_device: s.max_bytes_per_device,
        }
    }
}

/// One notification to keep for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxEntry {
    pub id: NotificationId,
    pub accepted_at_ms: u64,
    /// `accepted_at_ms + ttl`: never returned by `pending` from this instant on.
    pub expires_at_ms: u64,
    pub collapse_key: Option<String>,
    /// The exact notification frame the gateway sends this device
    /// (`gateway::protocol::notification_json`), so replay sends the same bytes.
    pub frame: Bytes,
}

impl InboxEntry {
    /// The bytes this entry counts against `max_bytes_per_device`: its frame.
    pub fn size_bytes(&self) -> usize {
        self.frame.len()
    }
}

/// An entry addressed to one device, for [`Inbox::store_batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxWrite {
    pub app: String,
    pub device_id: String,
    pub entry: InboxEntry,
}

/// Why an entry left (or never entered) the inbox other than by an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Over `max_per_device` / `max_bytes_per_device` (the oldest went), or a single frame
    /// larger than `max_bytes_per_device`: emit `inbox_overflow`.
    Overflow,
    /// Replaced by a newer entry with the same collapse key (`by`).
    Replaced { by: NotificationId },
    /// Its ttl passed: emit `expired`.
    Expired,
}

/// One entry removed or refused, with the device it was for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub app: String,
    pub device_id: String,
    pub id: NotificationId,
    pub reason: DropReason,
}

/// What a store call did besides keeping the new entries. An entry that was not kept (its
/// own id is in `dropped`) is done as far as the inbox is concerned: the caller reports it
/// like any other drop and still acks the queue message.
/// `dropped` is in no particular order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreReport {
    pub dropped: Vec<Dropped>,
}

impl StoreReport {
    /// Ids dropped for this reason class (convenience for callers and tests).
    pub fn overflowed(&self) -> Vec<NotificationId> {
        self.ids(|r| matches!(r, DropReason::Overflow))
    }
    pub fn replaced(&self) -> Vec<NotificationId> {
        self.ids(|r| matches!(r, DropReason::Replaced { .. }))
    }
    pub fn expired(&self) -> Vec<NotificationId> {
        self.ids(|r| matches!(r, DropReason::Expired))
    }
    /// True if `id` was kept by this call (not dropped on arrival).
    pub fn kept(&self, id: NotificationId) -> bool {
        !self.dropped.iter().any(|d| d.id == id)
    }
    fn ids(&self, f: impl Fn(&DropReason) -> bool) -> Vec<NotificationId> {
        self.dropped
            .iter()
            .filter(|d| f(&d.reason))
            .map(|d| d.id)
            .collect()
    }
}

/// A position in a device's accepted order, for paging [`Inbox::pending`]: pass the
/// `cursor` of the last entry seen to get the ones after it. Opaque.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    accepted_at_ms: i64,
    seq: i64,
}

/// One pending entry, as replay sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingEntry {
    pub cursor: Cursor,
    pub id: NotificationId,
    pub accepted_at_ms: u64,
    pub expires_at_ms: u64,
    pub collapse_key: Option<String>,
    pub frame: Bytes,
}

/// An expired entry the reaper deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredEntry {
    pub app: String,
    pub device_id: String,
    pub id: NotificationId,
}

/// An inbox backend. An enum, like [`crate::queue::Queue`]: exactly two backends, and the
/// compiler checks every call site handles both.
#[derive(Clone)]
pub enum Inbox {
    Memory(Arc<MemoryInbox>),
    Postgres(Arc<PostgresInbox>),
}

impl Inbox {
    /// The inbox the settings ask for: PostgreSQL when `inbox.url`/`inbox.url_file` is set
    /// (connects and applies the migrations, so a start-up against an unreachable database
    /// fails with [`InboxError::Unavailable`]); the memory inbox with the embedded queue;
    /// `None` in cluster mode without `inbox.url` (today's retry-then-dead-letter, which the
    /// caller states at start-up).
    pub async fn from_settings(settings: &Settings) -> anyhow::Result<Option<Inbox>> {
        let limits = InboxLimits::from_settings(&settings.inbox);
        if let Some(url) = settings.inbox_url()? {
            let pg = PostgresInbox::connect(
                url.expose(),
                PoolSettings::from_settings(&settings.inbox),
                limits,
            )
            .await?;
            return Ok(Some(Inbox::Postgres(Arc::new(pg))));
        }
        if settings.queue_url()?.is_none() {
            return Ok(Some(Inbox::Memory(Arc::new(MemoryInbox::new(
                limits,
                settings.inbox.memory_max_bytes,
            )))));
        }
        Ok(None)
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Inbox::Memory(_) => "memory",
            Inbox::Postgres(_) => "postgres",
        }
    }

    /// Keeps `entry` for (app, device_id), enforcing the bounds and collapse keys (see the
    /// module docs). Safe once `Ok`.
    pub async fn store(
        &self,
        app: &str,
        device_id: &str,
        entry: InboxEntry,
    ) -> Result<StoreReport, InboxError> {
        self.store_batch(vec![InboxWrite {
            app: app.to_owned(),
            device_id: device_id.to_owned(),
            entry,
        }])
        .await
    }

    /// Keeps many entries (any devices) at once: on PostgreSQL one statement, one round
    /// trip, one transaction; all or nothing. Within a batch, entries for one device are
    /// applied as if stored one by one in accepted order.
    pub async fn store_batch(&self, writes: Vec<InboxWrite>) -> Result<StoreReport, InboxError> {
        if writes.is_empty() {
            return Ok(StoreReport::default());
        }
        match self {
            Inbox::Memory(m) => m.store_batch(writes),
            Inbox::Postgres(p) => p.store_batch(writes).await,
        }
    }

    /// Up to `limit` unexpired entries of (app, device_id) after `after` (from the start
    /// when `None`), in accepted order.
    ///
    /// An entry stored while a replay pages through may sort before the cursor (a retried
    /// older notification) and so be missed by that pass; a replay that ends with a pass
    /// from `None` (acked entries are gone, so it is short) sees it.
    pub async fn pending(
        &self,
        app: &str,
        device_id: &str,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<Vec<PendingEntry>, InboxError> {
        match self {
            Inbox::Memory(m) => Ok(m.pending(app, device_id, after, limit)),
            Inbox::Postgres(p) => p.pending(app, device_id, after, limit).await,
        }
    }

    /// Deletes one entry (the device acked it). `Ok(false)` if it was not there (already
    /// acked, replaced, dropped or reaped).
    pub async fn ack(
        &self,
        app: &str,
        device_id: &str,
        id: NotificationId,
    ) -> Result<bool, InboxError> {
        match self {
            Inbox::Memory(m) => Ok(m.ack(app, device_id, id)),
            Inbox::Postgres(p) => p.ack(app, device_id, id).await,
        }
    }

    /// Deletes up to `batch` expired entries (soonest expired first) and returns them, for
    /// one `expired` event each. Call every `inbox.reap_interval` until it returns fewer
    /// than `batch`. Several nodes may reap at once: each row is returned to one of them.
    pub async fn reap_expired(&self, batch: usize) -> Result<Vec<ExpiredEntry>, InboxError> {
        match self {
            Inbox::Memory(m) => Ok(m.reap_expired(batch)),
            Inbox::Postgres(p) => p.reap_expired(batch).await,
        }
    }

    /// Entries held for all devices (expired but not yet reaped included): the pending-rows
    /// gauge. A full count on PostgreSQL, so sample it (e.g. every reap), do not call it per
    /// notification.
    pub async fn pending_count(&self) -> Result<u64, InboxError> {
        match self {
            Inbox::Memory(m) => Ok(m.pending_count()),
            Inbox::Postgres(p) => p.pending_count().await,
        }
    }

    /// Entries held per app (expired but not yet reaped included; apps with none left
    /// out), for the per-app pending gauge. A full count too (one `GROUP BY app` on
    /// PostgreSQL): sample it.
    pub async fn pending_by_app(&self) -> Result<Vec<(String, u64)>, InboxError> {
        match self {
            Inbox::Memory(m) => Ok(m.pending_by_app()),
            Inbox::Postgres(p) => p.pending_by_app().await,
        }
    }

    /// Closes the backend: PostgreSQL connections are closed gracefully; the memory inbox
    /// is simply dropped with the process.
    pub async fn close(&self) {
        if let Inbox::Postgres(p) = self {
            p.close().await;
        }
    }
}

// NotificationId keeps its Uuid private (domain types are parsed at the edge); the inbox
// stores it as a native `uuid`, so it converts through the canonical text form.
fn id_to_uuid(id: NotificationId) -> uuid::Uuid {
    uuid::Uuid::parse_str(&id.to_string()).expect("a NotificationId is a UUID")
}

fn id_from_uuid(u: uuid::Uuid) -> NotificationId {
    NotificationId::parse(&u.hyphenated().to_string()).expect("a UUID is a NotificationId")
}
