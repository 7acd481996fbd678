//! The one error body every HTTP refusal carries: `{"error": {"code", "message"}}`.
//!
//! A low module on purpose: the API's errors (`api/error.rs`) and the gateway's refusals
//! (`gateway/refusal.rs`, written through actix or as raw HTTP/1.1 on the upgrade path)
//! both render it, and neither should import the other to do so.

use serde_json::json;

/// The JSON error body: `code` is stable (clients switch on it), `message` is for people.
pub fn body(code: &str, message: &str) -> String {
    json!({"error": {"code": code, "message": message}}).to_string()
}
