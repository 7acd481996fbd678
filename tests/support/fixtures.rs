//! The one place tests build a [`QueuedNotification`]: from a notify body, through the
//! API's own parser (`NotifyRequest::parse`) with the compiled-in `[notify]` limits, so a
//! fixture is always something the API could have queued.

use std::time::SystemTime;

use herald::config::Settings;
use herald::domain::{NotifyLimits, NotifyRequest, QueuedNotification};
use serde_json::{Value, json};

/// A queued notification as the API makes it from this notify body.
pub fn notification(body: Value) -> QueuedNotification {
    let req: NotifyRequest = serde_json::from_value(body).expect("a valid notify body");
    let n = Settings::defaults().notify;
    let limits = NotifyLimits {
        max_targets: n.max_targets,
        default_ttl: n.default_ttl,
        max_ttl: n.max_ttl,
    };
    req.parse(limits, SystemTime::now())
        .expect("the API accepts it")
}

/// A data-only notification for one device.
pub fn notification_for(device: &str) -> QueuedNotification {
    notification(json!({"targets": [{"device_id": device}], "data": {"k": "v"}}))
}

/// A data-only notification whose one data value is `bytes` long (at least 1), live for a
/// minute: for the gateway's frame size and slow-reader cases.
pub fn notification_with_data(bytes: usize) -> QueuedNotification {
    notification(json!({
        "targets": [{"device_id": "fixture"}],
        "data": {"k": "v".repeat(bytes.max(1))},
        "ttl": "60s",
    }))
}
