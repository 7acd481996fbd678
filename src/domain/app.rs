//! Apps: the tenant every notification, device, session, key, metric and event belongs to.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::DeviceId;

/// The name of a configured app: 1-32 characters of `[a-z0-9-]`.
///
/// Short and plain on purpose: it is a metric label value, part of an AMQP routing key
/// (`herald.events`, the cluster directory), a JWT claim and a config section name
/// (`[apps.<name>]`, `HERALD__APPS__<NAME>__...`), with no escaping anywhere. Lower case only
/// because environment variable names are upper-cased and the config loader folds them
/// back: `SHOP` and `shop` must be the same app.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AppId(Arc<str>);

impl AppId {
    pub const MAX_LEN: usize = 32;
    /// The app the top-level `auth.api_keys*`, `apns.*`, `fcm.*`, `events.webhook_url`
    /// define, and the app of a device token or queued message that names none (minted or
    /// queued before apps existed).
    pub const DEFAULT: &'static str = "default";

    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(format!(
                "app name must be 1-{} characters, got {}",
                Self::MAX_LEN,
                s.len()
            ));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(format!(
                "app name {s:?} may only contain a-z 0-9 -, found {c:?}"
            ));
        }
        Ok(AppId(s.into()))
    }

    /// The app named [`AppId::DEFAULT`].
    pub fn default_app() -> Self {
        AppId(Self::DEFAULT.into())
    }

    pub fn is_default(&self) -> bool {
        &*self.0 == Self::DEFAULT
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for AppId {
    fn default() -> Self {
        AppId::default_app()
    }
}

impl TryFrom<String> for AppId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        AppId::parse(&s)
    }
}

impl From<AppId> for String {
    fn from(a: AppId) -> String {
        a.0.to_string()
    }
}

impl fmt::Display for AppId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AppId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AppId({})", self.0)
    }
}

/// A device as herald addresses it: device ids are unique within an app, not across apps,
/// so the session table, the cluster directory and every live delivery key on both.
/// `phone-42` of `shop` and `phone-42` of `pay` are two devices. On a wire (JSON, AMQP
/// routing keys) it is the one string `app/device` ([`DeviceKey::routing_key`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceKey {
    pub app: AppId,
    pub device: DeviceId,
}

impl DeviceKey {
    pub fn new(app: AppId, device: DeviceId) -> Self {
        DeviceKey { app, device }
    }

    /// `app/device`: one string for AMQP routing keys and logs. `/` is in neither alphabet,
    /// so it cannot be ambiguous; at most 32 + 1 + 128 bytes, inside AMQP's 255.
    pub fn routing_key(&self) -> String {
        format!("{}/{}", self.app, self.device)
    }

    /// The inverse of [`DeviceKey::routing_key`].
    pub fn parse_routing_key(s: &str) -> Option<Self> {
        let (app, device) = s.split_once('/')?;
        Some(DeviceKey {
            app: AppId::parse(app).ok()?,
            device: DeviceId::parse(device).ok()?,
        })
    }
}

impl TryFrom<String> for DeviceKey {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        DeviceKey::parse_routing_key(&s).ok_or_else(|| format!("{s:?} is not app/device"))
    }
}

impl From<DeviceKey> for String {
    fn from(k: DeviceKey) -> String {
        k.routing_key()
    }
}

impl fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.app, self.device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names() {
        for ok in ["default", "shop", "pay-2", "a", &"x".repeat(32)] {
            assert!(AppId::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Shop", "shop_1", "shop.eu", "a b", &"x".repeat(33)] {
            assert!(AppId::parse(bad).is_err(), "{bad}");
        }
        assert!(AppId::default().is_default());
    }

    #[test]
    fn device_keys_round_trip_as_routing_keys() {
        let key = DeviceKey::new(
            AppId::parse("shop").unwrap(),
            DeviceId::parse("user@example.com:ipad_1").unwrap(),
        );
        assert_eq!(key.routing_key(), "shop/user@example.com:ipad_1");
        assert_eq!(
            DeviceKey::parse_routing_key(&key.routing_key()),
            Some(key.clone())
        );
        assert_eq!(DeviceKey::parse_routing_key("Shop/phone"), None);
        assert_eq!(DeviceKey::parse_routing_key("phone"), None);
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(json, "\"shop/user@example.com:ipad_1\"");
        assert_eq!(serde_json::from_str::<DeviceKey>(&json).unwrap(), key);
        assert!(serde_json::from_str::<DeviceKey>("\"phone-42\"").is_err());
    }
}
