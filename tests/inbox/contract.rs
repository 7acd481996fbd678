//! The inbox contract, every case run on both backends (`memory` and `postgres` tests of
//! the same name).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use herald::domain::{NotificationId, unix_millis};
use herald::inbox::{
    DEFAULT_APP, DropReason, Inbox, InboxEntry, InboxLimits, InboxWrite, MemoryInbox, PoolSettings,
    PostgresInbox,
};

use crate::pg::TestDb;

pub const LIMITS: InboxLimits = InboxLimits {
    max_per_device: 100,
    max_bytes_per_device: 1024 * 1024,
};

#[derive(Clone, Copy)]
pub enum Backend {
    Memory,
    Postgres,
}

/// An inbox of the given backend; the database (if any) lives as long as the fixture.
pub struct Fixture {
    pub inbox: Inbox,
    /// Kept for its Drop: the database goes when the fixture does.
    _db: Option<TestDb>,
}

pub async fn fixture(backend: Backend, limits: InboxLimits) -> Fixture {
    match backend {
        Backend::Memory => Fixture {
            inbox: Inbox::Memory(Arc::new(MemoryInbox::new(limits, 256 * 1024 * 1024))),
            _db: None,
        },
        Backend::Postgres => {
            let db = TestDb::create().await;
            let pg = PostgresInbox::connect(&db.url, pool(8), limits)
                .await
                .expect("connect and migrate");
            Fixture {
                inbox: Inbox::Postgres(Arc::new(pg)),
                _db: Some(db),
            }
        }
    }
}

pub fn pool(max_connections: u32) -> PoolSettings {
    PoolSettings {
        max_connections,
        acquire_timeout: Duration::from_secs(5),
    }
}

pub fn now_ms() -> u64 {
    unix_millis(SystemTime::now())
}

/// An entry accepted at `accepted`, living an hour, with a frame of about `size` bytes.
pub fn entry_at(accepted: u64, size: usize, collapse_key: Option<&str>) -> InboxEntry {
    let id = NotificationId::generate();
    let head = format!(r#"{{"type":"notification","id":"{id}","data":{{"pad":""#);
    let pad = size.saturating_sub(head.len() + 3);
    let frame = format!("{head}{}\"}}}}", "x".repeat(pad));
    InboxEntry {
        id,
        accepted_at_ms: accepted,
        expires_at_ms: accepted + 3_600_000,
        collapse_key: collapse_key.map(str::to_owned),
        frame: Bytes::from(frame),
    }
}

pub fn entry(collapse_key: Option<&str>) -> InboxEntry {
    entry_at(now_ms(), 200, collapse_key)
}

async fn pending_ids(inbox: &Inbox, device: &str) -> Vec<NotificationId> {
    inbox
        .pending(DEFAULT_APP, device, None, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect()
}

macro_rules! both_backends {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn memory() {
                super::$case(super::Backend::Memory).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$case(super::Backend::Postgres).await
            }
        }
    )*};
}

both_backends!(
    pending_is_in_accepted_order_and_pages,
    pending_is_keyed_by_app_and_device,
    ack_removes_exactly_one,
    cap_of_100_keeps_the_newest_and_reports_50_overflows,
    cap_applies_within_one_batch,
    byte_cap_drops_oldest_and_refuses_oversized_frames,
    collapse_key_replaces_the_pending_entry,
    expired_entries_are_never_returned_and_are_reaped,
    store_batch_writes_many_devices_at_once,
    concurrent_stores_for_one_device_keep_the_cap,
    a_redelivered_entry_is_kept_once,
);

