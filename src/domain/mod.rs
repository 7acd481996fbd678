//! Parsed types. A request body becomes these at the API edge (`TryFrom`/`parse`, private
//! fields); the rest of herald never re-checks them. They are also the queued message format,
//! and deserializing re-runs the same checks, so a corrupt queued message is rejected whole.

mod app;
mod device;
mod notification;

pub use app::{AppId, DeviceKey};
pub use device::{ApnsToken, DeviceId, FcmToken};
pub use notification::{
    AndroidOptions, ApnsEnvironment, ApnsOptions, ApnsPushType, ApnsRoute, AttemptRecord, Content,
    NotificationId, NotifyError, NotifyLimits, NotifyRequest, Priority, QueuedNotification, Target,
    TargetRoute, unix_millis,
};
