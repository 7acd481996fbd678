//! Device tokens: minting over HTTP, and every way a bad token is refused before the upgrade.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use tokio_tungstenite::tungstenite;

use crate::helpers::*;
use crate::support::fixtures::notification_with_data;
use crate::support::{self, wait_for};

fn claims(sub: &str, exp_offset: i64) -> serde_json::Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    serde_json::json!({"sub": sub, "aud": "herald-device", "exp": now + exp_offset, "iat": now})
}

fn sign(alg: &str, claims: &serde_json::Value, secret: &[u8]) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let key = EncodingKey::from_secret(secret);
    match alg {
        // No library signs `none`: build header.payload. with an empty signature by hand.
        "none" => {
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            format!(
                "{}.{}.",
                b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
                b64.encode(claims.to_string())
            )
        }
        "HS256" => jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key).unwrap(),
        "HS512" => jsonwebtoken::encode(&Header::new(Algorithm::HS512), claims, &key).unwrap(),
        other => panic!("no signer for {other}"),
    }
}

async fn refused(app: &GwApp, token: Option<&str>) -> serde_json::Value {
    match try_connect(app, token).await {
        Err(tungstenite::Error::Http(res)) => {
            assert_eq!(res.status().as_u16(), 401, "token {token:?}");
            let body = res.body().clone().expect("a JSON body");
            serde_json::from_slice(&body).expect("JSON error body")
        }
        Ok(_) => panic!("token {token:?} opened a session"),
        Err(e) => panic!("token {token:?}: unexpected error {e}"),
    }
}

#[tokio::test]
async fn bad_tokens_get_401_and_no_session() {
    let app = spawn(settings()).await;
    let secret = SECRET.as_bytes();
    let cases = [
        ("missing", None),
        ("garbage", Some("not-a-jwt".to_owned())),
        (
            "bad signature",
            Some(sign(
                "HS256",
                &claims("phone-1", 60),
                b"another-secret-another-secret-xx",
            )),
        ),
        (
            "expired",
            Some(sign("HS256", &claims("phone-1", -3600), secret)),
        ),
        (
            "alg none",
            Some(sign("none", &claims("phone-1", 60), secret)),
        ),
        (
            "alg HS512",
            Some(sign("HS512", &claims("phone-1", 60), secret)),
        ),
        (
            "wrong audience",
            Some(sign(
                "HS256",
                &serde_json::json!({"sub": "phone-1", "aud": "other", "exp": u32::MAX}),
                secret,
            )),
        ),
        (
            "no exp",
            Some(sign(
                "HS256",
                &serde_json::json!({"sub": "phone-1", "aud": "herald-device"}),
                secret,
            )),
        ),
    ];
    for (what, token) in cases {
        let body = refused(&app, token.as_deref()).await;
        assert_eq!(body["error"]["code"], "unauthorized", "{what}: {body}");
    }
    // The same forger with the right secret and algorithm is accepted.
    let good = sign("HS256", &claims("phone-1", 60), secret);
    let (_ws, hello) = {
        let mut ws = try_connect(&app, Some(&good))
            .await
            .expect("a good token connects");
        let hello = next_json(&mut ws).await;
        (ws, hello)
    };
    assert_eq!(hello["device_id"], "phone-1");
    assert_eq!(app.metric("herald_gateway_sessions_opened_total"), 1.0);
    assert_eq!(
        app.metric("herald_gateway_sessions_refused_total{reason=\"unauthorized\"}"),
        8.0,
        "every refused token counted"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_token_only_reaches_its_own_device() {
    let app = spawn(settings()).await;
    let (ws, hello) = connect(&app, "phone-a").await;
    assert_eq!(hello["device_id"], "phone-a");
    let mut rx = spawn_acker(ws);
    let other = notification_with_data(10);
    assert_eq!(
        app.directory.deliver(&device("phone-b"), &other).await,
        herald::directory::LiveOutcome::Offline
    );
    let mine = notification_with_data(10);
    assert_eq!(
        app.directory.deliver(&device("phone-a"), &mine).await,
        herald::directory::LiveOutcome::Acked
    );
    let got = rx.recv().await.expect("a frame");
    assert_eq!(
        got["id"],
        mine.id.to_string(),
        "phone-a got only its own notification"
    );
    app.stop().await;
}

#[tokio::test]
async fn minted_tokens_open_sessions() {
    let mut s = settings();
    s.auth.device_token_secret = herald::config::Secret::default(); // a per-process secret
    let app = spawn(s).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/devices/phone-42/token", app.base);
    let res = http.post(&url).send().await.unwrap();
    assert_eq!(res.status(), 401, "caller auth is required");
    let res = http
        .post(format!("{}/v1/devices/bad%20id/token", app.base))
        .bearer_auth(support::API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_request");
    let res = http
        .post(&url)
        .bearer_auth(support::API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    let expires = time::OffsetDateTime::parse(
        body["expires_at"].as_str().expect("expires_at"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("RFC 3339");
    let ttl = expires - time::OffsetDateTime::now_utc();
    assert!(
        ttl > time::Duration::minutes(14) && ttl <= time::Duration::minutes(15),
        "{ttl}"
    );
    let token = body["token"].as_str().expect("token");
    let mut ws = try_connect(&app, Some(token))
        .await
        .expect("the minted token connects");
    assert_eq!(next_json(&mut ws).await["device_id"], "phone-42");
    wait_for(WAIT, "the session registered", || async {
        app.directory
            .is_connected(&device("phone-42"))
            .then_some(())
    })
    .await;
    app.stop().await;
}
