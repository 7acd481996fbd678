//! Caller authentication: `Authorization: Bearer <api key>`. A key belongs to one app; the
//! caller acts in that app and nothing in a request body can pick another.

use std::future::{Ready, ready};
use std::sync::Arc;

use actix_web::dev::Payload;
use actix_web::http::header::AUTHORIZATION;
use actix_web::{FromRequest, HttpRequest, web};
use sha2::Digest;
use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::ApiError;
use super::rate::RateLimit;
use crate::config::AppConfig;
use crate::domain::AppId;

/// The accepted API keys, held only as SHA-256 digests, each with the app it belongs to,
/// and each app's notify rate limit.
#[derive(Clone)]
pub struct ApiKeys(Arc<Keys>);

struct Keys {
    /// (digest, index into `apps`).
    digests: Vec<([u8; 32], u32)>,
    apps: Vec<CallerApp>,
}

struct CallerApp {
    id: AppId,
    limit: Option<Arc<RateLimit>>,
}

impl ApiKeys {
    /// Keys of the `default` app, with no rate limit.
    pub fn new(digests: Vec<[u8; 32]>) -> Self {
        Self::build(
            vec![CallerApp {
                id: AppId::default_app(),
                limit: None,
            }],
            digests.into_iter().map(|d| (d, 0)).collect(),
        )
    }

    /// Every app's keys and rate limit ([`crate::config::Settings::apps`], which also
    /// checked that no key belongs to two apps).
    pub fn from_apps(apps: &[AppConfig]) -> Self {
        let mut digests = Vec::new();
        let mut callers = Vec::new();
        for (i, app) in apps.iter().enumerate() {
            digests.extend(app.api_keys.iter().map(|d| (*d, i as u32)));
            callers.push(CallerApp {
                id: app.id.clone(),
                limit: app.max_notify_rate.map(|r| Arc::new(RateLimit::new(r))),
            });
        }
        Self::build(callers, digests)
    }

    fn build(apps: Vec<CallerApp>, digests: Vec<([u8; 32], u32)>) -> Self {
        ApiKeys(Arc::new(Keys { digests, apps }))
    }

    /// Whether no key is configured for any app.
    pub fn is_empty(&self) -> bool {
        self.0.digests.is_empty()
    }

    /// These keys plus `digest` for the `default` app (a key generated for this run).
    fn with_default_key(&self, digest: [u8; 32]) -> Self {
        let mut apps: Vec<CallerApp> = self
            .0
            .apps
            .iter()
            .map(|a| CallerApp {
                id: a.id.clone(),
                limit: a.limit.clone(),
            })
            .collect();
        let mut digests = self.0.digests.clone();
        let default = match apps.iter().position(|a| a.id.is_default()) {
            Some(i) => i,
            None => {
                apps.push(CallerApp {
                    id: AppId::default_app(),
                    limit: None,
                });
                apps.len() - 1
            }
        };
        digests.push((digest, default as u32));
        Self::build(apps, digests)
    }

    /// Every app's keys; with none configured for any app and `mint_if_none`, one random
    /// key minted for this run, for the app `default`, returned in the clear (once, to be
    /// printed) beside the digests. Never a silently open API.
    pub fn or_minted(apps: &[AppConfig], mint_if_none: bool) -> (Self, Option<String>) {
        let keys = ApiKeys::from_apps(apps);
        if !keys.is_empty() || !mint_if_none {
            return (keys, None);
        }
        let key = hex::encode(rand::random::<[u8; 24]>());
        let digest = sha2::Sha256::digest(key.as_bytes()).into();
        (keys.with_default_key(digest), Some(key))
    }

    /// Hashes the presented key and compares it with every accepted digest in constant
    /// time, without stopping at a match, so timing reveals neither which key matched nor
    /// how much of a guess was right. Gives the index of the key's app.
    fn find(&self, presented: &str) -> Option<usize> {
        let digest: [u8; 32] = sha2::Sha256::digest(presented.as_bytes()).into();
        let (found, app) =
            self.0
                .digests
                .iter()
                .fold((subtle::Choice::from(0), 0u32), |(found, app), (k, i)| {
                    let eq = digest_eq(k, &digest);
                    (found | eq, u32::conditional_select(&app, i, eq))
                });
        bool::from(found).then_some(app as usize)
    }

    /// The app `presented` is a key of.
    pub fn app_of(&self, presented: &str) -> Option<AppId> {
        self.find(presented).map(|i| self.0.apps[i].id.clone())
    }

