//! Session behaviour: heartbeat, acks, replacement, slow readers, garbage, shutdown.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use herald::directory::LiveOutcome;
use herald::gateway::protocol::close;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::*;
use crate::support::fixtures::notification_with_data;
use crate::support::wait_for;

#[tokio::test]
async fn hello_carries_the_session_parameters() {
    let app = spawn(settings()).await;
    let (_ws, hello) = connect(&app, "phone-1").await;
    assert_eq!(hello["ping_interval_ms"], 100);
    assert_eq!(hello["pong_timeout_ms"], 200);
    assert_eq!(hello["ack_timeout_ms"], 300);
    assert_eq!(hello["max_frame_bytes"], 65536);
    assert!(hello["session_id"].as_str().is_some_and(|s| !s.is_empty()));
    app.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_declared_dead() {
    let app = spawn(settings()).await;
    let (mut ws, _) = connect(&app, "phone-1").await;
    let d = device("phone-1");
    assert!(app.directory.is_connected(&d));
    // From here the socket is not polled, so tungstenite answers no pings.
    let stopped = Instant::now();
    wait_for(WAIT, "the pong-timeout close", || async {
        (app.closed("pong_timeout") == 1.0).then_some(())
    })
    .await;
    let took = stopped.elapsed();
    // ping_interval + pong_timeout = 300 ms, plus scheduling slack.
    assert!(
        took < Duration::from_millis(800),
        "declared dead after {took:?}"
    );
    assert!(!app.directory.is_connected(&d));
    assert_eq!(
        app.directory.deliver(&d, &notification_with_data(10)).await,
        LiveOutcome::Offline
    );
    assert_eq!(app.metric("herald_gateway_sessions_active"), 0.0);
    let (code, _) = expect_close(&mut ws).await;
    assert_eq!(code, close::PONG_TIMEOUT);
    app.stop().await;
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_and_rtt_is_measured() {
    let app = spawn(settings()).await;
    let (ws, _) = connect(&app, "phone-1").await;
    let _rx = spawn_reader(ws);
    wait_for(WAIT, "a few ping round trips", || async {
        (app.metric("herald_gateway_ping_rtt_seconds_count") >= 5.0).then_some(())
    })
    .await;
    assert!(app.directory.is_connected(&device("phone-1")));
    assert_eq!(app.closed("pong_timeout"), 0.0);
    app.stop().await;
}

#[tokio::test]
async fn acked_and_not_acked() {
    let app = spawn(settings()).await;
    let (ws, _) = connect(&app, "acker").await;
    let mut acked_rx = spawn_acker(ws);
    let (ws, _) = connect(&app, "silent").await;
    let mut silent_rx = spawn_reader(ws);

    let n = notification_with_data(10);
    assert_eq!(
        app.directory.deliver(&device("acker"), &n).await,
        LiveOutcome::Acked
    );
    let frame = acked_rx.recv().await.expect("frame");
    assert_eq!(frame["type"], "notification");
    assert_eq!(frame["id"], n.id.to_string());
    assert_eq!(frame["data"]["k"], "v".repeat(10));
    assert_eq!(frame["priority"], "high");
    assert!(
        frame.get("targets").is_none(),
        "provider routes never go to devices"
    );

    let n = notification_with_data(10);
    let started = Instant::now();
    assert_eq!(
        app.directory.deliver(&device("silent"), &n).await,
        LiveOutcome::NotAcked
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        silent_rx.recv().await.expect("frame")["id"],
        n.id.to_string()
    );
    assert_eq!(app.metric("herald_gateway_acks_total"), 1.0);
    assert_eq!(app.metric("herald_gateway_ack_timeouts_total"), 1.0);
    // The silent one still answers pings: not acking does not kill the session.
    assert!(app.directory.is_connected(&device("silent")));
    app.stop().await;
}

#[tokio::test]
async fn a_newer_session_replaces_the_older() {
    let app = spawn(settings()).await;
    let (mut old, _) = connect(&app, "phone-1").await;
    let (new, _) = connect(&app, "phone-1").await;
    let (code, _) = expect_close(&mut old).await;
    assert_eq!(code, close::REPLACED);
    let mut rx = spawn_acker(new);
    let n = notification_with_data(10);
    assert_eq!(
        app.directory.deliver(&device("phone-1"), &n).await,
        LiveOutcome::Acked
    );
    assert_eq!(rx.recv().await.expect("frame")["id"], n.id.to_string());
    assert_eq!(app.closed("replaced"), 1.0);
    assert_eq!(app.metric("herald_gateway_sessions_active"), 1.0);
    app.stop().await;
}

#[tokio::test]
async fn a_slow_reader_is_closed_without_stalling_others() {
    let mut s = settings();
    // Long enough that the heartbeat does not end the stalled session first.
    s.gateway.ping_interval = Duration::from_secs(30);
    s.gateway.ack_timeout = Duration::from_secs(5);
    s.gateway.send_buffer = 4;
    let app = spawn(s).await;
    let (mut slow, _) = connect(&app, "slow").await;
    let (fast, _) = connect(&app, "fast").await;
    let mut fast_rx = spawn_acker(fast);
    let d = device("slow");
    // The slow client never reads: 60 KiB frames fill the socket buffers, then the
    // session's pending write, then its send buffer.
    let mut tasks = Vec::new();
    wait_for(Duration::from_secs(20), "the slow-consumer close", || {
        for _ in 0..20 {
            let dir = app.directory.clone();
            let d = d.clone();
            tasks.push(tokio::spawn(async move {
                dir.deliver(&d, &notification_with_data(60_000)).await
            }));
        }
        let closed = app.closed("slow_consumer") == 1.0;
        async move { closed.then_some(()) }
    })
    .await;
    assert!(!app.directory.is_connected(&d));
    // The other session is unaffected.
    let n = notification_with_data(10);
    assert_eq!(
        app.directory.deliver(&device("fast"), &n).await,
        LiveOutcome::Acked
    );
    assert_eq!(fast_rx.recv().await.expect("frame")["id"], n.id.to_string());
    // Every delivery to the slow one ends as not delivered.
    for t in tasks {
        assert_ne!(t.await.unwrap(), LiveOutcome::Acked);
    }
    // Drain what the kernel buffered. The close frame itself may not fit through the full
    // pipe (the server gives it CLOSE_WRITE_TIMEOUT, then drops the connection), so a reset
    // is an acceptable end too; if a close frame arrives, it says slow consumer.
    loop {
        match tokio::time::timeout(WAIT, slow.next())
            .await
            .expect("frames")
        {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), close::SLOW_CONSUMER);
                break;
            }
            Some(Ok(Message::Close(None))) => panic!("close without a code"),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break,
        }
    }
    app.stop().await;
}

