//! `herald connect` run as a real subprocess.

use std::process::Stdio;
use std::time::Duration;

use herald::directory::LiveOutcome;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::helpers::*;
use crate::support::fixtures::notification_with_data;
use crate::support::wait_for;

fn herald_connect(url: &str, token: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["connect", "--url", url, "--token", token])
        .args(["--backoff-min", "50ms", "--backoff-max", "500ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("herald runs")
}

/// A port free now, to restart a server on the same address.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[tokio::test]
async fn receives_acks_dedupes_and_reconnects_after_a_restart() {
    let port = free_port();
    let mut s = settings();
    s.http.addr = format!("127.0.0.1:{port}");
    let app = spawn(s.clone()).await;
    let mut child = herald_connect(&app.ws_url(), &token("phone-cli"));
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let d = device("phone-cli");
    wait_for(WAIT, "the client's session", || async {
        app.directory.is_connected(&d).then_some(())
    })
    .await;

    let first = notification_with_data(10);
    assert_eq!(app.directory.deliver(&d, &first).await, LiveOutcome::Acked);
    // The same notification again (a redelivery): acked, but not printed twice.
    assert_eq!(app.directory.deliver(&d, &first).await, LiveOutcome::Acked);
    let second = notification_with_data(10);
    assert_eq!(app.directory.deliver(&d, &second).await, LiveOutcome::Acked);
    for expected in [&first, &second] {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("a line in time")
            .expect("stdout readable")
            .expect("a line");
        let v: serde_json::Value = serde_json::from_str(&line).expect("one JSON object per line");
        assert_eq!(v["id"], expected.id.to_string(), "{line}");
        assert_eq!(v["data"]["k"], "v".repeat(10));
    }

    // Restart the server on the same port: the client is told to reconnect, and does.
    app.stop().await;
    let app = spawn(s).await;
    wait_for(
        Duration::from_secs(10),
        "the client's reconnection",
        || async { app.directory.is_connected(&d).then_some(()) },
    )
    .await;
    let third = notification_with_data(10);
    assert_eq!(app.directory.deliver(&d, &third).await, LiveOutcome::Acked);
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("a line in time")
        .expect("stdout readable")
        .expect("a line");
    assert!(line.contains(&third.id.to_string()), "{line}");
    assert_eq!(child.try_wait().expect("status"), None, "still running");
    child.kill().await.expect("killed");
    app.stop().await;
}

#[tokio::test]
async fn reconnects_with_backoff_while_the_server_is_down() {
    let port = free_port();
    let mut s = settings();
    s.http.addr = format!("127.0.0.1:{port}");
    // Nothing listens yet: the client keeps retrying with backoff.
    let mut child = herald_connect(&format!("ws://127.0.0.1:{port}/v1/connect"), &token("late"));
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    for _ in 0..3 {
        let line = tokio::time::timeout(WAIT, stderr.next_line())
            .await
            .expect("a log line")
            .unwrap()
            .unwrap_or_default();
        assert!(
            line.contains("reconnect") || line.contains("connect failed"),
            "{line}"
        );
    }
    let app = spawn(s).await;
    wait_for(Duration::from_secs(10), "the client's session", || async {
        app.directory.is_connected(&device("late")).then_some(())
    })
    .await;
    child.kill().await.expect("killed");
    app.stop().await;
}

#[tokio::test]
async fn exits_non_zero_on_401() {
    let app = spawn(settings()).await;
    let child = herald_connect(&app.ws_url(), "not-a-token");
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("exits instead of retrying forever")
        .expect("output");
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("401"), "{stderr}");
    assert!(out.stdout.is_empty());
    app.stop().await;
}