    pub fn accepts(&self, presented: &str) -> bool {
        self.find(presented).is_some()
    }
}

/// Two digests compared in constant time, as four 64-bit words. `subtle`'s byte-slice
/// compare puts an optimisation barrier on each byte; with every app's keys compared on
/// every request, 20 apps (96 keys) measured 15-30% slower than 1 app with it, and within
/// noise to 6% with this (docs/benchmarks.md, "Apps: 1 app against 20").
fn digest_eq(a: &[u8; 32], b: &[u8; 32]) -> subtle::Choice {
    let word = |d: &[u8; 32], i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&d[i * 8..i * 8 + 8]);
        u64::from_ne_bytes(w)
    };
    (0..4).fold(subtle::Choice::from(1), |acc, i| {
        acc & word(a, i).ct_eq(&word(b, i))
    })
}

/// Extractor for an authenticated caller, in its key's app; handlers that take it reject
/// others with 401.
pub struct Caller {
    app: AppId,
    limit: Option<Arc<RateLimit>>,
}

impl Caller {
    /// The caller's app: the app its API key belongs to.
    pub fn app(&self) -> &AppId {
        &self.app
    }

    /// Takes one notification from the app's `max_notify_rate`, or 429 with how long to
    /// wait. Each app has its own bucket: one app at its limit leaves the others alone.
    pub fn admit_notification(&self) -> Result<(), ApiError> {
        match &self.limit {
            None => Ok(()),
            Some(limit) => limit
                .try_take()
                .map_err(|retry_after| ApiError::RateLimited {
                    app: self.app.clone(),
                    retry_after,
                }),
        }
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Caller, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let keys = req.app_data::<web::Data<ApiKeys>>();
        let presented = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        let caller = keys.zip(presented).and_then(|(keys, key)| {
            let app = &keys.0.apps[keys.find(key)?];
            Some(Caller {
                app: app.id.clone(),
                limit: app.limit.clone(),
            })
        });
        ready(caller.ok_or(ApiError::Unauthorized))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_configured_keys() {
        let keys = ApiKeys::new(vec![
            sha2::Sha256::digest(b"key-one-0123456789").into(),
            sha2::Sha256::digest(b"key-two-0123456789").into(),
        ]);
        assert!(keys.accepts("key-one-0123456789"));
        assert!(keys.accepts("key-two-0123456789"));
        assert!(!keys.accepts("key-one-012345678"));
        assert!(!keys.accepts(""));
    }

    #[test]
    fn a_key_resolves_to_its_own_app() {
        let app = |name: &str, key: &[u8]| AppConfig {
            id: AppId::parse(name).unwrap(),
            api_keys: vec![sha2::Sha256::digest(key).into()],
            ..crate::config::Settings::defaults()
                .apps()
                .unwrap()
                .remove(0)
        };
        let keys = ApiKeys::from_apps(&[
            app("default", b"default-key-0123456789"),
            app("shop", b"shop-key-0123456789"),
            app("pay", b"pay-key-0123456789"),
        ]);
        for (key, want) in [
            ("default-key-0123456789", "default"),
            ("shop-key-0123456789", "shop"),
            ("pay-key-0123456789", "pay"),
        ] {
            assert_eq!(keys.app_of(key).unwrap().as_str(), want);
        }
        assert_eq!(keys.app_of("pay-key-012345678"), None);
        let generated = keys.with_default_key(sha2::Sha256::digest(b"generated").into());
        assert_eq!(generated.app_of("generated").unwrap().as_str(), "default");
    }

    #[test]
    fn mints_a_key_only_when_none_is_configured() {
        let configured: [u8; 32] = sha2::Sha256::digest(b"key-one-0123456789").into();
        let apps = |keys: Vec<[u8; 32]>| {
            let mut apps = crate::config::Settings::defaults().apps().unwrap();
            apps[0].api_keys = keys;
            apps
        };
        let (keys, minted) = ApiKeys::or_minted(&apps(vec![configured]), true);
        assert!(minted.is_none());
        assert!(keys.accepts("key-one-0123456789"));

        let (keys, minted) = ApiKeys::or_minted(&apps(Vec::new()), true);
        let minted = minted.expect("a key is minted");
        assert!(keys.accepts(&minted));
        assert!(!keys.accepts("key-one-0123456789"));

        let (keys, minted) = ApiKeys::or_minted(&apps(Vec::new()), false);
        assert!(minted.is_none());
        assert!(!keys.accepts(""));
    }
}
