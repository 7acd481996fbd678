//! Admission (issue 14): what may spend a node's session limits, the per-device and
//! per-address limits, `gateway.max_sessions`, the handshake's own checks, and where a
//! device token may ride.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::*;

/// A valid handshake key (base64 of 16 bytes).
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Sends `head` (a request head without the final blank line) on a fresh connection and
/// returns the answer: up to the end of the connection (a refusal closes it) or, for a 101,
/// its head.
async fn raw(app: &GwApp, head: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    tcp.write_all(format!("{head}\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut chunk))
            .await
            .expect("the answer within the wait")
            .unwrap();
        out.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&out);
        if n == 0 || (text.starts_with("HTTP/1.1 101") && text.contains("\r\n\r\n")) {
            return text.into_owned();
        }
    }
}

fn upgrade_head(extra: &str) -> String {
    format!(
        "GET /v1/connect HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n{extra}"
    )
}

fn status(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"))
}

/// The status a real WebSocket connect for `device` gets (101 when it opened), and the
/// body's error code.
async fn connect_status(app: &GwApp, device: &str) -> (u16, String) {
    match try_connect(app, Some(&token(device))).await {
        Ok(_) => (101, String::new()),
        Err(tungstenite::Error::Http(res)) => {
            let body: serde_json::Value =
                serde_json::from_slice(res.body().as_deref().unwrap_or(b"{}")).unwrap();
            (
                res.status().as_u16(),
                body["error"]["code"].as_str().unwrap_or("").to_owned(),
            )
        }
        Err(e) => panic!("{device}: {e}"),
    }
}

#[tokio::test]
async fn plain_gets_and_bad_handshakes_spend_no_admission() {
    let mut s = settings();
    s.gateway.max_session_rate = 1;
    s.gateway.session_burst = 1;
    let app = spawn(s).await;
    let good = token("phone-1");
    let http = reqwest::Client::new();
    for _ in 0..5 {
        let res = http
            .get(format!("{}/v1/connect", app.base))
            .bearer_auth(&good)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "a plain GET is not an upgrade");
        let bad = raw(
            &app,
            &upgrade_head(&format!(
                "Authorization: Bearer {good}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n"
            )),
        )
        .await;
        assert_eq!(status(&bad), 400, "{bad}");
    }
    // The node's one token is still there for a real session.
    let _ws = connect(&app, "phone-2").await;
    assert_eq!(
        app.metric("herald_gateway_sessions_refused_total{reason=\"too_many_sessions\"}"),
        0.0
    );
    app.stop().await;
}

#[tokio::test]
async fn a_device_reconnecting_in_a_loop_spends_only_its_own_limit() {
    let mut s = settings();
    s.gateway.max_session_rate = 1;
    s.gateway.session_burst = 5;
    s.gateway.device_connects_per_minute = 1;
    s.gateway.device_connect_burst = 2;
    let app = spawn(s).await;
    let mut refused = None;
    for _ in 0..10 {
        let (status, code) = connect_status(&app, "looper").await;
        if status != 101 {
            refused = Some((status, code));
            break;
        }
    }
    assert_eq!(
        refused,
        Some((429, "too_many_connects".to_owned())),
        "the looping device is stopped by its own limit"
    );
    // Everyone else still gets in.
    let _ws = connect(&app, "bystander").await;
    app.stop().await;
}

#[tokio::test]
async fn per_address_limit_trusts_forwarded_for_only_from_configured_proxies() {
    let mut s = settings();
    s.gateway.ip_connects_per_second = 1;
    s.gateway.ip_connect_burst = 2;
    let app = spawn(s.clone()).await;
    assert_eq!(connect_status(&app, "a-1").await.0, 101);
    assert_eq!(connect_status(&app, "a-2").await.0, 101);
    assert_eq!(
        connect_status(&app, "a-3").await,
        (429, "too_many_connects".to_owned()),
        "the address spent its burst"
    );
    // X-Forwarded-For from an untrusted peer is ignored: it cannot dodge the limit.
    let forwarded = |url: String, device: &str, xff: &str| {
        let mut req = url.into_client_request().unwrap();
        let h = req.headers_mut();
        h.insert(
            "authorization",
            format!("Bearer {}", token(device)).parse().unwrap(),
        );
        h.insert("x-forwarded-for", xff.parse().unwrap());
        req
    };
    assert!(
        tokio_tungstenite::connect_async(forwarded(app.ws_url(), "a-4", "203.0.113.7"))
            .await
            .is_err()
    );
    app.stop().await;

    // Behind a trusted proxy (here: loopback), each forwarded client has its own bucket.
    s.gateway.trusted_proxies = vec!["127.0.0.0/8".into()];
    let app = spawn(s).await;
    for (i, client) in ["203.0.113.1", "203.0.113.2", "203.0.113.3"]
        .iter()
        .enumerate()
    {
        for j in 0..2 {
            let req = forwarded(
                app.ws_url(),
                &format!("b-{i}-{j}"),
                &format!("198.51.100.9, {client}"),
            );
            tokio_tungstenite::connect_async(req)
                .await
                .unwrap_or_else(|e| panic!("{client} #{j}: {e}"));
        }
    }
    let req = forwarded(app.ws_url(), "b-x", "203.0.113.1");
    assert!(
        tokio_tungstenite::connect_async(req).await.is_err(),
        "the third connect of one forwarded client is over its burst"
    );
    app.stop().await;
}

