//! The notify request, parsed into the notification herald queues.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{ApnsToken, AppId, DeviceId, FcmToken};

/// A notification's id: a UUIDv7, so ids sort by acceptance time and are unique across nodes
/// without coordination. Devices dedupe on it; APNs gets it as `apns-id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NotificationId(uuid::Uuid);

impl NotificationId {
    pub fn generate() -> Self {
        NotificationId(uuid::Uuid::now_v7())
    }
    pub fn parse(s: &str) -> Option<Self> {
        uuid::Uuid::parse_str(s).ok().map(NotificationId)
    }
}

impl fmt::Display for NotificationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// For optional fields: absent means `None`, but an explicit `null` is an error, as the API
/// schema says (a field is a string or absent). Without this, serde would take `null` as
/// `None` and accept a body the published schema calls invalid.
fn non_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Deliver now, wake the device (APNs priority 10, FCM HIGH). The default: callers of a
    /// push service mostly send things a person should see now.
    #[default]
    High,
    /// Deliver when convenient for the device's power (APNs 5, FCM NORMAL).
    Normal,
}

/// What delivery a notification needs (the `qos` field of the notify body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Qos {
    /// Retried until delivered, its ttl passes, or it is dead-lettered; a device with no
    /// session and no working provider route gets it from its offline inbox on reconnect.
    /// Devices dedupe on the id, which makes this "exactly once" as seen by the app.
    #[default]
    AtLeastOnce,
    /// Ephemeral (typing indicators, locations): one live attempt if a session exists now,
    /// else one provider attempt if the target has a route, then done. No retry, no inbox,
    /// no dead letter.
    AtMostOnce,
}

impl Qos {
    pub fn is_default(&self) -> bool {
        *self == Qos::AtLeastOnce
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApnsPushType {
    /// A visible alert (banner, sound, badge).
    #[default]
    Alert,
    /// A silent content-available push that wakes the app; carries no alert.
    Background,
}

/// What the person sees. Every field is optional; a request needs `notification` or `data`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Content {
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub title: Option<String>,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub subtitle: Option<String>,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub body: Option<String>,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub badge: Option<u32>,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub sound: Option<String>,
    /// An image URL (FCM `notification.image`; APNs gets `mutable-content` for an extension).
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub image: Option<String>,
    /// APNs `category` / FCM `click_action`: which action set the app shows.
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub category: Option<String>,
    /// APNs `thread-id` / FCM `tag`: groups notifications on the device.
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub thread_id: Option<String>,
}

/// APNs-specific options.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsOptions {
    #[serde(default)]
    pub push_type: ApnsPushType,
    /// Overrides `apns.topic` from the config (the app's bundle id).
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub topic: Option<String>,
}

/// FCM Android-specific options.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AndroidOptions {
    /// Android notification channel the notification is posted to.
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub channel_id: Option<String>,
}

/// Which APNs environment a device token belongs to. A development build (run from Xcode,
/// or an ad-hoc/TestFlight-from-Xcode build) registers with the sandbox; an App Store build
/// with production. A token sent to the other environment's host is refused as
/// `BadDeviceToken`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApnsEnvironment {
    Production,
    Sandbox,
}

impl ApnsEnvironment {
    pub fn as_str(self) -> &'static str {
        match self {
            ApnsEnvironment::Production => "production",
            ApnsEnvironment::Sandbox => "sandbox",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsRoute {
    pub token: ApnsToken,
    /// Absent: the app's `apns.default_environment` (itself `production` by default),
    /// resolved when sending, so a queued message follows the app's setting.
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub environment: Option<ApnsEnvironment>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmRoute {
    pub token: FcmToken,
}

/// One device to reach: live through its session, else through the provider routes given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub device_id: DeviceId,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub apns: Option<ApnsRoute>,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub fcm: Option<FcmRoute>,
}

/// A fallback route of a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetRoute<'a> {
    Apns(&'a ApnsRoute),
    Fcm(&'a FcmToken),
}

impl Target {
    pub fn routes(&self) -> impl Iterator<Item = TargetRoute<'_>> {
        let apns = self.apns.as_ref().map(TargetRoute::Apns);
        let fcm = self.fcm.as_ref().map(|r| TargetRoute::Fcm(&r.token));
        apns.into_iter().chain(fcm)
    }
}

/// The body of `POST /v1/notify`, as received. Unknown fields are rejected, so a misspelt
/// option is a 400, not a silently ignored setting.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyRequest {
    pub targets: Vec<Target>,
    #[serde(default, deserialize_with = "non_null")]
    pub notification: Option<Content>,
    #[serde(default)]
    pub data: BTreeMap<String, String>,
    #[serde(default)]
    pub priority: Priority,
    /// A duration string ("90s", "1h"); the default comes from `notify.default_ttl`.
    #[serde(default, deserialize_with = "non_null")]
    pub ttl: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    pub collapse_key: Option<String>,
    #[serde(default)]
    pub apns: ApnsOptions,
    #[serde(default)]
    pub android: AndroidOptions,
    #[serde(default)]
    pub qos: Qos,
}

/// Why a notify request cannot be accepted. Each becomes a 400 with this message.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NotifyError {
    #[error("{0}")]
    Invalid(String),
    #[error("the {provider} payload would be {size} bytes; the limit is {limit}")]
    PayloadTooLarge {
        provider: &'static str,
        size: usize,
        limit: usize,
    },
}

