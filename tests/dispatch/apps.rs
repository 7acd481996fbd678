//! Apps end to end: each app's notifications go through its own credentials only; APNs
//! targets go to their environment's endpoint; a BadDeviceToken says it is probably the
//! wrong environment.

use std::time::Duration;

use herald::config::Secret;
use serde_json::{Value, json};

use crate::harness::{APNS_TOKEN, Backend, Webhook, World};
use crate::support::apns_double::{ApnsDouble, Reply};
use crate::support::fcm_double::{FcmDouble, PROJECT_ID};
use crate::support::wait_for;

pub const SHOP_KEY: &str = "shop-api-key-0123456789";
const SHOP_APNS_TOKEN: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

/// The app `shop`, with its own APNs account and Firebase project.
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
        app.events.webhook_url = self.hook.url.clone();
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
    w.app.stop().await;
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
    w.app.stop().await;
}
