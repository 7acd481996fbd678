//! The FCM HTTP v1 `messages:send` body.
//!
//! Field names follow the v1 `Message` resource (`notification`, `data`, `android`); the
//! legacy API's shapes (`to`, `registration_ids`) are gone with that API.

use serde_json::{Map, Value, json};

use crate::domain::{Priority, QueuedNotification};

/// FCM's limit on a message's payload (notification + data).
pub const MAX_PAYLOAD_BYTES: usize = 4096;

pub fn message(n: &QueuedNotification, token: &str, ttl_secs: u64) -> Value {
    let mut msg = Map::new();
    msg.insert("token".into(), json!(token));
    let mut android = Map::new();
    android.insert(
        "priority".into(),
        json!(match n.priority {
            Priority::High => "HIGH",
            Priority::Normal => "NORMAL",
        }),
    );
    // Protobuf Duration in JSON: seconds with an "s" suffix.
    android.insert("ttl".into(), json!(format!("{ttl_secs}s")));
    if let Some(k) = &n.collapse_key {
        android.insert("collapse_key".into(), json!(k));
    }
    let mut android_notification = Map::new();
    if let Some(c) = &n.notification {
        let mut notification = Map::new();
        for (k, v) in [("title", &c.title), ("body", &c.body), ("image", &c.image)] {
            if let Some(v) = v {
                notification.insert(k.into(), json!(v));
            }
        }
        if !notification.is_empty() {
            msg.insert("notification".into(), Value::Object(notification));
        }
        if let Some(s) = &c.sound {
            android_notification.insert("sound".into(), json!(s));
        }
        if let Some(t) = &c.thread_id {
            android_notification.insert("tag".into(), json!(t));
        }
        if let Some(a) = &c.category {
            android_notification.insert("click_action".into(), json!(a));
        }
        if let Some(b) = c.badge {
            android_notification.insert("notification_count".into(), json!(b));
        }
    }
    if let Some(ch) = &n.android.channel_id {
        android_notification.insert("channel_id".into(), json!(ch));
    }
    if !android_notification.is_empty() {
        android.insert("notification".into(), Value::Object(android_notification));
    }
    msg.insert("android".into(), Value::Object(android));
    // FCM data values must be strings; herald_id lets the app dedupe live vs fallback.
    let mut data: Map<String, Value> = n.data.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    data.insert("herald_id".into(), json!(n.id.to_string()));
    msg.insert("data".into(), Value::Object(data));
    json!({ "message": msg })
}

/// The size FCM counts against its limit: the notification and data parts.
pub fn payload_size(n: &QueuedNotification) -> usize {
    let m = message(n, "", 0);
    let inner = &m["message"];
    let size = |v: &Value| serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
    size(&inner["data"]) + inner.get("notification").map(size).unwrap_or(0)
}
