// Unit tests: the protocol logic of herald.js against a fake socket and hand-driven timers.
import { test, describe } from "node:test";
import assert from "node:assert/strict";

import {
  HeraldClient,
  DedupeWindow,
  backoffDelay,
  parseFrame,
  advisedDelay,
  withToken,
  tokenProtocols,
  Defaults,
} from "../herald.js";
import { FakeTimers, fakeWebSocketClass, settle } from "./fakes.js";

const WS_URL = "ws://herald.test/v1/connect";

/** The token a fake socket was opened with: the `herald.bearer.` subprotocol, URL untouched. */
function tokenOf(ws) {
  assert.equal(ws.url, WS_URL, "the token stays out of the URL (access logs)");
  assert.equal(ws.protocols[0], "herald.v1");
  const bearer = ws.protocols.find((p) => p.startsWith("herald.bearer."));
  return bearer?.slice("herald.bearer.".length);
}

function notification(id, title = "Hi") {
  return {
    type: "notification",
    id,
    notification: { title, body: "b" },
    priority: "high",
    accepted_at_ms: 1,
    expires_at_ms: 2,
  };
}

/** A client wired to fakes, and a log of every event it emitted. */
function setup(opts = {}) {
  const timers = new FakeTimers();
  const { FakeWebSocket, sockets } = fakeWebSocketClass();
  const tokens = [];
  let n = 0;
  const probes = [];
  const window = new EventTarget();
  const document = Object.assign(new EventTarget(), { visibilityState: "visible" });
  const navigator = { onLine: true };
  const client = new HeraldClient({
    url: WS_URL,
    token: () => {
      const t = `tok-${++n}`;
      tokens.push(t);
      return t;
    },
    WebSocket: FakeWebSocket,
    timers,
    random: () => 0.5,
    fetch: async (url, init) => {
      probes.push({ url, authorization: init?.headers?.Authorization });
      const status = opts.probeStatus ?? 0;
      if (status === "throw") throw new TypeError("Failed to fetch");
      return { status: typeof status === "function" ? status() : status };
    },
    window,
    document,
    navigator,
    ...opts.client,
  });
  const events = [];
  for (const e of ["state", "hello", "notification", "duplicate", "disconnect", "reconnecting", "unauthorized", "replaced", "serverError", "pong", "error"]) {
    client.on(e, (...args) => events.push([e, ...args]));
  }
  const of = (name) => events.filter((e) => e[0] === name).map((e) => e[1]);
  return { client, timers, sockets, tokens, probes, events, of, window, document, navigator };
}

/** Connects and brings the session to hello; returns the socket. */
async function connected(s) {
  s.client.connect();
  await settle();
  const ws = s.sockets.at(-1);
  ws.open();
  ws.hello();
  assert.equal(s.client.state, "connected");
  return ws;
}

describe("backoffDelay", () => {
  test("stays within [0, min(max, min * 2^n)] for every failure count", () => {
    for (const failures of [0, 1, 2, 5, 7, 17, 40, 1e6]) {
      const ceiling = Math.min(30_000, 250 * 2 ** Math.min(failures, 31));
      for (const r of [0, 0.25, 0.5, 0.999999999]) {
        const d = backoffDelay(250, 30_000, failures, () => r);
        assert.ok(d >= 0 && d <= ceiling, `failures=${failures} r=${r}: ${d} outside [0, ${ceiling}]`);
        assert.ok(Number.isInteger(d));
      }
      assert.equal(backoffDelay(250, 30_000, failures, () => 0), 0);
      assert.equal(backoffDelay(250, 30_000, failures, () => 0.999999999), ceiling, "the ceiling itself is reachable");
    }
  });

  test("the ceiling doubles per failure and is capped", () => {
    const top = (n) => backoffDelay(100, 2000, n, () => 0.999999999);
    assert.deepEqual([0, 1, 2, 3, 4, 5, 6].map(top), [100, 200, 400, 800, 1600, 2000, 2000]);
  });

  test("full jitter spreads delays over the whole range", () => {
    const seen = new Set();
    for (let i = 0; i < 200; i++) seen.add(backoffDelay(100, 2000, 5));
    assert.ok(seen.size > 50, `only ${seen.size} distinct delays`);
    assert.ok([...seen].some((d) => d < 500) && [...seen].some((d) => d > 1500));
  });
});