async fn pending_is_in_accepted_order_and_pages(b: Backend) {
    let f = fixture(b, LIMITS).await;
    let base = now_ms();
    // Stored out of accepted order (a retried older notification arrives late).
    let offsets = [30u64, 10, 50, 20, 40, 20];
    let mut entries = Vec::new();
    for off in offsets {
        let e = entry_at(base + off, 200, None);
        entries.push(e.clone());
        let report = f.inbox.store(DEFAULT_APP, "web-7", e).await.unwrap();
        assert!(report.dropped.is_empty(), "{report:?}");
    }
    // Accepted order; equal timestamps in store order.
    let mut expected: Vec<(u64, usize)> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.accepted_at_ms, i))
        .collect();
    expected.sort();
    let expected: Vec<_> = expected.iter().map(|&(_, i)| entries[i].id).collect();
    let all = f
        .inbox
        .pending(DEFAULT_APP, "web-7", None, 100)
        .await
        .unwrap();
    assert_eq!(all.iter().map(|p| p.id).collect::<Vec<_>>(), expected);
    // Same frame bytes and metadata back.
    for p in &all {
        let e = entries.iter().find(|e| e.id == p.id).unwrap();
        assert_eq!(p.frame, e.frame);
        assert_eq!(p.accepted_at_ms, e.accepted_at_ms);
        assert_eq!(p.expires_at_ms, e.expires_at_ms);
    }
    // Paging by cursor, two at a time, sees the same sequence.
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = f
            .inbox
            .pending(DEFAULT_APP, "web-7", after, 2)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        after = Some(page.last().unwrap().cursor);
        paged.extend(page.into_iter().map(|p| p.id));
    }
    assert_eq!(paged, expected);
}

async fn pending_is_keyed_by_app_and_device(b: Backend) {
    let f = fixture(b, LIMITS).await;
    let a = entry(None);
    let other_device = entry(None);
    let other_app = entry(None);
    f.inbox.store(DEFAULT_APP, "d1", a.clone()).await.unwrap();
    f.inbox
        .store(DEFAULT_APP, "d2", other_device.clone())
        .await
        .unwrap();
    f.inbox
        .store("other-app", "d1", other_app.clone())
        .await
        .unwrap();
    assert_eq!(pending_ids(&f.inbox, "d1").await, vec![a.id]);
    assert_eq!(pending_ids(&f.inbox, "d2").await, vec![other_device.id]);
    let in_other_app = f.inbox.pending("other-app", "d1", None, 10).await.unwrap();
    assert_eq!(in_other_app.len(), 1);
    assert_eq!(in_other_app[0].id, other_app.id);
    // An ack names its device: acking d1's id as d2's does nothing.
    assert!(!f.inbox.ack(DEFAULT_APP, "d2", a.id).await.unwrap());
    assert_eq!(f.inbox.pending_count().await.unwrap(), 3);
    // The per-app gauge's sample: apps in order, each with its own entries.
    assert_eq!(
        f.inbox.pending_by_app().await.unwrap(),
        [(DEFAULT_APP.to_owned(), 2), ("other-app".to_owned(), 1)]
    );
}

async fn ack_removes_exactly_one(b: Backend) {
    let f = fixture(b, LIMITS).await;
    let base = now_ms();
    let es: Vec<_> = (0..3).map(|i| entry_at(base + i, 200, None)).collect();
    for e in &es {
        f.inbox.store(DEFAULT_APP, "d", e.clone()).await.unwrap();
    }
    assert!(f.inbox.ack(DEFAULT_APP, "d", es[1].id).await.unwrap());
    assert_eq!(pending_ids(&f.inbox, "d").await, vec![es[0].id, es[2].id]);
    // Acking again (a duplicate ack from the device) is a no-op.
    assert!(!f.inbox.ack(DEFAULT_APP, "d", es[1].id).await.unwrap());
    assert_eq!(f.inbox.pending_count().await.unwrap(), 2);
}

async fn cap_of_100_keeps_the_newest_and_reports_50_overflows(b: Backend) {
    let f = fixture(b, LIMITS).await;
    let base = now_ms();
    let es: Vec<_> = (0..150).map(|i| entry_at(base + i, 200, None)).collect();
    let mut overflowed = Vec::new();
    for e in &es {
        let report = f.inbox.store(DEFAULT_APP, "d", e.clone()).await.unwrap();
        assert!(report.replaced().is_empty() && report.expired().is_empty());
        for d in &report.dropped {
            assert_eq!((d.app.as_str(), d.device_id.as_str()), (DEFAULT_APP, "d"));
        }
        overflowed.extend(report.overflowed());
    }
    let newest: Vec<_> = es[50..].iter().map(|e| e.id).collect();
    let oldest: Vec<_> = es[..50].iter().map(|e| e.id).collect();
    assert_eq!(pending_ids(&f.inbox, "d").await, newest);
    assert_eq!(
        overflowed, oldest,
        "each of the 50 oldest reported once, in order"
    );
}

