//! What the server writes: notification frames are bounded by notify.max_frame_bytes (the
//! outgoing buffer is sized from it, not from the inbound frame limit), and a frame this
//! node cannot write is its own failure, never counted or treated as the device's.

use herald::directory::LiveOutcome;

use crate::helpers::*;
use crate::support::fixtures::notification_with_data;

#[tokio::test]
async fn a_notification_frame_larger_than_the_inbound_limit_is_delivered() {
    let mut s = settings();
    // Devices may send at most 1 KiB; the server may still write 64 KiB notifications.
    s.gateway.max_frame_bytes = 1024;
    s.notify.max_frame_bytes = 64 * 1024;
    let app = spawn(s).await;
    let (ws, _) = connect(&app, "phone-big").await;
    let mut rx = spawn_acker(ws);
    let d = device("phone-big");
    let n = notification_with_data(40_000);
    assert_eq!(app.directory.deliver(&d, &n).await, LiveOutcome::Acked);
    let frame = rx.recv().await.expect("the frame");
    assert_eq!(frame["id"], n.id.to_string());
    assert_eq!(frame["data"]["k"].as_str().map(str::len), Some(40_000));
    assert!(app.directory.is_connected(&d));
    assert_eq!(app.closed("client_closed"), 0.0);
    app.stop().await;
}

#[tokio::test]
async fn a_frame_the_server_cannot_write_keeps_the_session() {
    let mut s = settings();
    s.notify.max_frame_bytes = 8 * 1024;
    let app = spawn(s).await;
    let (ws, _) = connect(&app, "phone-1").await;
    let mut rx = spawn_acker(ws);
    let d = device("phone-1");
    // Larger than anything this node writes (as if accepted under a larger limit before a
    // config change): not deliverable live, so the deliverer falls back...
    let big = notification_with_data(64 * 1024);
    assert_eq!(app.directory.deliver(&d, &big).await, LiveOutcome::Offline);
    assert_eq!(app.metric("herald_gateway_frames_unwritable_total"), 1.0);
    // ...but the device did nothing wrong: its session is neither closed nor counted as
    // closed by it, and the next notification reaches it on the same session.
    assert_eq!(app.closed("client_closed"), 0.0);
    assert_eq!(app.closed("server_error"), 0.0);
    assert!(app.directory.is_connected(&d));
    let small = notification_with_data(10);
    assert_eq!(app.directory.deliver(&d, &small).await, LiveOutcome::Acked);
    // Acked, so the device has read it: the next frame it saw is this one.
    let frame = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("in time")
        .expect("the frame");
    assert_eq!(frame["id"], small.id.to_string());
    assert_eq!(app.metric("herald_gateway_sessions_opened_total"), 1.0);
    app.stop().await;
}
