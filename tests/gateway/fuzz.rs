//! Frame fuzzing (issue 14): generated frames thrown at real sessions over a raw socket.
//!
//! Each case opens a session, writes a short generated sequence (random bytes, truncated,
//! oversized and mistyped JSON, fragments, control frames with payloads, close frames with
//! bad codes, reserved bits, unknown opcodes, unmasked frames), then a probe ping. The
//! server must answer with protocol frames only: error frames (at most
//! `gateway.max_bad_frames`), the probe's pong, or a close with a documented code. After
//! every case: the bystander session still acks a delivery, no session is left behind
//! (so no session task died mid-way: a panicking task would never count itself closed),
//! and the node still takes sessions. A fixed seed list keeps it reproducible and bounded
//! (~200 cases, a few seconds); a failure names its seed.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;
use crate::support::fixtures::notification_with_data;
use crate::support::wait_for;

const CASES: u64 = 200;
/// Small, so "oversized" is cheap to generate.
const MAX_FRAME: usize = 4096;

/// xorshift64*: a seeded generator in ten lines, so a failing seed replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// One client frame: `fin`, reserved bits, opcode, payload; masked unless `unmasked`.
fn frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8], unmasked: bool) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | ((rsv & 7) << 4) | (opcode & 0xF)];
    let mask_bit = if unmasked { 0 } else { 0x80 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if unmasked {
        out.extend_from_slice(payload);
    } else {
        let key = [0x11, 0x22, 0x33, 0x44];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    }
    out
}

fn text(payload: &str) -> Vec<u8> {
    frame(true, 0, TEXT, payload.as_bytes(), false)
}

const VALID: &[&str] = &[
    r#"{"type":"ping","nonce":"n"}"#,
    r#"{"type":"ack","id":"01890a5d-ac96-774b-bcce-b302099a8057"}"#,
];

const MISTYPED: &[&str] = &[
    r#"{"type":"ack","id":5}"#,
    r#"{"type":"ack"}"#,
    r#"{"type":"ack","id":"not-a-uuid"}"#,
    r#"{"type":5}"#,
    r#"{"type":"subscribe","topic":"x"}"#,
    r#"{"type":"ping","nonce":{"deep":[1,2,3]}}"#,
    r#"{"type":"ping","nonce":"n","extra":true}"#,
    r#"[]"#,
    r#""ack""#,
    r#"null"#,
    r#"{}"#,
    r#"{"type":"ack","id":"01890a5d-ac96-774b-bcce-b302099a8057","id":"dup"}"#,
    "{\"type\":\"ping\",\"nonce\":\"\\ud800\"}",
];