async fn cap_applies_within_one_batch(b: Backend) {
    let f = fixture(b, LIMITS).await;
    let base = now_ms();
    let es: Vec<_> = (0..150).map(|i| entry_at(base + i, 200, None)).collect();
    let report = f
        .inbox
        .store_batch(
            es.iter()
                .map(|e| InboxWrite {
                    app: DEFAULT_APP.into(),
                    device_id: "d".into(),
                    entry: e.clone(),
                })
                .collect(),
        )
        .await
        .unwrap();
    let overflowed: HashSet<_> = report.overflowed().into_iter().collect();
    assert_eq!(overflowed, es[..50].iter().map(|e| e.id).collect());
    assert_eq!(report.dropped.len(), 50);
    let newest: Vec<_> = es[50..].iter().map(|e| e.id).collect();
    assert_eq!(pending_ids(&f.inbox, "d").await, newest);
}

async fn byte_cap_drops_oldest_and_refuses_oversized_frames(b: Backend) {
    let limits = InboxLimits {
        max_per_device: 100,
        max_bytes_per_device: 4096,
    };
    let f = fixture(b, limits).await;
    let base = now_ms();
    let es: Vec<_> = (0..5).map(|i| entry_at(base + i, 1000, None)).collect();
    assert!(es.iter().all(|e| e.size_bytes() == 1000));
    let mut overflowed = Vec::new();
    for e in &es {
        let r = f.inbox.store(DEFAULT_APP, "d", e.clone()).await.unwrap();
        overflowed.extend(r.overflowed());
    }
    // 4 × 1000 bytes fit in 4096; the fifth pushes out the oldest.
    assert_eq!(overflowed, vec![es[0].id]);
    assert_eq!(
        pending_ids(&f.inbox, "d").await,
        es[1..].iter().map(|e| e.id).collect::<Vec<_>>()
    );
    // One frame bigger than the whole budget is refused, and evicts nothing.
    let huge = entry_at(base + 10, 5000, None);
    let r = f.inbox.store(DEFAULT_APP, "d", huge.clone()).await.unwrap();
    assert_eq!(r.overflowed(), vec![huge.id]);
    assert!(!r.kept(huge.id));
    assert_eq!(pending_ids(&f.inbox, "d").await.len(), 4);
    // A 2,500-byte frame needs three of the old ones gone (1000 + 2500 <= 4096).
    let big = entry_at(base + 11, 2500, None);
    let r = f.inbox.store(DEFAULT_APP, "d", big.clone()).await.unwrap();
    let mut overflowed = r.overflowed();
    overflowed.sort();
    let mut want = vec![es[1].id, es[2].id, es[3].id];
    want.sort();
    assert_eq!(overflowed, want, "reports come in no particular order");
    assert_eq!(pending_ids(&f.inbox, "d").await, vec![es[4].id, big.id]);
}

async fn collapse_key_replaces_the_pending_entry(b: Backend) {
    let f = fixture(b, LIMITS).await;
    let base = now_ms();
    let a = entry_at(base, 200, Some("score"));
    let plain = entry_at(base + 1, 200, None);
    let c = entry_at(base + 2, 200, Some("score"));
    let other_key = entry_at(base + 3, 200, Some("chat"));
    for e in [&a, &plain] {
        f.inbox.store(DEFAULT_APP, "d", e.clone()).await.unwrap();
    }
    let r = f.inbox.store(DEFAULT_APP, "d", c.clone()).await.unwrap();
    assert_eq!(r.dropped.len(), 1);
    assert_eq!(r.dropped[0].id, a.id);
    assert_eq!(r.dropped[0].reason, DropReason::Replaced { by: c.id });
    let r = f
        .inbox
        .store(DEFAULT_APP, "d", other_key.clone())
        .await
        .unwrap();
    assert!(r.dropped.is_empty(), "another key replaces nothing: {r:?}");
    assert_eq!(
        pending_ids(&f.inbox, "d").await,
        vec![plain.id, c.id, other_key.id]
    );
    // An older notification with the key arrives late (a retry): the newer one stays.
    let late = entry_at(base + 1, 200, Some("score"));
    let r = f.inbox.store(DEFAULT_APP, "d", late.clone()).await.unwrap();
    assert_eq!(r.dropped.len(), 1);
    assert_eq!(r.dropped[0].id, late.id);
    assert_eq!(r.dropped[0].reason, DropReason::Replaced { by: c.id });
    // Two with one key in one batch: the later accepted wins, and it replaces c too.
    let (x, y) = (
        entry_at(base + 5, 200, Some("score")),
        entry_at(base + 6, 200, Some("score")),
    );
    let r = f
        .inbox
        .store_batch(
            [y.clone(), x.clone()]
                .into_iter()
                .map(|entry| InboxWrite {
                    app: DEFAULT_APP.into(),
                    device_id: "d".into(),
                    entry,
                })
                .collect(),
        )
        .await
        .unwrap();
    let mut replaced = r.replaced();
    replaced.sort();
    let mut want = vec![x.id, c.id];
    want.sort();
    assert_eq!(replaced, want, "{r:?}");
    assert!(
        r.dropped
            .iter()
            .all(|d| d.reason == DropReason::Replaced { by: y.id })
    );
    assert_eq!(
        pending_ids(&f.inbox, "d").await,
        vec![plain.id, other_key.id, y.id]
    );
}

