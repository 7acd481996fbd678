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

/// A TLS front like an ingress: terminates TLS with a leaf for `localhost` from a fresh CA
/// and splices the plaintext to `backend`. Returns its address, the CA's PEM, and a count
/// of completed TLS handshakes (so the test knows TLS really carried the session).
async fn tls_front(
    backend: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    String,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio_rustls::rustls;
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counted = handshakes.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (addr, ca_cert.pem(), handshakes)
}

#[tokio::test]
async fn connects_over_wss_with_a_ca_file() {
    use std::sync::atomic::Ordering;
    let app = spawn(settings()).await;
    let (front, ca_pem, handshakes) = tls_front(app.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let url = format!("wss://localhost:{}/v1/connect", front.port());

    // Without the CA the front's certificate is not trusted: no session, and the client
    // says why (it keeps retrying: the front may get a valid certificate).
    let mut untrusting = herald_connect(&url, &token("phone-tls"));
    let mut stderr = BufReader::new(untrusting.stderr.take().expect("stderr")).lines();
    loop {
        let line = tokio::time::timeout(WAIT, stderr.next_line())
            .await
            .expect("a log line")
            .unwrap()
            .expect("a line");
        if line.contains("connect failed") {
            assert!(line.to_lowercase().contains("certificate"), "{line}");
            break;
        }
    }
    untrusting.kill().await.expect("killed");
    assert!(!app.directory.is_connected(&device("phone-tls")));
    assert_eq!(
        handshakes.load(Ordering::SeqCst),
        0,
        "no TLS handshake completed"
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["connect", "--url", &url, "--token", &token("phone-tls")])
        .args(["--ca-file", ca_file.to_str().unwrap()])
        .args(["--backoff-min", "50ms", "--backoff-max", "500ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("herald runs");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let d = device("phone-tls");
    wait_for(WAIT, "the client's session through TLS", || async {
        app.directory.is_connected(&d).then_some(())
    })
    .await;
    let n = notification_with_data(10);
    assert_eq!(app.directory.deliver(&d, &n).await, LiveOutcome::Acked);
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("a line in time")
        .expect("stdout readable")
        .expect("a line");
    assert!(line.contains(&n.id.to_string()), "{line}");
    // The session went through the front's TLS (the failed attempts above did not finish a
    // handshake; this one did).
    assert!(handshakes.load(Ordering::SeqCst) >= 1);
    child.kill().await.expect("killed");
    app.stop().await;
}
