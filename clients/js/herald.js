// herald device client for browsers (and any runtime with a WHATWG WebSocket).
//
// One ES module, no dependencies, no build step: import it as it is. It speaks the device
// protocol of docs/protocol.md exactly as `herald connect` (src/client/) does: one ack per
// notification frame (duplicates included), dedupe on id over a bounded window, the
// heartbeat a browser can actually see (application-level `ping`/`pong`), dead-link
// detection, capped full-jitter backoff, and every close code handled as the protocol says.
//
// Types: JSDoc here, and herald.d.ts next to it for TypeScript.

/**
 * Close codes herald sends (docs/protocol.md section 7; src/gateway/protocol.rs).
 * @readonly
 */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  MESSAGE_TOO_BIG: 1009,
  PONG_TIMEOUT: 4000,
  REPLACED: 4001,
  SHUTDOWN: 4002,
  PROTOCOL_ERROR: 4003,
  SLOW_CONSUMER: 4004,
});

/**
 * Defaults, the same as `herald connect`'s where it has one.
 * @readonly
 */
export const Defaults = Object.freeze({
  /** First backoff ceiling; doubles per consecutive failure (`--backoff-min`). */
  backoffMinMs: 250,
  /** Largest backoff ceiling, and the cap on a server-advised reconnect delay (`--backoff-max`). */
  backoffMaxMs: 30_000,
  /**
   * Notification ids remembered for dedupe. A redelivery comes within the server's retry
   * window (minutes); 4,096 ids cover that for any device that is not a firehose. Same as
   * the reference client's DEDUPE_CAPACITY.
   */
  dedupeCapacity: 4096,
  /**
   * How long the socket may take to open and send `hello`. The reference client's
   * HANDSHAKE_TIMEOUT: past it the attempt counts as a failure and backs off.
   */
  handshakeTimeoutMs: 10_000,
});

/**
 * Parses one text frame from the server. Returns the frame object, or null when the text is
 * not a JSON object with a string `type` (the caller ignores it, as the reference client does).
 * Unknown fields are kept (the protocol lets the server add some); unknown types are returned
 * too, so the caller decides.
 * @param {unknown} text
 * @returns {{type: string, [k: string]: unknown} | null}
 */
export function parseFrame(text) {
  if (typeof text !== "string") return null;
  let v;
  try {
    v = JSON.parse(text);
  } catch {
    return null;
  }
  if (v === null || typeof v !== "object" || Array.isArray(v) || typeof v.type !== "string") {
    return null;
  }
  return v;
}

/**
 * The delay before a reconnect after `failures` consecutive failures: full jitter, uniform in
 * [0, min(max, min * 2^failures)]. Spreads a fleet's reconnects after an outage instead of
 * having them arrive in waves (docs/protocol.md section 8).
 * @param {number} minMs
 * @param {number} maxMs
 * @param {number} failures
 * @param {() => number} [random] uniform in [0, 1)
 * @returns {number} milliseconds
 */
export function backoffDelay(minMs, maxMs, failures, random = Math.random) {
  // 2^31 already exceeds any sane max; capping the exponent keeps the product finite.
  const ceiling = Math.min(maxMs, minMs * 2 ** Math.min(Math.max(failures, 0), 31));
  // Inclusive of the ceiling, like the reference client's 0..=ms.
  return Math.floor(random() * (ceiling + 1));
}

/**
 * The delay in a 4002 close reason `reconnect_after_ms=N`, or null when the reason does not
 * carry one.
 * @param {string} reason
 * @returns {number | null}
 */
export function advisedDelay(reason) {
  const m = /^reconnect_after_ms=(\d+)$/.exec(reason ?? "");
  return m ? Number(m[1]) : null;
}

/**
 * A set of the most recently seen ids, at most `capacity` of them. Seeing an id again
 * refreshes it (it moves to the newest end), like the reference client's LRU.
 */
export class DedupeWindow {
  /** @param {number} capacity */
  constructor(capacity) {
    if (!(capacity >= 1)) throw new RangeError("dedupe capacity must be at least 1");
    this.capacity = capacity;
    /** @type {Set<string>} insertion order = age order */
    this.ids = new Set();
  }

  /**
   * Records `id`; true if it was new, false if it is a duplicate.
   * @param {string} id
   */
  add(id) {
    const seen = this.ids.delete(id);
    this.ids.add(id);
    if (this.ids.size > this.capacity) {
      // The oldest id is the first in insertion order.
      this.ids.delete(this.ids.values().next().value);
    }
    return !seen;
  }

