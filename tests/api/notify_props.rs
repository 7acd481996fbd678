//! Property tests of the notify body parser (issue 14): arbitrary bytes, arbitrary JSON
//! built from the request's own vocabulary, and byte-level mutations of valid bodies. The
//! parse (one JSON value into `NotifyRequest`, then `NotifyRequest::parse`, then the
//! provider payload sizes) never panics and ends in `Ok` or a typed error; over HTTP every
//! such body gets 202, or a 4xx with the JSON error shape, never a 5xx. Case counts are
//! fixed so each property runs in a few seconds.

use std::time::{Duration, SystemTime};

use herald::domain::{NotifyLimits, NotifyRequest};
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::support;

const LIMITS: NotifyLimits = NotifyLimits {
    max_targets: 1000,
    default_ttl: Duration::from_secs(86_400),
    max_ttl: Duration::from_secs(28 * 86_400),
};

/// Field names and values the request uses, so generated objects reach deep into the
/// parser instead of failing at the first unknown field.
const KEYS: &[&str] = &[
    "targets",
    "device_id",
    "apns",
    "fcm",
    "token",
    "notification",
    "title",
    "subtitle",
    "body",
    "badge",
    "sound",
    "image",
    "category",
    "thread_id",
    "data",
    "priority",
    "ttl",
    "collapse_key",
    "push_type",
    "topic",
    "android",
    "channel_id",
    "herald_id",
    "aps",
    "google.x",
    "delivery",
    "unknown",
];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        Just(json!(u64::MAX)),
        // Any string, control characters and all.
        any::<String>().prop_map(Value::String),
        prop::sample::select(vec![
            "high",
            "normal",
            "low",
            "alert",
            "background",
            "90s",
            "0s",
            "29d",
            "1h",
            "phone-1",
            "",
            " ",
            "a\u{7}b",
            "x".repeat(300).leak(),
        ])
        .prop_map(|s: &str| Value::String(s.to_owned())),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|fields| {
                Value::Object(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

/// A body that parses, to mutate.
fn valid_body() -> Vec<u8> {
    json!({
        "targets": [
            {"device_id": "phone-1", "apns": {"token": "a".repeat(64)}},
            {"device_id": "phone-2"}
        ],
        "notification": {"title": "Hi", "body": "there", "badge": 3},
        "data": {"k": "v"},
        "priority": "high",
        "ttl": "1h",
        "collapse_key": "c",
        "apns": {"push_type": "alert"}
    })
    .to_string()
    .into_bytes()
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
    Append(Vec<u8>),
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let one = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
        prop::collection::vec(any::<u8>(), 1..8).prop_map(Mutation::Append),
    ];
    prop::collection::vec(one, 1..6)
}

fn mutate(mut body: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        let n = body.len().max(1);
        match m {
            Mutation::Flip(i, b) if !body.is_empty() => body[i % n] ^= b | 1,
            Mutation::Insert(i, b) => body.insert(i % (body.len() + 1), *b),
            Mutation::Delete(i) if !body.is_empty() => {
                body.remove(i % n);
            }
            Mutation::Truncate(i) => body.truncate(i % n),
            Mutation::Append(bytes) => body.extend_from_slice(bytes),
            _ => {}
        }
    }
    body
}

/// The whole in-process parse, as the handler runs it. Panics are what the properties
/// catch; errors are fine as long as they are the typed ones.
fn parse(body: &[u8]) {
    let mut de = serde_json::Deserializer::from_slice(body);
    let Ok(request) = serde_path_to_error::deserialize::<_, NotifyRequest>(&mut de) else {
        return;
    };
    if de.end().is_err() {
        return;
    }
    if let Ok(n) = request.parse(LIMITS, SystemTime::now()) {
        let _ = herald::providers::check_payload_sizes(&n);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        parse(&body);
    }

    #[test]
    fn arbitrary_json_never_panics(v in value()) {
        parse(v.to_string().as_bytes());
        // And the same under a valid shell, so the inner fields are reached.
        for key in ["notification", "data", "apns", "android", "ttl", "priority", "collapse_key"] {
            let body = json!({"targets": [{"device_id": "phone-1"}], "data": {"k": "v"}, key: v.clone()});
            parse(body.to_string().as_bytes());
        }
        let body = json!({"targets": [v.clone()], "data": {"k": "v"}});
        parse(body.to_string().as_bytes());
    }

    #[test]
    fn mutated_valid_bodies_never_panic(ms in mutations()) {
        parse(&mutate(valid_body(), &ms));
    }
}

/// Over HTTP against a real app: no generated body gets a 5xx or a non-JSON answer.
#[test]
fn generated_bodies_over_http_get_202_or_a_json_4xx() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt.block_on(support::spawn_app(support::api_only(
        support::test_settings(),
    )));
    let url = format!("{}/v1/notify", app.base);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 150,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let bodies = prop_oneof![
        mutations().prop_map(|ms| mutate(valid_body(), &ms)),
        value().prop_map(
            |v| json!({"targets": [{"device_id": "p"}], "notification": v})
                .to_string()
                .into_bytes()
        ),
        prop::collection::vec(any::<u8>(), 0..256),
    ];
    runner
        .run(&bodies, |body| {
            let res = rt
                .block_on(
                    app.http
                        .post(&url)
                        .bearer_auth(support::API_KEY)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send(),
                )
                .unwrap();
            let status = res.status().as_u16();
            let answer: Value = rt.block_on(res.json()).expect("a JSON answer");
            prop_assert!(
                status == 202 || (400..500).contains(&status),
                "{status} {answer}"
            );
            if status != 202 {
                prop_assert!(answer["error"]["code"].is_string(), "{answer}");
                prop_assert!(answer["error"]["message"].is_string(), "{answer}");
            }
            Ok(())
        })
        .unwrap();
    rt.block_on(app.stop());
}
