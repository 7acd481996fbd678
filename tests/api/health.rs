//! Health, readiness and metrics endpoints.

use std::time::{Duration, Instant};

use herald::config::Secret;

use crate::support::{api_only, spawn_app, test_settings};

#[tokio::test]
async fn healthz_and_readyz_on_the_embedded_backend() {
    let app = spawn_app(api_only(test_settings())).await;
    let res = app.get("/healthz").await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.json::<serde_json::Value>().await.unwrap()["status"],
        "ok"
    );
    let res = app.get("/readyz").await;
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["checks"]["backend"], "embedded");
    app.stop().await;
}

#[tokio::test]
async fn metrics_exposition_names_every_family() {
    let app = spawn_app(api_only(test_settings())).await;
    let res = app.get("/metrics").await;
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = res.text().await.unwrap();
    for family in [
        "herald_notifications_accepted_total",
        "herald_queue_publish_duration_seconds",
        "herald_broker_connected 1",
        "herald_deliveries_total",
        "herald_fallbacks_total",
        "herald_gateway_sessions_active",
    ] {
        assert!(text.contains(family), "missing {family}");
    }
    app.stop().await;
}

/// A broker that is not there: herald still starts, is not ready, and answers 503 within
/// the publish deadline instead of hanging or accepting.
#[tokio::test]
async fn unreachable_broker_means_not_ready_and_503_within_the_deadline() {
    // A port nothing listens on: bind, note it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut settings = test_settings();
    settings.queue.url = Secret::new(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"));
    settings.queue.publish_timeout = Duration::from_millis(500);
    let app = spawn_app(api_only(settings)).await;

    let res = app.get("/readyz").await;
    assert_eq!(res.status(), 503);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["checks"]["queue"], "disconnected");
    assert_eq!(
        app.get("/healthz").await.status(),
        200,
        "alive even when not ready"
    );

    let started = Instant::now();
    let res = app.post_notify(&crate::support::notify_body(&["d"])).await;
    let took = started.elapsed();
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    // Bounded by the configured deadline (0.5 s), with generous slack for a loaded machine.
    assert!(took < Duration::from_secs(5), "503 took {took:?}");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("herald_broker_connected 0"));
    assert!(metrics.contains("herald_notifications_accepted_total{app=\"default\"} 0"));
    app.stop().await;
}