  get size() {
    return this.ids.size;
  }
}

/**
 * The http(s) URL of a ws(s) URL, for the 401 probe.
 * @param {string} wsUrl
 */
function httpUrlOf(wsUrl) {
  return wsUrl.replace(/^ws(s?):/i, "http$1:");
}

/** The subprotocol herald selects; offered beside the bearer entry (a browser fails a
 * handshake that offered subprotocols and got none back). */
export const PROTOCOL = "herald.v1";

/**
 * The `Sec-WebSocket-Protocol` list that carries the device token. Browsers cannot set
 * `Authorization` on a WebSocket, and a token in the URL lands in proxy access logs, so the
 * token rides as the `herald.bearer.<token>` subprotocol (docs/protocol.md section 2); the
 * server selects `herald.v1` and never echoes the token.
 * @param {string} token
 * @returns {string[]}
 */
export function tokenProtocols(token) {
  return [PROTOCOL, `herald.bearer.${token}`];
}

/**
 * `url` with `?token=` (or `&token=`) appended: the older form, accepted only by a gateway
 * with `gateway.allow_query_token = true`. The client no longer uses it.
 * @param {string} url
 * @param {string} token
 */
export function withToken(url, token) {
  const hashAt = url.indexOf("#");
  const base = hashAt >= 0 ? url.slice(0, hashAt) : url;
  return `${base}${base.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`;
}

/**
 * Asks the gateway why a WebSocket handshake failed. A browser hides the handshake's HTTP
 * status (by design, so pages cannot port-scan), but herald answers a plain GET of
 * /v1/connect with 401 for a bad token (else 400), with `Access-Control-Allow-Origin: *`
 * and a preflight that allows the `Authorization` header, so any page can read it. The token
 * goes in that header, not the URL (access logs). When the answer cannot be read (a proxy
 * in front that drops the CORS headers), the failure is treated like any lost connection
 * (backoff, token fetched again).
 * @param {string} url ws(s) URL of /v1/connect
 * @param {string} token
 * @param {typeof fetch | undefined} fetchFn
 * @returns {Promise<number | null>} the HTTP status, or null if unknown
 */
async function probeStatus(url, token, fetchFn) {
  if (typeof fetchFn !== "function") return null;
  try {
    const res = await fetchFn(httpUrlOf(url), {
      method: "GET",
      headers: { Authorization: `Bearer ${token}` },
      cache: "no-store",
      credentials: "omit",
    });
    return typeof res.status === "number" && res.status > 0 ? res.status : null;
  } catch {
    return null;
  }
}

/**
 * @typedef {object} HeraldNotification
 * @property {string} id UUID, stable across every delivery attempt and channel
 * @property {{title?: string, subtitle?: string, body?: string, badge?: number, sound?: string,
 *   image?: string, category?: string, thread_id?: string}} [notification]
 * @property {Record<string, string>} [data]
 * @property {"high" | "normal"} priority
 * @property {string} [collapse_key]
 * @property {number} accepted_at_ms
 * @property {number} expires_at_ms
 */

/**
 * @typedef {object} HeraldHello
 * @property {string} session_id
 * @property {string} device_id
 * @property {number} ping_interval_ms
 * @property {number} pong_timeout_ms
 * @property {number} ack_timeout_ms
 * @property {number} max_frame_bytes
 */

/**
 * @typedef {"idle" | "connecting" | "connected" | "waiting" | "stopped"} HeraldState
 */

/**
 * @typedef {object} HeraldClientOptions
 * @property {string} url ws(s)://host/v1/connect
 * @property {string | (() => string | Promise<string>)} token the device token, or a function
 *   called before every (re)connect (so a short-lived token is refreshed)
 * @property {number} [backoffMinMs]
 * @property {number} [backoffMaxMs]
 * @property {number} [dedupeCapacity]
 * @property {number} [handshakeTimeoutMs]
 * @property {any} [WebSocket] WebSocket constructor (default: globalThis.WebSocket)
 * @property {typeof fetch | null} [fetch] used for the 401 probe (default: globalThis.fetch; null: no probe)
 * @property {EventTarget | null} [window] source of online/offline (default: globalThis.window)
 * @property {any} [document] source of visibilitychange (default: globalThis.document)
 * @property {{onLine?: boolean} | null} [navigator] its onLine says whether to try at all (default: globalThis.navigator)
 * @property {() => number} [random] uniform in [0, 1) (default: Math.random)
 * @property {{setTimeout: (fn: () => void, ms: number) => any, clearTimeout: (h: any) => void,
 *   now: () => number}} [timers] (default: the global timers and Date.now; tests pass fakes)
 */

