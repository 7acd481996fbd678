//! Apps end to end: each app's notifications go through its own credentials only; APNs
//! targets go to their environment's endpoint; a BadDeviceToken says it is probably the
//! wrong environment.

use std::time::Duration;

use herald::config::Secret;
use serde_json::{Value, json};

use crate::harness::{APNS_TOKEN, Backend, WEBHOOK_SECRET, Webhook, World, signed_with};
use crate::support::apns_double::{ApnsDouble, Reply};
use crate::support::fcm_double::{FcmDouble, PROJECT_ID};
use crate::support::wait_for;

pub const SHOP_KEY: &str = "shop-api-key-0123456789";
const SHOP_APNS_TOKEN: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

/// The app `shop`, with its own APNs account and Firebase project.
/// The shop app's webhook signing key (not the default app's).
pub const SHOP_WEBHOOK_SECRET: &str = "whsec_c2hvcC13ZWJob29rLWtleS0wMTIzNDU2Nzg5YWI=";

pub struct Shop {
    pub apns: ApnsDouble,
    pub fcm: FcmDouble,
    pub hook: Webhook,
}

impl Shop {
    pub async fn start() -> Shop {
        Shop {
            apns: ApnsDouble::start_as("SHOPKEY001", "SHOPTEAM01", "com.example.shop").await,
            fcm: FcmDouble::start_for_project("shop-project").await,
            hook: Webhook::start().await,
        }
    }

    pub fn configure(&self, s: &mut herald::config::Settings) {
        self.apns.configure_app(s, "shop");
        self.fcm.configure_app(s, "shop");
        let app = s.apps.get_mut("shop").unwrap();
        app.api_keys = vec![Secret::new(SHOP_KEY)];
        app.events.webhook_url = Secret::new(self.hook.url.clone());
        // Each app's webhook is signed with its own key.
        app.events.webhook_secret = Secret::new(SHOP_WEBHOOK_SECRET);
    }
}

/// POSTs `body` with `key`; the notification's id.
pub async fn notify_as(w: &World, key: &str, body: Value) -> String {
    let res = w
        .http
        .post(format!("{}/v1/notify", w.app.base))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202, "{}", res.text().await.unwrap());
    res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn each_apps_key_sends_through_its_own_credentials_only() {
    let shop = Shop::start().await;
    let w = World::start_with(Backend::Memory, |s| shop.configure(s)).await;
    // The same device id in both apps: two different devices.
    let body = |apns: &str, fcm: &str| {
        json!({
            "targets": [{"device_id": "phone-1", "apns": {"token": apns}, "fcm": {"token": fcm}}],
            "notification": {"title": "Hi"}
        })
    };
    w.notify(body(APNS_TOKEN, "fcm-default")).await;
    notify_as(&w, SHOP_KEY, body(SHOP_APNS_TOKEN, "fcm-shop")).await;
    wait_for(
        Duration::from_secs(20),
        "four provider deliveries",
        || async {
            (w.deliveries("apns", "delivered") + w.deliveries("fcm", "delivered") >= 4.0)
                .then_some(())
        },
    )
    .await;

    // APNs: each account got one request, signed with its own key (the double verifies the
    // ES256 signature with its key), kid and team, for its own topic and device.
    for (double, token, kid, iss, topic) in [
        (
            &w.apns,
            APNS_TOKEN,
            "TESTKEY123",
            "TEAM987654",
            "com.example.herald",
        ),
        (
            &shop.apns,
            SHOP_APNS_TOKEN,
            "SHOPKEY001",
            "SHOPTEAM01",
            "com.example.shop",
        ),
    ] {
        let got = double.requests();
        assert_eq!(got.len(), 1, "{kid}: {got:?}");
        let jwt = got[0].jwt.as_ref().expect("a JWT the double verified");
        assert_eq!((jwt.kid.as_str(), jwt.iss.as_str()), (kid, iss));
        assert_eq!(got[0].headers["apns-topic"], topic);
        assert_eq!(got[0].token, token);
    }
    // FCM: each project got one request, on its own project path, with an access token its
    // own token endpoint issued to its own service account.
    for (double, project, token) in [
        (&w.fcm, PROJECT_ID, "fcm-default"),
        (&shop.fcm, "shop-project", "fcm-shop"),
    ] {
        let got = double.requests();
        assert_eq!(got.len(), 1, "{project}: {got:?}");
        assert_eq!(got[0].path, format!("/v1/projects/{project}/messages:send"));
        assert_eq!(got[0].body["message"]["token"], token);
        let issued: Vec<String> = double
            .grants()
            .into_iter()
            .map(|g| g.access_token)
            .collect();
        assert!(issued.contains(got[0].access_token.as_ref().unwrap()));
    }
    // Each app's events go to its own webhook, and say which app they are for.
    for (hook, app) in [(&w.hook, "default"), (&shop.hook, "shop")] {
        let delivered = hook.wait("delivered", 2).await;
        let apps: Vec<&Value> = delivered.iter().map(|e| &e["app"]).collect();
        assert_eq!(apps, [app, app]);
    }
    w.stop().await;
}