describe("DedupeWindow", () => {
  test("reports duplicates and forgets the oldest id past its capacity", () => {
    const w = new DedupeWindow(3);
    assert.equal(w.add("a"), true);
    assert.equal(w.add("b"), true);
    assert.equal(w.add("c"), true);
    assert.equal(w.add("a"), false, "a is a duplicate (and is now the newest)");
    assert.equal(w.add("d"), true); // evicts b, the oldest
    assert.equal(w.size, 3);
    assert.equal(w.add("a"), false);
    assert.equal(w.add("c"), false);
    assert.equal(w.add("b"), true, "b was evicted");
  });

  test("the default window holds 4096 ids, like the reference client", () => {
    const w = new DedupeWindow(Defaults.dedupeCapacity);
    for (let i = 0; i < 4096; i++) w.add(`id-${i}`);
    assert.equal(w.add("id-0"), false);
    for (let i = 4096; i < 8192; i++) w.add(`id-${i}`);
    assert.equal(w.size, 4096);
    assert.equal(w.add("id-1"), true);
  });

  test("refuses a zero capacity", () => {
    assert.throws(() => new DedupeWindow(0), RangeError);
  });
});

describe("frame parsing", () => {
  test("accepts JSON objects with a string type and keeps unknown fields", () => {
    assert.deepEqual(parseFrame('{"type":"pong","nonce":"1","later":true}'), { type: "pong", nonce: "1", later: true });
  });

  test("rejects what is not a protocol frame", () => {
    for (const bad of ["", "not json", "[]", "null", "42", '"hello"', '{"id":"x"}', '{"type":5}', undefined, new ArrayBuffer(4)]) {
      assert.equal(parseFrame(bad), null, String(bad));
    }
  });

  test("advisedDelay reads only reconnect_after_ms=N", () => {
    assert.equal(advisedDelay("reconnect_after_ms=1830"), 1830);
    assert.equal(advisedDelay("reconnect_after_ms=0"), 0);
    for (const r of ["", "shutting down", "reconnect_after_ms=", "reconnect_after_ms=-5", "reconnect_after_ms=1x"]) {
      assert.equal(advisedDelay(r), null, r);
    }
  });

  test("tokenProtocols offers herald.v1 and the bearer entry", () => {
    assert.deepEqual(tokenProtocols("a.b-c_d"), ["herald.v1", "herald.bearer.a.b-c_d"]);
  });

  test("withToken puts the token in the query, encoded", () => {
    assert.equal(withToken("ws://h/v1/connect", "a.b+c"), "ws://h/v1/connect?token=a.b%2Bc");
    assert.equal(withToken("ws://h/v1/connect?x=1#f", "t"), "ws://h/v1/connect?x=1&token=t");
  });
});