async fn expired_entries_are_never_returned_and_are_reaped(b: Backend) {
    let f = fixture(b, LIMITS).await;
    let base = now_ms();
    // Already expired on arrival: refused and reported.
    let mut dead = entry_at(base - 10_000, 200, None);
    dead.expires_at_ms = base - 1;
    let r = f.inbox.store(DEFAULT_APP, "d", dead.clone()).await.unwrap();
    assert_eq!(r.expired(), vec![dead.id]);
    // Expires shortly; another lives an hour.
    let mut short = entry_at(base, 200, None);
    short.expires_at_ms = base + 300;
    let long = entry_at(base + 1, 200, None);
    f.inbox
        .store(DEFAULT_APP, "d", short.clone())
        .await
        .unwrap();
    f.inbox.store(DEFAULT_APP, "d", long.clone()).await.unwrap();
    // Wait for the condition: the clock past `short`'s expiry (PostgreSQL's clock is this
    // machine's clock).
    while now_ms() <= short.expires_at_ms + 5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Not reaped yet, but never returned.
    assert_eq!(f.inbox.pending_count().await.unwrap(), 2);
    assert_eq!(pending_ids(&f.inbox, "d").await, vec![long.id]);
    // The reaper deletes and reports it once.
    let reaped = f.inbox.reap_expired(1000).await.unwrap();
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].id, short.id);
    assert_eq!(
        (reaped[0].app.as_str(), reaped[0].device_id.as_str()),
        (DEFAULT_APP, "d")
    );
    assert!(f.inbox.reap_expired(1000).await.unwrap().is_empty());
    assert_eq!(f.inbox.pending_count().await.unwrap(), 1);
    // A store for a device reports (and deletes) that device's expired entries first.
    let mut short2 = entry_at(now_ms(), 200, None);
    short2.expires_at_ms = now_ms() + 200;
    f.inbox
        .store(DEFAULT_APP, "d", short2.clone())
        .await
        .unwrap();
    while now_ms() <= short2.expires_at_ms + 5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = f.inbox.store(DEFAULT_APP, "d", entry(None)).await.unwrap();
    assert_eq!(r.expired(), vec![short2.id]);
    assert!(f.inbox.reap_expired(1000).await.unwrap().is_empty());
    // The reaper's batch bound.
    let soon = now_ms() + 200;
    let batch: Vec<_> = (0..7)
        .map(|i| {
            let mut e = entry_at(now_ms(), 100, None);
            e.expires_at_ms = soon;
            InboxWrite {
                app: DEFAULT_APP.into(),
                device_id: format!("r{i}"),
                entry: e,
            }
        })
        .collect();
    f.inbox.store_batch(batch).await.unwrap();
    while now_ms() <= soon + 5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(f.inbox.reap_expired(5).await.unwrap().len(), 5);
    assert_eq!(f.inbox.reap_expired(5).await.unwrap().len(), 2);
}

