//! Apps at the API edge: a key acts in its own app, per-app rate limits, the device
//! token's `app` claim, and `check-config` listing every app.

use herald::config::Secret;
use serde_json::{Value, json};

use crate::support::{API_KEY, api_only, notify_body, spawn_app, test_settings};

const SHOP_KEY: &str = "shop-api-key-0123456789";
const PAY_KEY: &str = "pay-api-key-0123456789";

async fn post(app: &crate::support::TestApp, key: &str, body: &Value) -> reqwest::Response {
    app.http
        .post(format!("{}/v1/notify", app.base))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn past_its_rate_an_app_gets_429_with_retry_after_and_other_apps_are_unaffected() {
    let mut s = api_only(test_settings());
    // Far below one a second: the bucket holds one token and refills in ~1000 s, so the
    // second request is over the rate however slow this machine is.
    for (name, key) in [("shop", SHOP_KEY), ("pay", PAY_KEY)] {
        let app = s.apps.entry(name.into()).or_default();
        app.api_keys = vec![Secret::new(key)];
        app.max_notify_rate = Some(0.001);
    }
    let app = spawn_app(s).await;
    let body = notify_body(&["phone-1"]);

    assert_eq!(post(&app, SHOP_KEY, &body).await.status(), 202);
    let limited = post(&app, SHOP_KEY, &body).await;
    assert_eq!(limited.status(), 429);
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (900..=1000).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    let err: Value = limited.json().await.unwrap();
    assert_eq!(err["error"]["code"], "rate_limited");
    assert!(err["error"]["message"].as_str().unwrap().contains("shop"));

    // pay has its own bucket, default has none: both still accepted while shop is limited.
    assert_eq!(post(&app, PAY_KEY, &body).await.status(), 202);
    for _ in 0..5 {
        assert_eq!(post(&app, API_KEY, &body).await.status(), 202);
    }
    assert_eq!(post(&app, SHOP_KEY, &body).await.status(), 429);
    assert_eq!(post(&app, PAY_KEY, &body).await.status(), 429);
    app.stop().await;
}

/// The claims of a JWT, unverified (the test only reads what herald put there).
fn claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn a_minted_device_token_names_the_callers_app() {
    let mut s = api_only(test_settings());
    s.apps.entry("shop".into()).or_default().api_keys = vec![Secret::new(SHOP_KEY)];
    let app = spawn_app(s).await;
    for (key, want) in [(SHOP_KEY, "shop"), (API_KEY, "default")] {
        let res = app
            .http
            .post(format!("{}/v1/devices/phone-42/token", app.base))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.unwrap();
        let c = claims(body["token"].as_str().unwrap());
        assert_eq!(c["app"], want);
        assert_eq!(c["sub"], "phone-42");
    }
    // Nothing in the request picks the app: an `app` in the body is refused, not obeyed.
    let res = post(
        &app,
        SHOP_KEY,
        &json!({"app": "default", "targets": [{"device_id": "d"}], "data": {"k": "v"}}),
    )
    .await;
    assert_eq!(res.status(), 400);
    app.stop().await;
}

#[test]
fn check_config_lists_every_app_and_refuses_a_key_shared_by_two() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("herald.toml");
    std::fs::write(
        &file,
        format!(
            "[apps.shop]\napi_keys = [\"{SHOP_KEY}\"]\nmax_notify_rate = 20\n\
             [apps.shop.apns]\ntopic = \"com.example.shop\"\n\
             [apps.pay]\napi_keys_file = \"\"\n"
        ),
    )
    .unwrap();
    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.args(["check-config", "--config", file.to_str().unwrap()]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let out = run(&[(
        "HERALD__APPS__PAY__API_KEYS",
        &format!("{PAY_KEY},another-pay-key-0123"),
    )]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "app default:",
        "app pay:",
        "app shop:",
        "api keys: 2 (redacted)",
        "max_notify_rate: 20/s",
    ] {
        assert!(stdout.contains(line), "no {line:?} in {stdout}");
    }
    for secret in [SHOP_KEY, PAY_KEY] {
        assert!(!stdout.contains(secret), "{secret} printed");
    }
    let out = run(&[("HERALD__APPS__PAY__API_KEYS", SHOP_KEY)]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("apps.shop.api_keys"), "{stderr}");
    assert!(stderr.contains("exactly one app"), "{stderr}");
}
