//! The binary's start-up contract: a bad setting exits non-zero naming the key; a config
//! file and environment variables layer over the defaults.

use std::process::Command;

fn herald(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("herald runs")
}

#[test]
fn a_bad_setting_exits_2_naming_the_key() {
    for (var, value, key) in [
        ("HERALD__HTTP__ADDR", "not-an-address", "http.addr"),
        ("HERALD__QUEUE__URL", "redis://localhost", "queue.url"),
        ("HERALD__GATEWAY__PING_INTERVAL", "often", "ping_interval"),
    ] {
        let out = herald(&["serve"], &[(var, value)]);
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{var}={value}: {stderr}");
    }
}

#[test]
fn config_file_then_env_layer_over_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("herald.toml");
    std::fs::write(
        &file,
        "[http]\naddr = \"127.0.0.1:9999\"\n[queue]\nprefix = \"from-file\"\nprefetch = 7\n",
    )
    .unwrap();
    let out = herald(
        &["check-config", "--config", file.to_str().unwrap()],
        &[("HERALD__QUEUE__PREFETCH", "9")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("\"127.0.0.1:9999\""),
        "file sets http.addr"
    );
    assert!(printed.contains("\"from-file\""), "file sets queue.prefix");
    assert!(printed.contains("prefetch: 9"), "env beats the file");
    // A missing --config file is an error, not silently the defaults.
    let out = herald(
        &["check-config", "--config", "/nonexistent/herald.toml"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn secrets_are_redacted_when_settings_are_printed() {
    let out = herald(
        &["check-config"],
        &[
            ("HERALD__AUTH__API_KEYS", "very-secret-api-key-0123456789"),
            (
                "HERALD__QUEUE__URL",
                "amqp://user:hunter2hunter2@127.0.0.1:5672/%2f",
            ),
        ],
    );
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(!printed.contains("very-secret-api-key"), "{printed}");
    assert!(!printed.contains("hunter2"), "{printed}");
    assert!(printed.contains("redacted"));
}

/// What `serve` loads only when it builds the providers (the .p8 key with its key id, the
/// FCM service-account file) is checked by `check-config` too, by the same loader: exit 2
/// naming the key, and never the file's contents.
#[test]
fn check_config_loads_the_provider_keys_serve_would() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("AuthKey_ABC123DEFG.p8");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    std::fs::write(&good, key.serialize_pem()).unwrap();
    let bad = dir.path().join("not-a-key.p8");
    std::fs::write(&bad, "secret-garbage-0123456789").unwrap();
    let (good, bad) = (good.to_str().unwrap(), bad.to_str().unwrap());
    fn apns(file: &str, key_id: &str) -> Vec<(&'static str, String)> {
        vec![
            ("HERALD__APNS__KEY_FILE", file.to_owned()),
            ("HERALD__APNS__KEY_ID", key_id.to_owned()),
            ("HERALD__APNS__TEAM_ID", "TEAM123456".to_owned()),
            ("HERALD__APNS__TOPIC", "com.example.app".to_owned()),
        ]
    }
    let run = |env: &[(&str, String)]| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        herald(&["check-config"], &env)
    };

    let out = run(&apns(good, "ABC123DEFG"));
    assert!(
        out.status.success(),
        "a good key passes: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    for (env, key) in [
        (apns(bad, "ABC123DEFG"), "apns.key_file"),
        (apns(good, ""), "apns.key_id"),
        (
            vec![("HERALD__FCM__SERVICE_ACCOUNT_FILE", bad.to_owned())],
            "fcm.service_account_file",
        ),
    ] {
        let out = run(&env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}: {stderr}");
        assert!(stderr.contains(key), "names {key}: {stderr}");
        assert!(!stderr.contains("secret-garbage"), "{stderr}");
    }

    // A node without the dispatcher role never loads the providers, in serve or here.
    let mut env = apns(bad, "ABC123DEFG");
    env.push(("HERALD__ROLES", "api".to_owned()));
    assert!(run(&env).status.success());
}

/// Runs `herald serve` and waits (bounded) for it to exit: a start-up error must end the
/// process, so one that starts serving instead fails the test rather than hanging it.
fn serve_until_exit(env: &[(&str, &str)]) -> std::process::Output {
    use std::time::{Duration, Instant};
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.arg("serve")
        .env("HERALD__HTTP__ADDR", "127.0.0.1:0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("herald runs");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("status").is_none() {
        if Instant::now() > deadline {
            child.kill().expect("kill");
            let out = child.wait_with_output().expect("output");
            panic!(
                "herald serve started instead of refusing; stdout: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn an_api_keys_file_without_a_key_is_a_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("api-keys");
    std::fs::write(&file, "# keys go here\n\n   \n# sha256:...\n").unwrap();
    let out = serve_until_exit(&[("HERALD__AUTH__API_KEYS_FILE", file.to_str().unwrap())]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("auth.api_keys_file"), "{stderr}");
    assert!(stderr.contains("no API key"), "{stderr}");
    // Nothing generated, nothing printed to the log stream.
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The same file with one key starts fine (check-config: same load, no serving).
    std::fs::write(&file, "# keys go here\nfile-api-key-0123456789\n").unwrap();
    let out = herald(
        &["check-config"],
        &[("HERALD__AUTH__API_KEYS_FILE", file.to_str().unwrap())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn apns_topic_with_control_characters_is_a_config_error() {
    for topic in ["com.example\u{1}app", "com.example\tapp", "com.example app"] {
        let out = herald(&["check-config"], &[("HERALD__APNS__TOPIC", topic)]);
        assert_eq!(out.status.code(), Some(2), "{topic:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("apns.topic"), "{topic:?}: {stderr}");
    }
    let out = herald(
        &["check-config"],
        &[("HERALD__APNS__TOPIC", "com.example.app")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cleartext_provider_endpoints_only_to_loopback_unless_allowed() {
    for (var, url, key) in [
        (
            "HERALD__APNS__ENDPOINT",
            "http://apns.example.com",
            "apns.endpoint",
        ),
        (
            "HERALD__FCM__ENDPOINT",
            "http://10.1.2.3:8080",
            "fcm.endpoint",
        ),
    ] {
        let out = herald(&["check-config"], &[(var, url)]);
        assert_eq!(out.status.code(), Some(2), "{var}={url}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{stderr}");
        assert!(stderr.contains("allow_insecure_endpoints"), "{stderr}");
        // Allowed explicitly, per provider section.
        let allow = format!(
            "HERALD__{}__ALLOW_INSECURE_ENDPOINTS",
            &key[..key.find('.').unwrap()].to_uppercase()
        );
        let out = herald(&["check-config"], &[(var, url), (&allow, "true")]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Loopback (a local double) and https need no opt-in.
    for (var, url) in [
        ("HERALD__APNS__ENDPOINT", "http://127.0.0.1:9443"),
        ("HERALD__FCM__ENDPOINT", "http://localhost:9443"),
        ("HERALD__FCM__ENDPOINT", "https://fcm.example.com"),
    ] {
        let out = herald(&["check-config"], &[(var, url)]);
        assert!(
            out.status.success(),
            "{var}={url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
