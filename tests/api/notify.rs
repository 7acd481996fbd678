//! POST /v1/notify on the embedded backend: accepted, queued exactly, counted.

use herald::queue::QueueKind;
use serde_json::json;

use crate::support::{API_KEY, api_only, spawn_app, test_settings};

fn design_example() -> serde_json::Value {
    json!({
        "targets": [
            {"device_id": "phone-42", "apns": {"token": "ab".repeat(32)}},
            {"device_id": "tablet-7", "fcm": {"token": "fcm-registration-token"}}
        ],
        "notification": {"title": "Hi", "body": "You have a message"},
        "data": {"thread": "t-1"},
        "priority": "high",
        "ttl": "1h",
        "collapse_key": "inbox",
        "apns": {"push_type": "alert", "topic": "com.example.app"},
        "android": {"channel_id": "messages"}
    })
}

#[tokio::test]
async fn accepted_notification_is_queued_exactly_as_sent() {
    let app = spawn_app(api_only(test_settings())).await;
    let res = app.post_notify(&design_example()).await;
    assert_eq!(res.status(), 202);
    let id = res.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut consumer = app.queue.consume(QueueKind::Work);
    let delivery = consumer.next().await.expect("a queued message");
    let queued: serde_json::Value = serde_json::from_slice(&delivery.body).unwrap();
    let accepted = queued["accepted_at_ms"].as_u64().unwrap();
    let mut expected = design_example();
    let obj = expected.as_object_mut().unwrap();
    obj.remove("ttl");
    obj.insert("id".into(), json!(id));
    obj.insert("accepted_at_ms".into(), json!(accepted));
    obj.insert("expires_at_ms".into(), json!(accepted + 3_600_000));
    obj.insert("attempt".into(), json!(0));
    // The caller's app, from its API key.
    obj.insert("app".into(), json!("default"));
    assert_eq!(queued, expected);
    // Byte for byte: the queued body is the canonical serialization of what was accepted.
    assert_eq!(delivery.notification().unwrap().to_json(), delivery.body);
    delivery.ack().await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn legacy_path_and_counters() {
    let app = spawn_app(api_only(test_settings())).await;
    for path in ["/v1/notify", "/notify"] {
        let res = app
            .http
            .post(format!("{}{path}", app.base))
            .bearer_auth(API_KEY)
            .json(&json!({"targets": [{"device_id": "a"}, {"device_id": "b"}], "data": {"k": "v"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 202, "{path}");
    }
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("herald_notifications_accepted_total{app=\"default\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("herald_notification_targets_accepted_total{app=\"default\"} 4"));
    assert!(
        metrics.contains(
            r#"herald_http_requests_total{method="POST",route="/notify",status="202"} 1"#
        )
    );
    app.stop().await;
}

#[tokio::test]
async fn ids_are_unique_and_sortable() {
    let app = spawn_app(api_only(test_settings())).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        let res = app.post_notify(&crate::support::notify_body(&["d"])).await;
        let v: serde_json::Value = res.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted, ids,
        "UUIDv7 ids sort in acceptance order and never repeat"
    );
    app.stop().await;
}

#[tokio::test]
async fn thousand_targets_accepted_one_more_refused() {
    let app = spawn_app(api_only(test_settings())).await;
    let ids: Vec<String> = (0..1001).map(|i| format!("device-{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(
        app.post_notify(&crate::support::notify_body(&refs[..1000]))
            .await
            .status(),
        202
    );
    let res = app.post_notify(&crate::support::notify_body(&refs)).await;
    assert_eq!(res.status(), 400);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_request");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 1000")
    );
    app.stop().await;
}
