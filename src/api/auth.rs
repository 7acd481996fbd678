//! Caller authentication: `Authorization: Bearer <api key>`.

use std::future::{Ready, ready};
use std::sync::Arc;

use actix_web::dev::Payload;
use actix_web::http::header::AUTHORIZATION;
use actix_web::{FromRequest, HttpRequest, web};
use sha2::Digest;
use subtle::ConstantTimeEq;

use super::ApiError;

/// The accepted API keys, held only as SHA-256 digests.
#[derive(Clone)]
pub struct ApiKeys(Arc<Vec<[u8; 32]>>);

impl ApiKeys {
    pub fn new(digests: Vec<[u8; 32]>) -> Self {
        ApiKeys(Arc::new(digests))
    }

    /// The configured keys; with none configured and `mint_if_none`, one random key minted
    /// for this run, returned in the clear (once, to be printed) beside the digests. Never
    /// a silently open API.
    pub fn or_minted(digests: Vec<[u8; 32]>, mint_if_none: bool) -> (Self, Option<String>) {
        if !digests.is_empty() || !mint_if_none {
            return (ApiKeys::new(digests), None);
        }
        let key = hex::encode(rand::random::<[u8; 24]>());
        let digest = sha2::Sha256::digest(key.as_bytes()).into();
        (ApiKeys::new(vec![digest]), Some(key))
    }

    /// Hashes the presented key and compares it with every accepted digest in constant
    /// time, without stopping at a match, so timing reveals neither which key matched nor
    /// how much of a guess was right.
    pub fn accepts(&self, presented: &str) -> bool {
        let digest: [u8; 32] = sha2::Sha256::digest(presented.as_bytes()).into();
        self.0
            .iter()
            .fold(subtle::Choice::from(0), |acc, k| acc | k.ct_eq(&digest))
            .into()
    }
}

/// Extractor for an authenticated caller; handlers that take it reject others with 401.
pub struct Caller;

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
        ready(match (keys, presented) {
            (Some(keys), Some(key)) if keys.accepts(key) => Ok(Caller),
            _ => Err(ApiError::Unauthorized),
        })
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
    fn mints_a_key_only_when_none_is_configured() {
        let configured: [u8; 32] = sha2::Sha256::digest(b"key-one-0123456789").into();
        let (keys, minted) = ApiKeys::or_minted(vec![configured], true);
        assert!(minted.is_none());
        assert!(keys.accepts("key-one-0123456789"));

        let (keys, minted) = ApiKeys::or_minted(Vec::new(), true);
        let minted = minted.expect("a key is minted");
        assert!(keys.accepts(&minted));
        assert!(!keys.accepts("key-one-0123456789"));

        let (keys, minted) = ApiKeys::or_minted(Vec::new(), false);
        assert!(minted.is_none());
        assert!(!keys.accepts(""));
    }
}
