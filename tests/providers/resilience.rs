use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::domain::TargetRoute;
use herald::providers::ProviderOutcome;

use crate::support::apns_double::{ApnsDouble, Reply};
use crate::support::fcm_double::FcmDouble;
use crate::support::wait_for;
use crate::{alert, apns_token, fcm_token, providers, route, settings};

#[tokio::test]
async fn a_hung_apns_does_not_slow_fcm() {
    let apns = ApnsDouble::start().await;
    let fcm = FcmDouble::start().await;
    let mut s = settings();
    apns.configure(&mut s);
    fcm.configure(&mut s);
    s.apns.concurrency = 4;
    s.apns.timeout = Duration::from_secs(30);
    let (p, _) = providers(&s);
    let p = Arc::new(p);
    // Warm FCM's connection and access token, so the timing below is only sends.
    assert_eq!(
        p.send(TargetRoute::Fcm(&fcm_token("warm")), &alert()).await,
        ProviderOutcome::Delivered
    );

    apns.reply_always(Some(Reply::Hang));
    // Fill every APNs slot and queue more behind them.
    let stuck: Vec<_> = (0..12)
        .map(|i| {
            let p = p.clone();
            tokio::spawn(async move {
                let token = apns_token(500 + i);
                p.send(TargetRoute::Apns(&route(&token)), &alert()).await
            })
        })
        .collect();
    wait_for(Duration::from_secs(5), "4 hung APNs requests", || async {
        (apns.request_count() == 4).then_some(())
    })
    .await;

    let started = Instant::now();
    let sends = (0..50).map(|i| {
        let p = p.clone();
        async move {
            let token = fcm_token(&format!("bulk{i}"));
            p.send(TargetRoute::Fcm(&token), &alert()).await
        }
    });
    let outcomes = futures::future::join_all(sends).await;
    let took = started.elapsed();
    assert!(outcomes.iter().all(|o| *o == ProviderOutcome::Delivered));
    assert!(
        took < Duration::from_secs(3),
        "50 FCM sends took {took:?} beside a hung APNs"
    );
    assert!(
        stuck.iter().all(|t| !t.is_finished()),
        "APNs sends are still waiting"
    );
    // Only the slots' worth reached Apple's double: the bulkhead held the rest back.
    assert_eq!(apns.request_count(), 4);
    for t in stuck {
        t.abort();
    }
}

#[tokio::test]
async fn the_circuit_opens_after_consecutive_failures_and_recovers_through_a_probe() {
    let apns = ApnsDouble::start().await;
    let mut s = settings();
    apns.configure(&mut s);
    s.apns.breaker_failures = 3;
    // Long enough that the send right after the trip surely lands inside it on a loaded machine.
    s.apns.breaker_cooldown = Duration::from_secs(1);
    let (p, _) = providers(&s);
    let token = apns_token(600);

    apns.reply_always(Some(Reply::reason(503, "ServiceUnavailable")));
    for _ in 0..3 {
        let outcome = p.send(TargetRoute::Apns(&route(&token)), &alert()).await;
        assert!(
            matches!(&outcome, ProviderOutcome::Transient { reason, .. } if reason.contains("503")),
            "{outcome:?}"
        );
    }
    assert_eq!(apns.request_count(), 3);

    // Open: answered at once, without a request, with the cool-down as retry_after.
    match p.send(TargetRoute::Apns(&route(&token)), &alert()).await {
        ProviderOutcome::Transient {
            reason,
            retry_after: Some(wait),
        } => {
            assert_eq!(reason, "circuit open");
            assert!(wait <= Duration::from_secs(1) && wait > Duration::ZERO);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(apns.request_count(), 3);

    // Still failing when the cool-down ends: the one probe fails and the circuit reopens.
    wait_for(Duration::from_secs(5), "a failed probe", || async {
        p.send(TargetRoute::Apns(&route(&token)), &alert()).await;
        (apns.request_count() == 4).then_some(())
    })
    .await;
    assert!(matches!(
        p.send(TargetRoute::Apns(&route(&token)), &alert()).await,
        ProviderOutcome::Transient { reason, .. } if reason == "circuit open"
    ));

    // APNs recovers: the next probe succeeds and the circuit closes.
    apns.reply_always(None);
    wait_for(Duration::from_secs(5), "a successful probe", || async {
        (p.send(TargetRoute::Apns(&route(&token)), &alert()).await == ProviderOutcome::Delivered)
            .then_some(())
    })
    .await;
    assert_eq!(
        apns.request_count(),
        5,
        "exactly one probe after the second cool-down"
    );
    for _ in 0..3 {
        assert_eq!(
            p.send(TargetRoute::Apns(&route(&token)), &alert()).await,
            ProviderOutcome::Delivered
        );
    }
}

#[tokio::test]
async fn dead_tokens_and_config_errors_do_not_open_the_circuit() {
    let apns = ApnsDouble::start().await;
    let mut s = settings();
    apns.configure(&mut s);
    s.apns.breaker_failures = 2;
    let (p, _) = providers(&s);
    let token = apns_token(700);
    apns.reply_always(Some(Reply::reason(410, "Unregistered")));
    for _ in 0..5 {
        assert!(matches!(
            p.send(TargetRoute::Apns(&route(&token)), &alert()).await,
            ProviderOutcome::TokenDead { .. }
        ));
    }
    apns.reply_always(Some(Reply::reason(400, "BadTopic")));
    for _ in 0..5 {
        assert!(matches!(
            p.send(TargetRoute::Apns(&route(&token)), &alert()).await,
            ProviderOutcome::ConfigError { .. }
        ));
    }
    assert_eq!(apns.request_count(), 10);
}
