//! Real `herald serve` processes: cross-node delivery, kill -9 (alone and under load), a
//! device that moves under a stream, SIGTERM to each role under a stream.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::nodes::{Device, Node, assert_all_delivered, node_env, notify};
use crate::support::apns_double::ApnsDouble;
use crate::support::{TestVhost, wait_for};

fn apns_ids(apns: &ApnsDouble) -> Vec<String> {
    apns.requests()
        .into_iter()
        .filter_map(|r| r.headers.get("apns-id").cloned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_cross_node_live_kill9_fallback_then_live_on_another_node() {
    let vhost = TestVhost::new();
    let apns = ApnsDouble::start().await;
    let env = node_env(&vhost.url, &apns);
    // Node 1 takes requests and dispatches but holds no sessions; 2 only holds sessions;
    // 3 runs everything. So "live" on node 2 can only be a cross-node delivery.
    let n1 = Node::start("n1", &env, "api,dispatcher").await;
    let mut n2 = Node::start("n2", &env, "gateway").await;
    let n3 = Node::start("n3", &env, "api,gateway,dispatcher").await;
    let http = reqwest::Client::new();

    // Each role alone: no sessions without the gateway, no notify route without the api.
    let r = http
        .get(format!("{}/v1/connect", n1.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "no gateway role on n1");
    let r = http
        .post(format!("{}/v1/notify", n2.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "no api role on n2");

    let device = Device::start("phone-x", vec![n2.ws_url.clone()]);
    device.wait_sessions(1).await;
    let id = notify(&http, &n1.base, "phone-x").await.expect("202");
    device.wait_got(&id).await;
    assert!(
        !apns_ids(&apns).contains(&id),
        "delivered live, so APNs got nothing"
    );

    // kill -9 the session's node: the device is nowhere, the next one falls back.
    device.set_nodes(vec![]);
    n2.kill9();
    let id = notify(&http, &n1.base, "phone-x").await.expect("202");
    wait_for(Duration::from_secs(20), "fallback to APNs", || async {
        apns_ids(&apns).contains(&id).then_some(())
    })
    .await;
    assert!(!device.got(&id));

    // The device comes back on node 3: live again (node 1 dispatches, so cross-node).
    device.set_nodes(vec![n3.ws_url.clone()]);
    device.wait_sessions(2).await;
    let id = notify(&http, &n1.base, "phone-x").await.expect("202");
    device.wait_got(&id).await;
    assert!(!apns_ids(&apns).contains(&id));
}

/// Posts `count` notifications, the k-th for `devices[k % len]`, with `concurrency`
/// requests in flight, round-robin over `bases` (a refused or failed request is tried on
/// the next node); `on_progress(k)` runs after the k-th acceptance. Returns the accepted
/// (id, device) pairs.
async fn stream(
    bases: Vec<String>,
    devices: Vec<String>,
    count: usize,
    concurrency: usize,
    on_progress: impl Fn(usize) + Send + Sync + 'static,
) -> Vec<(String, String)> {
    let http = reqwest::Client::new();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let on_progress = Arc::new(on_progress);
    futures::stream::iter(0..count)
        .map(|k| {
            let (http, bases, accepted, on_progress) = (
                http.clone(),
                bases.clone(),
                accepted.clone(),
                on_progress.clone(),
            );
            let device = devices[k % devices.len()].clone();
            async move {
                for attempt in 0..200 {
                    let base = &bases[(k + attempt) % bases.len()];
                    if let Some(id) = notify(&http, base, &device).await {
                        let n = accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        on_progress(n);
                        return (id, device);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                panic!("notification {k} was never accepted by any node");
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

fn ids(accepted: &[(String, String)]) -> Vec<String> {
    accepted.iter().map(|(id, _)| id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_of_a_gateway_under_load_other_devices_keep_receiving_live_and_its_devices_fall_back()
{
    let vhost = TestVhost::new();
    let apns = ApnsDouble::start().await;
    let env = node_env(&vhost.url, &apns);
    let n1 = Node::start("n1", &env, "api,dispatcher").await;
    let mut doomed = Node::start("doomed", &env, "gateway").await;
    let survivor = Node::start("survivor", &env, "gateway").await;
    let names = |p: &str| (0..10).map(|k| format!("{p}-{k}")).collect::<Vec<_>>();
    let (on_doomed, on_survivor) = (names("d"), names("s"));
    let doomed_devices: Vec<Device> = on_doomed
        .iter()
        .map(|d| Device::start(d, vec![doomed.ws_url.clone()]))
        .collect();
    let survivor_devices: Vec<Device> = on_survivor
        .iter()
        .map(|d| Device::start(d, vec![survivor.ws_url.clone()]))
        .collect();
    for d in doomed_devices.iter().chain(&survivor_devices) {
        d.wait_sessions(1).await;
    }
    let (tx, mut third) = tokio::sync::mpsc::unbounded_channel();
    let all: Vec<String> = on_doomed.iter().chain(&on_survivor).cloned().collect();
    let streaming = tokio::spawn(stream(vec![n1.base.clone()], all, 1200, 16, move |k| {
        if k == 400 {
            let _ = tx.send(());
        }
    }));
    third.recv().await.unwrap();
    // The doomed node's devices stay away (they would reconnect elsewhere; here they wait,
    // so everything for them must fall back).
    for d in &doomed_devices {
        d.set_nodes(vec![]);
    }
    doomed.kill9();
    let accepted = streaming.await.unwrap();
    assert_eq!(accepted.len(), 1200);
    let every: Vec<&Device> = doomed_devices.iter().chain(&survivor_devices).collect();
    assert_all_delivered(&ids(&accepted), &every, &apns).await;

    // Isolation: every notification for a device on the surviving node reached it live,
    // through the whole crash (a dead node holds no delivery slot they need). On this
    // shared 2-core machine an ack can still miss the 500 ms ack_timeout under load; such
    // a notification is also sent to APNs (a duplicate, reported), never only there.
    let fallback: std::collections::HashSet<String> = apns_ids(&apns).into_iter().collect();
    let live: std::collections::HashSet<String> = survivor_devices
        .iter()
        .flat_map(|d| {
            d.seen
                .lock()
                .unwrap()
                .ids
                .keys()
                .cloned()
                .collect::<Vec<_>>()
        })
        .collect();
    let for_survivors: Vec<&String> = accepted
        .iter()
        .filter(|(_, dev)| on_survivor.contains(dev))
        .map(|(id, _)| id)
        .collect();
    let not_live: Vec<&&String> = for_survivors
        .iter()
        .filter(|id| !live.contains(**id))
        .collect();
    assert!(
        not_live.is_empty(),
        "{} of {} notifications for devices on the surviving node did not arrive live",
        not_live.len(),
        for_survivors.len()
    );
    let also_fell_back = for_survivors
        .iter()
        .filter(|id| fallback.contains(**id))
        .count();
    eprintln!(
        "surviving node: {} live, {also_fell_back} also via APNs (ack timeouts)",
        for_survivors.len()
    );
    // The dead node's devices were recognised as offline: their notifications fell back.
    let doomed_fell_back = accepted
        .iter()
        .filter(|(id, dev)| on_doomed.contains(dev) && fallback.contains(id))
        .count();
    assert!(doomed_fell_back > 0, "the dead node's devices fell back");
    eprintln!("after kill -9: {doomed_fell_back} fallbacks for the dead node's devices");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_moving_between_nodes_mid_stream_loses_nothing() {
    let vhost = TestVhost::new();
    let apns = ApnsDouble::start().await;
    let env = node_env(&vhost.url, &apns);
    let n1 = Node::start("n1", &env, "api,dispatcher").await;
    let n2 = Node::start("n2", &env, "gateway").await;
    let n3 = Node::start("n3", &env, "gateway").await;

    let old = Device::start("mover", vec![n2.ws_url.clone()]);
    old.wait_sessions(1).await;
    // Halfway, the device opens a session on node 3 (its client moved networks while the
    // old connection lingered): node 3's open event closes the older session on node 2.
    let (tx, mut halfway) = tokio::sync::mpsc::unbounded_channel();
    let devices = vec!["mover".to_owned()];
    let streaming = tokio::spawn(stream(vec![n1.base.clone()], devices, 2000, 32, move |k| {
        if k == 1000 {
            let _ = tx.send(());
        }
    }));
    halfway.recv().await.unwrap();
    old.set_nodes(vec![]);
    let new = Device::start("mover", vec![n3.ws_url.clone()]);
    new.wait_sessions(1).await;
    wait_for(Duration::from_secs(10), "old session replaced", || async {
        old.seen
            .lock()
            .unwrap()
            .closes
            .contains(&4001)
            .then_some(())
    })
    .await;
    let accepted = ids(&streaming.await.unwrap());
    assert_eq!(accepted.len(), 2000);
    assert_all_delivered(&accepted, &[&old, &new], &apns).await;
    let (on_old, on_new) = (
        old.seen.lock().unwrap().ids.len(),
        new.seen.lock().unwrap().ids.len(),
    );
    eprintln!("live on node 2: {on_old}, live on node 3: {on_new}");
    assert!(on_new > 0, "live delivery followed the device to node 3");
    drop((n1, n2, n3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_to_each_role_during_a_stream_loses_nothing() {
    let vhost = TestVhost::new();
    let apns = ApnsDouble::start().await;
    let env = node_env(&vhost.url, &apns);
    // Dispatchers first: they declare the topology the others only use.
    let mut disp1 = Node::start("disp1", &env, "dispatcher").await;
    let _disp2 = Node::start("disp2", &env, "dispatcher").await;
    let mut api1 = Node::start("api1", &env, "api").await;
    let api2 = Node::start("api2", &env, "api").await;
    let mut gw1 = Node::start("gw1", &env, "gateway").await;
    let gw2 = Node::start("gw2", &env, "gateway").await;

    let device = Arc::new(Device::start(
        "steady",
        vec![gw1.ws_url.clone(), gw2.ws_url.clone()],
    ));
    device.wait_sessions(1).await;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let bases = vec![api1.base.clone(), api2.base.clone()];
    let devices = vec!["steady".to_owned()];
    let streaming = tokio::spawn(stream(bases, devices, 1500, 16, move |k| {
        if k % 300 == 0 {
            let _ = tx.send(k);
        }
    }));
    // SIGTERM one node of each role while the stream runs; each must exit cleanly.
    rx.recv().await.unwrap();
    api1.sigterm();
    assert!(api1.wait_exit(Duration::from_secs(10)).await, "api1 exit 0");
    rx.recv().await.unwrap();
    disp1.sigterm();
    assert!(
        disp1.wait_exit(Duration::from_secs(10)).await,
        "disp1 exit 0"
    );
    rx.recv().await.unwrap();
    let before = device.seen.lock().unwrap().closes.clone();
    gw1.sigterm();
    assert!(gw1.wait_exit(Duration::from_secs(10)).await, "gw1 exit 0");
    let accepted = ids(&streaming.await.unwrap());
    assert_eq!(accepted.len(), 1500);
    let closes = device.seen.lock().unwrap().closes.clone();
    assert!(
        closes.contains(&4002),
        "gw1 told the device to reconnect elsewhere; session close codes: {before:?} before \
         gw1's SIGTERM, {closes:?} at the end"
    );
    assert_all_delivered(&accepted, &[&device], &apns).await;
}
