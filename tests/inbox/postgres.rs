//! PostgreSQL-only behaviour: migrations at start, and connection loss (what a database
//! restart or failover does) giving a typed transient error, then recovery by the pool.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use herald::inbox::{DEFAULT_APP, Inbox, InboxError, InboxLimits, PostgresInbox};

use crate::contract::{LIMITS, entry, pool};
use crate::pg::TestDb;

#[tokio::test]
async fn migrations_apply_once_and_a_second_node_starts_on_the_same_schema() {
    let db = TestDb::create().await;
    // Two nodes starting together: the migrator's lock lets one apply, the other waits.
    let (a, b) = tokio::join!(
        PostgresInbox::connect(&db.url, pool(2), LIMITS),
        PostgresInbox::connect(&db.url, pool(2), LIMITS)
    );
    let (a, b) = (
        Inbox::Postgres(Arc::new(a.unwrap())),
        Inbox::Postgres(Arc::new(b.unwrap())),
    );
    let e = entry(None);
    a.store(DEFAULT_APP, "d", e.clone()).await.unwrap();
    let seen = b.pending(DEFAULT_APP, "d", None, 10).await.unwrap();
    assert_eq!(seen[0].id, e.id, "one shared inbox across nodes");
    if let Inbox::Postgres(p) = &a {
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
            .fetch_one(p.pool())
            .await
            .unwrap();
        assert_eq!(applied, 2, "every migration, once");
    }
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn an_unreachable_database_is_a_transient_error() {
    // A port nothing listens on (bound then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut settings = pool(1);
    settings.acquire_timeout = Duration::from_millis(500);
    let err = PostgresInbox::connect(
        &format!("postgres://postgres:secret-pw@127.0.0.1:{port}/x"),
        settings,
        LIMITS,
    )
    .await
    .err()
    .expect("no database there");
    assert!(err.is_transient(), "{err:?}");
    assert!(!err.to_string().contains("secret-pw"), "{err}");
}

#[tokio::test]
async fn killed_idle_connections_give_a_transient_error_then_recover() {
    let db = TestDb::create().await;
    let pg = Arc::new(
        PostgresInbox::connect(&db.url, pool(2), LIMITS)
            .await
            .unwrap(),
    );
    let inbox = Inbox::Postgres(pg.clone());
    let before = entry(None);
    inbox.store(DEFAULT_APP, "d", before.clone()).await.unwrap();
    assert!(db.terminate_connections().await >= 1);
    // The next operation runs on a connection the server closed: a typed transient error,
    // never a panic or a hang.
    let err = inbox
        .store(DEFAULT_APP, "d", entry(None))
        .await
        .expect_err("the pooled connection was killed");
    assert!(matches!(err, InboxError::Unavailable(_)), "{err:?}");
    assert!(err.is_transient());
    // The pool drops dead connections and opens new ones: within a few attempts (at most
    // one per pooled connection) operations succeed again.
    let after = entry(None);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match inbox.store(DEFAULT_APP, "d", after.clone()).await {
            Ok(_) => break,
            Err(e) => assert!(e.is_transient() && attempts <= 3, "{e:?} after {attempts}"),
        }
    }
    // Nothing committed before the loss is lost; the write after it landed.
    let ids: Vec<_> = inbox
        .pending(DEFAULT_APP, "d", None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(ids, vec![before.id, after.id]);
    assert!(db.connection_count().await >= 1, "the pool reconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_killed_mid_stream_lose_no_committed_entry() {
    let db = TestDb::create().await;
    // No cap may drop anything here: a writer the scheduler favours can store more than
    // LIMITS.max_per_device before the kills are done, and an overflow drop is not a loss.
    let uncapped = InboxLimits {
        max_per_device: 1_000_000,
        max_bytes_per_device: 1 << 40,
    };
    let inbox = Inbox::Postgres(Arc::new(
        PostgresInbox::connect(&db.url, pool(4), uncapped)
            .await
            .unwrap(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    // Stores that failed, across writers: the proof that a kill hit a store in flight.
    let failures = Arc::new(AtomicUsize::new(0));
    // Writers store continuously (each to its own device, uncapped) and record
    // which stores returned Ok and count those that failed.
    let mut writers = Vec::new();
    for w in 0..4 {
        let (inbox, stop, failures) = (inbox.clone(), stop.clone(), failures.clone());
        writers.push(tokio::spawn(async move {
            let device = format!("w{w}");
            let mut ok = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let e = entry(None);
                match inbox.store(DEFAULT_APP, &device, e.clone()).await {
                    Ok(_) => ok.push(e.id),
                    Err(err) => {
                        assert!(err.is_transient(), "{err:?}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            (device, ok)
        }));
    }
    // Kill all connections while they write, each time after the writers made progress,
    // at least twice and until a kill has hit a store in flight (a kill that lands between
    // statements is absorbed by the pool's reconnect and proves nothing); then wait until
    // writes succeed again.
    let count = |inbox: Inbox| async move { inbox.pending_count().await };
    let mut killed = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last = 0;
    while killed < 2 || failures.load(Ordering::Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "after {killed} kills: writers made no progress, or killing connections mid-stream surfaced no error"
        );
        if let Ok(n) = count(inbox.clone()).await
            && n >= last + 40
        {
            db.terminate_connections().await;
            killed += 1;
            last = n;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    loop {
        assert!(tokio::time::Instant::now() < deadline, "no recovery");
        if let Ok(n) = count(inbox.clone()).await
            && n >= last + 40
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let (device, ok) = w.await.unwrap();
        let stored: Vec<_> = inbox
            .pending(DEFAULT_APP, &device, None, 10_000)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.id)
            .collect();
        // Every store that returned Ok is there (an Err store may or may not have
        // committed: the dispatcher retries it, and a retry stores it once).
        for id in &ok {
            assert!(stored.contains(id), "{device}: committed entry {id} lost");
        }
    }
}
