//! The APNs provider authentication token: an ES256 JWT (header `kid` = key id, claims
//! `iss` = team id, `iat`) signed with the .p8 key, reused across requests.
//!
//! Apple rejects a token older than an hour (403 ExpiredProviderToken) and throttles one
//! refreshed more often than every 20 minutes (429 TooManyProviderTokenUpdates), so a token
//! is re-minted once it is [`REFRESH_AFTER`] old, and at once when Apple calls it expired.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::header::HeaderValue;
use serde::Serialize;
use tokio::time::Instant;

/// Inside Apple's window: older than 20 minutes (no throttling), younger than 60 (not
/// expired), with ten minutes of margin for clock skew and a slow request.
pub const REFRESH_AFTER: Duration = Duration::from_secs(50 * 60);

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: u64,
}

#[derive(Clone)]
struct Minted {
    token: Bearer,
    at: Instant,
}

/// A minted provider token as it is sent: the `authorization` header value, built once per
/// token rather than once per request. Clones are cheap (the value is shared bytes).
#[derive(Clone)]
pub(crate) struct Bearer {
    /// Identity of this mint, for [`ProviderToken::invalidate`].
    token: Arc<str>,
    pub(crate) header: HeaderValue,
}

impl Bearer {
    /// The JWT itself.
    #[cfg(test)]
    fn token(&self) -> &str {
        &self.token
    }

    /// The same mint (not merely equal text).
    #[cfg(test)]
    fn same(&self, other: &Bearer) -> bool {
        Arc::ptr_eq(&self.token, &other.token)
    }
}

pub(crate) struct ProviderToken {
    key: EncodingKey,
    key_id: String,
    team_id: String,
    refresh_after: Duration,
    current: RwLock<Option<Minted>>,
}

impl ProviderToken {
    /// `pem` is the .p8 file: a PKCS#8 P-256 private key.
    pub(crate) fn new(pem: &[u8], key_id: &str, team_id: &str) -> anyhow::Result<Self> {
        let key = EncodingKey::from_ec_pem(pem)
            .map_err(|e| anyhow::anyhow!("not a PKCS#8 EC (P-256) private key: {e}"))?;
        let t = ProviderToken {
            key,
            key_id: key_id.to_owned(),
            team_id: team_id.to_owned(),
            refresh_after: REFRESH_AFTER,
            current: RwLock::new(None),
        };
        // Sign once now, so a key of the wrong curve fails at start-up, not per request.
        t.mint()?;
        Ok(t)
    }

    pub(crate) fn with_refresh_after(mut self, d: Duration) -> Self {
        self.refresh_after = d;
        self
    }

    fn mint(&self) -> anyhow::Result<Bearer> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = Claims {
            iss: &self.team_id,
            iat,
        };
        let token = jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| anyhow::anyhow!("signing the APNs provider token: {e}"))?;
        // A JWT is base64url and dots: always a valid header value.
        let header = HeaderValue::try_from(format!("bearer {token}"))
            .map_err(|e| anyhow::anyhow!("the APNs provider token is not a header value: {e}"))?;
        Ok(Bearer {
            token: token.into(),
            header,
        })
    }

    /// The token to send now: the cached one while it is young enough, else a fresh one.
    pub(crate) fn get(&self) -> anyhow::Result<Bearer> {
        let now = Instant::now();
        if let Some(m) = self.read().as_ref()
            && now.duration_since(m.at) < self.refresh_after
        {
            return Ok(m.token.clone());
        }
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        // Another caller may have refreshed while this one waited for the lock.
        if let Some(m) = current.as_ref()
            && now.duration_since(m.at) < self.refresh_after
        {
            return Ok(m.token.clone());
        }
        let token = self.mint()?;
        *current = Some(Minted {
            token: token.clone(),
            at: Instant::now(),
        });
        Ok(token)
    }

    /// Apple called `stale` expired: drop it, unless a concurrent caller already replaced it
    /// (a burst of 403s for one token must cause one refresh, or Apple throttles us).
    pub(crate) fn invalidate(&self, stale: &Bearer) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current
            .as_ref()
            .is_some_and(|m| Arc::ptr_eq(&m.token.token, &stale.token))
        {
            *current = None;
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Option<Minted>> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A throwaway P-256 key (PKCS#8), generated for these tests only.
    const TEST_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgqc6tlTl2RbbgJiNs
xcLryk1C9SioqEvwoHPabry9XFehRANCAARpMLjnHEVoulglOOOL/Ke8I/dec7dz
iolvDX43KipRif2Doa4E7LX9su2qDZNyuLE3UG2lPvd2gUW6b9NJzaeF
-----END PRIVATE KEY-----
";

    fn claims(token: &str) -> serde_json::Value {
        let mut v =
            jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(token).expect("decodes");
        let header = serde_json::to_value(&v.header).unwrap();
        v.claims["kid"] = header["kid"].clone();
        v.claims["alg"] = header["alg"].clone();
        v.claims
    }

    #[tokio::test(start_paused = true)]
    async fn reused_until_fifty_minutes_then_refreshed() {
        let t = ProviderToken::new(TEST_KEY.as_bytes(), "KEY123", "TEAM456").unwrap();
        let first = t.get().unwrap();
        assert_eq!(
            first.header.to_str().unwrap(),
            format!("bearer {}", first.token())
        );
        let c = claims(first.token());
        assert_eq!(c["kid"], "KEY123");
        assert_eq!(c["iss"], "TEAM456");
        assert_eq!(c["alg"], "ES256");
        tokio::time::advance(Duration::from_secs(49 * 60)).await;
        assert!(first.same(&t.get().unwrap()), "reused at 49 min");
        tokio::time::advance(Duration::from_secs(60)).await;
        let second = t.get().unwrap();
        assert_ne!(first.token(), second.token(), "refreshed at 50 min");
        assert!(second.same(&t.get().unwrap()));
    }

    #[tokio::test(start_paused = true)]
    async fn invalidate_refreshes_once_per_stale_token() {
        let t = ProviderToken::new(TEST_KEY.as_bytes(), "K", "T").unwrap();
        let stale = t.get().unwrap();
        t.invalidate(&stale);
        let fresh = t.get().unwrap();
        assert!(!stale.same(&fresh));
        // A second 403 carrying the old token must not throw the new one away.
        t.invalidate(&stale);
        assert!(fresh.same(&t.get().unwrap()));
    }

    #[test]
    fn rejects_a_key_that_is_not_pkcs8_ec() {
        assert!(ProviderToken::new(b"not a key", "K", "T").is_err());
    }
}
