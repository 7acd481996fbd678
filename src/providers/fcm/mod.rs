//! FCM (HTTP v1): message body now; OAuth2 and the transport come with the dispatcher.

mod message;

pub use message::{MAX_PAYLOAD_BYTES, message, payload_size};
