// Test doubles for the unit tests: a WebSocket whose server side the test plays, and timers
// the test advances by hand (so no test waits on the wall clock).

export class FakeTimers {
  constructor() {
    this.nowMs = 0;
    this.nextId = 1;
    /** @type {Map<number, {at: number, fn: () => void, seq: number}>} */
    this.pending = new Map();
    this.seq = 0;
  }

  setTimeout(fn, ms) {
    const id = this.nextId++;
    this.pending.set(id, { at: this.nowMs + Math.max(0, ms), fn, seq: this.seq++ });
    return id;
  }

  clearTimeout(id) {
    this.pending.delete(id);
  }

  now() {
    return this.nowMs;
  }

  /** Runs every timer due within `ms`, in due order, moving the clock as it goes. */
  async advance(ms) {
    const end = this.nowMs + ms;
    for (;;) {
      let next = null;
      for (const [id, t] of this.pending) {
        if (t.at <= end && (next === null || t.at < next[1].at || (t.at === next[1].at && t.seq < next[1].seq))) {
          next = [id, t];
        }
      }
      if (next === null) break;
      this.pending.delete(next[0]);
      this.nowMs = next[1].at;
      next[1].fn();
      await settle();
    }
    this.nowMs = end;
    await settle();
  }

  /** Due times of pending timers, relative to now. */
  delays() {
    return [...this.pending.values()].map((t) => t.at - this.nowMs).sort((a, b) => a - b);
  }
}

/** Lets promise callbacks (async token functions, the 401 probe) run. */
export async function settle() {
  for (let i = 0; i < 10; i++) await new Promise((r) => setImmediate(r));
}

/** Builds a WebSocket class whose instances land in `sockets`. */
export function fakeWebSocketClass() {
  const sockets = [];
  class FakeWebSocket {
    static CONNECTING = 0;
    static OPEN = 1;
    static CLOSING = 2;
    static CLOSED = 3;

    constructor(url, protocols) {
      this.url = url;
      /** The subprotocols offered (the device token rides in one). */
      this.protocols = protocols;
      this.readyState = 0;
      /** Frames the client sent, parsed. */
      this.sent = [];
      /** The client's own close call, if any. */
      this.closedByClient = null;
      this.onopen = null;
      this.onmessage = null;
      this.onclose = null;
      this.onerror = null;
      sockets.push(this);
    }

    send(data) {
      if (this.readyState !== 1) throw new Error("InvalidStateError: not open");
      this.sent.push(JSON.parse(data));
    }

    close(code, reason) {
      this.closedByClient = { code, reason };
      this.readyState = 3;
    }

    // ---- the server's side ----

    open() {
      this.readyState = 1;
      this.onopen?.({});
    }

    /** A text frame; objects are JSON-encoded. */
    message(frame) {
      this.onmessage?.({ data: typeof frame === "string" ? frame : JSON.stringify(frame) });
    }

    hello(overrides = {}) {
      this.message({
        type: "hello",
        session_id: "s-1",
        device_id: "web-1",
        ping_interval_ms: 1000,
        pong_timeout_ms: 500,
        ack_timeout_ms: 1000,
        max_frame_bytes: 65536,
        ...overrides,
      });
    }

    serverClose(code, reason = "") {
      this.readyState = 3;
      this.onclose?.({ code, reason, wasClean: true });
    }

    /** The connection failed before or after opening, without a close frame. */
    drop() {
      this.readyState = 3;
      this.onerror?.({});
      this.onclose?.({ code: 1006, reason: "", wasClean: false });
    }

    acks() {
      return this.sent.filter((f) => f.type === "ack").map((f) => f.id);
    }

    pings() {
      return this.sent.filter((f) => f.type === "ping");
    }
  }
  return { FakeWebSocket, sockets };
}
