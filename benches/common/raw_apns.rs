//! The raw HTTP/2 APNs client the benchmarks measure herald against: the same path, headers
//! and pre-serialized body herald sends, a JWT signed once, nothing else.
#![allow(dead_code)]

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use herald::domain::QueuedNotification;

use super::apns_double::ApnsDouble;

/// An ES256 provider JWT for the double's key, signed once.
pub fn sign_jwt(double: &ApnsDouble) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(double.key_id.clone());
    let iat = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    jsonwebtoken::encode(
        &header,
        &serde_json::json!({"iss": double.team_id, "iat": iat}),
        &jsonwebtoken::EncodingKey::from_ec_pem(double.key_pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// `sends` requests at concurrency `c`; returns requests per second (all must be 200).
pub async fn raw(
    client: &reqwest::Client,
    url: &str,
    jwt: &str,
    body: &[u8],
    n: &QueuedNotification,
    sends: usize,
    c: usize,
) -> f64 {
    let expiration = (SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600)
        .to_string();
    let auth = format!("bearer {jwt}");
    let id = n.id.to_string();
    let started = Instant::now();
    let ok = futures::stream::iter(0..sends)
        .map(|_| async {
            let resp = client
                .post(url)
                .header("authorization", &auth)
                .header("apns-topic", "com.example.herald")
                .header("apns-push-type", "alert")
                .header("apns-priority", "10")
                .header("apns-expiration", &expiration)
                .header("apns-id", &id)
                .header("content-type", "application/json")
                .body(body.to_vec())
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let _ = resp.bytes().await;
            status == 200
        })
        .buffer_unordered(c)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await;
    assert_eq!(ok, sends, "every raw request answered 200");
    sends as f64 / started.elapsed().as_secs_f64()
}
