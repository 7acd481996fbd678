//! The gateway's own events (issues 14 and 12): `session_replaced` when a newer session of
//! a device closes its older one on the same node, naming both sessions and both peers.
//! (Across nodes: tests/cluster/in_process.rs; `replayed`: tests/offline/replay.rs.)

use serde_json::Value;

use crate::gw;
use crate::harness::{Backend, World};

/// The `session` object of a `session_replaced` event for a client: its hello's session
/// id and the client's own address, as the gateway saw it (`ip:port`).
fn session_of(hello: &Value, ws: &gw::Ws) -> Value {
    serde_json::json!({
        "id": hello["session_id"],
        "peer": gw::local_addr(ws).to_string(),
    })
}

async fn a_newer_session_on_the_same_node_emits_session_replaced_with_both_peers(b: Backend) {
    let w = World::start(b).await;
    let (mut old, old_hello) = gw::connect(&w.app, "stolen-1").await;
    let old_session = session_of(&old_hello, &old);
    let (new, new_hello) = gw::connect(&w.app, "stolen-1").await;
    let new_session = session_of(&new_hello, &new);
    assert_ne!(
        old_session["peer"], new_session["peer"],
        "two client sockets"
    );
    let (code, _) = gw::expect_close(&mut old).await;
    assert_eq!(code, 4001);

    let events = w.hook.wait("session_replaced", 1).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["app"], "default");
    assert_eq!(e["device_id"], "stolen-1");
    assert_eq!(e["old_session"], old_session);
    assert_eq!(e["new_session"], new_session);
    // About a session, not a notification: none of a delivery's fields.
    for absent in ["notification_id", "channel", "attempt", "token", "reason"] {
        assert!(e.get(absent).is_none(), "{absent} in {e}");
    }
    drop(new);
    w.stop().await;
}

mod a_newer_session_on_the_same_node_emits_session_replaced_with_both_peers {
    use crate::harness::Backend;

    #[tokio::test]
    async fn memory() {
        super::a_newer_session_on_the_same_node_emits_session_replaced_with_both_peers(
            Backend::Memory,
        )
        .await
    }

    #[tokio::test]
    async fn rabbitmq() {
        super::a_newer_session_on_the_same_node_emits_session_replaced_with_both_peers(
            Backend::Rabbit,
        )
        .await
    }
}
