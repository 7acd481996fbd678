//! Settings: the layered configuration tree, its validation, and typed secrets.
//!
//! Layers (later wins): the compiled-in `config/default.toml`, `config/$HERALD_ENV.toml`,
//! `--config FILE`, then `HERALD__SECTION__KEY` environment variables. Everything is checked
//! once at start-up by [`Settings::load`]; a bad value is a [`SettingsError`] naming the key,
//! and the process exits non-zero before binding anything.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The defaults, compiled in so the binary runs from any working directory.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// A start-up configuration error: which key, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration: {0}")]
    Source(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {message}")]
    Invalid {
        /// The full key, e.g. `apps.shop.apns.topic` (app keys are only known at run time).
        key: Cow<'static, str>,
        message: String,
    },
}

fn invalid(key: impl Into<Cow<'static, str>>, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// A string that must never reach a log line. `Debug` and `Display` print a placeholder.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Api,
    Gateway,
    Dispatcher,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub roles: Vec<Role>,
    pub http: HttpSettings,
    pub log: LogSettings,
    pub auth: AuthSettings,
    pub notify: NotifySettings,
    pub queue: QueueSettings,
    pub retry: RetrySettings,
    pub dispatcher: DispatcherSettings,
    pub events: EventsSettings,
    pub gateway: GatewaySettings,
    pub cluster: ClusterSettings,
    pub apns: ApnsSettings,
    pub fcm: FcmSettings,
    /// `[apps.<name>]`: the apps besides `default` (which the top-level keys define).
    #[serde(default)]
    pub apps: BTreeMap<String, AppSettings>,
    pub inbox: InboxSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub addr: String,
    pub max_body_bytes: usize,
    pub workers: usize,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub api_keys: Vec<Secret>,
    pub api_keys_file: String,
    pub device_token_secret: Secret,
    pub device_token_secret_file: String,
    #[serde(with = "humantime_serde")]
    pub device_token_ttl: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySettings {
    pub max_targets: usize,
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// The `default` app's `max_notify_rate` (see [`AppSettings::max_notify_rate`]).
    #[serde(default)]
    pub max_notify_rate: Option<f64>,
    pub max_frame_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    pub url: Secret,
    pub url_file: String,
    pub ca_file: String,
    pub prefix: String,
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
    pub memory_capacity: usize,
    pub memory_max_bytes: usize,
    pub prefetch: u16,
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    pub heartbeat_secs: u16,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    pub max_attempts: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatcherSettings {
    pub target_concurrency: usize,
    /// Messages, beyond `queue.prefetch`, that may wait only for devices' acks
    /// (src/dispatch/slot.rs); the consumer's broker prefetch is the sum.
    pub max_awaiting_ack: usize,
}

/// `[events]`: the outcome event sinks (src/events.rs); config/default.toml says why each
/// default. The webhook URL may carry a credential (basic auth, a query token), so it is a
/// [`Secret`] like the signing key: `check-config` and logs never show it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSettings {
    pub webhook_url: Secret,
    pub webhook_url_file: String,
    pub webhook_secret: Secret,
    pub webhook_secret_file: String,
    pub ca_file: String,
    pub webhook_batch: usize,
    #[serde(with = "humantime_serde")]
    pub webhook_flush: Duration,
    #[serde(with = "humantime_serde")]
    pub webhook_timeout: Duration,
    pub webhook_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub webhook_backoff_min: Duration,
    #[serde(with = "humantime_serde")]
    pub webhook_backoff_max: Duration,
    #[serde(with = "humantime_serde")]
    pub webhook_retry_after_max: Duration,
    pub buffer: usize,
}

impl EventsSettings {
    /// The webhook URL (`events.webhook_url`, else the contents of
    /// `events.webhook_url_file`); `None` means no webhook.
    pub fn webhook_url(&self) -> Result<Option<Secret>, SettingsError> {
        if !self.webhook_url.is_empty() {
            return Ok(Some(self.webhook_url.clone()));
        }
        if self.webhook_url_file.is_empty() {
            return Ok(None);
        }
        let text = read_secret_file("events.webhook_url_file", &self.webhook_url_file)?;
        Ok(Some(Secret::new(text.trim())).filter(|s| !s.is_empty()))
    }

    /// The webhook signing key (`events.webhook_secret`, else the contents of
    /// `events.webhook_secret_file`), parsed from its `whsec_<base64>` form.
    pub fn webhook_key(&self) -> Result<Option<crate::checks::SigningKey>, SettingsError> {
        let text = if !self.webhook_secret.is_empty() {
            self.webhook_secret.clone()
        } else if !self.webhook_secret_file.is_empty() {
            Secret::new(
                read_secret_file("events.webhook_secret_file", &self.webhook_secret_file)?.trim(),
            )
        } else {
            return Ok(None);
        };
        crate::checks::SigningKey::parse(text.expose())
            .map(Some)
            .map_err(|e| invalid("events.webhook_secret", e))
    }

    fn validate(&self) -> Result<(), SettingsError> {
        if self.webhook_batch == 0 || self.buffer == 0 || self.webhook_attempts == 0 {
            return Err(invalid(
                "events",
                "webhook_batch, webhook_attempts and buffer must be at least 1",
            ));
        }
        if self.webhook_timeout.is_zero() {
            return Err(invalid("events.webhook_timeout", "must be positive"));
        }
        if self.webhook_backoff_min.is_zero() || self.webhook_backoff_min > self.webhook_backoff_max
        {
            return Err(invalid(
                "events.webhook_backoff_min",
                "must be positive and at most events.webhook_backoff_max",
            ));
        }
        if !self.ca_file.is_empty() {
            crate::checks::read_ca_file(&self.ca_file).map_err(|e| invalid("events.ca_file", e))?;
        }
        let key = self.webhook_key()?;
        if let Some(url) = self.webhook_url()? {
            // The messages never repeat the URL: it may hold a credential.
            crate::checks::check_webhook_url(url.expose())
                .map_err(|e| invalid("events.webhook_url", e))?;
            // No unsigned webhook: see config/default.toml, events.webhook_secret.
            if key.is_none() {
                return Err(invalid(
                    "events.webhook_secret",
                    "is required when events.webhook_url is set: every POST is signed \
                     (Standard Webhooks); generate one with \
                     `echo whsec_$(openssl rand -base64 32)`",
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    pub max_frame_bytes: usize,
    pub send_buffer: usize,
    pub max_bad_frames: u32,
    #[serde(with = "humantime_serde")]
    pub reconnect_spread: Duration,
    pub max_session_rate: u32,
    pub session_burst: u32,
    pub max_sessions: usize,
    pub device_connects_per_minute: u32,
    pub device_connect_burst: u32,
    pub ip_connects_per_second: u32,
    pub ip_connect_burst: u32,
    pub trusted_proxies: Vec<String>,
    pub allow_query_token: bool,
}

/// `[cluster]`: the directory across nodes (used when `queue.url` is RabbitMQ).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    pub node_id: String,
    #[serde(with = "humantime_serde")]
    pub reply_margin: Duration,
    #[serde(with = "humantime_serde")]
    pub register_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub node_lease: Duration,
    #[serde(with = "humantime_serde")]
    pub hop_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsSettings {
    pub key_file: String,
    pub key_id: String,
    pub team_id: String,
    pub topic: String,
    pub endpoint: String,
    pub sandbox_endpoint: String,
    pub default_environment: crate::domain::ApnsEnvironment,
    pub ca_file: String,
    pub allow_insecure_endpoints: bool,
    pub concurrency: usize,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub breaker_failures: u32,
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmSettings {
    pub service_account_file: String,
    pub endpoint: String,
    pub ca_file: String,
    pub allow_insecure_endpoints: bool,
    pub concurrency: usize,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub breaker_failures: u32,
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
}

/// `[apps.<name>]`: one app's credentials, keys, webhook and rate. Every key is optional:
/// an app without `apns.key_file` has no APNs, one without keys cannot be called. The
/// provider limits (`concurrency`, `timeout`, `breaker_*`) default to the top-level
/// `[apns]` / `[fcm]` values; credentials, topics and endpoints never do, so one app can
/// never send with another's key by omission.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppSettings {
    pub api_keys: Vec<Secret>,
    pub api_keys_file: String,
    /// Notifications per second this app's callers may send (a token bucket holding one
    /// second's worth); unset = unlimited. Past it: 429 `rate_limited` with Retry-After.
    pub max_notify_rate: Option<f64>,
    pub apns: AppApnsSettings,
    pub fcm: AppFcmSettings,
    pub events: AppEventsSettings,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppApnsSettings {
    pub key_file: String,
    pub key_id: String,
    pub team_id: String,
    pub topic: String,
    /// Empty = `production` (Apple's production host).
    pub endpoint: String,
    /// Empty = `sandbox` (Apple's sandbox host).
    pub sandbox_endpoint: String,
    pub default_environment: Option<crate::domain::ApnsEnvironment>,
    pub ca_file: String,
    /// Not inherited from `[apns]`: each app opts in to cleartext off loopback itself.
    pub allow_insecure_endpoints: bool,
    pub concurrency: Option<usize>,
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
    pub breaker_failures: Option<u32>,
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Option<Duration>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppFcmSettings {
    pub service_account_file: String,
    /// Empty = Google's (`https://fcm.googleapis.com`).
    pub endpoint: String,
    pub ca_file: String,
    /// Not inherited from `[fcm]`: each app opts in to cleartext off loopback itself.
    pub allow_insecure_endpoints: bool,
    pub concurrency: Option<usize>,
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
    pub breaker_failures: Option<u32>,
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Option<Duration>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppEventsSettings {
    /// This app's events go here (batched as `[events]` says); empty = no webhook. A
    /// [`Secret`]: the URL may carry a credential.
    pub webhook_url: Secret,
    /// This app's webhook signing key (`whsec_<base64>`); required with `webhook_url`, and
    /// per app so one app's receiver cannot forge another app's events.
    pub webhook_secret: Secret,
    /// A file holding `webhook_secret` instead.
    pub webhook_secret_file: String,
}

/// Google's FCM base URL, the default of an app's `fcm.endpoint`.
pub const FCM_ENDPOINT: &str = "https://fcm.googleapis.com";

/// One app, resolved: the `default` app from the top-level keys, or an `[apps.<name>]`
/// section over the top-level provider limits. What the API, providers and events use.
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub id: crate::domain::AppId,
    /// SHA-256 digests of this app's API keys.
    pub api_keys: Vec<[u8; 32]>,
    pub apns: ApnsSettings,
    pub fcm: FcmSettings,
    /// Empty = no webhook for this app.
    pub webhook_url: Secret,
    /// Signs the app's webhook POSTs; checked present when `webhook_url` is set.
    pub webhook_key: Option<crate::checks::SigningKey>,
    pub max_notify_rate: Option<f64>,
    /// The config key prefix errors name: `""` for `default`, `apps.<name>.` otherwise.
    pub key_prefix: String,
}

/// The bulkhead and circuit breaker of one provider (`[apns]` and `[fcm]` each have them;
/// config/default.toml says why each default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProviderLimits {
    /// Requests in flight at once to this provider.
    pub concurrency: usize,
    /// Whole-request deadline (connect, send, answer).
    pub timeout: Duration,
    /// Consecutive transient failures that open the circuit.
    pub breaker_failures: u32,
    /// How long an open circuit rejects sends before one probe is let through.
    pub breaker_cooldown: Duration,
}

impl ApnsSettings {
    pub fn limits(&self) -> ProviderLimits {
        ProviderLimits {
            concurrency: self.concurrency,
            timeout: self.timeout,
            breaker_failures: self.breaker_failures,
            breaker_cooldown: self.breaker_cooldown,
        }
    }
}

impl FcmSettings {
    pub fn limits(&self) -> ProviderLimits {
        ProviderLimits {
            concurrency: self.concurrency,
            timeout: self.timeout,
            breaker_failures: self.breaker_failures,
            breaker_cooldown: self.breaker_cooldown,
        }
    }
}

/// Where settings come from. A seam so tests can load with a given environment instead of
/// the process's own.
#[derive(Debug, Default)]
pub struct Sources {
    /// `--config FILE`.
    pub file: Option<PathBuf>,
    /// The `HERALD_ENV` overlay name (e.g. "production" → `config/production.toml`).
    pub environment: Option<String>,
    /// Environment variables; `None` reads the process environment.
    pub env_vars: Option<HashMap<String, String>>,
}

impl Sources {
    /// The sources of a real process: its `--config` file, `HERALD_ENV`, its environment.
    pub fn from_process(file: Option<PathBuf>) -> Self {
        Sources {
            file,
            environment: std::env::var("HERALD_ENV").ok().filter(|s| !s.is_empty()),
            env_vars: None,
        }
    }
}

impl Settings {
    /// Load and validate the layered settings.
    pub fn load(sources: Sources) -> Result<Settings, SettingsError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(env) = &sources.environment {
            let overlay = Path::new("config").join(format!("{env}.toml"));
            builder = builder.add_source(config::File::from(overlay).required(false));
        }
        if let Some(file) = &sources.file {
            if !file.exists() {
                return Err(invalid(
                    "--config",
                    format!("file {} does not exist", file.display()),
                ));
            }
            builder = builder.add_source(config::File::from(file.as_path()));
        }
        let mut env = config::Environment::with_prefix("HERALD")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("roles")
            .with_list_parse_key("auth.api_keys");
        // HERALD__APPS__SHOP__API_KEYS=a,b is a list too; app names are only known from the
        // variables themselves.
        let vars: HashMap<String, String> = match sources.env_vars {
            Some(vars) => vars,
            None => std::env::vars().collect(),
        };
        for name in vars.keys().filter_map(|k| {
            k.strip_prefix("HERALD__APPS__")?
                .strip_suffix("__API_KEYS")
                .map(str::to_lowercase)
        }) {
            env = env.with_list_parse_key(&format!("apps.{name}.api_keys"));
        }
        env = env.source(Some(vars.into_iter().collect()));
        let settings: Settings = builder.add_source(env).build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// The compiled-in defaults, validated; the starting point for tests.
    pub fn defaults() -> Settings {
        Settings::load(Sources {
            env_vars: Some(HashMap::new()),
            ..Sources::default()
        })
        .expect("the compiled-in defaults are valid")
    }

    /// Checks every rule that serde's types cannot express.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.roles.is_empty() {
            return Err(invalid("roles", "at least one role is required"));
        }
        self.http
            .addr
            .parse::<SocketAddr>()
            .map_err(|e| invalid("http.addr", format!("`{}`: {e}", self.http.addr)))?;
        if self.http.max_body_bytes < 1024 {
            return Err(invalid("http.max_body_bytes", "must be at least 1024"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", e.to_string()))?;
        if self.auth.device_token_ttl.is_zero() {
            return Err(invalid("auth.device_token_ttl", "must be positive"));
        }
        // The live frame must fit whatever a provider-routed notification already may carry
        // (a 4 KiB payload plus the frame's own fields), and stays under the 16 MiB a
        // WebSocket frame is allowed to be here (gateway.max_frame_bytes has the same cap).
        if !(8 * 1024..=16 * 1024 * 1024).contains(&self.notify.max_frame_bytes) {
            return Err(invalid("notify.max_frame_bytes", "must be 8 KiB to 16 MiB"));
        }
        if self.notify.max_targets == 0 {
            return Err(invalid("notify.max_targets", "must be at least 1"));
        }
        if self.notify.default_ttl.is_zero() || self.notify.default_ttl > self.notify.max_ttl {
            return Err(invalid(
                "notify.default_ttl",
                "must be positive and at most notify.max_ttl",
            ));
        }
        if self.queue.prefix.is_empty() || !amqp_name_part(&self.queue.prefix) {
            return Err(invalid(
                "queue.prefix",
                "1-100 characters of [A-Za-z0-9-_.]",
            ));
        }
        if self.queue.publish_timeout.is_zero() {
            return Err(invalid("queue.publish_timeout", "must be positive"));
        }
        if self.queue.memory_capacity == 0 {
            return Err(invalid("queue.memory_capacity", "must be at least 1"));
        }
        // At least one body of the largest size accepted, or the queue could take nothing.
        if self.queue.memory_max_bytes < self.http.max_body_bytes {
            return Err(invalid(
                "queue.memory_max_bytes",
                "must be at least http.max_body_bytes",
            ));
        }
        if self.queue.prefetch == 0 {
            return Err(invalid("queue.prefetch", "must be at least 1"));
        }
        if self.queue.reconnect_min.is_zero() || self.queue.reconnect_min > self.queue.reconnect_max
        {
            return Err(invalid(
                "queue.reconnect_min",
                "must be positive and at most queue.reconnect_max",
            ));
        }
        let url = self.queue_url()?;
        if let Some(url) = url {
            if !(url.expose().starts_with("amqp://") || url.expose().starts_with("amqps://")) {
                return Err(invalid(
                    "queue.url",
                    "must start with amqp:// or amqps:// (or be empty for the embedded queue)",
                ));
            }
            url.expose()
                .parse::<lapin::uri::AMQPUri>()
                .map_err(|e| invalid("queue.url", format!("not a valid AMQP URI: {e}")))?;
        }
        let url = self.queue_url()?;
        crate::queue::tls::check_ca_file(url.as_ref().map(Secret::expose), &self.queue.ca_file)
            .map_err(|e| invalid("queue.ca_file", e))?;
        if self.retry.base_delay.is_zero() || self.retry.base_delay > self.retry.max_delay {
            return Err(invalid(
                "retry.base_delay",
                "must be positive and at most retry.max_delay",
            ));
        }
        if usize::from(self.queue.prefetch) + self.dispatcher.max_awaiting_ack
            > usize::from(u16::MAX)
        {
            return Err(invalid(
                "dispatcher.max_awaiting_ack",
                "queue.prefetch + dispatcher.max_awaiting_ack must be at most 65535 (the AMQP prefetch is 16 bits)",
            ));
        }
        if self.dispatcher.target_concurrency == 0 {
            return Err(invalid(
                "dispatcher.target_concurrency",
                "must be at least 1",
            ));
        }
        self.events.validate()?;
        if !(1..=30).contains(&self.retry.max_attempts) {
            return Err(invalid("retry.max_attempts", "must be between 1 and 30"));
        }
        for (key, d) in [
            ("gateway.ping_interval", self.gateway.ping_interval),
            ("gateway.pong_timeout", self.gateway.pong_timeout),
            ("gateway.ack_timeout", self.gateway.ack_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be positive"));
            }
        }
        if self.gateway.max_session_rate == 0 || self.gateway.session_burst == 0 {
            return Err(invalid(
                "gateway.max_session_rate",
                "gateway.max_session_rate and gateway.session_burst must be at least 1",
            ));
        }
        for (key, v) in [
            ("gateway.max_sessions", self.gateway.max_sessions as u64),
            (
                "gateway.device_connects_per_minute",
                u64::from(self.gateway.device_connects_per_minute),
            ),
            (
                "gateway.device_connect_burst",
                u64::from(self.gateway.device_connect_burst),
            ),
            (
                "gateway.ip_connects_per_second",
                u64::from(self.gateway.ip_connects_per_second),
            ),
            (
                "gateway.ip_connect_burst",
                u64::from(self.gateway.ip_connect_burst),
            ),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        for proxy in &self.gateway.trusted_proxies {
            if crate::checks::IpNet::parse(proxy).is_none() {
                return Err(invalid(
                    "gateway.trusted_proxies",
                    "each entry is an IP address or a CIDR block (10.0.0.0/8, fd00::/8)",
                ));
            }
        }
        if !amqp_name_part(&self.cluster.node_id) {
            return Err(invalid(
                "cluster.node_id",
                "empty, or up to 100 characters of [A-Za-z0-9-_.]",
            ));
        }
        if self.cluster.register_timeout.is_zero() {
            return Err(invalid("cluster.register_timeout", "must be positive"));
        }
        for (key, d) in [
            (
                "cluster.heartbeat_interval",
                self.cluster.heartbeat_interval,
            ),
            ("cluster.node_lease", self.cluster.node_lease),
            ("cluster.hop_timeout", self.cluster.hop_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be positive"));
            }
        }
        if self.cluster.node_lease < 2 * self.cluster.heartbeat_interval {
            return Err(invalid(
                "cluster.node_lease",
                "must be at least twice cluster.heartbeat_interval (one lost heartbeat must not kill a node)",
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.gateway.max_frame_bytes) {
            return Err(invalid(
                "gateway.max_frame_bytes",
                "must be 1 KiB to 16 MiB",
            ));
        }
        if self.gateway.send_buffer == 0 {
            return Err(invalid("gateway.send_buffer", "must be at least 1"));
        }
        if self.gateway.max_bad_frames == 0 {
            return Err(invalid("gateway.max_bad_frames", "must be at least 1"));
        }
        self.apps()?;
        self.device_token_secret()?;
        self.inbox.validate()?;
        Ok(())
    }

    /// The names of every app, `default` first, then the `[apps.<name>]` sections in name
    /// order; a name that does not parse is left out (`validate` refuses it). What the queue
    /// builds its per-app work queues from, without reading any key file.
    pub fn app_ids(&self) -> Vec<crate::domain::AppId> {
        use crate::domain::AppId;
        std::iter::once(AppId::default_app())
            .chain(
                self.apps
                    .keys()
                    .filter_map(|name| AppId::parse(name).ok())
                    .filter(|id| !id.is_default()),
            )
            .collect()
    }

    /// Every app, `default` first, resolved and checked: names, provider limits, webhook
    /// URLs, rates, and that no API key belongs to two apps. Reads the key files.
    pub fn apps(&self) -> Result<Vec<AppConfig>, SettingsError> {
        use crate::domain::AppId;
        let mut apps = vec![AppConfig {
            id: AppId::default_app(),
            api_keys: self.api_keys()?,
            apns: self.apns.clone(),
            fcm: self.fcm.clone(),
            webhook_url: self.events.webhook_url()?.unwrap_or_default(),
            webhook_key: self.events.webhook_key()?,
            max_notify_rate: self.notify.max_notify_rate,
            key_prefix: String::new(),
        }];
        for (name, app) in &self.apps {
            let id = AppId::parse(name).map_err(|e| invalid(format!("apps.{name}"), e))?;
            if id.is_default() {
                return Err(invalid(
                    "apps.default",
                    "the app `default` is defined by the top-level auth, apns, fcm and events keys; name this app otherwise",
                ));
            }
            let prefix = format!("apps.{name}.");
            let mut api_keys = Vec::new();
            for key in &app.api_keys {
                api_keys.push(parse_api_key(format!("{prefix}api_keys"), key.expose())?);
            }
            if !app.api_keys_file.is_empty() {
                api_keys.extend(read_api_keys_file(
                    format!("{prefix}api_keys_file"),
                    &app.api_keys_file,
                )?);
            }
            let webhook_key = if !app.events.webhook_secret.is_empty() {
                Some(app.events.webhook_secret.clone())
            } else if !app.events.webhook_secret_file.is_empty() {
                let key = format!("{prefix}events.webhook_secret_file");
                Some(Secret::new(
                    read_secret_file(key, &app.events.webhook_secret_file)?.trim(),
                ))
            } else {
                None
            }
            .map(|s| {
                crate::checks::SigningKey::parse(s.expose())
                    .map_err(|e| invalid(format!("{prefix}events.webhook_secret"), e))
            })
            .transpose()?;
            apps.push(AppConfig {
                id,
                api_keys,
                apns: app.apns.resolve(&self.apns),
                fcm: app.fcm.resolve(&self.fcm),
                webhook_url: app.events.webhook_url.clone(),
                webhook_key,
                max_notify_rate: app.max_notify_rate,
                key_prefix: prefix,
            });
        }
        let mut owners: HashMap<[u8; 32], &AppConfig> = HashMap::new();
        for app in &apps {
            let p = &app.key_prefix;
            app.apns.limits().validate(format!("{p}apns"))?;
            app.fcm.limits().validate(format!("{p}fcm"))?;
            // apns.topic becomes the apns-topic header: a control character there would be
            // refused by the HTTP client on every send, dead-lettering everything as a
            // provider configuration error. Refused here instead, at start-up.
            if !header_safe(&app.apns.topic) {
                return Err(invalid(
                    format!("{p}apns.topic"),
                    "must not contain control characters or spaces (it is the apns-topic header)",
                ));
            }
            for (key, url) in [
                ("endpoint", &app.apns.endpoint),
                ("sandbox_endpoint", &app.apns.sandbox_endpoint),
            ] {
                if !matches!(url.as_str(), "production" | "sandbox") {
                    let key = format!("{p}apns.{key}");
                    check_url(&key, url, app.apns.allow_insecure_endpoints)
                        .map_err(|e| invalid(key, format!("{e:#}")))?;
                }
            }
            let key = format!("{p}fcm.endpoint");
            check_url(&key, &app.fcm.endpoint, app.fcm.allow_insecure_endpoints)
                .map_err(|e| invalid(key, format!("{e:#}")))?;
            if !app.webhook_url.is_empty() {
                // The messages never repeat the URL: it may hold a credential.
                crate::checks::check_webhook_url(app.webhook_url.expose())
                    .map_err(|e| invalid(format!("{p}events.webhook_url"), e))?;
                // No unsigned webhook, per app as at the top level.
                if app.webhook_key.is_none() {
                    return Err(invalid(
                        format!("{p}events.webhook_secret"),
                        "is required when the app's events.webhook_url is set: every POST is \
                         signed (Standard Webhooks); generate one with \
                         `echo whsec_$(openssl rand -base64 32)`",
                    ));
                }
            }
            if let Some(rate) = app.max_notify_rate
                && !(rate.is_finite() && rate > 0.0)
            {
                let key = if p.is_empty() {
                    "notify.max_notify_rate".to_owned()
                } else {
                    format!("{p}max_notify_rate")
                };
                return Err(invalid(
                    key,
                    "must be a positive number of notifications per second (leave it unset for no limit)",
                ));
            }
            for digest in &app.api_keys {
                if let Some(other) = owners.insert(*digest, app)
                    && other.id != app.id
                {
                    let key = if p.is_empty() {
                        "auth.api_keys".to_owned()
                    } else {
                        format!("{p}api_keys")
                    };
                    return Err(invalid(
                        key,
                        format!(
                            "an API key of app `{}` is also a key of app `{}`: a key belongs to exactly one app",
                            app.id, other.id
                        ),
                    ));
                }
            }
        }
        Ok(apps)
    }

    /// What `herald check-config` shows about the apps: each one's keys (counted, never
    /// shown), providers and webhook (host only: a URL may carry a credential).
    pub fn apps_summary(&self) -> Result<String, SettingsError> {
        use std::fmt::Write;
        let mut out = String::new();
        for app in self.apps()? {
            let _ = writeln!(out, "app {}:", app.id);
            let _ = writeln!(out, "  api keys: {} (redacted)", app.api_keys.len());
            let rate = app
                .max_notify_rate
                .map_or("unlimited".to_owned(), |r| format!("{r}/s"));
            let _ = writeln!(out, "  max_notify_rate: {rate}");
            if app.apns.key_file.is_empty() {
                let _ = writeln!(out, "  apns: off");
            } else {
                let a = &app.apns;
                let _ = writeln!(
                    out,
                    "  apns: key_id {} team_id {} topic {} production {} sandbox {} default {} (key file redacted)",
                    a.key_id,
                    a.team_id,
                    a.topic,
                    a.endpoint,
                    a.sandbox_endpoint,
                    a.default_environment.as_str()
                );
            }
            if app.fcm.service_account_file.is_empty() {
                let _ = writeln!(out, "  fcm: off");
            } else {
                let _ = writeln!(
                    out,
                    "  fcm: endpoint {} (service account redacted)",
                    app.fcm.endpoint
                );
            }
            let hook = match reqwest::Url::parse(app.webhook_url.expose()) {
                Ok(url) => format!(
                    "{}://{}/… (redacted)",
                    url.scheme(),
                    url.host_str().unwrap_or("")
                ),
                Err(_) => "off".to_owned(),
            };
            let _ = writeln!(out, "  events webhook: {hook}");
        }
        Ok(out)
    }

    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.http
            .addr
            .parse()
            .expect("validated in Settings::validate")
    }

    /// The broker URL (`queue.url`, else the contents of `queue.url_file`); `None` means the
    /// embedded queue.
    pub fn queue_url(&self) -> Result<Option<Secret>, SettingsError> {
        if !self.queue.url.is_empty() {
            return Ok(Some(self.queue.url.clone()));
        }
        if self.queue.url_file.is_empty() {
            return Ok(None);
        }
        let text = read_secret_file("queue.url_file", &self.queue.url_file)?;
        Ok(Some(Secret::new(text.trim())).filter(|s| !s.is_empty()))
    }

    /// The `default` app's API keys (inline and from `auth.api_keys_file`), as SHA-256
    /// digests. Every app's: [`Settings::apps`].
    pub fn api_keys(&self) -> Result<Vec<[u8; 32]>, SettingsError> {
        let mut keys = Vec::new();
        for key in &self.auth.api_keys {
            keys.push(parse_api_key("auth.api_keys", key.expose())?);
        }
        if !self.auth.api_keys_file.is_empty() {
            keys.extend(read_api_keys_file(
                "auth.api_keys_file",
                &self.auth.api_keys_file,
            )?);
        }
        Ok(keys)
    }

    /// The device-token signing secret, if one is configured.
    pub fn device_token_secret(&self) -> Result<Option<Secret>, SettingsError> {
        let secret = if !self.auth.device_token_secret.is_empty() {
            self.auth.device_token_secret.clone()
        } else if !self.auth.device_token_secret_file.is_empty() {
            Secret::new(
                read_secret_file(
                    "auth.device_token_secret_file",
                    &self.auth.device_token_secret_file,
                )?
                .trim(),
            )
        } else {
            return Ok(None);
        };
        if secret.expose().len() < 32 {
            return Err(invalid(
                "auth.device_token_secret",
                "must be at least 32 bytes (HS256 wants a key as long as its hash)",
            ));
        }
        Ok(Some(secret))
    }
}

impl ProviderLimits {
    /// `section` is e.g. "apns" or "apps.shop.fcm"; errors name the full key.
    fn validate(&self, section: String) -> Result<(), SettingsError> {
        if !(1..=10_000).contains(&self.concurrency) {
            return Err(invalid(
                format!("{section}.concurrency"),
                "must be between 1 and 10000",
            ));
        }
        if self.timeout.is_zero() {
            return Err(invalid(format!("{section}.timeout"), "must be positive"));
        }
        if self.breaker_failures == 0 {
            return Err(invalid(
                format!("{section}.breaker_failures"),
                "must be at least 1",
            ));
        }
        if self.breaker_cooldown.is_zero() {
            return Err(invalid(
                format!("{section}.breaker_cooldown"),
                "must be positive",
            ));
        }
        Ok(())
    }
}

impl AppApnsSettings {
    /// This app's `[apns]`: its own credentials and endpoints, the top-level limits where
    /// it sets none.
    fn resolve(&self, base: &ApnsSettings) -> ApnsSettings {
        let or = |s: &str, default: &str| {
            if s.is_empty() {
                default.to_owned()
            } else {
                s.to_owned()
            }
        };
        ApnsSettings {
            key_file: self.key_file.clone(),
            key_id: self.key_id.clone(),
            team_id: self.team_id.clone(),
            topic: self.topic.clone(),
            endpoint: or(&self.endpoint, "production"),
            sandbox_endpoint: or(&self.sandbox_endpoint, "sandbox"),
            default_environment: self
                .default_environment
                .unwrap_or(crate::domain::ApnsEnvironment::Production),
            ca_file: self.ca_file.clone(),
            allow_insecure_endpoints: self.allow_insecure_endpoints,
            concurrency: self.concurrency.unwrap_or(base.concurrency),
            timeout: self.timeout.unwrap_or(base.timeout),
            breaker_failures: self.breaker_failures.unwrap_or(base.breaker_failures),
            breaker_cooldown: self.breaker_cooldown.unwrap_or(base.breaker_cooldown),
        }
    }
}

impl AppFcmSettings {
    /// This app's `[fcm]`: its own service account and endpoint, the top-level limits where
    /// it sets none.
    fn resolve(&self, base: &FcmSettings) -> FcmSettings {
        FcmSettings {
            service_account_file: self.service_account_file.clone(),
            endpoint: if self.endpoint.is_empty() {
                FCM_ENDPOINT.to_owned()
            } else {
                self.endpoint.clone()
            },
            ca_file: self.ca_file.clone(),
            allow_insecure_endpoints: self.allow_insecure_endpoints,
            concurrency: self.concurrency.unwrap_or(base.concurrency),
            timeout: self.timeout.unwrap_or(base.timeout),
            breaker_failures: self.breaker_failures.unwrap_or(base.breaker_failures),
            breaker_cooldown: self.breaker_cooldown.unwrap_or(base.breaker_cooldown),
        }
    }
}

/// Fit for an HTTP header value that names something (a topic, a collapse id): no control
/// characters, no whitespace.
pub fn header_safe(s: &str) -> bool {
    !s.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// Up to 100 characters of `[A-Za-z0-9-_.]`: safe inside AMQP exchange and queue names
/// (255 bytes at most) with room for herald's own suffixes.
fn amqp_name_part(s: &str) -> bool {
    s.len() <= 100
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A file of API keys: one key (or `sha256:<hex>`) per line, blank lines and `#` comments
/// ignored.
fn read_api_keys_file(
    key: impl Into<Cow<'static, str>> + Clone,
    path: &str,
) -> Result<Vec<[u8; 32]>, SettingsError> {
    let text = read_secret_file(key.clone(), path)?;
    let mut keys = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        keys.push(parse_api_key(key.clone(), line)?);
    }
    // A configured key source that holds no key is a mistake (an unmounted Secret, a
    // template never filled in), not a request for a generated key: that would start an
    // API whose only key went to stdout, i.e. the log stream.
    if keys.is_empty() {
        return Err(invalid(
            key,
            format!("{path} holds no API key (only blank lines or comments)"),
        ));
    }
    Ok(keys)
}

fn read_secret_file(
    key: impl Into<Cow<'static, str>>,
    path: &str,
) -> Result<String, SettingsError> {
    // The error names the file, never its contents.
    std::fs::read_to_string(path).map_err(|e| invalid(key, format!("cannot read {path}: {e}")))
}

/// An API key entry: the key itself, or `sha256:<64 hex>` of it. Keys are kept only as
/// digests so comparison is over fixed-length values, in constant time.
fn parse_api_key(
    key: impl Into<Cow<'static, str>>,
    entry: &str,
) -> Result<[u8; 32], SettingsError> {
    use sha2::Digest;
    let key = key.into();
    if let Some(hexed) = entry.strip_prefix("sha256:") {
        let bytes = hex::decode(hexed)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| invalid(key.clone(), "a sha256: entry needs exactly 64 hex digits"))?;
        return Ok(bytes);
    }
    if entry.len() < 16 {
        return Err(invalid(key, "an API key must be at least 16 characters"));
    }
    Ok(sha2::Sha256::digest(entry.as_bytes()).into())
}

/// `[inbox]`: the offline inbox (src/inbox/); config/default.toml says why each default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboxSettings {
    pub url: Secret,
    pub url_file: String,
    pub max_per_device: usize,
    pub max_bytes_per_device: usize,
    #[serde(with = "humantime_serde")]
    pub reap_interval: Duration,
    pub reap_batch: usize,
    pub memory_max_bytes: usize,
    pub pool_size: u32,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl InboxSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        if !(1..=10_000).contains(&self.max_per_device) {
            return Err(invalid(
                "inbox.max_per_device",
                "must be between 1 and 10000",
            ));
        }
        // At least one frame of any size the gateway may send; at most what an i32 column
        // of sizes sums to safely.
        if !(1024..=i32::MAX as usize).contains(&self.max_bytes_per_device) {
            return Err(invalid(
                "inbox.max_bytes_per_device",
                "must be between 1 KiB and 2 GiB",
            ));
        }
        if self.reap_interval.is_zero() {
            return Err(invalid("inbox.reap_interval", "must be positive"));
        }
        if self.reap_batch == 0 {
            return Err(invalid("inbox.reap_batch", "must be at least 1"));
        }
        if self.memory_max_bytes < self.max_bytes_per_device {
            return Err(invalid(
                "inbox.memory_max_bytes",
                "must be at least inbox.max_bytes_per_device",
            ));
        }
        if self.pool_size == 0 {
            return Err(invalid("inbox.pool_size", "must be at least 1"));
        }
        if self.connect_timeout.is_zero() {
            return Err(invalid("inbox.connect_timeout", "must be positive"));
        }
        if let Some(url) = self.url()? {
            let u = url.expose();
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                // The message never repeats the URL: it may hold a password.
                return Err(invalid(
                    "inbox.url",
                    "must start with postgres:// or postgresql:// (or be empty)",
                ));
            }
        }
        Ok(())
    }

    /// The inbox database URL (`inbox.url`, else the contents of `inbox.url_file`);
    /// `None` means no PostgreSQL inbox.
    pub fn url(&self) -> Result<Option<Secret>, SettingsError> {
        if !self.url.is_empty() {
            return Ok(Some(self.url.clone()));
        }
        if self.url_file.is_empty() {
            return Ok(None);
        }
        let text = read_secret_file("inbox.url_file", &self.url_file)?;
        Ok(Some(Secret::new(text.trim())).filter(|s| !s.is_empty()))
    }
}

impl Settings {
    /// The PostgreSQL inbox URL, if one is configured (see [`InboxSettings::url`]).
    pub fn inbox_url(&self) -> Result<Option<Secret>, SettingsError> {
        self.inbox.url()
    }
}

pub use crate::checks::check_url;

#[cfg(test)]
mod inbox_settings_tests {
    use super::*;

    fn load(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        Settings::load(Sources {
            env_vars: Some(
                vars.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Sources::default()
        })
    }

    #[test]
    fn inbox_defaults_and_url_file() {
        let s = Settings::defaults();
        assert_eq!(s.inbox.max_per_device, 100);
        assert!(s.inbox_url().unwrap().is_none());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("url");
        std::fs::write(&file, "postgres://herald:pw@db/herald\n").unwrap();
        let s = load(&[("HERALD__INBOX__URL_FILE", file.to_str().unwrap())]).unwrap();
        assert_eq!(
            s.inbox_url().unwrap().unwrap().expose(),
            "postgres://herald:pw@db/herald"
        );
    }

    #[test]
    fn bad_inbox_values_name_their_key_and_hide_the_url() {
        let err = load(&[("HERALD__INBOX__URL", "mysql://u:hunter2@x/db")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("inbox.url") && !err.contains("hunter2"),
            "{err}"
        );
        for (var, value, key) in [
            ("HERALD__INBOX__MAX_PER_DEVICE", "0", "inbox.max_per_device"),
            (
                "HERALD__INBOX__MAX_BYTES_PER_DEVICE",
                "10",
                "inbox.max_bytes_per_device",
            ),
            ("HERALD__INBOX__REAP_INTERVAL", "0s", "inbox.reap_interval"),
            ("HERALD__INBOX__POOL_SIZE", "0", "inbox.pool_size"),
        ] {
            let err = load(&[(var, value)]).unwrap_err().to_string();
            assert!(
                err.contains(key),
                "{var}={value}: `{err}` does not name {key}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_env(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        Settings::load(Sources {
            env_vars: Some(
                vars.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Sources::default()
        })
    }

    #[test]
    fn defaults_are_valid_and_embedded() {
        let s = Settings::defaults();
        assert_eq!(s.http.addr, "0.0.0.0:8080");
        assert!(s.queue_url().unwrap().is_none());
        assert_eq!(s.roles.len(), 3);
    }

    #[test]
    fn env_overrides_nested_keys_and_lists() {
        let s = load_env(&[
            (
                "HERALD__QUEUE__URL",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
            ),
            ("HERALD__HTTP__ADDR", "127.0.0.1:9000"),
            ("HERALD__ROLES", "api,dispatcher"),
            ("HERALD__QUEUE__PREFETCH", "10"),
        ])
        .unwrap();
        assert_eq!(s.http.addr, "127.0.0.1:9000");
        assert_eq!(s.roles, vec![Role::Api, Role::Dispatcher]);
        assert_eq!(s.queue.prefetch, 10);
        assert!(s.queue_url().unwrap().is_some());
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("HERALD__HTTP__ADDR", "nowhere", "http.addr"),
            ("HERALD__QUEUE__URL", "redis://x", "queue.url"),
            ("HERALD__QUEUE__PUBLISH_TIMEOUT", "soon", "publish_timeout"),
            ("HERALD__RETRY__MAX_ATTEMPTS", "0", "retry.max_attempts"),
            ("HERALD__AUTH__API_KEYS", "short", "auth.api_keys"),
            (
                "HERALD__AUTH__DEVICE_TOKEN_SECRET",
                "tooshort",
                "device_token_secret",
            ),
            ("HERALD__ROLES", "api,cook", "roles"),
            ("HERALD__QUEUE__NO_SUCH_KEY", "1", "no_such_key"),
            ("HERALD__APNS__CONCURRENCY", "0", "apns.concurrency"),
            ("HERALD__CLUSTER__NODE_LEASE", "600ms", "cluster.node_lease"),
            ("HERALD__CLUSTER__HOP_TIMEOUT", "0s", "cluster.hop_timeout"),
            (
                "HERALD__FCM__BREAKER_COOLDOWN",
                "0s",
                "fcm.breaker_cooldown",
            ),
            (
                "HERALD__NOTIFY__MAX_FRAME_BYTES",
                "1000",
                "notify.max_frame_bytes",
            ),
            (
                "HERALD__QUEUE__MEMORY_MAX_BYTES",
                "1000",
                "queue.memory_max_bytes",
            ),
            ("HERALD__APNS__TOPIC", "com.example\u{7}app", "apns.topic"),
            (
                "HERALD__FCM__ENDPOINT",
                "http://fcm.example.com",
                "fcm.endpoint",
            ),
        ];
        for (var, value, key) in cases {
            let err = load_env(&[(var, value)]).unwrap_err().to_string();
            assert!(
                err.contains(key),
                "{var}={value}: error `{err}` does not name {key}"
            );
        }
    }

    #[test]
    fn api_keys_accept_plain_and_hashed_entries() {
        use sha2::Digest;
        let digest = hex::encode(sha2::Sha256::digest(b"another-key-0123456789"));
        let s = load_env(&[(
            "HERALD__AUTH__API_KEYS",
            &format!("plain-key-0123456789,sha256:{digest}"),
        )])
        .unwrap();
        let keys = s.api_keys().unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(hex::encode(keys[1]), digest);
    }

    fn load_toml(toml: &str) -> Result<Settings, SettingsError> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("herald.toml");
        std::fs::write(&file, toml).unwrap();
        Settings::load(Sources {
            file: Some(file),
            env_vars: Some(HashMap::new()),
            ..Sources::default()
        })
    }

    #[test]
    fn apps_from_sections_and_the_environment() {
        let s = load_env(&[
            ("HERALD__AUTH__API_KEYS", "default-key-0123456789"),
            (
                "HERALD__APPS__SHOP__API_KEYS",
                "shop-key-one-0123456789,shop-key-two-0123456789",
            ),
            ("HERALD__APPS__SHOP__APNS__TOPIC", "com.example.shop"),
            ("HERALD__APPS__SHOP__MAX_NOTIFY_RATE", "50"),
            ("HERALD__APPS__PAY__APNS__CONCURRENCY", "7"),
            (
                "HERALD__APPS__PAY__EVENTS__WEBHOOK_URL",
                "http://127.0.0.1:1/pay",
            ),
            (
                "HERALD__APPS__PAY__EVENTS__WEBHOOK_SECRET",
                "whsec_MDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDA=",
            ),
        ])
        .unwrap();
        let apps = s.apps().unwrap();
        let names: Vec<&str> = apps.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(names, ["default", "pay", "shop"]);
        let (pay, shop) = (&apps[1], &apps[2]);
        assert_eq!(apps[0].api_keys.len(), 1);
        assert_eq!(shop.api_keys.len(), 2);
        assert!(pay.api_keys.is_empty());
        assert_eq!(shop.apns.topic, "com.example.shop");
        assert_eq!(shop.max_notify_rate, Some(50.0));
        assert_eq!(shop.apns.endpoint, "production");
        assert_eq!(shop.apns.sandbox_endpoint, "sandbox");
        assert_eq!(shop.fcm.endpoint, FCM_ENDPOINT);
        // Limits inherit from the top level; credentials never do.
        assert_eq!(pay.apns.concurrency, 7);
        assert_eq!(shop.apns.concurrency, s.apns.concurrency);
        assert_eq!(pay.webhook_url.expose(), "http://127.0.0.1:1/pay");
        assert!(pay.webhook_key.is_some());
        assert!(apps[0].webhook_url.is_empty());
    }

    #[test]
    fn app_config_errors_name_the_key() {
        let dup = "shared-key-0123456789";
        let cases: Vec<(Result<Settings, SettingsError>, &str)> = vec![
            (
                load_toml("[apps.shop]\nmax_notify_rat = 5\n"),
                "max_notify_rat",
            ),
            (load_toml("[apps.shop.apns]\nkeyfile = \"x\"\n"), "keyfile"),
            (
                load_env(&[("HERALD__APPS__SHOP__APNS__NO_SUCH_KEY", "1")]),
                "no_such_key",
            ),
            (
                load_toml(&format!(
                    "[auth]\napi_keys = [\"{dup}\"]\n[apps.shop]\napi_keys = [\"{dup}\"]\n"
                )),
                "apps.shop.api_keys",
            ),
            (
                load_toml(&format!(
                    "[apps.pay]\napi_keys = [\"{dup}\"]\n[apps.shop]\napi_keys = [\"{dup}\"]\n"
                )),
                "also a key of app `pay`",
            ),
            (load_toml("[apps.shop_eu]\n"), "apps.shop_eu"),
            (load_toml(&format!("[apps.{}]\n", "x".repeat(33))), "1-32"),
            (load_toml("[apps.default]\n"), "apps.default"),
            (
                load_toml("[apps.shop]\nmax_notify_rate = 0\n"),
                "apps.shop.max_notify_rate",
            ),
            (
                load_toml("[apps.shop.fcm]\nbreaker_failures = 0\n"),
                "apps.shop.fcm.breaker_failures",
            ),
            (
                load_toml("[apps.shop.events]\nwebhook_url = \"ftp://x\"\n"),
                "apps.shop.events.webhook_url",
            ),
            (
                // A per-app webhook is signed with its own key: no key, no webhook.
                load_toml("[apps.shop.events]\nwebhook_url = \"https://hooks.example.com/x\"\n"),
                "apps.shop.events.webhook_secret",
            ),
            (
                load_toml("[apps.shop]\napi_keys = [\"short\"]\n"),
                "apps.shop.api_keys",
            ),
            (
                load_toml("[apps.shop.apns]\nsandbox_endpoint = \"http://10.1.2.3:443\"\n"),
                "apps.shop.apns.sandbox_endpoint",
            ),
            (
                load_toml("[apps.shop.apns]\ntopic = \"com.example shop\"\n"),
                "apps.shop.apns.topic",
            ),
        ];
        for (result, want) in cases {
            let err = result.map(|_| ()).unwrap_err().to_string();
            assert!(err.contains(want), "error `{err}` does not say {want}");
        }
    }

    #[test]
    fn check_config_lists_every_app_with_secrets_redacted() {
        let s = load_toml(
            "[auth]\napi_keys = [\"default-key-0123456789\"]\n\
             [apps.shop]\napi_keys = [\"shop-secret-key-0123456789\"]\n\
             [apps.shop.apns]\nkey_file = \"/run/secrets/shop.p8\"\nkey_id = \"KEY1\"\nteam_id = \"TEAM1\"\ntopic = \"com.example.shop\"\n\
             [apps.shop.events]\nwebhook_url = \"https://hooks.example.com/x?token=hook-secret\"\nwebhook_secret = \"whsec_MDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDA=\"\n",
        )
        .unwrap();
        let out = s.apps_summary().unwrap();
        assert!(out.contains("app default:"), "{out}");
        assert!(out.contains("app shop:"), "{out}");
        assert!(out.contains("topic com.example.shop"), "{out}");
        assert!(out.contains("hooks.example.com"), "{out}");
        for secret in ["shop-secret-key", "default-key", "hook-secret", "shop.p8"] {
            assert!(!out.contains(secret), "{secret} in {out}");
        }
        assert!(!format!("{s:?}").contains("shop-secret-key"));
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2-hunter2-hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
