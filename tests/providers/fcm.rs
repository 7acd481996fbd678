use std::time::Duration;

use herald::domain::TargetRoute;
use herald::providers::ProviderOutcome;
use serde_json::json;

use crate::support::fcm_double::{CLIENT_EMAIL, FcmDouble, FcmReply, PROJECT_ID};
use crate::{fcm_token, metric, notification, providers, settings, with_fcm};

fn message() -> herald::domain::QueuedNotification {
    notification(json!({
        "targets": [{"device_id": "tablet-7"}],
        "notification": {"title": "Hi", "body": "You have a message", "thread_id": "t"},
        "data": {"thread": "t-1"},
        "priority": "high",
        "ttl": "1h",
        "collapse_key": "inbox",
        "android": {"channel_id": "messages"},
    }))
}

#[tokio::test]
async fn delivered_with_a_verified_oauth_token_and_the_v1_body() {
    let double = FcmDouble::start().await;
    let (p, metrics) = with_fcm(&double);
    let token = fcm_token("a");
    let n = message();

    assert_eq!(
        p.send(TargetRoute::Fcm(&token), &n).await,
        ProviderOutcome::Delivered
    );

    // The token endpoint got (and verified) a JWT-bearer assertion for the FCM scope.
    let grants = double.grants();
    assert_eq!(grants.len(), 1);
    let claims = &grants[0].claims;
    assert_eq!(claims["iss"], CLIENT_EMAIL);
    assert_eq!(claims["aud"], format!("{}/token", double.url));
    assert_eq!(
        claims["scope"],
        "https://www.googleapis.com/auth/firebase.messaging"
    );
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        3600
    );
    assert_eq!(grants[0].kid.as_deref(), Some("test-key-id-1"));

    let reqs = double.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.path, format!("/v1/projects/{PROJECT_ID}/messages:send"));
    assert_eq!(
        r.access_token.as_deref(),
        Some(grants[0].access_token.as_str())
    );
    let msg = &r.body["message"];
    assert_eq!(msg["token"], token.as_str());
    assert_eq!(
        msg["notification"],
        json!({"title": "Hi", "body": "You have a message"})
    );
    assert_eq!(
        msg["data"],
        json!({"thread": "t-1", "herald_id": n.id.to_string()})
    );
    assert_eq!(msg["android"]["priority"], "HIGH");
    assert_eq!(msg["android"]["collapse_key"], "inbox");
    assert_eq!(msg["android"]["notification"]["channel_id"], "messages");
    assert_eq!(msg["android"]["notification"]["tag"], "t");
    let ttl: u64 = msg["android"]["ttl"]
        .as_str()
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!((3590..=3600).contains(&ttl), "ttl {ttl}");
    assert_eq!(
        metric(
            &metrics,
            "herald_provider_request_duration_seconds_count{provider=\"fcm\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn the_access_token_is_cached_across_sends() {
    let double = FcmDouble::start().await;
    let (p, _) = with_fcm(&double);
    let sends = (0..20).map(|i| {
        let p = &p;
        async move {
            let token = fcm_token(&format!("c{i}"));
            p.send(TargetRoute::Fcm(&token), &message()).await
        }
    });
    let outcomes = futures::future::join_all(sends).await;
    assert!(outcomes.iter().all(|o| *o == ProviderOutcome::Delivered));
    assert_eq!(
        double.grants().len(),
        1,
        "20 concurrent sends share one token fetch"
    );
    assert_eq!(double.request_count(), 20);
}

#[tokio::test]
async fn a_short_lived_access_token_is_refreshed_before_it_expires() {
    let double = FcmDouble::start().await;
    // expires_in 2s: refresh at half of it (the margin is capped at half the lifetime).
    double.set_token_lifetime(2);
    let (p, _) = with_fcm(&double);
    let token = fcm_token("short");
    assert_eq!(
        p.send(TargetRoute::Fcm(&token), &message()).await,
        ProviderOutcome::Delivered
    );
    crate::support::wait_for(Duration::from_secs(5), "a second token fetch", || async {
        assert_eq!(
            p.send(TargetRoute::Fcm(&token), &message()).await,
            ProviderOutcome::Delivered
        );
        (double.grants().len() == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_401_refreshes_the_access_token_and_retries_once() {
    let double = FcmDouble::start().await;
    let (p, _) = with_fcm(&double);
    let token = fcm_token("r");
    assert_eq!(
        p.send(TargetRoute::Fcm(&token), &message()).await,
        ProviderOutcome::Delivered
    );
    double.revoke_access_tokens();
    assert_eq!(
        p.send(TargetRoute::Fcm(&token), &message()).await,
        ProviderOutcome::Delivered
    );
    let grants = double.grants();
    assert_eq!(grants.len(), 2);
    let used: Vec<_> = double
        .requests()
        .iter()
        .map(|r| r.access_token.clone().unwrap())
        .collect();
    assert_eq!(
        used,
        vec![
            grants[0].access_token.clone(),
            grants[0].access_token.clone(),
            grants[1].access_token.clone(),
        ]
    );
}

#[tokio::test]
async fn dead_tokens_are_reported_and_counted() {
    let double = FcmDouble::start().await;
    let (p, metrics) = with_fcm(&double);
    let cases = [
        (FcmReply::unregistered(), "fcm 404 UNREGISTERED"),
        (FcmReply::invalid_token(), "fcm 400 INVALID_ARGUMENT"),
        (FcmReply::sender_id_mismatch(), "fcm 403 SENDER_ID_MISMATCH"),
    ];
    for (i, (reply, reason)) in cases.into_iter().enumerate() {
        let token = fcm_token(&format!("dead{i}"));
        double.reply_for_token(token.as_str(), reply);
        let outcome = p.send(TargetRoute::Fcm(&token), &message()).await;
        assert!(
            matches!(&outcome, ProviderOutcome::TokenDead { reason: r } if r.starts_with(reason)),
            "{reason}: {outcome:?}"
        );
    }
    assert_eq!(
        metric(&metrics, "herald_tokens_dead_total{provider=\"fcm\"}"),
        3.0
    );
}

#[tokio::test]
async fn transient_failures_keep_retry_after() {
    let double = FcmDouble::start().await;
    let (p, _) = with_fcm(&double);
    let token = fcm_token("t");
    let cases = [
        (
            FcmReply::quota_exceeded().with_retry_after("30"),
            "fcm 429 QUOTA_EXCEEDED",
            Some(Duration::from_secs(30)),
        ),
        (
            FcmReply::unavailable().with_retry_after("5"),
            "fcm 503 UNAVAILABLE",
            Some(Duration::from_secs(5)),
        ),
        (FcmReply::internal(), "fcm 500 INTERNAL", None),
    ];
    for (reply, reason, want_retry) in cases {
        double.reply_next(1, reply);
        match p.send(TargetRoute::Fcm(&token), &message()).await {
            ProviderOutcome::Transient {
                reason: r,
                retry_after,
            } => {
                assert!(r.starts_with(reason), "{r}");
                assert_eq!(retry_after, want_retry, "{reason}");
            }
            other => panic!("{reason}: {other:?}"),
        }
    }
    double.reply_next(1, FcmReply::Reset);
    assert!(matches!(
        p.send(TargetRoute::Fcm(&token), &message()).await,
        ProviderOutcome::Transient { .. }
    ));
}

#[tokio::test]
async fn configuration_errors_are_not_transient() {
    let double = FcmDouble::start().await;
    let (p, _) = with_fcm(&double);
    let token = fcm_token("c");
    let cases = [
        (
            FcmReply::invalid_argument("message.android.ttl"),
            "fcm 400 INVALID_ARGUMENT",
        ),
        (
            FcmReply::third_party_auth(),
            "fcm 401 THIRD_PARTY_AUTH_ERROR",
        ),
        (FcmReply::permission_denied(), "fcm 403 PERMISSION_DENIED"),
    ];
    for (reply, reason) in cases {
        double.reply_next(1, reply);
        let outcome = p.send(TargetRoute::Fcm(&token), &message()).await;
        assert!(
            matches!(&outcome, ProviderOutcome::ConfigError { reason: r } if r.starts_with(reason)),
            "{reason}: {outcome:?}"
        );
    }
    // A third-party auth error is not "refresh the access token": one fetch in all.
    assert_eq!(double.grants().len(), 1);
}

#[tokio::test]
async fn a_401_that_survives_a_refresh_is_a_config_error() {
    let double = FcmDouble::start().await;
    let (p, _) = with_fcm(&double);
    let unauthenticated = FcmReply::error(
        401,
        "UNAUTHENTICATED",
        None,
        "Request had invalid authentication credentials.",
    );
    double.reply_always(Some(unauthenticated));
    let outcome = p.send(TargetRoute::Fcm(&fcm_token("u")), &message()).await;
    assert!(
        matches!(&outcome, ProviderOutcome::ConfigError { reason } if reason.contains("UNAUTHENTICATED")),
        "{outcome:?}"
    );
    assert_eq!(double.grants().len(), 2, "refreshed once, then gave up");
    assert_eq!(double.request_count(), 2);
}

#[tokio::test]
async fn a_project_the_endpoint_does_not_know_is_a_config_error() {
    let double = FcmDouble::start().await;
    let mut s = settings();
    double.configure(&mut s);
    // Same account, different project id: FCM answers 404 with no UNREGISTERED detail.
    let mut sa: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&double.service_account_file).unwrap()).unwrap();
    sa["project_id"] = json!("someone-elses-project");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sa.json");
    std::fs::write(&path, sa.to_string()).unwrap();
    s.fcm.service_account_file = path.display().to_string();
    let (p, _) = providers(&s);
    assert!(matches!(
        p.send(TargetRoute::Fcm(&fcm_token("p")), &message()).await,
        ProviderOutcome::ConfigError { .. }
    ));
}

#[tokio::test]
async fn an_https_endpoint_and_token_uri_are_trusted_through_fcm_ca_file() {
    let double = FcmDouble::start_tls().await;
    assert!(double.url.starts_with("https://"));
    let (p, _) = with_fcm(&double);
    assert_eq!(
        p.send(TargetRoute::Fcm(&fcm_token("tls")), &message())
            .await,
        ProviderOutcome::Delivered
    );
    assert_eq!(double.grants().len(), 1);
}

#[tokio::test]
async fn bad_settings_name_their_key() {
    let double = FcmDouble::start().await;
    let mut s = settings();
    double.configure(&mut s);
    s.fcm.service_account_file = "/nonexistent/sa.json".into();
    let err = herald::providers::Providers::from_settings(&s, &herald::metrics::Metrics::new())
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("fcm.service_account_file"));

    let mut s = settings();
    double.configure(&mut s);
    s.fcm.endpoint = "fcm.googleapis.com".into();
    let err = herald::providers::Providers::from_settings(&s, &herald::metrics::Metrics::new())
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("fcm.endpoint"));

    // A key file that is JSON but not a service account (e.g. an OAuth client secret).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("client.json");
    std::fs::write(&path, r#"{"installed": {"client_id": "x"}}"#).unwrap();
    let mut s = settings();
    s.fcm.service_account_file = path.display().to_string();
    let err = herald::providers::Providers::from_settings(&s, &herald::metrics::Metrics::new())
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("fcm.service_account_file"));
}
