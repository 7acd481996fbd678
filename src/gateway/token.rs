//! Device tokens: short-lived JWTs whose subject is the device id and whose `app` claim is
//! the app the device belongs to (device ids are per app). A token without the claim was
//! minted before apps existed and belongs to `default`.
//!
//! HS256 only. The algorithm is pinned on both sides: a token whose header says `none`,
//! `HS512`, `RS256` or anything else is refused before its signature is looked at, which
//! closes the classic "alg confusion" holes. `aud` must be [`AUDIENCE`] so a JWT minted
//! for some other service with the same secret cannot open a session; `exp` is required.
//!
//! Minting goes through `jsonwebtoken`; checking is done here with the HMAC keyed once
//! (issue 10: `jsonwebtoken::decode` derived the HMAC key, parsed the header twice and
//! the claims twice on every connect). The checks and their order are the library's:
//! header (`alg` must be HS256), signature (constant-time compare), claims (every field
//! of [`Claims`] but `app` required), `exp` with [`LEEWAY_SECS`], `aud`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use crate::config::Secret;
use crate::domain::{AppId, DeviceId, DeviceKey};

/// The `aud` claim of every device token.
pub const AUDIENCE: &str = "herald-device";

/// Clock skew tolerated on `exp`. Small: tokens live minutes, and a node whose clock is
/// off by more than this has bigger problems.
const LEEWAY_SECS: u64 = 5;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    aud: String,
    exp: u64,
    iat: u64,
    /// The device's app. Signed with the rest: changing it breaks the signature, so a
    /// caller of one app cannot open a session in another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    app: Option<String>,
}

/// Why a presented device token was refused. Only the message is shown to the client.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "missing device token: send `Authorization: Bearer <token>` or the `herald.bearer.<token>` subprotocol"
    )]
    Missing,
    #[error("device token expired")]
    Expired,
    #[error("invalid device token")]
    Invalid,
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// The `Sec-WebSocket-Protocol` entry that carries a device token: `herald.bearer.<token>`
/// (browsers cannot set `Authorization` on a WebSocket, but can offer subprotocols; a JWT
/// is all token characters, so it goes in as is). Never echoed back.
pub const BEARER_PROTOCOL_PREFIX: &str = "herald.bearer.";
/// The subprotocol the server selects when a client offers it beside its bearer entry
/// (browsers fail a handshake that offered protocols and got none back).
pub const PROTOCOL: &str = "herald.v1";

/// The token a connect presents: `Authorization: Bearer <token>`, else the
/// `Sec-WebSocket-Protocol` bearer entry, else `?token=` (`query` is empty when
/// `gateway.allow_query_token` is off). `None` when none is there.
pub(crate) fn presented(
    headers: &actix_web::http::header::HeaderMap,
    query: &str,
) -> Option<String> {
    let protocol_token = || {
        headers
            .get_all(actix_web::http::header::SEC_WEBSOCKET_PROTOCOL)
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|p| p.trim().strip_prefix(BEARER_PROTOCOL_PREFIX))
            .map(str::to_owned)
    };
    let header_token = headers
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_owned())
        });
    header_token.or_else(protocol_token).or_else(|| {
        actix_web::web::Query::<TokenQuery>::from_query(query)
            .ok()
            .and_then(|q| q.into_inner().token)
    })
}

/// Mints and checks device tokens with one HS256 secret.
#[derive(Clone)]
pub struct DeviceTokens {
    encoding: EncodingKey,
    /// HMAC-SHA256 keyed with the secret once (the inner and outer pads absorbed): the
    /// same aws-lc HMAC `jsonwebtoken::decode` used, without deriving the key per check.
    verifier: aws_lc_rs::hmac::Key,
    ttl: Duration,
}

