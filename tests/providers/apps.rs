//! Providers per app: a notification goes through its own app's clients only; an APNs
//! target goes to its environment's endpoint, signed by the same key.

use herald::domain::{ApnsEnvironment, ApnsRoute, AppId, QueuedNotification, TargetRoute};
use herald::providers::ProviderOutcome;

use crate::support::apns_double::ApnsDouble;
use crate::{alert, apns_token, providers, route, settings};

fn in_app(app: &str) -> QueuedNotification {
    QueuedNotification {
        app: AppId::parse(app).unwrap(),
        ..alert()
    }
}

#[tokio::test]
async fn a_notification_goes_through_its_own_apps_provider_only() {
    let default = ApnsDouble::start().await;
    let shop = ApnsDouble::start_as("SHOPKEY001", "SHOPTEAM01", "com.example.shop").await;
    let mut s = settings();
    default.configure(&mut s);
    shop.configure_app(&mut s, "shop");
    // `pay` exists but has no APNs.
    s.apps.entry("pay".into()).or_default();
    let (p, _) = providers(&s);
    let token = apns_token(1);

    let sent = p
        .send(TargetRoute::Apns(&route(&token)), &in_app("shop"))
        .await;
    assert_eq!(sent, ProviderOutcome::Delivered);
    assert_eq!((shop.request_count(), default.request_count()), (1, 0));
    let jwt = shop.requests()[0]
        .jwt
        .clone()
        .expect("signed with shop's key");
    assert_eq!(
        (jwt.kid.as_str(), jwt.iss.as_str()),
        ("SHOPKEY001", "SHOPTEAM01")
    );
    assert_eq!(shop.requests()[0].headers["apns-topic"], "com.example.shop");

    // pay has no APNs of its own, and never falls back to another app's.
    let ProviderOutcome::ConfigError { reason } = p
        .send(TargetRoute::Apns(&route(&token)), &in_app("pay"))
        .await
    else {
        panic!("pay has no APNs");
    };
    assert!(reason.contains("apps.pay.apns.key_file"), "{reason}");
    // An app this node does not know (queued under an older config) is not sent at all.
    let ProviderOutcome::ConfigError { reason } = p
        .send(TargetRoute::Apns(&route(&token)), &in_app("ghost"))
        .await
    else {
        panic!("ghost is not configured");
    };
    assert!(reason.contains("ghost"), "{reason}");
    assert_eq!((shop.request_count(), default.request_count()), (1, 0));
    assert!(p.has(
        &AppId::parse("shop").unwrap(),
        &TargetRoute::Apns(&route(&token))
    ));
    assert!(!p.has(
        &AppId::parse("pay").unwrap(),
        &TargetRoute::Apns(&route(&token))
    ));
}

#[tokio::test]
async fn each_environment_has_its_endpoint_and_the_default_is_configurable() {
    let production = ApnsDouble::start().await;
    let sandbox = production.start_same_account().await;
    let mut s = settings();
    production.configure(&mut s);
    s.apns.sandbox_endpoint = sandbox.url.clone();
    s.apns.default_environment = ApnsEnvironment::Sandbox;
    let (p, _) = providers(&s);
    let to = |n: u32, environment: Option<ApnsEnvironment>| ApnsRoute {
        token: apns_token(n),
        environment,
    };
    for route in [
        to(1, Some(ApnsEnvironment::Production)),
        to(2, Some(ApnsEnvironment::Sandbox)),
        // No environment: the app's default_environment, sandbox here.
        to(3, None),
    ] {
        assert_eq!(
            p.send(TargetRoute::Apns(&route), &alert()).await,
            ProviderOutcome::Delivered
        );
    }
    let tokens = |d: &ApnsDouble| {
        d.requests()
            .into_iter()
            .map(|r| r.token)
            .collect::<Vec<_>>()
    };
    assert_eq!(tokens(&production), [apns_token(1).as_str()]);
    assert_eq!(
        tokens(&sandbox),
        [apns_token(2).as_str(), apns_token(3).as_str()]
    );
    // Both hosts verified the same provider token.
    assert!(sandbox.requests().iter().all(|r| r.jwt.is_some()));
    assert!(production.requests()[0].jwt.is_some());
}
