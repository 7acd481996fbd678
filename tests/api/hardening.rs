//! Issue 14's bad input at the edge: trailing bytes, oversized live frames, control
//! characters in header-bound fields, and the embedded queue's byte bound.

use herald::queue::QueueKind;
use serde_json::{Value, json};

use crate::support::{API_KEY, TestApp, api_only, spawn_app, test_settings};

async fn post_raw(app: &TestApp, body: String) -> (u16, Value) {
    let res = app
        .http
        .post(format!("{}/v1/notify", app.base))
        .bearer_auth(API_KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

fn live_only(data_bytes: usize) -> Value {
    json!({"targets": [{"device_id": "phone-1"}], "data": {"k": "v".repeat(data_bytes)}})
}

#[tokio::test]
async fn the_body_is_exactly_one_json_value() {
    let app = spawn_app(api_only(test_settings())).await;
    let body = live_only(1).to_string();
    for trailing in [" xx", "{}", "\n{\"targets\": []}", " 1", "]"] {
        let (status, err) = post_raw(&app, format!("{body}{trailing}")).await;
        assert_eq!(status, 400, "trailing {trailing:?}: {err}");
        assert_eq!(err["error"]["code"], "invalid_json", "{err}");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.contains("exactly one JSON value"), "{message}");
    }
    // Whitespace around the value is not "more".
    let (status, err) = post_raw(&app, format!(" \n{body} \r\n\t ")).await;
    assert_eq!(status, 202, "{err}");
    app.stop().await;
}

#[tokio::test]
async fn a_live_frame_over_notify_max_frame_bytes_is_refused() {
    let mut s = api_only(test_settings());
    s.notify.max_frame_bytes = 16 * 1024;
    let app = spawn_app(s).await;
    // Well under the 1 MiB body limit, over the live frame limit: no provider payload
    // limit applies to a device_id-only target, this is the only bound.
    let res = app.post_notify(&live_only(20 * 1024)).await;
    assert_eq!(res.status(), 400);
    let err: Value = res.json().await.unwrap();
    assert_eq!(err["error"]["code"], "invalid_request", "{err}");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(message.contains("notify.max_frame_bytes"), "{message}");
    assert!(message.contains("16384"), "{message}");
    // Under it: accepted.
    let res = app.post_notify(&live_only(15 * 1024)).await;
    assert_eq!(res.status(), 202);
    app.stop().await;
}

#[tokio::test]
async fn control_characters_in_header_fields_are_refused() {
    let app = spawn_app(api_only(test_settings())).await;
    let cases = [
        ("collapse_key", json!({"collapse_key": "in\u{7}box"})),
        (
            "collapse_key",
            json!({"collapse_key": "inbox\r\nx-evil: 1"}),
        ),
        ("apns.topic", json!({"apns": {"topic": "com.example\napp"}})),
        (
            "apns.topic",
            json!({"apns": {"topic": "com.example\u{0}app"}}),
        ),
    ];
    for (field, extra) in cases {
        let mut body = live_only(1);
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let res = app.post_notify(&body).await;
        assert_eq!(res.status(), 400, "{body}");
        let err: Value = res.json().await.unwrap();
        assert_eq!(err["error"]["code"], "invalid_request", "{err}");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{field}: {message}");
    }
    // Printable values, spaces in a collapse key included, still pass.
    let mut body = live_only(1);
    body["collapse_key"] = json!("new messages");
    body["apns"] = json!({"topic": "com.example.app"});
    assert_eq!(app.post_notify(&body).await.status(), 202);
    app.stop().await;
}

#[tokio::test]
async fn the_embedded_queue_is_bounded_by_bytes() {
    let mut s = api_only(test_settings());
    s.http.max_body_bytes = 16 * 1024;
    s.queue.memory_max_bytes = 16 * 1024;
    let app = spawn_app(s).await;
    // ~6 KiB each: two fit in 16 KiB, the third does not (the count bound, 100,000, is
    // nowhere near).
    for _ in 0..2 {
        assert_eq!(app.post_notify(&live_only(6 * 1024)).await.status(), 202);
    }
    let res = app.post_notify(&live_only(6 * 1024)).await;
    assert_eq!(res.status(), 503);
    assert!(res.headers().get("retry-after").is_some(), "Retry-After");
    let err: Value = res.json().await.unwrap();
    assert_eq!(err["error"]["code"], "queue_unavailable", "{err}");
    // A small one still fits in what is left.
    assert_eq!(app.post_notify(&live_only(1)).await.status(), 202);
    // Settling a message gives its bytes back.
    let mut consumer = app.queue.consume(QueueKind::Work);
    consumer.next().await.expect("queued").ack().await.unwrap();
    assert_eq!(app.post_notify(&live_only(6 * 1024)).await.status(), 202);
    app.stop().await;
}