/// A burst of deliveries larger than the send buffer, to a device that reads and acks
/// everything: the buffer fills for a moment (every deliverer runs before the session task
/// writes a frame), which is not a slow device. Several dispatchers with `queue.prefetch`
/// in flight each do this to one busy device; closing it with 4004 moved a healthy device
/// off its node (`tests/cluster/processes.rs::sigterm_to_each_role_during_a_stream_…`).
#[tokio::test]
async fn a_burst_larger_than_the_send_buffer_to_a_reading_device_is_all_acked() {
    let mut s = settings();
    s.gateway.send_buffer = 4;
    // The burst is what is under test, not the heartbeat or the ack round trip on a loaded
    // machine.
    s.gateway.ping_interval = Duration::from_secs(30);
    s.gateway.pong_timeout = Duration::from_secs(10);
    s.gateway.ack_timeout = Duration::from_secs(5);
    let app = spawn(s).await;
    let (ws, _) = connect(&app, "busy").await;
    let mut frames = spawn_acker(ws);
    let d = device("busy");
    let burst: Vec<_> = (0..40)
        .map(|_| {
            let (dir, d) = (app.directory.clone(), d.clone());
            tokio::spawn(async move { dir.deliver(&d, &notification_with_data(10)).await })
        })
        .collect();
    for t in burst {
        let outcome = t.await.unwrap();
        let closes = ["slow_consumer", "pong_timeout", "client_closed"].map(|r| app.closed(r));
        assert_eq!(
            outcome,
            LiveOutcome::Acked,
            "sessions closed (slow consumer, pong timeout, client): {closes:?}"
        );
    }
    for _ in 0..40 {
        assert_eq!(frames.recv().await.expect("frame")["type"], "notification");
    }
    assert_eq!(app.closed("slow_consumer"), 0.0);
    assert!(app.directory.is_connected(&d));
    app.stop().await;
}