/// One generated step and whether the connection may then end without a readable close:
/// after raw junk a later frame may be swallowed (the probe is never read; the heartbeat
/// ends the session), and an oversized frame may be reset mid-write.
fn step(rng: &mut Rng) -> (Vec<u8>, bool) {
    match rng.below(14) {
        0 => {
            let n = 1 + rng.below(64) as usize;
            (rng.bytes(n), true)
        }
        1 => {
            let v = rng.pick(VALID);
            let cut = rng.below(v.len() as u64) as usize;
            (text(&v[..cut]), false)
        }
        2 => {
            let big = format!(
                r#"{{"type":"ping","nonce":"{}"}}"#,
                "x".repeat(MAX_FRAME + rng.below(4 * MAX_FRAME as u64) as usize)
            );
            // The server may close (1009) while this is still being written: the reset
            // can eat the close frame on the client's side.
            (text(&big), true)
        }
        3 => (text(rng.pick::<&str>(MISTYPED)), false),
        4 => {
            // A valid message in 2-4 fragments.
            let v = rng.pick(VALID).as_bytes();
            let mid = 1 + rng.below(v.len() as u64 - 1) as usize;
            let mut out = frame(false, 0, TEXT, &v[..mid], false);
            if rng.below(2) == 0 {
                // A control frame may sit between fragments.
                out.extend(frame(true, 0, PING, b"between", false));
            }
            out.extend(frame(true, 0, CONTINUATION, &v[mid..], false));
            (out, false)
        }
        5 => {
            // Broken fragmentation: a continuation with nothing to continue, or a new data
            // frame before the last one finished.
            if rng.below(2) == 0 {
                (frame(true, 0, CONTINUATION, b"{}", false), false)
            } else {
                let mut out = frame(false, 0, TEXT, b"{\"ty", false);
                out.extend(text(VALID[0]));
                (out, false)
            }
        }
        6 => {
            let n = rng.below(200) as usize;
            (frame(true, 0, PING, &rng.bytes(n), false), false)
        }
        7 => {
            let n = rng.below(200) as usize;
            (frame(true, 0, PONG, &rng.bytes(n), false), false)
        }
        8 => {
            // Control frames cannot be fragmented.
            (frame(false, 0, PING, b"frag", false), false)
        }
        9 => {
            let code: u16 = *rng.pick(&[
                0, 999, 1004, 1005, 1006, 1015, 2999, 5000, 65535, 1000, 4000,
            ]);
            let mut payload = code.to_be_bytes().to_vec();
            match rng.below(3) {
                0 => payload.truncate(1),
                1 => payload.extend_from_slice(&[0xff, 0xfe]),
                _ => payload.extend_from_slice(b"bye"),
            }
            (frame(true, 0, CLOSE, &payload, false), false)
        }
        10 => (
            frame(true, 0, TEXT, &[0xc3, 0x28, 0xa0, 0xa1], false),
            false,
        ),
        11 => {
            let rsv = 1 + rng.below(7) as u8;
            (frame(true, rsv, TEXT, VALID[0].as_bytes(), false), false)
        }
        12 => {
            let op = *rng.pick(&[3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]);
            (frame(true, 0, op, b"??", false), false)
        }
        _ => {
            if rng.below(2) == 0 {
                (frame(true, 0, TEXT, VALID[0].as_bytes(), true), false)
            } else {
                (frame(true, 0, BINARY, &rng.bytes(16), false), false)
            }
        }
    }
}

/// A session on a raw socket.
struct Raw {
    tcp: TcpStream,
    buf: Vec<u8>,
}

enum Got {
    Text(String),
    Close(Option<u16>),
    Ping(Vec<u8>),
    Other,
    Eof,
}