/// Limits applied at parse time, from `[notify]` in the config.
#[derive(Debug, Clone, Copy)]
pub struct NotifyLimits {
    pub max_targets: usize,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
}

/// Data keys FCM refuses (its reserved words) or herald uses itself.
fn reserved_data_key(key: &str) -> bool {
    matches!(
        key,
        "from" | "notification" | "message_type" | "aps" | "herald_id"
    ) || key.starts_with("google")
        || key.starts_with("gcm")
}

impl NotifyRequest {
    /// Checks everything and stamps the id and times: the notification as it is queued.
    pub fn parse(
        self,
        limits: NotifyLimits,
        now: SystemTime,
    ) -> Result<QueuedNotification, NotifyError> {
        let bad = |m: String| Err(NotifyError::Invalid(m));
        if self.targets.is_empty() {
            return bad("targets must hold at least one target".into());
        }
        if self.targets.len() > limits.max_targets {
            return bad(format!(
                "targets holds {} entries; at most {} per request",
                self.targets.len(),
                limits.max_targets
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for t in &self.targets {
            if !seen.insert(&t.device_id) {
                return bad(format!(
                    "device_id {} appears twice in targets",
                    t.device_id
                ));
            }
        }
        let has_content = self
            .notification
            .as_ref()
            .is_some_and(|c| *c != Content::default());
        if !has_content && self.data.is_empty() {
            return bad("a notification needs `notification` content or `data`".into());
        }
        if self.apns.push_type == ApnsPushType::Background && has_content {
            return bad(
                "apns.push_type background carries no visible content: send `data` only".into(),
            );
        }
        if let Some(key) = self.data.keys().find(|k| reserved_data_key(k)) {
            return bad(format!(
                "data key {key:?} is reserved (FCM reserves from, notification, message_type, google*, gcm*; herald uses aps and herald_id)"
            ));
        }
        if let Some(key) = &self.collapse_key {
            // APNs caps apns-collapse-id at 64 bytes.
            if key.is_empty() || key.len() > 64 {
                return bad("collapse_key must be 1-64 bytes".into());
            }
            // It becomes the apns-collapse-id header: a control character would be refused
            // by the HTTP client at send time and dead-letter the target as a provider
            // configuration error. Refused here, where the caller can fix it.
            if key.chars().any(char::is_control) {
                return bad("collapse_key must not contain control characters".into());
            }
        }
        if let Some(topic) = &self.apns.topic
            && (topic.is_empty() || !crate::config::header_safe(topic))
        {
            return bad(
                "apns.topic must be non-empty, without control characters or spaces (it is the apns-topic header)"
                    .into(),
            );
        }
        let ttl = match &self.ttl {
            None => limits.default_ttl,
            Some(s) => humantime::parse_duration(s)
                .map_err(|e| NotifyError::Invalid(format!("ttl {s:?}: {e}")))?,
        };
        if ttl.is_zero() || ttl > limits.max_ttl {
            return bad(format!(
                "ttl must be positive and at most {}",
                humantime::format_duration(limits.max_ttl)
            ));
        }
        let accepted_at = unix_millis(now);
        Ok(QueuedNotification {
            id: NotificationId::generate(),
            app: AppId::default_app(),
            accepted_at_ms: accepted_at,
            expires_at_ms: accepted_at + ttl.as_millis() as u64,
            priority: self.priority,
            collapse_key: self.collapse_key,
            notification: self.notification.filter(|_| has_content),
            data: self.data,
            apns: self.apns,
            android: self.android,
            qos: self.qos,
            targets: self.targets,
            attempt: 0,
            history: Vec::new(),
        })
    }
}

/// A notification as it travels through the queue. JSON on the wire (readable in the
/// RabbitMQ UI and in dead letters); deserializing re-validates every nested type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueuedNotification {
    pub id: NotificationId,
    /// The caller's app (its API key's), set at the edge; every target is a device of this
    /// app and goes through this app's providers. Absent in messages queued before apps
    /// existed: those belong to `default`.
    #[serde(default)]
    pub app: AppId,
    pub accepted_at_ms: u64,
    pub expires_at_ms: u64,
    pub priority: Priority,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub collapse_key: Option<String>,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub notification: Option<Content>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data: BTreeMap<String, String>,
    #[serde(default)]
    pub apns: ApnsOptions,
    #[serde(default)]
    pub android: AndroidOptions,
    /// Left out when at_least_once (the default), so the queued format of such messages is
    /// what nodes without QoS read.
    #[serde(default, skip_serializing_if = "Qos::is_default")]
    pub qos: Qos,
    /// The targets still to deliver. A retry carries only the targets that have not reached
    /// a final outcome, so a retry never re-sends to a device that already got it.
    pub targets: Vec<Target>,
    /// Delivery attempts made so far (0 when first queued).
    #[serde(default)]
    pub attempt: u32,
    /// One record per attempt that left targets undelivered: why, by count. Kept compact
    /// (reasons, not per-device entries) so a 1000-target retry stays small; the targets
    /// still pending are `targets`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<AttemptRecord>,
}

/// What one delivery attempt left undone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub at_ms: u64,
    /// Failure reason → number of targets that failed with it.
    pub failures: BTreeMap<String, u32>,
}

impl QueuedNotification {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("QueuedNotification always serializes")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        unix_millis(now) >= self.expires_at_ms
    }