#[tokio::test]
async fn garbage_frames_get_errors_then_a_close() {
    let app = spawn(settings()).await;
    let (mut ws, _) = connect(&app, "phone-1").await;
    ws.send(Message::Text("not json".into())).await.unwrap();
    let err = next_json(&mut ws).await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "bad_frame");
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["code"], "binary_not_supported");
    send_json(&mut ws, serde_json::json!({"type": "launch_missiles"})).await;
    assert_eq!(next_json(&mut ws).await["code"], "bad_frame");
    send_json(
        &mut ws,
        serde_json::json!({"type": "ack", "id": "not-a-uuid"}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["code"], "bad_frame");
    // A valid frame in between is still served.
    send_json(&mut ws, serde_json::json!({"type": "ping", "nonce": "n-1"})).await;
    assert_eq!(
        next_json(&mut ws).await,
        serde_json::json!({"type": "pong", "nonce": "n-1"})
    );
    // The fifth garbage frame (gateway.max_bad_frames) closes the session.
    ws.send(Message::Text("{".into())).await.unwrap();
    let (code, _) = expect_close(&mut ws).await;
    assert_eq!(code, close::PROTOCOL_ERROR);
    wait_for(WAIT, "the protocol_error count", || async {
        (app.closed("protocol_error") == 1.0).then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009() {
    let app = spawn(settings()).await;
    let (mut ws, _) = connect(&app, "phone-1").await;
    ws.send(Message::Text("x".repeat(65_537).into()))
        .await
        .unwrap();
    let (code, _) = expect_close(&mut ws).await;
    assert_eq!(code, close::MESSAGE_TOO_BIG);
    assert!(
        !app.directory.is_connected(&device("phone-1")) || {
            wait_for(WAIT, "unregistered", || async {
                (!app.directory.is_connected(&device("phone-1"))).then_some(())
            })
            .await;
            true
        }
    );
    app.stop().await;
}

#[tokio::test]
async fn shutdown_finishes_in_flight_acks_then_says_reconnect_elsewhere() {
    let mut s = settings();
    s.gateway.ack_timeout = Duration::from_secs(5);
    let app = spawn(s).await;
    let (mut ws, _) = connect(&app, "phone-1").await;
    let dir = app.directory.clone();
    let n = notification_with_data(10);
    let id = n.id.to_string();
    let delivery = tokio::spawn(async move { dir.deliver(&device("phone-1"), &n).await });
    let frame = next_json(&mut ws).await;
    assert_eq!(frame["id"], id);
    // Shutdown starts while the delivery waits for its ack.
    app.shutdown.cancel();
    // New sessions are refused from now on.
    wait_for(WAIT, "new sessions refused", || async {
        try_connect(&app, Some(&token("phone-2")))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    send_json(&mut ws, serde_json::json!({"type": "ack", "id": id})).await;
    assert_eq!(delivery.await.unwrap(), LiveOutcome::Acked);
    let (code, reason) = expect_close(&mut ws).await;
    assert_eq!(code, close::SHUTDOWN);
    let after: u64 = reason
        .strip_prefix("reconnect_after_ms=")
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("advised delay in {reason:?}"));
    assert!(after < 100, "within gateway.reconnect_spread: {after}");
    let _ = app.task.await;
}