impl Raw {
    async fn open(app: &GwApp, device: &str) -> Raw {
        let mut tcp = TcpStream::connect(app.addr).await.unwrap();
        let head = format!(
            "GET /v1/connect HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {}\r\n\r\n",
            token(device)
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut raw = Raw {
            tcp,
            buf: Vec::new(),
        };
        let end = loop {
            if let Some(i) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(raw.fill().await, "the handshake answer");
        };
        let head = String::from_utf8_lossy(&raw.buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        raw.buf.drain(..end);
        raw
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(WAIT, self.tcp.read(&mut chunk))
            .await
            .expect("the server answers within the wait (no hang)")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    async fn need(&mut self, n: usize) -> bool {
        while self.buf.len() < n {
            if !self.fill().await {
                return false;
            }
        }
        true
    }

    /// The next server frame (servers do not mask).
    async fn next(&mut self) -> Got {
        if !self.need(2).await {
            return Got::Eof;
        }
        let (b0, b1) = (self.buf[0], self.buf[1]);
        assert_eq!(b1 & 0x80, 0, "a server frame is never masked");
        let (len, at) = match b1 & 0x7F {
            126 => {
                if !self.need(4).await {
                    return Got::Eof;
                }
                (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
            }
            127 => {
                if !self.need(10).await {
                    return Got::Eof;
                }
                (
                    u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                    10,
                )
            }
            n => (n as usize, 2),
        };
        if !self.need(at + len).await {
            return Got::Eof;
        }
        let payload: Vec<u8> = self.buf[at..at + len].to_vec();
        self.buf.drain(..at + len);
        match b0 & 0xF {
            TEXT => Got::Text(String::from_utf8(payload).expect("server text is UTF-8")),
            CLOSE => Got::Close(
                (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])),
            ),
            PING => Got::Ping(payload),
            _ => Got::Other,
        }
    }
}

/// Close codes a fuzzed session may end with: docs/protocol.md's, RFC 6455's protocol error
/// (1002), invalid data (1007), and a valid code the client sent (echoed).
const DOCUMENTED: &[u16] = &[1000, 1002, 1007, 1009, 4000, 4003];

#[tokio::test]
async fn generated_frames_never_hurt_the_node_or_other_sessions() {
    let mut s = settings();
    s.gateway.max_frame_bytes = MAX_FRAME;
    s.gateway.device_connects_per_minute = 1_000_000;
    s.gateway.device_connect_burst = 1_000_000;
    s.gateway.ip_connects_per_second = 1_000_000;
    s.gateway.ip_connect_burst = 1_000_000;
    s.gateway.max_session_rate = 1_000_000;
    s.gateway.session_burst = 1_000_000;
    let max_bad = s.gateway.max_bad_frames as usize;
    let app = spawn(s).await;
    let (bystander, _) = connect(&app, "bystander").await;
    let _acks = spawn_acker(bystander);
    let (mut closes, mut alive, mut eofs) = (0, 0, 0);
    for seed in 1..=CASES {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut raw = Raw::open(&app, &format!("fuzz-{seed}")).await;
        let mut sent = Vec::new();
        let mut swallowing = false;
        let mut client_codes = Vec::new();
        for _ in 0..1 + rng.below(5) {
            let (bytes, swallows) = step(&mut rng);
            if bytes.len() >= 2 && bytes[0] & 0xF == CLOSE && bytes[1] & 0x7F >= 2 {
                let masked = &bytes[6..8];
                client_codes.push(u16::from_be_bytes([masked[0] ^ 0x11, masked[1] ^ 0x22]));
            }
            swallowing |= swallows;
            sent.extend(bytes);
        }
        let probe = format!("end-{seed}");
        sent.extend(text(&format!(r#"{{"type":"ping","nonce":"{probe}"}}"#)));
        // The server may close mid-way and reset the connection: a failed write is fine.
        let _ = raw.tcp.write_all(&sent).await;
        let mut errors = 0;
        let outcome = loop {
            match raw.next().await {
                Got::Text(t) => {
                    let v: serde_json::Value = serde_json::from_str(&t)
                        .unwrap_or_else(|e| panic!("seed {seed}: server sent non-JSON {t:?}: {e}"));
                    match v["type"].as_str() {
                        Some("hello") => {}
                        Some("error") => errors += 1,
                        Some("pong") if v["nonce"] == probe.as_str() => break "alive",
                        Some("pong") => {}
                        _ => panic!("seed {seed}: unexpected frame {v}"),
                    }
                }
                Got::Ping(p) => {
                    let _ = raw.tcp.write_all(&frame(true, 0, PONG, &p, false)).await;
                }
                Got::Close(code) => {
                    let code = code.unwrap_or(1005);
                    assert!(
                        DOCUMENTED.contains(&code) || client_codes.contains(&code),
                        "seed {seed}: close code {code} is not documented"
                    );
                    break "closed";
                }
                Got::Other => {}
                Got::Eof => break "eof",
            }
        };
        assert!(errors <= max_bad, "seed {seed}: {errors} error frames");
        match outcome {
            "alive" => alive += 1,
            "closed" => closes += 1,
            _ => {
                assert!(
                    swallowing || !client_codes.is_empty(),
                    "seed {seed}: the connection ended without a close frame"
                );
                eofs += 1
            }
        }
        drop(raw);
        // Everyone else is unaffected: the bystander still acks, the node still counts.
        assert_eq!(
            app.directory
                .deliver(&device("bystander"), &notification_with_data(8))
                .await,
            herald::directory::LiveOutcome::Acked,
            "seed {seed}: the bystander was hurt"
        );
    }
    eprintln!("fuzz: {CASES} cases, {alive} alive, {closes} closed, {eofs} ended without close");
    assert!(
        alive > 0 && closes > 0,
        "the generator reaches both outcomes"
    );
    // Every fuzzed session ended and counted itself closed: none died mid-task.
    wait_for(WAIT, "only the bystander left", || async {
        (app.metric("herald_gateway_sessions_active") == 1.0).then_some(())
    })
    .await;
    let res = reqwest::get(format!("{}/healthz", app.base)).await.unwrap();
    assert_eq!(res.status(), 200);
    let _fresh = connect(&app, "after-fuzz").await;
    app.stop().await;
}
