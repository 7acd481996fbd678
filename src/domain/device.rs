//! Device identity and provider tokens.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A device id chosen by the caller: 1-128 characters of `[A-Za-z0-9._:@-]`.
///
/// The restricted alphabet keeps ids safe as AMQP routing keys (at most 255 bytes), JWT
/// subjects, URL path segments and log fields, with no escaping anywhere.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

impl DeviceId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(s: impl Into<String>) -> Result<Self, String> {
        let s = s.into();
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(format!(
                "device_id must be 1-{} characters, got {}",
                Self::MAX_LEN,
                s.len()
            ));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "._:@-".contains(*c)))
        {
            return Err(format!(
                "device_id may only contain A-Z a-z 0-9 . _ : @ -, found {c:?}"
            ));
        }
        Ok(DeviceId(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DeviceId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        DeviceId::parse(s)
    }
}

impl From<DeviceId> for String {
    fn from(d: DeviceId) -> String {
        d.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Shows the first 8 characters of a token and its length: enough to correlate in logs,
/// never the whole credential.
fn redact(token: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let head: String = token.chars().take(8).collect();
    write!(f, "{head}…({} chars)", token.len())
}

/// An APNs device token: hex, 64 characters today; Apple says tokens may grow, so up to 200.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ApnsToken(String);

impl ApnsToken {
    pub fn parse(s: impl Into<String>) -> Result<Self, String> {
        let s = s.into();
        if s.len() < 64 || s.len() > 200 || !s.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err("apns.token must be 64-200 hex digits".into());
        }
        Ok(ApnsToken(s.to_ascii_lowercase()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ApnsToken {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        ApnsToken::parse(s)
    }
}
impl From<ApnsToken> for String {
    fn from(t: ApnsToken) -> String {
        t.0
    }
}
impl fmt::Debug for ApnsToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        redact(&self.0, f)
    }
}

/// An FCM registration token: opaque, printable ASCII, 1-4096 characters.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FcmToken(String);

impl FcmToken {
    pub fn parse(s: impl Into<String>) -> Result<Self, String> {
        let s = s.into();
        if s.is_empty() || s.len() > 4096 || !s.chars().all(|c| c.is_ascii_graphic()) {
            return Err("fcm.token must be 1-4096 printable ASCII characters".into());
        }
        Ok(FcmToken(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for FcmToken {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        FcmToken::parse(s)
    }
}
impl From<FcmToken> for String {
    fn from(t: FcmToken) -> String {
        t.0
    }
}
impl fmt::Debug for FcmToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        redact(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids() {
        assert!(DeviceId::parse("phone-42").is_ok());
        assert!(DeviceId::parse("user@example.com:ipad_1").is_ok());
        assert!(DeviceId::parse("").is_err());
        assert!(DeviceId::parse("a b").is_err());
        assert!(DeviceId::parse("x".repeat(129)).is_err());
        assert!(DeviceId::parse("#").is_err());
    }

    #[test]
    fn tokens_are_checked_and_redacted() {
        let t = ApnsToken::parse("AB".repeat(32)).unwrap();
        assert_eq!(t.as_str(), "ab".repeat(32));
        assert!(!format!("{t:?}").contains(&"ab".repeat(32)));
        assert!(ApnsToken::parse("zz".repeat(32)).is_err());
        assert!(FcmToken::parse("tok en").is_err());
        assert!(FcmToken::parse("fcm:token_1").is_ok());
    }
}