describe("HeraldClient: session", () => {
  test("connects with a fresh token in the subprotocol and reports hello", async () => {
    const s = setup();
    const ws = await connected(s);
    assert.equal(tokenOf(ws), "tok-1");
    assert.equal(s.of("hello")[0].session_id, "s-1");
    assert.deepEqual(
      s.of("state").slice(0, 2),
      ["connecting", "connected"],
    );
    assert.equal(s.client.hello.ping_interval_ms, 1000);
  });

  test("a notification is handed over once, then acked; a duplicate is acked but not shown", async () => {
    const s = setup();
    const ws = await connected(s);
    const order = [];
    s.client.on("notification", (n) => order.push(`shown ${n.id} acks=${ws.acks().length}`));
    ws.message(notification("n-1"));
    ws.message(notification("n-2"));
    ws.message(notification("n-1")); // a re-send: the server did not get (or not in time) the ack
    assert.deepEqual(order, ["shown n-1 acks=0", "shown n-2 acks=1"], "acked only after the handler returned");
    assert.deepEqual(ws.acks(), ["n-1", "n-2", "n-1"], "one ack per notification frame, duplicates included");
    assert.deepEqual(s.of("notification").map((n) => n.id), ["n-1", "n-2"]);
    assert.deepEqual(s.of("duplicate").map((n) => n.id), ["n-1"]);
    assert.equal(s.of("notification")[0].type, undefined, "the frame's type is not part of the notification");
    assert.equal(s.of("notification")[0].notification.title, "Hi");
  });

  test("duplicates are recognised across reconnects", async () => {
    const s = setup();
    const ws = await connected(s);
    ws.message(notification("n-1"));
    ws.drop();
    await s.timers.advance(Defaults.backoffMaxMs);
    const ws2 = s.sockets.at(-1);
    assert.notEqual(ws2, ws);
    ws2.open();
    ws2.hello({ session_id: "s-2" });
    ws2.message(notification("n-1"));
    assert.deepEqual(ws2.acks(), ["n-1"]);
    assert.equal(s.of("notification").length, 1);
    assert.equal(s.of("duplicate").length, 1);
  });

  test("an async handler delays the ack until its promise settles", async () => {
    const s = setup();
    const ws = await connected(s);
    let release;
    s.client.on("notification", () => new Promise((r) => (release = r)));
    ws.message(notification("n-1"));
    await settle();
    assert.deepEqual(ws.acks(), []);
    release();
    await settle();
    assert.deepEqual(ws.acks(), ["n-1"]);
  });

  test("a throwing handler is reported and the notification is still acked", async () => {
    const s = setup();
    const ws = await connected(s);
    s.client.on("notification", () => {
      throw new Error("boom");
    });
    ws.message(notification("n-1"));
    assert.deepEqual(ws.acks(), ["n-1"]);
    assert.equal(s.of("error")[0].message, "boom");
  });

  test("frames that are not protocol frames, and notifications without an id, are ignored", async () => {
    const s = setup();
    const ws = await connected(s);
    ws.message("not json");
    ws.message({ type: "notification", priority: "high" });
    ws.message({ type: "something_new", x: 1 });
    ws.message({ type: "error", code: "bad_frame", message: "unknown type" });
    assert.deepEqual(ws.acks(), []);
    assert.equal(s.of("notification").length, 0);
    assert.deepEqual(s.of("serverError"), [{ code: "bad_frame", message: "unknown type" }]);
    assert.equal(s.client.state, "connected");
  });

  test("close() closes with 1000 and never reconnects", async () => {
    const s = setup();
    const ws = await connected(s);
    s.client.close();
    assert.equal(ws.closedByClient.code, 1000);
    assert.equal(s.client.state, "stopped");
    ws.serverClose(1000);
    await s.timers.advance(10 * Defaults.backoffMaxMs);
    assert.equal(s.sockets.length, 1);
  });

  test("a late frame on a replaced socket is not acked on it", async () => {
    const s = setup();
    const ws = await connected(s);
    ws.drop();
    await s.timers.advance(Defaults.backoffMaxMs);
    ws.readyState = 1; // pretend the old socket still delivers
    ws.message(notification("n-9"));
    assert.deepEqual(ws.acks(), []);
    assert.equal(s.of("notification").length, 0);
  });
});

