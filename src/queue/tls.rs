//! TLS to the broker: `amqps://` verified against the platform's roots plus `queue.ca_file`.
//!
//! lapin (with its default `rustls` feature) already speaks `amqps://` and verifies the
//! broker against the platform trust store; what it needs from herald is the private CA a
//! Kubernetes broker's certificate is usually issued by (cert-manager), handed over as
//! `OwnedTLSConfig::cert_chain`. That CA is *added* to the platform roots, not used
//! instead of them, as `apns.ca_file` / `fcm.ca_file` do.
//!
//! The CA file is checked once at start-up ([`check_ca_file`], from `Settings::validate`:
//! a bad file is a configuration error that stops `serve` and `check-config`), and read
//! again at every connect, so a CA rotated in its mounted Secret is picked up at the next
//! reconnect without a restart.

use lapin::tcp::OwnedTLSConfig;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connect, Connection, ConnectionProperties};

/// Reads `ca_file` as a PEM bundle holding at least one certificate; the error says which
/// of "cannot read", "not PEM" or "no certificate" it is.
///
/// reqwest's parser (rustls' own PEM reader, already a dependency for the provider
/// clients) rather than a new crate: it is the one `apns.ca_file` and `fcm.ca_file` use, so
/// all three CA keys accept and refuse the same files.
fn read_ca_bundle(ca_file: &str) -> Result<String, String> {
    let pem = std::fs::read(ca_file).map_err(|e| format!("cannot read {ca_file}: {e}"))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{ca_file} is not a PEM certificate bundle: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "{ca_file} holds no certificate (want one or more -----BEGIN CERTIFICATE----- blocks)"
        ));
    }
    String::from_utf8(pem).map_err(|_| format!("{ca_file} is not UTF-8 PEM text"))
}

/// Start-up check of `queue.ca_file` against the broker URL (`None`: the embedded queue).
/// A CA with a cleartext `amqp://` URL is refused rather than ignored: whoever set it
/// meant the connection to be encrypted, and a silent cleartext connection would hide it.
pub fn check_ca_file(url: Option<&str>, ca_file: &str) -> Result<(), String> {
    if ca_file.is_empty() {
        return Ok(());
    }
    match url {
        None => {
            return Err("is set, but queue.url is empty (the embedded queue has no broker)".into());
        }
        Some(u) if !u.starts_with("amqps://") => {
            return Err("is set, but queue.url is not amqps:// (the CA would be ignored and AMQP sent in the clear)".into());
        }
        Some(_) => {}
    }
    read_ca_bundle(ca_file).map(|_| ())
}

/// Opens the broker connection: `amqp://` in the clear, `amqps://` over TLS verified against
/// the platform roots plus `ca_file` (when set). The one place herald connects to RabbitMQ.
pub async fn connect(
    uri: AMQPUri,
    props: ConnectionProperties,
    ca_file: &str,
) -> anyhow::Result<Connection> {
    let mut tls = OwnedTLSConfig::default();
    if uri.scheme == AMQPScheme::AMQPS && !ca_file.is_empty() {
        tls.cert_chain =
            Some(read_ca_bundle(ca_file).map_err(|e| anyhow::anyhow!("queue.ca_file: {e}"))?);
    }
    let runtime = lapin::runtime::default_runtime()?;
    Ok(uri.connect_with_config(props, tls, runtime).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    const TLS_URL: Option<&str> = Some("amqps://u:p@broker:5671/%2f");

    #[test]
    fn unset_ca_file_is_fine_with_any_url() {
        assert_eq!(check_ca_file(None, ""), Ok(()));
        assert_eq!(check_ca_file(Some("amqp://h"), ""), Ok(()));
        assert_eq!(check_ca_file(TLS_URL, ""), Ok(()));
    }

    #[test]
    fn a_real_ca_bundle_is_accepted() {
        let f = file_with(&ca_pem());
        assert_eq!(check_ca_file(TLS_URL, f.path().to_str().unwrap()), Ok(()));
    }

    #[test]
    fn a_missing_file_says_it_cannot_be_read() {
        let err = check_ca_file(TLS_URL, "/nonexistent/herald-ca.pem").unwrap_err();
        assert!(
            err.starts_with("cannot read /nonexistent/herald-ca.pem"),
            "{err}"
        );
    }

    #[test]
    fn a_file_without_a_certificate_is_refused() {
        // A private key (a common mix-up: the Secret's tls.key instead of ca.crt), and text.
        let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        for text in [key.as_str(), "not a certificate\n", ""] {
            let f = file_with(text);
            let err = check_ca_file(TLS_URL, f.path().to_str().unwrap()).unwrap_err();
            assert!(err.contains("holds no certificate"), "{err}");
        }
    }

    #[test]
    fn a_corrupt_pem_block_is_refused() {
        let pem = ca_pem();
        let truncated = &pem[..pem.len() / 2];
        let f = file_with(truncated);
        let err = check_ca_file(TLS_URL, f.path().to_str().unwrap()).unwrap_err();
        assert!(err.contains("is not a PEM certificate bundle"), "{err}");
    }

    #[test]
    fn a_ca_file_without_amqps_is_refused() {
        let f = file_with(&ca_pem());
        let path = f.path().to_str().unwrap();
        let err = check_ca_file(Some("amqp://u:p@broker:5672/%2f"), path).unwrap_err();
        assert!(err.contains("not amqps://"), "{err}");
        let err = check_ca_file(None, path).unwrap_err();
        assert!(err.contains("queue.url is empty"), "{err}");
    }
}