async fn store_batch_writes_many_devices_at_once(b: Backend) {
    let f = fixture(b, LIMITS).await;
    let base = now_ms();
    let mut writes = Vec::new();
    for i in 0..30u64 {
        writes.push(InboxWrite {
            app: DEFAULT_APP.into(),
            device_id: format!("dev-{}", i % 3),
            entry: entry_at(base + i, 300, None),
        });
    }
    let r = f.inbox.store_batch(writes.clone()).await.unwrap();
    assert!(r.dropped.is_empty(), "{r:?}");
    for d in 0..3 {
        let want: Vec<_> = writes
            .iter()
            .filter(|w| w.device_id == format!("dev-{d}"))
            .map(|w| w.entry.id)
            .collect();
        assert_eq!(pending_ids(&f.inbox, &format!("dev-{d}")).await, want);
    }
    assert_eq!(f.inbox.pending_count().await.unwrap(), 30);
    // An empty batch is a no-op.
    assert!(
        f.inbox
            .store_batch(Vec::new())
            .await
            .unwrap()
            .dropped
            .is_empty()
    );
}

async fn concurrent_stores_for_one_device_keep_the_cap(b: Backend) {
    let f = fixture(b, LIMITS).await;
    let base = now_ms();
    let es: Vec<_> = (0..400).map(|i| entry_at(base + i, 200, None)).collect();
    // 400 stores at once for one device, singles and small batches mixed.
    let mut tasks = Vec::new();
    for chunk in es.chunks(4) {
        let inbox = f.inbox.clone();
        let chunk = chunk.to_vec();
        tasks.push(tokio::spawn(async move {
            if chunk.len() == 4 && chunk[0].accepted_at_ms % 8 == 0 {
                let writes = chunk
                    .into_iter()
                    .map(|entry| InboxWrite {
                        app: DEFAULT_APP.into(),
                        device_id: "hot".into(),
                        entry,
                    })
                    .collect();
                inbox.store_batch(writes).await.unwrap().overflowed()
            } else {
                let mut out = Vec::new();
                for e in chunk {
                    out.extend(
                        inbox
                            .store(DEFAULT_APP, "hot", e)
                            .await
                            .unwrap()
                            .overflowed(),
                    );
                }
                out
            }
        }));
    }
    let mut overflowed = Vec::new();
    for t in tasks {
        overflowed.extend(t.await.unwrap());
    }
    let pending = pending_ids(&f.inbox, "hot").await;
    assert_eq!(pending.len(), 100, "the cap holds under concurrent stores");
    assert_eq!(f.inbox.pending_count().await.unwrap(), 100);
    // Every stored id is either pending or reported overflowed, exactly once.
    let mut seen: Vec<_> = pending.iter().chain(overflowed.iter()).copied().collect();
    seen.sort();
    let mut all: Vec<_> = es.iter().map(|e| e.id).collect();
    all.sort();
    assert_eq!(seen, all);
}

async fn a_redelivered_entry_is_kept_once(b: Backend) {
    let f = fixture(b, LIMITS).await;
    let e = entry(Some("k"));
    f.inbox.store(DEFAULT_APP, "d", e.clone()).await.unwrap();
    let r = f.inbox.store(DEFAULT_APP, "d", e.clone()).await.unwrap();
    assert!(r.dropped.is_empty(), "a redelivery replaces nothing: {r:?}");
    let r = f
        .inbox
        .store_batch(vec![
            InboxWrite {
                app: DEFAULT_APP.into(),
                device_id: "d".into(),
                entry: e.clone(),
            };
            2
        ])
        .await
        .unwrap();
    assert!(r.dropped.is_empty(), "{r:?}");
    assert_eq!(pending_ids(&f.inbox, "d").await, vec![e.id]);
}

#[tokio::test]
async fn memory_inbox_refuses_past_its_total_bound() {
    // Room for about three 1,000-byte entries in total.
    let inbox = Inbox::Memory(Arc::new(MemoryInbox::new(LIMITS, 4000)));
    let mut stored = 0;
    let err = loop {
        match inbox
            .store(
                DEFAULT_APP,
                &format!("d{stored}"),
                entry_at(now_ms(), 1000, None),
            )
            .await
        {
            Ok(_) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 10, "the total bound never applied");
    };
    assert_eq!(stored, 3);
    assert!(matches!(err, herald::inbox::InboxError::Full(4000)));
    assert!(err.is_transient());
    // Acks make room again.
    let p = inbox.pending(DEFAULT_APP, "d0", None, 10).await.unwrap();
    assert!(inbox.ack(DEFAULT_APP, "d0", p[0].id).await.unwrap());
    inbox
        .store(DEFAULT_APP, "again", entry_at(now_ms(), 1000, None))
        .await
        .unwrap();
}
