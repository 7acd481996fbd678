//! Value types and checks that settings validation and the running service share: endpoint
//! URLs, CA bundles, webhook signing keys, IP networks. A leaf: it imports nothing of
//! herald's, so `config` can validate with the same code the runtime uses without an
//! import circle (config -> events/gateway/providers -> config).

use std::fmt;
use std::net::IpAddr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{KeyInit as _, Mac as _};

/// Signing key bounds, decoded bytes. The Standard Webhooks spec asks for a random secret of
/// at least 24 bytes (192 bits) and at most 64 (512 bits); HMAC-SHA256 hashes a longer key
/// down anyway, and a shorter one is guessable.
const KEY_MIN_BYTES: usize = 24;
const KEY_MAX_BYTES: usize = 64;

/// An endpoint URL as the design's scheme rules read it: `https://`, or cleartext `http://`
/// only to a loopback host (a local double, a sidecar) unless `allow_insecure` (the
/// provider's `allow_insecure_endpoints`) says the operator means it. Cleartext elsewhere
/// would put provider JWTs, OAuth2 assertions and device tokens on the network.
pub fn check_url(key: &str, url: &str, allow_insecure: bool) -> anyhow::Result<String> {
    use anyhow::Context;
    let url = url.trim_end_matches('/');
    let parsed =
        reqwest::Url::parse(url).with_context(|| format!("{key}: `{url}` is not a URL"))?;
    anyhow::ensure!(
        matches!(parsed.scheme(), "https" | "http") && parsed.host().is_some(),
        "{key}: `{url}` must be an https:// URL (or http:// to a loopback host)"
    );
    if parsed.scheme() == "http" {
        let host = parsed.host_str().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        anyhow::ensure!(
            loopback || allow_insecure,
            "{key}: `{url}` is cleartext http:// to a host that is not loopback; use https://, \
             or set allow_insecure_endpoints = true in this provider's section if you mean it"
        );
    }
    Ok(url.to_owned())
}

/// A webhook signing key: the bytes behind a Standard Webhooks `whsec_<base64>` secret.
/// `Debug` never shows them.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl SigningKey {
    /// Parses `whsec_<base64>` (standard alphabet, padded), 24 to 64 bytes once decoded.
    /// The prefix is required, as the spec's serialization has it: it tells a signing
    /// secret from any other base64 at a glance, and a secret pasted without it is more
    /// likely some other value than this one. Errors never repeat the secret.
    pub fn parse(text: &str) -> Result<SigningKey, String> {
        let b64 = text
            .strip_prefix("whsec_")
            .ok_or("must be `whsec_` followed by the base64 of 24 to 64 random bytes")?;
        let bytes = BASE64
            .decode(b64)
            .map_err(|_| "the part after `whsec_` is not valid base64".to_owned())?;
        if !(KEY_MIN_BYTES..=KEY_MAX_BYTES).contains(&bytes.len()) {
            return Err(format!(
                "decodes to {} bytes; the Standard Webhooks spec asks for {KEY_MIN_BYTES} to \
                 {KEY_MAX_BYTES} random bytes",
                bytes.len()
            ));
        }
        Ok(SigningKey(bytes))
    }

    /// The `webhook-signature` value for one attempt: `v1,` + base64 of
    /// HMAC-SHA256(key, `{id}.{timestamp}.{body}`), the Standard Webhooks symmetric scheme.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0)
            .expect("HMAC takes a key of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey([redacted])")
    }
}

/// Checks a webhook URL: `https://`, or cleartext `http://` only to a loopback host (a
/// local receiver or sidecar). Events carry provider tokens (`token_dead`) and device ids;
/// the signature proves where they came from but hides nothing, so elsewhere they must be
/// encrypted. The error never repeats the URL: it may hold a credential.
pub fn check_webhook_url(url: &str) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("is not a URL ({e})"))?;
    let host = match (parsed.scheme(), parsed.host_str()) {
        (_, None) => return Err("has no host".into()),
        ("https", _) => return Ok(parsed),
        ("http", Some(host)) => host.trim_start_matches('[').trim_end_matches(']'),
        _ => return Err("must be an https:// URL (or http:// to a loopback host)".into()),
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Err(
            "is cleartext http:// to a host that is not loopback; events carry provider \
             tokens, so use https://"
                .into(),
        );
    }
    Ok(parsed)
}

/// Reads `events.ca_file`: a PEM bundle of at least one certificate, trusted on top of the
/// platform's roots. The same parser (reqwest's, i.e. rustls') as `apns.ca_file`,
/// `fcm.ca_file` and `queue.ca_file`, so all four accept and refuse the same files.
pub fn read_ca_file(ca_file: &str) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(ca_file).map_err(|e| format!("cannot read {ca_file}: {e}"))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{ca_file} is not a PEM certificate bundle: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "{ca_file} holds no certificate (want one or more -----BEGIN CERTIFICATE----- blocks)"
        ));
    }
    Ok(certs)
}

/// An IP network (`10.0.0.0/8`, `fd00::/8`, or one address) for `gateway.trusted_proxies`.
/// Hand-written: twenty lines against a crate for one `contains`.
#[derive(Debug, Clone, Copy)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn parse(s: &str) -> Option<IpNet> {
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (s.trim().parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(IpNet { addr, prefix })
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        // An IPv4 client seen on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(*ip),
            v4 => *v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}
