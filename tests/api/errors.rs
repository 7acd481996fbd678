//! Every error status, as JSON `{"error": {"code", "message"}}`, and nothing queued on error.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::support::{API_KEY, TestApp, api_only, spawn_app, test_settings};

async fn expect_error(res: reqwest::Response, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(res.status().as_u16(), status, "status for {code}");
    assert_eq!(
        res.headers()["content-type"].to_str().unwrap(),
        "application/json",
        "{code} is JSON"
    );
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(!body["error"]["message"].as_str().unwrap().is_empty());
    body
}

async fn post_raw(app: &TestApp, body: &str) -> reqwest::Response {
    app.http
        .post(format!("{}/v1/notify", app.base))
        .bearer_auth(API_KEY)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

async fn nothing_queued(app: &TestApp) {
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("herald_notifications_accepted_total{app=\"default\"} 0"));
    assert!(metrics.contains("herald_queue_depth 0"));
}

#[tokio::test]
async fn bad_bodies_are_400_with_a_reason() {
    let app = spawn_app(api_only(test_settings())).await;
    let token = "ab".repeat(32);
    for (body, code, needle) in [
        ("{", "invalid_json", "EOF"),
        ("not json", "invalid_json", "expected"),
        ("[]", "invalid_request", "struct"),
        (r#"{"targets": []}"#, "invalid_request", "at least one"),
        (
            r#"{"targets": [{"device_id": "a b"}], "data": {"k": "v"}}"#,
            "invalid_request",
            "device_id",
        ),
        (
            r#"{"targets": [{"device_id": "d", "apns": {"token": "xyz"}}], "data": {"k": "v"}}"#,
            "invalid_request",
            "hex",
        ),
        (
            r#"{"targets": [{"device_id": "d"}], "data": {"k": 1}}"#,
            "invalid_request",
            "string",
        ),
        (
            r#"{"targets": [{"device_id": "d"}], "data": {"k": "v"}, "priority": "urgent"}"#,
            "invalid_request",
            "priority",
        ),
        (
            r#"{"targets": [{"device_id": "d"}], "data": {"k": "v"}, "ttl": "forever"}"#,
            "invalid_request",
            "ttl",
        ),
        (
            r#"{"targets": [{"device_id": "d"}], "data": {"k": "v"}, "unknown": 1}"#,
            "invalid_request",
            "unknown",
        ),
        (
            r#"{"targets": [{"device_id": "d"}]}"#,
            "invalid_request",
            "needs",
        ),
    ] {
        let res = post_raw(&app, body).await;
        let err = expect_error(res, 400, code).await;
        let msg = err["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(needle),
            "{body}: message {msg:?} lacks {needle:?}"
        );
    }
    // A payload APNs would refuse (over 4 KiB) is refused here, before queueing.
    let big = json!({
        "targets": [{"device_id": "d", "apns": {"token": token}}],
        "data": {"blob": "x".repeat(5000)}
    });
    let res = app.post_notify(&big).await;
    let err = expect_error(res, 400, "provider_payload_too_large").await;
    assert!(err["error"]["message"].as_str().unwrap().contains("APNs"));
    nothing_queued(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn auth_failures_are_401() {
    let app = spawn_app(api_only(test_settings())).await;
    let url = format!("{}/v1/notify", app.base);
    let body = crate::support::notify_body(&["d"]);
    for auth in [
        None,
        Some("Bearer wrong-key-0123456789"),
        Some("Basic dGVzdDp0ZXN0"),
        Some("Bearer "),
        Some(API_KEY),
    ] {
        let mut req = app.http.post(&url).json(&body);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.headers()["www-authenticate"], "Bearer");
        expect_error(res, 401, "unauthorized").await;
    }
    // The scheme is case-insensitive (RFC 7235).
    let res = app
        .http
        .post(&url)
        .header("authorization", format!("bearer {API_KEY}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    app.stop().await;
}

#[tokio::test]
async fn routing_errors_404_and_405() {
    let app = spawn_app(api_only(test_settings())).await;
    expect_error(app.get("/v2/notify").await, 404, "not_found").await;
    let res = app.get("/v1/notify").await;
    assert_eq!(res.headers()["allow"], "POST");
    expect_error(res, 405, "method_not_allowed").await;
    let res = app
        .http
        .delete(format!("{}/healthz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["allow"], "GET");
    expect_error(res, 405, "method_not_allowed").await;
    app.stop().await;
}

#[tokio::test]
async fn oversize_bodies_are_413_declared_or_streamed() {
    let mut settings = test_settings();
    settings.http.max_body_bytes = 4096;
    let app = spawn_app(api_only(settings)).await;
    let big = format!(
        r#"{{"targets":[{{"device_id":"d"}}],"data":{{"k":"{}"}}}}"#,
        "x".repeat(5000)
    );
    expect_error(post_raw(&app, &big).await, 413, "body_too_large").await;
    // Chunked, with no Content-Length: refused once it crosses the limit.
    let chunks: Vec<Result<String, std::io::Error>> = big
        .as_bytes()
        .chunks(1000)
        .map(|c| Ok(String::from_utf8(c.to_vec()).unwrap()))
        .collect();
    let res = app
        .http
        .post(format!("{}/v1/notify", app.base))
        .bearer_auth(API_KEY)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    expect_error(res, 413, "body_too_large").await;
    nothing_queued(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn wrong_content_type_is_415() {
    let app = spawn_app(api_only(test_settings())).await;
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut req = app
            .http
            .post(format!("{}/v1/notify", app.base))
            .bearer_auth(API_KEY)
            .body(r#"{"targets":[{"device_id":"d"}],"data":{"k":"v"}}"#);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        expect_error(req.send().await.unwrap(), 415, "unsupported_media_type").await;
    }
    let res = app
        .http
        .post(format!("{}/v1/notify", app.base))
        .bearer_auth(API_KEY)
        .header("content-type", "application/json; charset=utf-8")
        .body(r#"{"targets":[{"device_id":"d"}],"data":{"k":"v"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    app.stop().await;
}

#[tokio::test]
async fn full_embedded_queue_is_503_with_retry_after() {
    let mut settings = test_settings();
    settings.queue.memory_capacity = 2;
    settings.queue.retry_after = Duration::from_secs(3);
    let app = spawn_app(api_only(settings)).await;
    let body = crate::support::notify_body(&["d"]);
    assert_eq!(app.post_notify(&body).await.status(), 202);
    assert_eq!(app.post_notify(&body).await.status(), 202);
    let res = app.post_notify(&body).await;
    assert_eq!(res.headers()["retry-after"], "3");
    expect_error(res, 503, "queue_unavailable").await;
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains(r#"herald_queue_publish_failures_total{reason="full"} 1"#));
    assert!(metrics.contains("herald_notifications_accepted_total{app=\"default\"} 2"));
    app.stop().await;
}
