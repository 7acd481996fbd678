//! Parsed types. A request body becomes these at the API edge; the rest of herald never
//! re-checks them.
//!
//! Two kinds, checked differently. The identifiers (`DeviceId`, `ApnsToken`, `FcmToken`,
//! `NotificationId`) are newtypes with a private field: the only ways to make one are their
//! `parse` / `TryFrom` (serde goes through `try_from`), so an invalid one cannot exist. The
//! records built from them (`NotifyRequest`, `Target`, `Content`, `QueuedNotification`, …)
//! have public fields; their per-field rules hold because each field is such a type, and
//! the rules across fields (at least one target, no device twice, ttl within
//! `notify.max_ttl`, `notification` or `data`) are checked once, by `NotifyRequest::parse`.
//! They are also the queued message format: deserializing re-runs every field's check
//! (unknown fields refused), so a queued message with a bad token or id is rejected whole;
//! code that builds a `QueuedNotification` by hand instead of through `parse` (tests) is
//! trusted with the cross-field rules.

mod app;
mod device;
mod notification;

pub use app::{AppId, DeviceKey};
pub use device::{ApnsToken, DeviceId, FcmToken};
pub use notification::{
    AndroidOptions, ApnsEnvironment, ApnsOptions, ApnsPushType, ApnsRoute, AttemptRecord, Content,
    NotificationId, NotifyError, NotifyLimits, NotifyRequest, Priority, Qos, QueuedNotification,
    Target, TargetRoute, unix_millis,
};