/**
 * A device connection to herald that stays up: it reconnects until `close()`, a 4001
 * "replaced", or a rejected token stops it.
 *
 * Events (`on(name, fn)`):
 * - `notification` (n: HeraldNotification): a new notification; acked once every handler
 *   has returned (or its returned promise has settled)
 * - `duplicate` (n): a notification id seen before; acked, not passed to `notification`
 * - `state` (state: HeraldState, detail): connection state changes
 * - `hello` (hello: HeraldHello): a session started
 * - `disconnect` ({code, reason, wasClean}): the socket closed
 * - `reconnecting` ({delayMs, attempt, reason}): a reconnect is scheduled
 * - `unauthorized` ({status}): the token was refused twice in a row; stopped
 * - `replaced` ({code, reason}): a newer session of this device took over (4001); stopped
 * - `serverError` ({code, message}): herald sent an `error` frame
 * - `pong` ({nonce}): answer to the client's ping
 * - `error` (err): a handler or the token function threw; the client carries on
 */
export class HeraldClient {
  /** @param {HeraldClientOptions} options */
  constructor(options) {
    if (!options || typeof options.url !== "string" || !/^wss?:\/\//i.test(options.url)) {
      throw new TypeError("HeraldClient: options.url must be a ws:// or wss:// URL");
    }
    if (typeof options.token !== "string" && typeof options.token !== "function") {
      throw new TypeError("HeraldClient: options.token must be a string or a function");
    }
    const g = /** @type {any} */ (globalThis);
    this.url = options.url;
    this.tokenSource = options.token;
    this.backoffMinMs = options.backoffMinMs ?? Defaults.backoffMinMs;
    this.backoffMaxMs = options.backoffMaxMs ?? Defaults.backoffMaxMs;
    this.handshakeTimeoutMs = options.handshakeTimeoutMs ?? Defaults.handshakeTimeoutMs;
    this.WebSocket = options.WebSocket ?? g.WebSocket;
    this.fetch = options.fetch === undefined ? g.fetch?.bind(g) : options.fetch;
    this.window = options.window === undefined ? g.window ?? null : options.window;
    this.document = options.document === undefined ? g.document ?? null : options.document;
    this.navigator = options.navigator === undefined ? g.navigator ?? null : options.navigator;
    this.random = options.random ?? Math.random;
    this.timers = options.timers ?? {
      setTimeout: (fn, ms) => setTimeout(fn, ms),
      clearTimeout: (h) => clearTimeout(h),
      now: () => Date.now(),
    };
    if (typeof this.WebSocket !== "function") {
      throw new TypeError("HeraldClient: no WebSocket implementation (pass options.WebSocket)");
    }
    this.seen = new DedupeWindow(options.dedupeCapacity ?? Defaults.dedupeCapacity);

    /** @type {HeraldState} */
    this.state = "idle";
    /** @type {Map<string, Set<Function>>} */
    this.handlers = new Map();
    /** Consecutive failures since the last `hello`: the backoff exponent. */
    this.failures = 0;
    /** Consecutive handshakes refused with 401 since the last `hello`. */
    this.unauthorizedCount = 0;
    /** Bumped per connection attempt: callbacks of an older socket are ignored. */
    this.generation = 0;
    this.socket = null;
    /** @type {HeraldHello | null} */
    this.hello = null;
    this.timer = { retry: null, handshake: null, ping: null, pongDeadline: null };
    /** Frames received on the current socket: the heartbeat's proof of life. */
    this.framesReceived = 0;
    this.pingNonce = 0;
    /** What the scheduled reconnect waits for, so a page event can cut a backoff short. */
    this.waitingFor = null;

    this.onOnline = () => this.networkChanged(true);
    this.onOffline = () => this.networkChanged(false);
    this.onVisibility = () => {
      if (this.document?.visibilityState === "visible") this.becameVisible();
    };
  }

  /**
   * Subscribes to an event; returns a function that unsubscribes.
   * @param {string} event
   * @param {Function} fn
   * @returns {() => void}
   */
  on(event, fn) {
    if (!this.handlers.has(event)) this.handlers.set(event, new Set());
    this.handlers.get(event).add(fn);
    return () => this.off(event, fn);
  }