    /// Time left before `ttl` runs out (zero once expired).
    pub fn remaining_ttl(&self, now: SystemTime) -> Duration {
        Duration::from_millis(self.expires_at_ms.saturating_sub(unix_millis(now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: NotifyLimits = NotifyLimits {
        max_targets: 3,
        default_ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(86400),
    };

    fn request(json: serde_json::Value) -> Result<QueuedNotification, NotifyError> {
        let req: NotifyRequest =
            serde_json::from_value(json).map_err(|e| NotifyError::Invalid(e.to_string()))?;
        req.parse(LIMITS, SystemTime::now())
    }

    #[test]
    fn parses_the_design_example() {
        let q = request(serde_json::json!({
            "targets": [
                {"device_id": "phone-42", "apns": {"token": "ab".repeat(32)}},
                {"device_id": "tablet-7", "fcm": {"token": "fcm-token"}}
            ],
            "notification": {"title": "Hi", "body": "You have a message"},
            "data": {"thread": "t-1"},
            "priority": "high",
            "ttl": "1h"
        }))
        .unwrap();
        assert_eq!(q.targets.len(), 2);
        assert_eq!(q.expires_at_ms - q.accepted_at_ms, 3_600_000);
        let back = QueuedNotification::from_json(&q.to_json()).unwrap();
        assert_eq!(back, q);
    }

    #[test]
    fn rejects_what_cannot_be_delivered() {
        let t = serde_json::json!([{"device_id": "d1"}]);
        let cases = [
            serde_json::json!({"targets": [], "data": {"a": "b"}}),
            serde_json::json!({"targets": t, "data": {}}),
            serde_json::json!({"targets": t, "notification": {}}),
            serde_json::json!({"targets": t, "data": {"a": "b"}, "ttl": "0s"}),
            serde_json::json!({"targets": t, "data": {"a": "b"}, "ttl": "30d"}),
            serde_json::json!({"targets": t, "data": {"a": "b"}, "ttl": "soon"}),
            serde_json::json!({"targets": t, "data": {"google.x": "b"}}),
            serde_json::json!({"targets": t, "data": {"a": "b"}, "collapse_key": "x".repeat(65)}),
            serde_json::json!({"targets": [{"device_id": "d"}, {"device_id": "d"}], "data": {"a": "b"}}),
            serde_json::json!({"targets": [{"device_id": "a"}, {"device_id": "b"}, {"device_id": "c"}, {"device_id": "e"}], "data": {"a": "b"}}),
            serde_json::json!({"targets": t, "notification": {"title": "x"}, "apns": {"push_type": "background"}}),
            serde_json::json!({"targets": t, "data": {"a": "b"}, "ttl": null}),
            serde_json::json!({"targets": t, "data": {"a": "b"}, "android": {"channel_id": null}}),
            serde_json::json!({"targets": [{"device_id": "d", "fcm": null}], "data": {"a": "b"}}),
        ];
        for case in cases {
            assert!(request(case.clone()).is_err(), "accepted {case}");
        }
    }

    #[test]
    fn expiry() {
        let now = SystemTime::now();
        let q = request(
            serde_json::json!({"targets": [{"device_id": "d"}], "data": {"k": "v"}, "ttl": "10s"}),
        )
        .unwrap();
        assert!(!q.is_expired(now));
        assert!(q.is_expired(now + Duration::from_secs(11)));
    }

    #[test]
    fn qos_defaults_to_at_least_once_and_round_trips() {
        let t = serde_json::json!([{"device_id": "d"}]);
        let q = request(serde_json::json!({"targets": t, "data": {"k": "v"}})).unwrap();
        assert_eq!(q.qos, Qos::AtLeastOnce);
        assert!(!String::from_utf8(q.to_json()).unwrap().contains("qos"));
        let q =
            request(serde_json::json!({"targets": t, "data": {"k": "v"}, "qos": "at_most_once"}))
                .unwrap();
        assert_eq!(q.qos, Qos::AtMostOnce);
        assert_eq!(
            QueuedNotification::from_json(&q.to_json()).unwrap().qos,
            Qos::AtMostOnce
        );
        assert!(
            request(serde_json::json!({"targets": t, "data": {"k": "v"}, "qos": "exactly_once"}))
                .is_err()
        );
    }
}