describe("HeraldClient: heartbeat", () => {
  test("pings once per ping_interval_ms and stays up while pongs come back", async () => {
    const s = setup();
    const ws = await connected(s);
    await s.timers.advance(999);
    assert.equal(ws.pings().length, 0, "no faster than the server pings");
    await s.timers.advance(1);
    assert.equal(ws.pings().length, 1);
    ws.message({ type: "pong", nonce: ws.pings()[0].nonce });
    await s.timers.advance(1000);
    assert.equal(ws.pings().length, 2);
    ws.message({ type: "pong", nonce: ws.pings()[1].nonce });
    for (let i = 0; i < 5; i++) {
      await s.timers.advance(1000);
      ws.message({ type: "pong", nonce: ws.pings().at(-1).nonce });
    }
    assert.equal(ws.pings().length, 7);
    assert.equal(s.client.state, "connected");
    assert.equal(ws.closedByClient, null);
    assert.equal(s.of("pong").length >= 2, true);
  });

  test("any frame counts as proof of life", async () => {
    const s = setup();
    const ws = await connected(s);
    await s.timers.advance(1000); // ping sent
    await s.timers.advance(300);
    ws.message(notification("n-1")); // not a pong, still the server talking
    await s.timers.advance(200); // the pong deadline passes
    assert.equal(s.client.state, "connected");
  });

  test("declares the link dead after ping_interval_ms + pong_timeout_ms of silence and reconnects", async () => {
    const s = setup();
    const ws = await connected(s);
    await s.timers.advance(1499);
    assert.equal(s.client.state, "connected");
    await s.timers.advance(1);
    assert.equal(ws.closedByClient.code, 1000);
    assert.equal(s.client.state, "waiting");
    const r = s.of("reconnecting")[0];
    assert.equal(r.reason, "heartbeat_timeout");
    assert.ok(r.delayMs <= Defaults.backoffMinMs, "a session had started, so the backoff starts over");
    await s.timers.advance(r.delayMs);
    assert.equal(s.sockets.length, 2);
    assert.equal(tokenOf(s.sockets[1]), "tok-2", "every reconnect asks for a token again");
  });

  test("no hello within the handshake timeout counts as a failure", async () => {
    const s = setup();
    s.client.connect();
    await settle();
    s.sockets[0].open(); // TCP and upgrade fine, then nothing
    await s.timers.advance(Defaults.handshakeTimeoutMs - 1);
    assert.equal(s.client.state, "connecting");
    await s.timers.advance(1);
    assert.equal(s.sockets[0].closedByClient?.code, 1000);
    assert.equal(s.client.state, "waiting");
  });
});

