//! Cleartext to providers only to loopback unless `allow_insecure_endpoints`: the
//! service account's token_uri (which receives the signed OAuth2 assertion) included.

use herald::metrics::Metrics;
use herald::providers::Providers;

use crate::settings;
use crate::support::fcm_double::FcmDouble;

#[tokio::test]
async fn a_cleartext_token_uri_off_loopback_is_refused_unless_allowed() {
    let double = FcmDouble::start().await;
    let mut s = settings();
    double.configure(&mut s);
    // The double's own key file, with its token_uri moved off loopback.
    let mut sa: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&double.service_account_file).unwrap()).unwrap();
    sa["token_uri"] = "http://oauth.example.com/token".into();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sa.json");
    std::fs::write(&file, sa.to_string()).unwrap();
    s.fcm.service_account_file = file.display().to_string();

    let err = match Providers::from_settings(&s, &Metrics::new()) {
        Ok(_) => panic!("a cleartext token_uri off loopback was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("token_uri"), "{err}");
    assert!(err.contains("allow_insecure_endpoints"), "{err}");

    s.fcm.allow_insecure_endpoints = true;
    assert!(Providers::from_settings(&s, &Metrics::new()).is_ok());
    // On loopback (the double as it is) no opt-in is needed.
    let mut s = settings();
    double.configure(&mut s);
    assert!(Providers::from_settings(&s, &Metrics::new()).is_ok());
}
