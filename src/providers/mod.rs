//! Provider fallbacks: APNs and FCM. Each builds its wire payload from a queued
//! notification; the API uses the same builders to reject a payload over a provider's size
//! limit before it is queued (it would only fail later, per target, at the provider).

pub mod apns;
pub mod fcm;

use crate::domain::{NotifyError, QueuedNotification};

/// Rejects a notification whose APNs or FCM payload would exceed the provider's limit, for
/// the routes its targets actually use.
pub fn check_payload_sizes(n: &QueuedNotification) -> Result<(), NotifyError> {
    if n.targets.iter().any(|t| t.apns.is_some()) {
        let size = apns::payload_size(n);
        if size > apns::MAX_PAYLOAD_BYTES {
            return Err(NotifyError::PayloadTooLarge {
                provider: "APNs",
                size,
                limit: apns::MAX_PAYLOAD_BYTES,
            });
        }
    }
    if n.targets.iter().any(|t| t.fcm.is_some()) {
        let size = fcm::payload_size(n);
        if size > fcm::MAX_PAYLOAD_BYTES {
            return Err(NotifyError::PayloadTooLarge {
                provider: "FCM",
                size,
                limit: fcm::MAX_PAYLOAD_BYTES,
            });
        }
    }
    Ok(())
}
