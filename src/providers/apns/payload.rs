//! The APNs JSON payload (`aps` dictionary plus custom keys).
//!
//! Built with serde_json rather than a2's payload builder. a2's builder is not tied to its
//! client (`DefaultNotificationBuilder::build()` returns a `Payload` that serializes on its
//! own), but a2 0.10's `aps` has no `thread-id`, which herald's `notification.thread_id`
//! maps to, and a2 is not a dependency anyway (its client cannot reach a custom endpoint:
//! see `providers/apns/mod.rs` and ARCHITECTURE.md). Here the same function feeds the
//! transport and the size check at the API edge. The keys follow Apple's "Generating a
//! remote notification" reference.

use serde_json::{Map, Value, json};

use crate::domain::{ApnsPushType, QueuedNotification};

/// Apple's limit for a regular (non-VoIP) remote notification payload.
pub const MAX_PAYLOAD_BYTES: usize = 4096;

pub fn payload(n: &QueuedNotification) -> Value {
    let mut aps = Map::new();
    if let Some(c) = &n.notification {
        let mut alert = Map::new();
        for (k, v) in [
            ("title", &c.title),
            ("subtitle", &c.subtitle),
            ("body", &c.body),
        ] {
            if let Some(v) = v {
                alert.insert(k.into(), json!(v));
            }
        }
        if !alert.is_empty() {
            aps.insert("alert".into(), Value::Object(alert));
        }
        if let Some(b) = c.badge {
            aps.insert("badge".into(), json!(b));
        }
        if let Some(s) = &c.sound {
            aps.insert("sound".into(), json!(s));
        }
        if let Some(t) = &c.thread_id {
            aps.insert("thread-id".into(), json!(t));
        }
        if let Some(cat) = &c.category {
            aps.insert("category".into(), json!(cat));
        }
        if c.image.is_some() {
            // Lets a notification service extension fetch the image before display.
            aps.insert("mutable-content".into(), json!(1));
        }
    }
    if n.apns.push_type == ApnsPushType::Background {
        aps.insert("content-available".into(), json!(1));
    }
    let mut root = Map::new();
    root.insert("aps".into(), Value::Object(aps));
    if let Some(image) = n.notification.as_ref().and_then(|c| c.image.as_ref()) {
        root.insert("image".into(), json!(image));
    }
    // The id rides along so the app can dedupe a live delivery against a fallback one.
    root.insert("herald_id".into(), json!(n.id.to_string()));
    for (k, v) in &n.data {
        root.insert(k.clone(), json!(v));
    }
    Value::Object(root)
}

pub fn payload_size(n: &QueuedNotification) -> usize {
    serde_json::to_vec(&payload(n))
        .map(|v| v.len())
        .unwrap_or(usize::MAX)
}
