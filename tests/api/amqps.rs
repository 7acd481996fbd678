//! `amqps://` with `queue.ca_file`, for real: the machine's RabbitMQ has no TLS listener (and
//! is shared, so it cannot be restarted to get one), so each test puts a TLS terminator in
//! front of it: a rustls server on 127.0.0.1:0 with a certificate from a CA made for the
//! test, forwarding the decrypted bytes to 127.0.0.1:5672. herald speaks AMQP over that TLS
//! session to the real broker, exactly as it would to a TLS listener.

use std::sync::Arc;
use std::time::Duration;

use herald::config::Secret;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::support::{self, TestVhost};

/// What one TLS client handshake at the terminator ended in.
#[derive(Debug)]
enum Handshake {
    Ok,
    Failed(String),
}

/// The terminator: its port, the CA's PEM, and every handshake's result.
struct TlsFront {
    port: u16,
    ca_pem: String,
    handshakes: mpsc::UnboundedReceiver<Handshake>,
}

fn ca_and_acceptor() -> (tokio_rustls::TlsAcceptor, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    use tokio_rustls::rustls;
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
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
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        ca_cert.pem(),
    )
}

async fn tls_front() -> TlsFront {
    let (acceptor, ca_pem) = ca_and_acceptor();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, handshakes) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match acceptor.accept(client).await {
                    Ok(mut tls) => {
                        let _ = tx.send(Handshake::Ok);
                        let mut broker = TcpStream::connect("127.0.0.1:5672").await.unwrap();
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Handshake::Failed(e.to_string()));
                    }
                }
            });
        }
    });
    TlsFront {
        port,
        ca_pem,
        handshakes,
    }
}

fn write_pem(pem: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), pem).unwrap();
    f
}

/// The API publishes over amqps:// (TLS verified with queue.ca_file) to the real broker:
/// the 202 means the broker confirmed, and the message is in the work queue.
#[tokio::test]
async fn notify_is_queued_over_amqps_with_the_configured_ca() {
    let vhost = TestVhost::new();
    vhost.declare_dispatcher_topology(&vhost.settings()).await;
    let mut front = tls_front().await;
    let ca = write_pem(&front.ca_pem);
    let mut settings = support::api_only(vhost.settings());
    settings.queue.url = Secret::new(format!(
        "amqps://guest:guest@127.0.0.1:{}/{}",
        front.port, vhost.name
    ));
    settings.queue.ca_file = ca.path().to_str().unwrap().to_owned();
    settings
        .validate()
        .expect("amqps:// with a CA file is a valid config");
    let app = support::spawn_app(settings).await;

    let Some(Handshake::Ok) = front.handshakes.recv().await else {
        panic!("herald's TLS handshake with the terminator failed");
    };
    let resp = app.post_notify(&support::notify_body(&["dev-tls"])).await;
    assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    support::wait_for(
        Duration::from_secs(5),
        "the message in herald.work",
        || async { (vhost.queue_len("herald.work") == Some(1)).then_some(()) },
    )
    .await;
    app.stop().await;
}

/// A broker certificate from another CA is refused: herald aborts the TLS handshake (unknown
/// issuer) on every attempt, never connects, and /readyz stays 503.
#[tokio::test]
async fn a_broker_certificate_from_another_ca_is_refused() {
    let vhost = TestVhost::new();
    let mut front = tls_front().await;
    let (_, other_ca) = ca_and_acceptor();
    let ca = write_pem(&other_ca);
    let mut settings = support::api_only(vhost.settings());
    settings.queue.url = Secret::new(format!(
        "amqps://guest:guest@127.0.0.1:{}/{}",
        front.port, vhost.name
    ));
    settings.queue.ca_file = ca.path().to_str().unwrap().to_owned();
    let app = support::spawn_app(settings).await;

    // herald aborts the handshake (the terminator sees it end early); it keeps retrying
    // and keeps refusing. The same terminator with the right CA works (the test above), so
    // the CA is the only difference.
    for attempt in 1..=2 {
        match front.handshakes.recv().await {
            Some(Handshake::Failed(e)) => eprintln!("attempt {attempt}: refused ({e})"),
            other => panic!("attempt {attempt}: want a refused handshake, got {other:?}"),
        }
    }
    assert!(!app.queue.is_connected());
    assert_eq!(app.get("/readyz").await.status(), 503);
    app.stop().await;
}

/// A CA file that is not a certificate is a configuration error naming the key, before
/// anything connects (so `herald serve` and `herald check-config` refuse it).
#[tokio::test]
async fn a_bad_ca_file_is_a_config_error() {
    let key_not_cert = write_pem(&rcgen::KeyPair::generate().unwrap().serialize_pem());
    let mut settings = support::test_settings();
    settings.queue.url = Secret::new("amqps://u:p@broker.example:5671/%2f");
    settings.queue.ca_file = key_not_cert.path().to_str().unwrap().to_owned();
    let err = settings.validate().unwrap_err().to_string();
    assert!(
        err.contains("queue.ca_file") && err.contains("holds no certificate"),
        "{err}"
    );

    settings.queue.ca_file = "/nonexistent/ca.crt".into();
    let err = settings.validate().unwrap_err().to_string();
    assert!(
        err.contains("queue.ca_file") && err.contains("cannot read"),
        "{err}"
    );

    let ca = write_pem(&ca_and_acceptor().1);
    settings.queue.ca_file = ca.path().to_str().unwrap().to_owned();
    settings.queue.url = Secret::new("amqp://u:p@broker.example:5672/%2f");
    let err = settings.validate().unwrap_err().to_string();
    assert!(
        err.contains("queue.ca_file") && err.contains("not amqps://"),
        "{err}"
    );
}
