//! Bench knobs from the environment.

/// `key` parsed as `T`, or `default` when unset or unparseable.
pub fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