describe("HeraldClient: close codes", () => {
  test("4001 replaced: stops for good and says so", async () => {
    const s = setup();
    const ws = await connected(s);
    ws.serverClose(4001, "replaced");
    assert.equal(s.client.state, "stopped");
    assert.deepEqual(s.of("replaced"), [{ code: 4001, reason: "replaced" }]);
    await s.timers.advance(10 * Defaults.backoffMaxMs);
    assert.equal(s.sockets.length, 1, "never reconnects by itself");
  });

  test("4002 shutdown: waits exactly the advised delay, then reconnects", async () => {
    const s = setup();
    const ws = await connected(s);
    ws.serverClose(4002, "reconnect_after_ms=1830");
    assert.deepEqual(s.of("reconnecting").at(-1), { delayMs: 1830, attempt: 0, reason: "server_shutdown" });
    await s.timers.advance(1829);
    assert.equal(s.sockets.length, 1);
    await s.timers.advance(1);
    assert.equal(s.sockets.length, 2);
  });

  test("4002: the advised delay is capped by backoffMaxMs; without one it backs off", async () => {
    const s = setup();
    let ws = await connected(s);
    ws.serverClose(4002, "reconnect_after_ms=99999999");
    assert.equal(s.of("reconnecting").at(-1).delayMs, Defaults.backoffMaxMs);
    await s.timers.advance(Defaults.backoffMaxMs);
    ws = s.sockets.at(-1);
    ws.open();
    ws.hello();
    ws.serverClose(4002, "");
    const r = s.of("reconnecting").at(-1);
    assert.equal(r.reason, "server_shutdown");
    assert.ok(r.delayMs <= Defaults.backoffMinMs);
  });

  for (const [code, reason] of [
    [4000, "pong_timeout"],
    [4003, "protocol_error"],
    [4004, "slow_consumer"],
    [1009, "message_too_big"],
    [1006, "connection_lost"],
    [1011, "connection_lost"],
  ]) {
    test(`${code}: reconnects with backoff (${reason})`, async () => {
      const s = setup();
      const ws = await connected(s);
      ws.serverClose(code, "");
      const r = s.of("reconnecting").at(-1);
      assert.equal(r.reason, reason);
      assert.equal(r.delayMs, backoffDelay(Defaults.backoffMinMs, Defaults.backoffMaxMs, 0, () => 0.5));
      await s.timers.advance(r.delayMs);
      assert.equal(s.sockets.length, 2);
      assert.equal(s.client.state, "connecting");
    });
  }

  test("consecutive failures grow the backoff; hello resets it", async () => {
    const s = setup({ client: { random: () => 0.999999999 } });
    s.client.connect();
    await settle();
    const delays = [];
    for (let i = 0; i < 9; i++) {
      s.sockets.at(-1).drop();
      await settle();
      const d = s.of("reconnecting").at(-1).delayMs;
      delays.push(d);
      await s.timers.advance(d);
    }
    assert.deepEqual(delays, [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
    const ws = s.sockets.at(-1);
    ws.open();
    ws.hello();
    ws.drop();
    assert.equal(s.of("reconnecting").at(-1).delayMs, 250);
  });
});

describe("HeraldClient: tokens", () => {
  test("401 at connect: one immediate retry with a new token, then stop with `unauthorized`", async () => {
    const s = setup({ probeStatus: 401 });
    s.client.connect();
    await settle();
    s.sockets[0].drop(); // the handshake was refused; the browser does not say why
    await settle();
    await s.timers.advance(0);
    assert.deepEqual(
      s.probes[0],
      { url: "http://herald.test/v1/connect", authorization: "Bearer tok-1" },
      "asks the gateway with the same token, in the Authorization header",
    );
    assert.equal(s.sockets.length, 2, "retried at once");
    assert.equal(tokenOf(s.sockets[1]), "tok-2", "with a new token");
    s.sockets[1].drop();
    await settle();
    assert.equal(s.client.state, "stopped");
    assert.deepEqual(s.of("unauthorized"), [{ status: 401 }]);
    await s.timers.advance(10 * Defaults.backoffMaxMs);
    assert.equal(s.sockets.length, 2);
    assert.deepEqual(s.tokens, ["tok-1", "tok-2"]);
  });

  test("a 401 followed by a good token carries on, and the count starts over", async () => {
    let status = 401;
    const s = setup({ probeStatus: () => status });
    s.client.connect();
    await settle();
    s.sockets[0].drop();
    await settle();
    await s.timers.advance(0);
    const ws = s.sockets[1];
    ws.open();
    ws.hello();
    ws.serverClose(4000);
    await s.timers.advance(s.of("reconnecting").at(-1).delayMs);
    assert.equal(s.sockets.length, 3);
    s.sockets[2].drop(); // 401 again: the first of a new run, so retried at once
    await settle();
    await s.timers.advance(0);
    assert.equal(s.sockets.length, 4);
    assert.notEqual(s.client.state, "stopped");
    assert.equal(s.of("unauthorized").length, 0);
    status = 0;
    s.sockets[3].drop(); // now an ordinary failure
    await settle();
    assert.equal(s.of("reconnecting").at(-1).reason, "connect_failed");
  });

  test("an unreadable probe (cross-origin) or a 503 is an ordinary failure: backoff", async () => {
    for (const [probeStatus, reason] of [["throw", "connect_failed"], [0, "connect_failed"], [503, "server_unavailable"]]) {
      const s = setup({ probeStatus });
      s.client.connect();
      await settle();
      s.sockets[0].drop();
      await settle();
      assert.equal(s.of("reconnecting").at(-1).reason, reason);
      assert.equal(s.client.state, "waiting");
    }
  });

  test("a failing token function is reported and retried with backoff", async () => {
    let fail = true;
    const s = setup({
      client: {
        token: async () => {
          if (fail) throw new Error("backend down");
          return "good";
        },
      },
    });
    s.client.connect();
    await settle();
    assert.equal(s.sockets.length, 0);
    assert.equal(s.of("error")[0].message, "backend down");
    assert.equal(s.of("reconnecting").at(-1).reason, "token_unavailable");
    fail = false;
    await s.timers.advance(s.of("reconnecting").at(-1).delayMs);
    assert.equal(s.sockets.length, 1);
    assert.equal(tokenOf(s.sockets[0]), "good");
  });

  test("a fixed string token works too", async () => {
    const s = setup({ client: { token: "static" } });
    s.client.connect();
    await settle();
    assert.equal(tokenOf(s.sockets[0]), "static");
  });
});

describe("HeraldClient: page events", () => {
  test("offline holds retries until online, which reconnects at once", async () => {
    const s = setup();
    const ws = await connected(s);
    s.navigator.onLine = false;
    s.window.dispatchEvent(new Event("offline"));
    assert.equal(s.client.state, "connected", "the socket is kept: the event is unreliable");
    ws.drop();
    await s.timers.advance(10 * Defaults.backoffMaxMs);
    assert.equal(s.sockets.length, 1, "no attempts while offline");
    s.navigator.onLine = true;
    s.window.dispatchEvent(new Event("online"));
    await settle();
    assert.equal(s.sockets.length, 2);
  });

  test("online while connected checks the link with a ping", async () => {
    const s = setup();
    const ws = await connected(s);
    s.window.dispatchEvent(new Event("online"));
    assert.equal(ws.pings().length, 1);
    await s.timers.advance(500); // pong_timeout_ms, and no answer
    assert.equal(s.client.state, "waiting");
  });

  test("becoming visible cuts a backoff short but not a server-advised delay", async () => {
    const s = setup();
    let ws = await connected(s);
    ws.drop();
    assert.equal(s.client.state, "waiting");
    s.document.dispatchEvent(new Event("visibilitychange"));
    await settle();
    assert.equal(s.sockets.length, 2, "backoff cut short");
    ws = s.sockets[1];
    ws.open();
    ws.hello();
    ws.serverClose(4002, "reconnect_after_ms=3000");
    s.document.dispatchEvent(new Event("visibilitychange"));
    await settle();
    assert.equal(s.sockets.length, 2, "the advised delay spreads the fleet: kept");
    await s.timers.advance(3000);
    assert.equal(s.sockets.length, 3);
  });

  test("becoming visible while connected pings at once", async () => {
    const s = setup();
    const ws = await connected(s);
    s.document.dispatchEvent(new Event("visibilitychange"));
    assert.equal(ws.pings().length, 1);
  });

  test("listeners are removed when the client stops", async () => {
    const s = setup();
    await connected(s);
    s.client.close();
    s.window.dispatchEvent(new Event("online"));
    s.document.dispatchEvent(new Event("visibilitychange"));
    await settle();
    assert.equal(s.sockets.length, 1);
  });
});

describe("HeraldClient: options", () => {
  test("refuses a non-WebSocket URL and a missing token", () => {
    const { FakeWebSocket } = fakeWebSocketClass();
    assert.throws(() => new HeraldClient({ url: "http://x/v1/connect", token: "t", WebSocket: FakeWebSocket }), TypeError);
    assert.throws(() => new HeraldClient({ url: WS_URL, WebSocket: FakeWebSocket }), TypeError);
  });
});

describe("package", () => {
  test("herald.d.ts declares exactly what herald.js exports", async () => {
    const { readFile } = await import("node:fs/promises");
    const dts = await readFile(new URL("../herald.d.ts", import.meta.url), "utf8");
    const declared = [...dts.matchAll(/^export declare (?:const|function|class) (\w+)/gm)].map((m) => m[1]).sort();
    const actual = Object.keys(await import("../herald.js")).sort();
    assert.deepEqual(declared, actual);
  });

  test("herald.js imports nothing (zero runtime dependencies, no build step)", async () => {
    const { readFile } = await import("node:fs/promises");
    const src = await readFile(new URL("../herald.js", import.meta.url), "utf8");
    assert.doesNotMatch(src, /^\s*import\s/m);
    assert.doesNotMatch(src, /\brequire\(/);
    const pkg = JSON.parse(await readFile(new URL("../package.json", import.meta.url), "utf8"));
    assert.equal(pkg.dependencies, undefined);
  });
});