#[tokio::test]
async fn past_max_sessions_new_devices_get_503_node_full() {
    let mut s = settings();
    s.gateway.max_sessions = 2;
    let app = spawn(s).await;
    let _a = connect(&app, "full-1").await;
    let _b = connect(&app, "full-2").await;
    support_wait(&app, 2).await;
    assert_eq!(
        connect_status(&app, "full-3").await,
        (503, "node_full".to_owned())
    );
    assert_eq!(
        app.metric("herald_gateway_sessions_refused_total{reason=\"node_full\"}"),
        1.0
    );
    // A device already here may replace its own session: it adds none.
    let (_a2, _) = connect(&app, "full-1").await;
    app.stop().await;
}

async fn support_wait(app: &GwApp, n: usize) {
    crate::support::wait_for(WAIT, "sessions registered", || async {
        (app.metric("herald_gateway_sessions_active") as usize == n).then_some(())
    })
    .await;
}

#[tokio::test]
async fn handshake_headers_are_checked_per_rfc_6455() {
    let app = spawn(settings()).await;
    let auth = format!("Authorization: Bearer {}\r\n", token("phone-h"));
    let wrong_version = raw(
        &app,
        &upgrade_head(&format!(
            "{auth}Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: {KEY}\r\n"
        )),
    )
    .await;
    assert_eq!(status(&wrong_version), 426, "{wrong_version}");
    assert!(
        wrong_version
            .to_ascii_lowercase()
            .contains("\r\nsec-websocket-version: 13\r\n"),
        "{wrong_version}"
    );
    for key in [
        "",
        "not base64!",
        "AAAAAAAAAAAAAAAAAAAA",
        "dGhlIHNhbXBsZSBub25j",
    ] {
        let answer = raw(
            &app,
            &upgrade_head(&format!(
                "{auth}Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
            )),
        )
        .await;
        assert_eq!(status(&answer), 400, "key {key:?}: {answer}");
        assert!(answer.contains("invalid_request"), "{answer}");
    }
    let ok = raw(
        &app,
        &upgrade_head(&format!(
            "{auth}Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n"
        )),
    )
    .await;
    assert_eq!(status(&ok), 101, "{ok}");
    // RFC 6455's own example: this key's accept value.
    assert!(ok.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{ok}");
    app.stop().await;
}

#[tokio::test]
async fn the_plain_refusal_is_readable_cross_origin() {
    let app = spawn(settings()).await;
    let http = reqwest::Client::new();
    let res = http
        .get(format!("{}/v1/connect", app.base))
        .header("origin", "https://app.example")
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        res.headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap()),
        Some("*")
    );
    // The preflight for the probe's Authorization header.
    let res = http
        .request(reqwest::Method::OPTIONS, format!("{}/v1/connect", app.base))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], "*");
    assert!(
        h["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("authorization")
    );
    app.stop().await;
}

#[tokio::test]
async fn query_tokens_are_off_by_default_and_browsers_use_the_subprotocol() {
    let app = spawn(settings()).await;
    let url = format!("{}?token={}", app.ws_url(), token("phone-q"));
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tungstenite::Error::Http(res)) => assert_eq!(res.status(), 401),
        other => panic!("the query token was accepted: {:?}", other.map(|_| ())),
    }
    let mut req = app.ws_url().into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("herald.v1, herald.bearer.{}", token("phone-p"))
            .parse()
            .unwrap(),
    );
    let (mut ws, res) = tokio_tungstenite::connect_async(req)
        .await
        .expect("the subprotocol token connects");
    assert_eq!(
        res.headers()["sec-websocket-protocol"],
        "herald.v1",
        "the server selects herald.v1, never echoes the token"
    );
    assert_eq!(next_json(&mut ws).await["device_id"], "phone-p");
    app.stop().await;

    let mut s = settings();
    s.gateway.allow_query_token = true;
    let app = spawn(s).await;
    let url = format!("{}?token={}", app.ws_url(), token("phone-q"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("allowed by gateway.allow_query_token");
    assert_eq!(next_json(&mut ws).await["device_id"], "phone-q");
    app.stop().await;
}