  /** @param {string} event @param {Function} fn */
  off(event, fn) {
    this.handlers.get(event)?.delete(fn);
  }

  /** Starts connecting (a no-op while already running). */
  connect() {
    if (this.state !== "idle" && this.state !== "stopped") return;
    this.failures = 0;
    this.unauthorizedCount = 0;
    this.window?.addEventListener?.("online", this.onOnline);
    this.window?.addEventListener?.("offline", this.onOffline);
    this.document?.addEventListener?.("visibilitychange", this.onVisibility);
    this.attempt();
  }

  /** Closes the session (1000) and stops reconnecting. */
  close() {
    this.stop("closed");
  }

  // ---- internals ----

  /** @param {string} event @param {...any} args @returns {any[]} what handlers returned */
  emit(event, ...args) {
    const results = [];
    for (const fn of [...(this.handlers.get(event) ?? [])]) {
      try {
        results.push(fn(...args));
      } catch (err) {
        if (event !== "error") this.emit("error", err);
      }
    }
    return results;
  }

  /** @param {HeraldState} state @param {object} [detail] */
  setState(state, detail = {}) {
    this.state = state;
    this.emit("state", state, detail);
  }

  clearTimer(name) {
    if (this.timer[name] !== null) {
      this.timers.clearTimeout(this.timer[name]);
      this.timer[name] = null;
    }
  }

  clearAllTimers() {
    for (const name of Object.keys(this.timer)) this.clearTimer(name);
  }

  /** @param {string} why */
  stop(why, detail = {}) {
    if (this.state === "stopped") return;
    this.generation++;
    this.clearAllTimers();
    this.waitingFor = null;
    this.window?.removeEventListener?.("online", this.onOnline);
    this.window?.removeEventListener?.("offline", this.onOffline);
    this.document?.removeEventListener?.("visibilitychange", this.onVisibility);
    const socket = this.socket;
    this.socket = null;
    this.hello = null;
    if (socket && socket.readyState <= 1) {
      try {
        socket.close(CloseCode.NORMAL);
      } catch {
        // already closing
      }
    }
    this.setState("stopped", { reason: why, ...detail });
  }

  async attempt() {
    const gen = ++this.generation;
    this.waitingFor = null;
    this.clearAllTimers();
    this.hello = null;
    this.setState("connecting", { attempt: this.failures + 1 });
    let token;
    try {
      token = typeof this.tokenSource === "function" ? await this.tokenSource() : this.tokenSource;
      if (typeof token !== "string" || token === "") {
        throw new TypeError("the token function returned no token");
      }
    } catch (err) {
      if (gen !== this.generation) return;
      this.emit("error", err);
      this.scheduleBackoff("token_unavailable");
      return;
    }
    if (gen !== this.generation) return;

    let socket;
    try {
      socket = new this.WebSocket(this.url, tokenProtocols(token));
    } catch (err) {
      // A malformed URL: no retry can fix it.
      this.emit("error", err);
      this.stop("bad_url", { error: String(err) });
      return;
    }
    this.socket = socket;
    let opened = false;
    // The socket may close before it opens (refused, 401, 503): the handshake timer covers
    // a server that accepts TCP and then says nothing.
    this.timer.handshake = this.timers.setTimeout(() => {
      if (gen !== this.generation) return;
      this.timer.handshake = null;
      try {
        socket.close(CloseCode.NORMAL, "handshake timed out");
      } catch {
        // not open yet: closing a connecting socket only fails it
      }
      this.lost(gen, { code: 1006, reason: "handshake timed out", wasClean: false }, opened, token);
    }, this.handshakeTimeoutMs);

    socket.onopen = () => {
      if (gen !== this.generation) return;
      opened = true;
    };
    socket.onmessage = (ev) => {
      if (gen !== this.generation) return;
      this.framesReceived++;
      this.received(gen, socket, ev.data);
    };
    socket.onclose = (ev) => {
      if (gen !== this.generation) return;
      this.lost(gen, { code: ev.code, reason: ev.reason ?? "", wasClean: !!ev.wasClean }, opened, token);
    };
    // `error` is always followed by `close`, which carries what there is to know.
    socket.onerror = () => {};
  }