/// Issue 11, end to end: every event of the app `shop`, from the dispatcher (`delivered`,
/// `stored`) and from the gateway (`replayed`, `session_replaced`), reaches shop's webhook
/// only, every POST signed with `apps.shop.events.webhook_secret` (checked here with the
/// spec's algorithm), and not with the default app's; the default app's webhook gets none.
#[tokio::test]
async fn a_non_default_apps_events_reach_only_its_webhook_signed_with_its_secret() {
    let shop = Shop::start().await;
    let w = World::start_with(Backend::Memory, |s| shop.configure(s)).await;
    // A provider delivery and an inbox entry for shop's devices.
    notify_as(
        &w,
        SHOP_KEY,
        json!({
            "targets": [{"device_id": "ios-s", "apns": {"token": SHOP_APNS_TOKEN}}, {"device_id": "web-s"}],
            "data": {"k": "v"}
        }),
    )
    .await;
    shop.hook.wait("stored", 1).await;
    // web-s connects: the entry is replayed and acked; then it connects again, replacing
    // that session.
    let token = crate::gw::token_in("shop", "web-s");
    let (mut first, _) = crate::gw::connect_with(&w.app, &token).await;
    let frame = loop {
        let v = crate::gw::next_json(&mut first).await;
        if v["type"] == "notification" {
            break v;
        }
    };
    crate::gw::send_json(&mut first, json!({"type": "ack", "id": frame["id"]})).await;
    shop.hook.wait("replayed", 1).await;
    let (_second, _) = crate::gw::connect_with(&w.app, &token).await;
    assert_eq!(crate::gw::expect_close(&mut first).await.0, 4001);
    shop.hook.wait("session_replaced", 1).await;
    shop.hook.wait("delivered", 1).await;

    let events = shop.hook.events();
    let mut kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        ["delivered", "replayed", "session_replaced", "stored"]
    );
    assert!(events.iter().all(|e| e["app"] == "shop"), "{events:?}");
    let posts = shop.hook.posts();
    assert!(!posts.is_empty());
    for post in &posts {
        assert!(
            signed_with(post, SHOP_WEBHOOK_SECRET),
            "signed with shop's secret: {:?}",
            post.headers
        );
        assert!(
            !signed_with(post, WEBHOOK_SECRET),
            "not with the default app's"
        );
    }

    // The default app's webhook: one event of its own, sent after all of shop's were
    // seen. Each sink is FIFO and an event's sinks are chosen when it is emitted, so a shop
    // event routed there would have arrived before this one.
    w.notify(json!({"targets": [{"device_id": "ios-d", "apns": {"token": APNS_TOKEN}}], "data": {"k": "v"}}))
        .await;
    w.hook.wait("delivered", 1).await;
    let default_events = w.hook.events();
    assert!(
        default_events.iter().all(|e| e["app"] == "default"),
        "{default_events:?}"
    );
    assert_eq!(default_events.len(), 1, "{default_events:?}");
    for post in w.hook.posts() {
        assert!(signed_with(&post, WEBHOOK_SECRET));
        assert!(!signed_with(&post, SHOP_WEBHOOK_SECRET));
    }
    w.stop().await;
}

#[tokio::test]
async fn sandbox_and_production_targets_go_to_their_two_endpoints() {
    let apns = ApnsDouble::start().await;
    let sandbox = apns.start_same_account().await;
    // The test's pair (production, sandbox) replaces the double World configures.
    let w = World::start_with(Backend::Memory, |s| {
        apns.configure(s);
        s.apns.sandbox_endpoint = sandbox.url.clone();
    })
    .await;
    let prod_token = APNS_TOKEN;
    let dev_token = SHOP_APNS_TOKEN;
    let wrong_env = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";
    apns.reply_for_token(wrong_env, Reply::reason(400, "BadDeviceToken"));
    w.notify(json!({
        "targets": [
            {"device_id": "dev-phone", "apns": {"token": dev_token, "environment": "sandbox"}},
            {"device_id": "store-phone", "apns": {"token": prod_token}},
            {"device_id": "misfiled-phone", "apns": {"token": wrong_env, "environment": "production"}}
        ],
        "data": {"k": "v"}
    }))
    .await;
    let dead = w.hook.wait("token_dead", 1).await;
    wait_for(Duration::from_secs(20), "two deliveries", || async {
        (w.deliveries("apns", "delivered") >= 2.0).then_some(())
    })
    .await;
    let tokens = |d: &ApnsDouble| {
        d.requests()
            .into_iter()
            .map(|r| r.token)
            .collect::<Vec<_>>()
    };
    assert_eq!(tokens(&sandbox), [dev_token]);
    let mut prod = tokens(&apns);
    prod.sort();
    assert_eq!(prod, [prod_token, wrong_env]);
    // One .p8 key signs for both hosts.
    assert!(sandbox.requests()[0].jwt.is_some());
    // The dead token's reason says what to do about it.
    let reason = dead[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("BadDeviceToken") && reason.contains("sandbox"),
        "{reason}"
    );
    assert_eq!(dead[0]["device_id"], "misfiled-phone");
    w.stop().await;
}

