use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald::domain::TargetRoute;
use herald::providers::ProviderOutcome;
use serde_json::json;

use crate::support::apns_double::{ApnsDouble, Reply};
use crate::{alert, apns_token, metric, notification, providers, route, settings, with_apns};

#[tokio::test]
async fn delivered_with_the_headers_jwt_and_body_apple_expects() {
    let double = ApnsDouble::start().await;
    let (p, metrics) = with_apns(&double);
    let n = notification(json!({
        "targets": [{"device_id": "phone-1"}],
        "notification": {"title": "Hi", "body": "You have a message", "badge": 3},
        "data": {"thread": "t-1"},
        "priority": "high",
        "ttl": "1h",
        "collapse_key": "inbox",
    }));
    let token = apns_token(1);
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();

    let outcome = p.send(TargetRoute::Apns(&route(&token)), &n).await;

    assert_eq!(outcome, ProviderOutcome::Delivered);
    let reqs = double.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, format!("/3/device/{}", token.as_str()));
    let h = &r.headers;
    assert_eq!(h["apns-topic"], double.topic);
    assert_eq!(h["apns-push-type"], "alert");
    assert_eq!(h["apns-priority"], "10");
    assert_eq!(h["apns-collapse-id"], "inbox");
    assert_eq!(h["apns-id"], n.id.to_string());
    assert_eq!(h["content-type"], "application/json");
    let expiration: u64 = h["apns-expiration"].parse().unwrap();
    assert!(
        (before + 3590..=before + 3601).contains(&expiration),
        "apns-expiration {expiration} is not ~1h from {before}"
    );
    let jwt = r.jwt.as_ref().expect("the double verified the JWT");
    assert_eq!(jwt.alg, "ES256");
    assert_eq!(jwt.kid, double.key_id);
    assert_eq!(jwt.iss, double.team_id);
    assert!(jwt.iat.abs_diff(before) <= 5);
    assert_eq!(
        r.body,
        json!({
            "aps": {"alert": {"title": "Hi", "body": "You have a message"}, "badge": 3},
            "herald_id": n.id.to_string(),
            "thread": "t-1",
        })
    );
    assert_eq!(
        metric(
            &metrics,
            "herald_provider_request_duration_seconds_count{provider=\"apns\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn background_pushes_go_at_priority_5_and_the_topic_can_be_overridden() {
    let double = ApnsDouble::start().await;
    let (p, _) = with_apns(&double);
    let n = notification(json!({
        "targets": [{"device_id": "phone-1"}],
        "data": {"sync": "1"},
        "priority": "high",
        "apns": {"push_type": "background", "topic": "com.example.other"},
    }));
    let outcome = p.send(TargetRoute::Apns(&route(&apns_token(2))), &n).await;
    assert_eq!(outcome, ProviderOutcome::Delivered);
    let r = &double.requests()[0];
    assert_eq!(r.headers["apns-push-type"], "background");
    assert_eq!(r.headers["apns-priority"], "5");
    assert_eq!(r.headers["apns-topic"], "com.example.other");
    assert!(!r.headers.contains_key("apns-collapse-id"));
    assert_eq!(r.body["aps"], json!({"content-available": 1}));
}

#[tokio::test]
async fn normal_priority_alerts_go_at_5() {
    let double = ApnsDouble::start().await;
    let (p, _) = with_apns(&double);
    let n = notification(json!({
        "targets": [{"device_id": "phone-1"}],
        "notification": {"body": "later"},
        "priority": "normal",
    }));
    assert_eq!(
        p.send(TargetRoute::Apns(&route(&apns_token(3))), &n).await,
        ProviderOutcome::Delivered
    );
    assert_eq!(double.requests()[0].headers["apns-priority"], "5");
}

#[tokio::test]
async fn dead_tokens_are_reported_and_counted() {
    let double = ApnsDouble::start().await;
    let (p, metrics) = with_apns(&double);
    let cases = [
        (410, "Unregistered"),
        (400, "BadDeviceToken"),
        (400, "DeviceTokenNotForTopic"),
    ];
    for (i, (status, reason)) in cases.iter().enumerate() {
        let token = apns_token(100 + i as u32);
        double.reply_for_token(token.as_str(), Reply::reason(*status, reason));
        let outcome = p.send(TargetRoute::Apns(&route(&token)), &alert()).await;
        let ProviderOutcome::TokenDead { reason: got } = outcome else {
            panic!("{status} {reason}: {outcome:?}");
        };
        // BadDeviceToken goes on to say it is probably the other environment (apps.rs).
        assert!(got.starts_with(&format!("apns {status} {reason}")), "{got}");
    }
    assert_eq!(
        metric(&metrics, "herald_tokens_dead_total{provider=\"apns\"}"),
        3.0
    );
    // Each was sent once: a dead token is never retried by the provider.
    assert_eq!(double.request_count(), 3);
}

#[tokio::test]
async fn transient_failures_keep_retry_after() {
    let double = ApnsDouble::start().await;
    let (p, _) = with_apns(&double);
    let token = apns_token(7);
    let cases = [
        (
            Reply::reason(429, "TooManyRequests").with_retry_after("17"),
            "apns 429 TooManyRequests",
            Some(Duration::from_secs(17)),
        ),
        (
            Reply::reason(500, "InternalServerError"),
            "apns 500 InternalServerError",
            None,
        ),
        (
            Reply::reason(503, "ServiceUnavailable").with_retry_after("60"),
            "apns 503 ServiceUnavailable",
            Some(Duration::from_secs(60)),
        ),
    ];
    for (reply, reason, retry_after) in cases {
        double.reply_next(1, reply);
        let outcome = p.send(TargetRoute::Apns(&route(&token)), &alert()).await;
        assert_eq!(
            outcome,
            ProviderOutcome::Transient {
                reason: reason.into(),
                retry_after
            }
        );
    }
}

#[tokio::test]
async fn a_reset_stream_and_a_timeout_are_transient() {
    let double = ApnsDouble::start().await;
    let mut s = settings();
    double.configure(&mut s);
    // Short enough to keep the test quick, long enough for a loaded CI machine's loopback.
    s.apns.timeout = Duration::from_secs(1);
    let (p, _) = providers(&s);
    let token = apns_token(8);

    double.reply_next(1, Reply::Reset);
    let outcome = p.send(TargetRoute::Apns(&route(&token)), &alert()).await;
    assert!(
        matches!(&outcome, ProviderOutcome::Transient { reason, .. } if reason.starts_with("apns transport error")),
        "{outcome:?}"
    );

    double.reply_next(1, Reply::Hang);
    let outcome = p.send(TargetRoute::Apns(&route(&token)), &alert()).await;
    assert!(
        matches!(&outcome, ProviderOutcome::Transient { reason, .. } if reason.starts_with("apns timeout")),
        "{outcome:?}"
    );
    // No error text carries the device token.
    if let ProviderOutcome::Transient { reason, .. } = outcome {
        assert!(!reason.contains(token.as_str()), "{reason}");
    }
    // The connection is still good afterwards.
    assert_eq!(
        p.send(TargetRoute::Apns(&route(&token)), &alert()).await,
        ProviderOutcome::Delivered
    );
}

#[tokio::test]
async fn configuration_errors_are_not_transient() {
    let double = ApnsDouble::start().await;
    let (p, _) = with_apns(&double);
    let token = apns_token(9);
    for (status, reason) in [
        (400, "BadTopic"),
        (400, "TopicDisallowed"),
        (403, "InvalidProviderToken"),
        (413, "PayloadTooLarge"),
    ] {
        double.reply_next(1, Reply::reason(status, reason));
        assert_eq!(
            p.send(TargetRoute::Apns(&route(&token)), &alert()).await,
            ProviderOutcome::ConfigError {
                reason: format!("apns {status} {reason}")
            }
        );
    }
}

#[tokio::test]
async fn a_wrong_key_id_is_rejected_by_the_double_as_a_config_error() {
    let double = ApnsDouble::start().await;
    let mut s = settings();
    double.configure(&mut s);
    s.apns.key_id = "WRONGKEY99".into();
    let (p, _) = providers(&s);
    assert_eq!(
        p.send(TargetRoute::Apns(&route(&apns_token(10))), &alert())
            .await,
        ProviderOutcome::ConfigError {
            reason: "apns 403 InvalidProviderToken".into()
        }
    );
}

#[tokio::test]
async fn expired_provider_token_is_refreshed_and_the_request_retried_once() {
    let double = ApnsDouble::start().await;
    let (p, _) = with_apns(&double);
    let token = apns_token(11);
    assert_eq!(
        p.send(TargetRoute::Apns(&route(&token)), &alert()).await,
        ProviderOutcome::Delivered
    );

    double.reply_next(1, Reply::reason(403, "ExpiredProviderToken"));
    assert_eq!(
        p.send(TargetRoute::Apns(&route(&token)), &alert()).await,
        ProviderOutcome::Delivered
    );
    let jwts: Vec<String> = double
        .requests()
        .iter()
        .map(|r| r.jwt.as_ref().unwrap().raw.clone())
        .collect();
    assert_eq!(jwts.len(), 3, "one first send, then the 403 and its retry");
    assert_eq!(
        jwts[0], jwts[1],
        "the cached JWT was used until Apple refused it"
    );
    assert_ne!(jwts[1], jwts[2], "the retry carries a fresh JWT");

    // Refused again right after a refresh: a clock problem, transient, no third try.
    double.reply_next(2, Reply::reason(403, "ExpiredProviderToken"));
    let outcome = p.send(TargetRoute::Apns(&route(&token)), &alert()).await;
    assert!(
        matches!(&outcome, ProviderOutcome::Transient { reason, .. } if reason.contains("ExpiredProviderToken")),
        "{outcome:?}"
    );
    assert_eq!(double.request_count(), 5);
}

#[tokio::test]
async fn the_jwt_is_reused_across_requests_and_reminted_when_old() {
    let double = ApnsDouble::start().await;
    let mut s = settings();
    double.configure(&mut s);
    let metrics = herald::metrics::Metrics::new();
    let client = herald::providers::ApnsClient::from_settings(&s.apns, &metrics)
        .unwrap()
        .unwrap()
        .with_jwt_refresh_after(Duration::from_millis(1100));
    let p = herald::providers::Providers::new(Some(client), None);
    let token = apns_token(12);
    for _ in 0..3 {
        assert_eq!(
            p.send(TargetRoute::Apns(&route(&token)), &alert()).await,
            ProviderOutcome::Delivered
        );
    }
    let first = double.requests()[0].jwt.clone().unwrap();
    assert!(
        double
            .requests()
            .iter()
            .all(|r| r.jwt.as_ref() == Some(&first))
    );

    // Once the token is older than the refresh age, the next request carries a new one,
    // with a later iat (seconds), signed by the same key.
    let newer = crate::support::wait_for(Duration::from_secs(5), "a re-minted JWT", || async {
        p.send(TargetRoute::Apns(&route(&token)), &alert()).await;
        double
            .requests()
            .last()
            .and_then(|r| r.jwt.clone())
            .filter(|j| j.raw != first.raw)
    })
    .await;
    assert!(newer.iat > first.iat);
}

#[tokio::test]
async fn an_https_endpoint_is_trusted_through_apns_ca_file() {
    let double = ApnsDouble::start_tls().await;
    assert!(double.url.starts_with("https://"));
    let (p, _) = with_apns(&double);
    assert_eq!(
        p.send(TargetRoute::Apns(&route(&apns_token(13))), &alert())
            .await,
        ProviderOutcome::Delivered
    );

    // Without the CA file the private certificate is not trusted: never delivered.
    let mut s = settings();
    double.configure(&mut s);
    s.apns.ca_file = String::new();
    let (untrusting, _) = providers(&s);
    let outcome = untrusting
        .send(TargetRoute::Apns(&route(&apns_token(13))), &alert())
        .await;
    assert!(
        matches!(outcome, ProviderOutcome::Transient { .. }),
        "{outcome:?}"
    );
    assert_eq!(double.request_count(), 1);
}

#[tokio::test]
async fn an_unconfigured_provider_is_a_config_error() {
    let (p, _) = providers(&settings());
    let token = apns_token(14);
    assert!(!p.has(&Default::default(), &TargetRoute::Apns(&route(&token))));
    assert!(matches!(
        p.send(TargetRoute::Apns(&route(&token)), &alert()).await,
        ProviderOutcome::ConfigError { .. }
    ));
}

#[tokio::test]
async fn bad_settings_name_their_key() {
    let double = ApnsDouble::start().await;
    type Break = fn(&mut herald::config::Settings);
    let cases: [(&str, Break); 5] = [
        ("apns.key_file", |s| {
            s.apns.key_file = "/nonexistent/key.p8".into()
        }),
        ("apns.key_id", |s| s.apns.key_id = String::new()),
        ("apns.topic", |s| s.apns.topic = " ".into()),
        ("apns.endpoint", |s| s.apns.endpoint = "gopher://x".into()),
        ("apns.ca_file", |s| {
            s.apns.ca_file = "/nonexistent/ca.pem".into()
        }),
    ];
    for (key, break_it) in cases {
        let mut s = settings();
        double.configure(&mut s);
        break_it(&mut s);
        let err = herald::providers::Providers::from_settings(&s, &herald::metrics::Metrics::new())
            .err()
            .unwrap_or_else(|| panic!("{key}: accepted"));
        let text = format!("{err:#}");
        assert!(text.contains(key), "error `{text}` does not name {key}");
    }
    // A file that is not a P-256 PKCS#8 key.
    let mut s = settings();
    double.configure(&mut s);
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("bogus.p8");
    std::fs::write(
        &bogus,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    s.apns.key_file = bogus.display().to_string();
    let err = herald::providers::Providers::from_settings(&s, &herald::metrics::Metrics::new())
        .err()
        .expect("a bogus key is refused at start-up");
    assert!(format!("{err:#}").contains("apns.key_file"));
}
