//! A throwaway PostgreSQL database per test, on the machine's server (127.0.0.1:5432, user
//! postgres, trust; `HERALD_TEST_PG` overrides the server URL). Created with a random name,
//! dropped (`WITH (FORCE)`, so open pools do not block it) when the guard drops, also when
//! the test panics.

use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection};

pub fn server_url() -> String {
    std::env::var("HERALD_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

async fn admin() -> PgConnection {
    PgConnection::connect(&format!("{}/postgres", server_url()))
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (user postgres) is running")
}

pub struct TestDb {
    pub name: String,
    /// The database's URL, for `PostgresInbox::connect`.
    pub url: String,
}

impl TestDb {
    pub async fn create() -> TestDb {
        let name = format!("herald_test_{}", uuid::Uuid::new_v4().simple());
        admin()
            .await
            .execute(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
            .await
            .expect("create the test database");
        TestDb {
            url: format!("{}/{name}", server_url()),
            name,
        }
    }

    /// Kills every connection to this database (what a PostgreSQL restart or failover does
    /// to a pool) and waits until the server has ended them all. Returns how many it killed.
    pub async fn terminate_connections(&self) -> i64 {
        let mut admin = admin().await;
        let killed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()) k",
        )
        .bind(&self.name)
        .fetch_one(&mut admin)
        .await
        .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
                    .bind(&self.name)
                    .fetch_one(&mut admin)
                    .await
                    .unwrap();
            if left == 0 {
                return killed;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "backends still alive after pg_terminate_backend"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Connections the server currently has to this database.
    pub async fn connection_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
            .bind(&self.name)
            .fetch_one(&mut admin().await)
            .await
            .unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop cannot await, and the test's runtime may be gone (or panicking): drop the
        // database from a thread with its own small runtime.
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let _ = admin()
                    .await
                    .execute(sqlx::AssertSqlSafe(format!(
                        r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#
                    )))
                    .await;
            });
        })
        .join();
    }
}
