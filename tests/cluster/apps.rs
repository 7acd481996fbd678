//! Apps across nodes: the same device id connected in two apps on a gateway node; a
//! dispatcher on another node reaches only the notification's own app's session, and falls
//! back through that app's own provider.

use std::time::Duration;

use herald::config::{Role, Secret, Settings};
use herald::startup::Application;
use serde_json::{Value, json};

use crate::gw;
use crate::support::apns_double::ApnsDouble;
use crate::support::{API_KEY, TestVhost, wait_for};

const SHOP_KEY: &str = "shop-api-key-0123456789";
const SHOP_APNS_TOKEN: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

fn settings(vhost: &TestVhost, apns: &ApnsDouble, shop: &ApnsDouble, roles: &[Role]) -> Settings {
    let mut s = gw::settings();
    s.queue.url = vhost.settings().queue.url;
    s.roles = roles.to_vec();
    s.cluster.reply_margin = Duration::from_millis(200);
    apns.configure(&mut s);
    shop.configure_app(&mut s, "shop");
    s.apps.get_mut("shop").unwrap().api_keys = vec![Secret::new(SHOP_KEY)];
    s
}

async fn post(base: &str, key: &str, body: Value) -> String {
    let res = reqwest::Client::new()
        .post(format!("{base}/v1/notify"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_route_each_apps_notification_to_its_own_session_only() {
    let vhost = TestVhost::new();
    let apns = ApnsDouble::start().await;
    let shop = ApnsDouble::start_as("SHOPKEY001", "SHOPTEAM01", "com.example.shop").await;
    // The gateway starts first: what a dispatcher declares must be there for it.
    let gateway_settings = settings(&vhost, &apns, &shop, &[Role::Gateway]);
    vhost.declare_dispatcher_topology(&gateway_settings).await;
    let gateway = gw::spawn(gateway_settings).await;
    wait_for(Duration::from_secs(10), "directory registered", || async {
        let r = reqwest::get(format!("{}/readyz", gateway.base))
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let dispatcher = Application::build(settings(
        &vhost,
        &apns,
        &shop,
        &[Role::Api, Role::Dispatcher],
    ))
    .await
    .unwrap();
    let cluster = dispatcher.cluster().expect("cluster mode").clone();
    assert!(cluster.wait_ready(Duration::from_secs(10)).await);
    let base = format!("http://{}", dispatcher.addr());
    let stop_dispatcher = dispatcher.shutdown_handle();
    tokio::spawn(dispatcher.run_until_stopped());
    let live = |device: &str| json!({"targets": [{"device_id": device}], "data": {"k": "v"}});

    // default's phone-1 on the gateway node; shop's phone-1 not connected.
    let (ws, _) = gw::connect(&gateway, "phone-1").await;
    let mut default_frames = gw::spawn_acker(ws);
    post(
        &base,
        SHOP_KEY,
        json!({"targets": [{"device_id": "phone-1", "apns": {"token": SHOP_APNS_TOKEN}}], "data": {"k": "v"}}),
    )
    .await;
    wait_for(Duration::from_secs(20), "shop's APNs fallback", || async {
        (shop.request_count() == 1).then_some(())
    })
    .await;
    assert_eq!(apns.request_count(), 0);
    let first = post(&base, API_KEY, live("phone-1")).await;
    assert_eq!(gw::next_notification_id(&mut default_frames).await, first);

    // shop's phone-1 connects on the same node: a second device, default's stays.
    let (ws, _) = gw::connect_with(&gateway, &gw::token_in("shop", "phone-1")).await;
    let mut shop_frames = gw::spawn_acker(ws);
    let to_shop = post(&base, SHOP_KEY, live("phone-1")).await;
    assert_eq!(gw::next_notification_id(&mut shop_frames).await, to_shop);
    let to_default = post(&base, API_KEY, live("phone-1")).await;
    assert_eq!(
        gw::next_notification_id(&mut default_frames).await,
        to_default
    );
    assert_eq!(shop.request_count(), 1);
    assert_eq!(apns.request_count(), 0);

    stop_dispatcher.cancel();
    gateway.stop().await;
}