  /** One frame from the current socket. */
  received(gen, socket, data) {
    const frame = parseFrame(data);
    if (frame === null) return; // not a protocol frame (or binary): ignored, as the reference does
    switch (frame.type) {
      case "hello":
        this.clearTimer("handshake");
        this.hello = /** @type {HeraldHello} */ (/** @type {unknown} */ (frame));
        this.failures = 0;
        this.unauthorizedCount = 0;
        this.startHeartbeat(gen);
        this.setState("connected", { sessionId: frame.session_id, deviceId: frame.device_id });
        this.emit("hello", frame);
        break;
      case "notification":
        this.notification(gen, socket, frame);
        break;
      case "pong":
        this.emit("pong", { nonce: frame.nonce });
        break;
      case "error":
        this.emit("serverError", { code: frame.code, message: frame.message });
        break;
      default:
        // A newer server's frame this client does not know: ignored.
        break;
    }
  }

  notification(gen, socket, frame) {
    if (typeof frame.id !== "string" || frame.id === "") return; // nothing to ack or dedupe on
    const { type: _type, ...n } = frame;
    const ack = () => {
      // Only on the socket that carried it: after a reconnect the server re-sends anything
      // unacked, and the dedupe window acks that copy without showing it again.
      if (gen === this.generation && socket.readyState === 1) this.sendAck(socket, frame.id);
    };
    if (!this.seen.add(frame.id)) {
      this.emit("duplicate", n);
      ack();
      return;
    }
    const results = this.emit("notification", n);
    const pending = results.filter((r) => r && typeof r.then === "function");
    if (pending.length === 0) {
      ack();
    } else {
      Promise.allSettled(pending).then((settled) => {
        for (const s of settled) if (s.status === "rejected") this.emit("error", s.reason);
        ack();
      });
    }
  }

  /**
   * Sends the ack for one notification frame. A method of its own so a test page can
   * withhold one (to make herald re-send it: the duplicate path, end to end).
   * @param {{send: (data: string) => void}} socket
   * @param {string} id
   */
  sendAck(socket, id) {
    this.send(socket, { type: "ack", id });
  }

  send(socket, frame) {
    try {
      socket.send(JSON.stringify(frame));
      return true;
    } catch {
      return false; // closing: the close event follows and decides what happens next
    }
  }

  /**
   * Browsers cannot see WebSocket Ping frames, so the client pings at the application level
   * once per `ping_interval_ms` (no more often than the server, as the protocol asks) and
   * declares the link dead when a ping goes `pong_timeout_ms` without any frame arriving.
   * Silence is therefore noticed after at most ping_interval_ms + pong_timeout_ms. The
   * deadline runs from when the ping was actually sent, so a background tab whose timers
   * the browser throttles is not declared dead just because its own timer fired late.
   */
  startHeartbeat(gen) {
    const interval = Number(this.hello?.ping_interval_ms) || 0;
    const timeout = Number(this.hello?.pong_timeout_ms) || 0;
    if (interval <= 0 || timeout <= 0) return; // the server did not say: rely on TCP
    this.clearTimer("ping");
    this.timer.ping = this.timers.setTimeout(() => {
      this.timer.ping = null;
      if (gen !== this.generation) return;
      this.pingNow(gen);
      this.startHeartbeat(gen);
    }, interval);
  }

  /** Sends an app-level ping and arms the pong deadline (unless one is already pending). */
  pingNow(gen) {
    const timeout = Number(this.hello?.pong_timeout_ms) || 0;
    if (!this.socket || timeout <= 0) return;
    const heardBefore = this.framesReceived;
    this.send(this.socket, { type: "ping", nonce: String(++this.pingNonce) });
    if (this.timer.pongDeadline !== null) return;
    this.timer.pongDeadline = this.timers.setTimeout(() => {
      this.timer.pongDeadline = null;
      if (gen !== this.generation) return;
      if (this.framesReceived !== heardBefore) return; // heard from the server since: alive
      const socket = this.socket;
      // Close it ourselves (no close frame may ever come from a dead link) and reconnect.
      this.generation++;
      try {
        socket?.close(CloseCode.NORMAL, "heartbeat timeout");
      } catch {
        // ignore
      }
      this.socket = null;
      this.lostAfterSession({ code: 1006, reason: "no frame from the server within ping_interval + pong_timeout", wasClean: false });
    }, timeout);
  }

