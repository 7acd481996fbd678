//! APNs: payload now; token auth and the HTTP/2 transport come with the dispatcher.

mod payload;

pub use payload::{MAX_PAYLOAD_BYTES, payload, payload_size};