impl DeviceTokens {
    /// With `secret = None`, a random 32-byte secret for this process: tokens die with it,
    /// which is fine for one node and wrong for a cluster (every node must share the secret).
    pub fn new(secret: Option<&Secret>, ttl: Duration) -> Self {
        let bytes = match secret {
            Some(s) => s.expose().as_bytes().to_vec(),
            None => {
                tracing::warn!(
                    "auth.device_token_secret unset: signing device tokens with a random per-process secret (set it on every node of a cluster)"
                );
                rand::random::<[u8; 32]>().to_vec()
            }
        };
        DeviceTokens {
            encoding: EncodingKey::from_secret(&bytes),
            verifier: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &bytes),
            ttl,
        }
    }

    /// A token for `device` of the `default` app, and when it expires.
    pub fn mint(&self, device: &DeviceId) -> anyhow::Result<(String, SystemTime)> {
        self.mint_in(&AppId::default_app(), device)
    }

    /// A token for `device` of `app`, and when it expires.
    pub fn mint_in(&self, app: &AppId, device: &DeviceId) -> anyhow::Result<(String, SystemTime)> {
        let now = SystemTime::now();
        let expires = now + self.ttl;
        let claims = Claims {
            sub: device.as_str().to_owned(),
            aud: AUDIENCE.to_owned(),
            exp: secs(expires),
            iat: secs(now),
            app: Some(app.as_str().to_owned()),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?;
        // Report the second the token really expires at (exp has whole seconds).
        Ok((token, UNIX_EPOCH + Duration::from_secs(claims.exp)))
    }

    /// The device (and its app) a token was minted for, if the token is valid now.
    ///
    /// In the order `jsonwebtoken::decode` checks: three base64url parts; a header whose
    /// `alg` is HS256 (anything else, `none` included, is refused before the signature is
    /// looked at); the signature over `header.payload`, compared in constant time; claims
    /// that parse as [`Claims`] (`sub`, `aud`, `exp`, `iat` required); `exp` not past by
    /// more than [`LEEWAY_SECS`] (else [`TokenError::Expired`]); `aud` = [`AUDIENCE`].
    pub fn verify(&self, token: &str) -> Result<DeviceKey, TokenError> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let (message, signature) = token.rsplit_once('.').ok_or(TokenError::Invalid)?;
        if !message.contains('.') {
            return Err(TokenError::Invalid);
        }
        // The library's own header parser (the `alg` names it knows), splitting as decode did.
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid)?;
        if header.alg != Algorithm::HS256 {
            return Err(TokenError::Invalid);
        }
        let signature = b64.decode(signature).map_err(|_| TokenError::Invalid)?;
        // Constant-time compare of the tag.
        aws_lc_rs::hmac::verify(&self.verifier, message.as_bytes(), &signature)
            .map_err(|_| TokenError::Invalid)?;
        let (_, payload) = message.rsplit_once('.').ok_or(TokenError::Invalid)?;
        let payload = b64.decode(payload).map_err(|_| TokenError::Invalid)?;
        let claims: Claims = serde_json::from_slice(&payload).map_err(|_| TokenError::Invalid)?;
        if claims.exp < secs(SystemTime::now()).saturating_sub(LEEWAY_SECS) {
            return Err(TokenError::Expired);
        }
        if claims.aud != AUDIENCE {
            return Err(TokenError::Invalid);
        }
        let device = DeviceId::parse(claims.sub).map_err(|_| TokenError::Invalid)?;
        let app = match claims.app {
            None => AppId::default_app(),
            Some(app) => AppId::parse(&app).map_err(|_| TokenError::Invalid)?,
        };
        Ok(DeviceKey::new(app, device))
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> DeviceTokens {
        DeviceTokens::new(
            Some(&Secret::new("0123456789abcdef0123456789abcdef")),
            Duration::from_secs(60),
        )
    }

    #[test]
    fn round_trip() {
        let t = tokens();
        let d = DeviceId::parse("phone-42").unwrap();
        let (token, _) = t.mint(&d).unwrap();
        assert_eq!(
            t.verify(&token).unwrap(),
            DeviceKey::new(AppId::default(), d.clone())
        );
        let shop = AppId::parse("shop").unwrap();
        let (token, _) = t.mint_in(&shop, &d).unwrap();
        assert_eq!(t.verify(&token).unwrap(), DeviceKey::new(shop, d));
    }

    #[test]
    fn a_token_without_an_app_claim_is_the_default_apps() {
        let t = tokens();
        let claims = Claims {
            sub: "phone-42".into(),
            aud: AUDIENCE.into(),
            exp: secs(SystemTime::now()) + 60,
            iat: 0,
            app: None,
        };
        let key = EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
        let old = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        assert!(!old.is_empty());
        let got = t.verify(&old).unwrap();
        assert!(got.app.is_default());
        assert_eq!(got.device.as_str(), "phone-42");
    }

    #[test]
    fn an_app_claim_cannot_be_changed_or_malformed() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let t = tokens();
        let shop = AppId::parse("shop").unwrap();
        let (token, _) = t
            .mint_in(&shop, &DeviceId::parse("phone-42").unwrap())
            .unwrap();
        // Swap the payload for one naming another app, keeping shop's signature.
        let parts: Vec<&str> = token.split('.').collect();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
        claims["app"] = "pay".into();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64.encode(serde_json::to_vec(&claims).unwrap()),
            parts[2]
        );
        assert!(matches!(t.verify(&forged), Err(TokenError::Invalid)));
        // Correctly signed, but not an app name.
        claims["app"] = "Not An App".into();
        let key = EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
        let bad = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        assert!(matches!(t.verify(&bad), Err(TokenError::Invalid)));
    }

    #[test]
    fn refuses_other_algorithms_and_secrets() {
        let t = tokens();
        let claims = Claims {
            sub: "phone-42".into(),
            aud: AUDIENCE.into(),
            exp: secs(SystemTime::now()) + 60,
            iat: 0,
            app: None,
        };
        let key = EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
        let hs512 = jsonwebtoken::encode(&Header::new(Algorithm::HS512), &claims, &key).unwrap();
        assert!(t.verify(&hs512).is_err());
        let other = EncodingKey::from_secret(b"another-secret-another-secret-xx");
        let forged = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &other).unwrap();
        assert!(t.verify(&forged).is_err());
        // alg: none, hand-built: header.payload. with an empty signature.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(serde_json::to_vec(&claims).unwrap())
        );
        assert!(t.verify(&none).is_err());
        assert!(t.verify("garbage").is_err());
    }

    /// The checks done here agree with `jsonwebtoken::decode` (what `verify` used before
    /// issue 10) configured as it was, token by token, on valid ones and on each way a
    /// token can be wrong.
    #[test]
    fn agrees_with_jsonwebtoken_decode() {
        use base64::Engine;
        use jsonwebtoken::{DecodingKey, Validation};
        let secret = b"0123456789abcdef0123456789abcdef";
        let t = tokens();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        validation.leeway = LEEWAY_SECS;
        let reference = |token: &str| -> Result<DeviceKey, &'static str> {
            let data = jsonwebtoken::decode::<Claims>(
                token,
                &DecodingKey::from_secret(secret),
                &validation,
            )
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => "expired",
                _ => "invalid",
            })?;
            let device = DeviceId::parse(data.claims.sub).map_err(|_| "invalid")?;
            let app = match data.claims.app {
                None => AppId::default_app(),
                Some(app) => AppId::parse(&app).map_err(|_| "invalid")?,
            };
            Ok(DeviceKey::new(app, device))
        };
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let now = secs(SystemTime::now());
        let sign = |alg: Algorithm, claims: &serde_json::Value, key: &[u8]| {
            jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(key)).unwrap()
        };
        let hs = |claims: serde_json::Value| sign(Algorithm::HS256, &claims, secret);
        let base = |exp: u64| serde_json::json!({"sub": "phone-1", "aud": AUDIENCE, "exp": exp, "iat": now, "app": "shop"});
        let good = hs(base(now + 60));
        let (head, rest) = good.split_once('.').unwrap();
        let (payload, sig) = rest.split_once('.').unwrap();
        let mut cases = vec![
            good.clone(),
            hs(base(now - 1)),
            hs(base(now - LEEWAY_SECS + 1)),
            hs(base(now - LEEWAY_SECS - 2)),
            hs(base(now - 3600)),
            hs(serde_json::json!({"sub": "phone-1", "aud": AUDIENCE, "exp": now + 60, "iat": 0})),
            hs(serde_json::json!({"sub": "phone-1", "aud": AUDIENCE, "exp": now + 60})),
            hs(serde_json::json!({"sub": "phone-1", "aud": [AUDIENCE], "exp": now + 60, "iat": 0})),
            hs(serde_json::json!({"sub": "phone-1", "aud": "other", "exp": now + 60, "iat": 0})),
            hs(serde_json::json!({"sub": "phone-1", "exp": now + 60, "iat": 0})),
            hs(serde_json::json!({"aud": AUDIENCE, "exp": now + 60, "iat": 0})),
            hs(serde_json::json!({"sub": "phone-1", "aud": AUDIENCE, "iat": 0})),
            hs(serde_json::json!({"sub": "phone-1", "aud": AUDIENCE, "exp": "soon", "iat": 0})),
            hs(serde_json::json!({"sub": "phone-1", "aud": AUDIENCE, "exp": 1.5e12, "iat": 0})),
            hs(
                serde_json::json!({"sub": "phone-1", "aud": AUDIENCE, "exp": now + 60, "iat": 0, "nbf": now + 3600, "extra": [1]}),
            ),
            hs(
                serde_json::json!({"sub": "not a device id!", "aud": AUDIENCE, "exp": now + 60, "iat": 0}),
            ),
            hs(
                serde_json::json!({"sub": "phone-1", "aud": AUDIENCE, "exp": now + 60, "iat": 0, "app": "Not An App"}),
            ),
            hs(
                serde_json::json!({"sub": "phone-1", "aud": AUDIENCE, "exp": now + 60, "iat": 0, "app": null}),
            ),
            sign(Algorithm::HS384, &base(now + 60), secret),
            sign(Algorithm::HS512, &base(now + 60), secret),
            sign(
                Algorithm::HS256,
                &base(now + 60),
                b"another-secret-another-secret-xx",
            ),
            format!(
                "{}.{payload}.",
                b64.encode(br#"{"alg":"none","typ":"JWT"}"#)
            ),
            format!(
                "{}.{payload}.{sig}",
                b64.encode(br#"{"alg":"none","typ":"JWT"}"#)
            ),
            format!("{}.{payload}.{sig}", b64.encode(br#"{"alg":"HS256"}"#)),
            format!("{}.{payload}.{sig}", b64.encode(br#"{"typ":"JWT"}"#)),
            format!("{}.{payload}.{sig}", b64.encode(b"not json")),
            format!("{head}.{payload}.{sig}="),
            format!("{head}.{payload}.{sig}A"),
            format!("{head}.{payload}"),
            format!("{head}.{payload}.{sig}.{sig}"),
            format!("{head}.{head}.{payload}.{sig}"),
            format!("{head}..{sig}"),
            format!(".{payload}.{sig}"),
            format!("{head}.{payload}x.{sig}"),
            format!("{head}.{}.{sig}", b64.encode(b"{}")),
            String::new(),
            "..".into(),
            "garbage".into(),
        ];
        // Every single-character change of the valid token.
        for i in 0..good.len() {
            let mut bytes = good.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            cases.push(String::from_utf8(bytes).unwrap());
        }
        for token in &cases {
            let ours = t.verify(token).map_err(|e| match e {
                TokenError::Expired => "expired",
                _ => "invalid",
            });
            assert_eq!(ours, reference(token), "token {token}");
        }
        assert!(t.verify(&good).is_ok());
    }
}