  /** The socket of attempt `gen` is gone. */
  lost(gen, close, opened, token) {
    this.generation++;
    this.clearAllTimers();
    const hadSession = this.hello !== null;
    this.socket = null;
    this.emit("disconnect", close);
    if (!opened) {
      // The handshake failed; the browser hides why. Ask (see probeStatus).
      const myGen = this.generation;
      probeStatus(this.url, token, this.fetch).then((status) => {
        if (myGen !== this.generation || this.state === "stopped") return;
        if (status === 401) {
          this.unauthorizedCount++;
          if (this.unauthorizedCount >= 2) {
            this.emit("unauthorized", { status });
            this.stop("unauthorized");
          } else {
            // A token that expired between fetch and use: one immediate retry with a fresh one.
            this.scheduleRetry(0, "unauthorized");
          }
        } else {
          this.scheduleBackoff(status === 503 ? "server_unavailable" : "connect_failed");
        }
      });
      return;
    }
    this.closeCodeDecides(close, hadSession);
  }

  /** The session died without the server saying so (heartbeat). */
  lostAfterSession(close) {
    this.clearAllTimers();
    this.hello = null;
    this.emit("disconnect", close);
    this.failures = 0; // a session had started
    this.scheduleBackoff("heartbeat_timeout");
  }

  /** What each close code asks of the client (docs/protocol.md section 7). */
  closeCodeDecides(close, hadSession) {
    this.hello = null;
    if (hadSession) this.failures = 0;
    switch (close.code) {
      case CloseCode.REPLACED:
        // Two clients with one device id would evict each other forever.
        this.emit("replaced", { code: close.code, reason: close.reason });
        this.stop("replaced");
        return;
      case CloseCode.SHUTDOWN: {
        const advised = advisedDelay(close.reason);
        if (advised !== null) {
          // The server picked a random spread for its sessions: honour it, capped like
          // backoff so a bogus value cannot park the client.
          this.failures = 0;
          this.scheduleRetry(Math.min(advised, this.backoffMaxMs), "server_shutdown");
          return;
        }
        this.scheduleBackoff("server_shutdown");
        return;
      }
      case CloseCode.PONG_TIMEOUT:
        this.scheduleBackoff("pong_timeout");
        return;
      case CloseCode.PROTOCOL_ERROR:
        this.scheduleBackoff("protocol_error");
        return;
      case CloseCode.MESSAGE_TOO_BIG:
        this.scheduleBackoff("message_too_big");
        return;
      case CloseCode.SLOW_CONSUMER:
        this.scheduleBackoff("slow_consumer");
        return;
      default:
        this.scheduleBackoff("connection_lost");
    }
  }

  scheduleBackoff(reason) {
    const delay = backoffDelay(this.backoffMinMs, this.backoffMaxMs, this.failures, this.random);
    this.failures++;
    this.scheduleRetry(delay, reason, "backoff");
  }

  /**
   * @param {number} delayMs
   * @param {string} reason
   * @param {"backoff" | "advised"} [kind] a backoff may be cut short by the page coming back
   *   online or into view; a server-advised delay is not (it spreads the fleet)
   */
  scheduleRetry(delayMs, reason, kind = "advised") {
    if (this.state === "stopped") return;
    this.clearAllTimers();
    const attempt = this.failures;
    this.waitingFor = kind;
    this.setState("waiting", { delayMs, reason });
    this.emit("reconnecting", { delayMs, attempt, reason });
    if (this.isOffline()) {
      // No network: trying would only fail. The `online` event resumes.
      this.waitingFor = "online";
      return;
    }
    this.timer.retry = this.timers.setTimeout(() => {
      this.timer.retry = null;
      this.attempt();
    }, delayMs);
  }

  isOffline() {
    return this.navigator?.onLine === false;
  }

  /** `online` / `offline` from the page. */
  networkChanged(online) {
    if (this.state === "stopped") return;
    if (!online) {
      // The socket may well survive a short drop (and the event is unreliable): keep it and
      // let the heartbeat decide; a pending retry waits for `online` instead of failing.
      if (this.state === "waiting" && this.timer.retry !== null) {
        this.clearTimer("retry");
        this.waitingFor = "online";
      }
      return;
    }
    if (this.state === "waiting" && (this.waitingFor === "online" || this.waitingFor === "backoff")) {
      // The network is back: no reason to sit out the rest of a backoff.
      this.failures = 0;
      this.attempt();
    } else if (this.state === "connected") {
      // A network change often kills TCP connections silently: check the link now.
      this.pingNow(this.generation);
    }
  }

  /** The page came into view (timers may have been throttled while hidden). */
  becameVisible() {
    if (this.state === "connected") {
      this.pingNow(this.generation);
    } else if (this.state === "waiting" && this.waitingFor === "backoff") {
      this.attempt();
    }
  }
}