/// A device token minted through the API with `key`: for `device` of the key's app.
async fn minted(w: &World, key: &str, device: &str) -> String {
    let res = w
        .http
        .post(format!("{}/v1/devices/{device}/token", w.app.base))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A token as herald minted them before apps: no `app` claim.
fn claimless_token(device: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": device, "aud": "herald-device", "iat": now, "exp": now + 60}),
        &jsonwebtoken::EncodingKey::from_secret(crate::gw::SECRET.as_bytes()),
    )
    .unwrap()
}

/// `token` with its `app` claim changed to `app`, the signature kept.
fn with_app_claim(token: &str, app: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    claims["app"] = app.into();
    let payload = b64.encode(serde_json::to_vec(&claims).unwrap());
    format!("{}.{payload}.{}", parts[0], parts[2])
}

async fn open(w: &World, token: &str) -> tokio::sync::mpsc::UnboundedReceiver<Value> {
    let (ws, _) = crate::gw::connect_with(&w.app, token).await;
    crate::gw::spawn_acker(ws)
}

crate::delivery::on_both_backends!(the_same_device_id_in_two_apps_is_two_devices);

async fn the_same_device_id_in_two_apps_is_two_devices(backend: Backend) {
    let shop = Shop::start().await;
    let w = World::start_with(backend, |s| shop.configure(s)).await;
    let live = |id: &str| json!({"targets": [{"device_id": id}], "data": {"k": "v"}});

    // phone-1 of `default`, with a token from before apps (no claim: default's).
    let mut default_frames = open(&w, &claimless_token("phone-1")).await;
    // shop's phone-1 has no session: shop's notification must not reach default's session,
    // and falls back through shop's own APNs.
    notify_as(
        &w,
        SHOP_KEY,
        json!({"targets": [{"device_id": "phone-1", "apns": {"token": SHOP_APNS_TOKEN}}], "data": {"k": "v"}}),
    )
    .await;
    wait_for(Duration::from_secs(20), "shop's APNs fallback", || async {
        (shop.apns.request_count() == 1).then_some(())
    })
    .await;
    assert_eq!(
        w.apns.request_count(),
        0,
        "default's APNs never sees shop's"
    );
    // The first frame default's session gets is default's own notification.
    let first = w.notify(live("phone-1")).await;
    assert_eq!(
        crate::gw::next_notification_id(&mut default_frames).await,
        first
    );

    // Now phone-1 of shop connects with a token shop's key minted: a second device, so
    // default's session is not replaced.
    let shop_token = minted(&w, SHOP_KEY, "phone-1").await;
    let mut shop_frames = open(&w, &shop_token).await;
    let to_shop = notify_as(&w, SHOP_KEY, live("phone-1")).await;
    assert_eq!(
        crate::gw::next_notification_id(&mut shop_frames).await,
        to_shop
    );
    let to_default = w.notify(live("phone-1")).await;
    assert_eq!(
        crate::gw::next_notification_id(&mut default_frames).await,
        to_default
    );
    assert_eq!(
        w.metric("herald_gateway_sessions_active{app=\"shop\"}"),
        1.0
    );
    assert_eq!(
        w.metric("herald_gateway_sessions_active{app=\"default\"}"),
        1.0
    );
    // The device acks before the dispatcher hears of it (a broker hop in cluster mode).
    let live_delivered = |app: &str| {
        w.metric(&format!(
            "herald_deliveries_total{{app=\"{app}\",channel=\"live\",outcome=\"delivered\"}}"
        ))
    };
    wait_for(Duration::from_secs(10), "three live deliveries", || async {
        (live_delivered("shop") + live_delivered("default") >= 3.0).then_some(())
    })
    .await;
    assert_eq!(
        (live_delivered("shop"), live_delivered("default")),
        (1.0, 2.0)
    );

    // Shop's token with its app claim changed opens nothing.
    let forged =
        crate::gw::try_connect(&w.app, Some(&with_app_claim(&shop_token, "default"))).await;
    match forged {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 401),
        other => panic!("a forged app claim connected: {:?}", other.map(|_| ())),
    }
    w.stop().await;
}
