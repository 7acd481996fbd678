// End to end: a real herald (embedded backend), the demo page served by the one-line static
// server, headless Chromium driving it. Every wait is on a condition (a page state, a metric,
// a process exit), bounded by a deadline that only matters when something is broken.
//
// HERALD_BIN: the herald binary (default: <repo>/target/debug/herald).
// CHROMIUM:   the browser (default: /usr/bin/chromium, Debian's package).
// Artifacts (screenshot, herald logs) go to <repo>/target/js-e2e/.
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { createServer, connect as tcpConnect } from "node:net";
import { createServer as createHttpServer, request as httpRequest } from "node:http";
import { mkdirSync, openSync, writeFileSync, existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { randomBytes } from "node:crypto";

import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const clientDir = resolve(here, "..");
const repo = resolve(clientDir, "../..");
const HERALD_BIN = process.env.HERALD_BIN ?? join(repo, "target/debug/herald");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const ARTIFACTS = join(repo, "target/js-e2e");

/** The longest any condition may take before the test calls it broken. Generous: the CI
 * machine is shared and slow; a healthy run meets every condition in well under a second. */
const DEADLINE_MS = 30_000;
/** How often a condition outside the page (HTTP, metrics) is polled. */
const POLL_MS = 50;

// herald settings for the run: short intervals so heartbeat, ack timeout, retry and shutdown
// spread all happen within a fraction of a second to a few seconds.
const API_KEY = `e2e-${randomBytes(8).toString("hex")}`;
const DEVICE = "web-e2e-1";
const heraldEnv = {
  HERALD__AUTH__API_KEYS: API_KEY,
  // Shared by both herald processes, so the device token survives the restart.
  HERALD__AUTH__DEVICE_TOKEN_SECRET: randomBytes(32).toString("hex"),
  HERALD__GATEWAY__PING_INTERVAL: "1s",
  HERALD__GATEWAY__PONG_TIMEOUT: "1s",
  // The duplicate step waits one ack timeout.
  HERALD__GATEWAY__ACK_TIMEOUT: "1s",
  // The advised reconnect delay is drawn from [0, this).
  HERALD__GATEWAY__RECONNECT_SPREAD: "2s",
  HERALD__RETRY__BASE_DELAY: "100ms",
  HERALD__HTTP__SHUTDOWN_GRACE: "5s",
  HERALD__LOG__LEVEL: "info",
};

async function freePort() {
  const srv = createServer();
  srv.listen(0, "127.0.0.1");
  await once(srv, "listening");
  const { port } = srv.address();
  srv.close();
  await once(srv, "close");
  return port;
}

/** Polls `check` until it returns a truthy value (returned), or fails after DEADLINE_MS. */
async function waitFor(what, check) {
  const end = Date.now() + DEADLINE_MS;
  let last;
  for (;;) {
    try {
      const v = await check();
      if (v) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > end) {
      throw new Error(`gave up waiting for ${what}${last ? `: ${last.message}` : ""}`);
    }
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

/** A value from Prometheus text: the sum of `name` series whose labels include `labels`. */
function metric(text, name, labels = {}) {
  let sum = 0;
  for (const line of text.split("\n")) {
    const m = /^([a-z_]+)(?:\{([^}]*)\})? ([0-9.eE+-]+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const have = Object.fromEntries([...(m[2] ?? "").matchAll(/(\w+)="([^"]*)"/g)].map((x) => [x[1], x[2]]));
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) sum += Number(m[3]);
  }
  return sum;
}

/**
 * One origin for the demo and herald, as a reverse proxy in front of both gives in
 * production: /v1/* (HTTP and the WebSocket upgrade) goes to herald, the rest to the static
 * server. Only there can a page read the 401 of a refused handshake.
 */
async function sameOriginProxy(staticPort, heraldPort) {
  const server = createHttpServer((req, res) => {
    const port = req.url.startsWith("/v1/") ? heraldPort : staticPort;
    const up = httpRequest({ host: "127.0.0.1", port, method: req.method, path: req.url, headers: req.headers }, (r) => {
      res.writeHead(r.statusCode, r.headers);
      r.pipe(res);
    });
    up.on("error", () => res.destroy());
    req.pipe(up);
  });
  server.on("upgrade", (req, socket, head) => {
    const up = tcpConnect(heraldPort, "127.0.0.1", () => {
      let lines = `${req.method} ${req.url} HTTP/1.1\r\n`;
      for (let i = 0; i < req.rawHeaders.length; i += 2) lines += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
      up.write(`${lines}\r\n`);
      up.write(head);
      socket.pipe(up).pipe(socket);
    });
    up.on("error", () => socket.destroy());
    socket.on("error", () => up.destroy());
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return server;
}

class Herald {
  constructor(port, n) {
    this.port = port;
    this.base = `http://127.0.0.1:${port}`;
    this.logPath = join(ARTIFACTS, `herald-${n}.log`);
  }

  async start() {
    assert.ok(existsSync(HERALD_BIN), `no herald binary at ${HERALD_BIN} (cargo build --bins, or set HERALD_BIN)`);
    const log = openSync(this.logPath, "w");
    this.proc = spawn(HERALD_BIN, ["serve"], {
      env: { ...process.env, ...heraldEnv, HERALD__HTTP__ADDR: `127.0.0.1:${this.port}` },
      stdio: ["ignore", log, log],
    });
    this.exited = once(this.proc, "exit");
    await waitFor(`herald on :${this.port} to be ready (log: ${this.logPath})`, async () => {
      if (this.proc.exitCode !== null) throw new Error(`herald exited with ${this.proc.exitCode}`);
      return (await fetch(`${this.base}/readyz`)).ok;
    });
  }

  async stop(signal = "SIGTERM") {
    if (!this.proc || this.proc.exitCode !== null || this.proc.signalCode !== null) return null;
    this.proc.kill(signal);
    const [code, sig] = await this.exited;
    return { code, sig };
  }

  async metrics() {
    const res = await fetch(`${this.base}/metrics`);
    assert.equal(res.status, 200);
    return res.text();
  }

  async notify(title, body) {
    const res = await fetch(`${this.base}/v1/notify`, {
      method: "POST",
      headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
      // Live only (no APNs/FCM token): the only way this reaches the device is the page.
      body: JSON.stringify({ targets: [{ device_id: DEVICE }], notification: { title, body }, data: { step: title } }),
    });
    const text = await res.text();
    assert.equal(res.status, 202, text);
    return JSON.parse(text).id;
  }

  async deviceToken(device = DEVICE) {
    const res = await fetch(`${this.base}/v1/devices/${device}/token`, {
      method: "POST",
      headers: { authorization: `Bearer ${API_KEY}` },
    });
    const text = await res.text();
    assert.equal(res.status, 200, text);
    return JSON.parse(text).token;
  }
}

describe("demo page against a real herald in headless Chromium", { timeout: 5 * 60_000 }, () => {
  let herald;
  let staticServer;
  let staticPort;
  let browser;
  let page;
  const pageErrors = [];
  const consoleLines = [];

  const stats = () => page.evaluate(() => JSON.parse(JSON.stringify(window.heraldDemo.stats)));
  const waitInPage = (what, fn, arg) =>
    page.waitForFunction(fn, arg, { timeout: DEADLINE_MS, polling: "raf" }).catch((err) => {
      throw new Error(`gave up waiting in the page for ${what}: ${err.message}`);
    });

  before(async () => {
    mkdirSync(ARTIFACTS, { recursive: true });
    herald = new Herald(await freePort(), 1);
    await herald.start();

    // The demo's documented one-line static server, verbatim.
    staticPort = await freePort();
    staticServer = spawn("python3", ["-m", "http.server", String(staticPort), "--bind", "127.0.0.1"], {
      cwd: clientDir,
      stdio: "ignore",
    });
    const demoUrl = `http://127.0.0.1:${staticPort}/demo/?test-hooks&url=${encodeURIComponent(`ws://127.0.0.1:${herald.port}/v1/connect`)}`;
    await waitFor("the static server", async () => (await fetch(`http://127.0.0.1:${staticPort}/herald.js`)).ok);

    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    });
    page = await browser.newPage({ viewport: { width: 1000, height: 900 } });
    page.on("pageerror", (e) => pageErrors.push(String(e)));
    page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
    await page.goto(demoUrl);
    await page.fill("#token", await herald.deviceToken());
    await page.click("#connect");
    await waitInPage("the session to start", () => window.heraldDemo.stats.state === "connected");
  });

  after(async () => {
    if (page) {
      writeFileSync(join(ARTIFACTS, "page-console.log"), consoleLines.join("\n"));
      writeFileSync(join(ARTIFACTS, "page-log.txt"), await page.textContent("#log").catch(() => ""));
    }
    await browser?.close();
    staticServer?.kill();
    await herald?.stop("SIGKILL");
  });

  test("a notification posted over HTTP arrives in the page and is acked: a live delivery", async () => {
    const id = await herald.notify("First", "posted over HTTP");
    await waitInPage("the notification to be shown", (id) => document.querySelector(`li[data-id="${id}"]`) !== null, id);
    await waitInPage("its ack to go out", (id) => window.heraldDemo.stats.acks.includes(id), id);

    // herald saw the ack: the delivery is counted live, and nothing fell back.
    const m = await waitFor("herald to count the live delivery", async () => {
      const text = await herald.metrics();
      return metric(text, "herald_deliveries_total", { channel: "live", outcome: "delivered" }) === 1 ? text : null;
    });
    assert.equal(metric(m, "herald_gateway_acks_total"), 1);
    assert.equal(metric(m, "herald_fallbacks_total"), 0, "no fallback to APNs/FCM");
    assert.equal(metric(m, "herald_deliveries_total", { channel: "apns" }), 0, "APNs untouched");
    assert.equal(metric(m, "herald_deliveries_total", { channel: "fcm" }), 0, "FCM untouched");

    const s = await stats();
    assert.deepEqual(s.shown, [id]);
    assert.deepEqual(s.acks, [id]);
    assert.equal(await page.textContent(`li[data-id="${id}"] .title`), "First");
    await page.screenshot({ path: join(ARTIFACTS, "demo-first-delivery.png"), fullPage: true });
  });

  test("the session survives its heartbeats: app-level pings answered, no dead-link close", async () => {
    const { sessionId, pongs } = await stats();
    // ping_interval is 1s: three answered pings span three server heartbeats too (Chromium
    // answers herald's WebSocket Pings itself).
    await waitInPage("three more pongs", (n) => window.heraldDemo.stats.pongs >= n + 3, pongs);
    const s = await stats();
    assert.equal(s.sessionId, sessionId, "same session throughout");
    assert.equal(s.closes.length, 0);
    const m = await herald.metrics();
    assert.equal(metric(m, "herald_gateway_sessions_opened_total"), 1);
    assert.equal(metric(m, "herald_gateway_sessions_closed_total"), 0);
    assert.equal(metric(m, "herald_gateway_sessions_active"), 1);
  });

  test("a duplicate (herald re-sends after a withheld ack) is acked and shown once", async () => {
    // The test hook drops the page's ack of the next frame. herald waits ack_timeout, finds
    // no fallback route for this live-only target, keeps it in the device's offline inbox
    // and, seeing the device still connected, replays the inbox into the same session at
    // once: the same id again, the duplicate docs/protocol.md section 5 warns about,
    // produced by herald itself.
    await page.evaluate(() => window.heraldTest.withholdNextAck());
    const id = await herald.notify("Second", "delivered twice, shown once");
    await waitInPage("the re-sent frame", (id) => window.heraldDemo.stats.frames[id] === 2, id);
    await waitInPage("the duplicate's ack", (id) => window.heraldDemo.stats.acks.includes(id), id);

    const m = await waitFor("herald to count the replayed entry's ack", async () => {
      const text = await herald.metrics();
      return metric(text, "herald_inbox_acked_total") === 1 ? text : null;
    });
    assert.equal(metric(m, "herald_gateway_ack_timeouts_total"), 1, "the first frame went unacked");
    assert.equal(metric(m, "herald_inbox_writes_total"), 1, "herald kept it for the device");
    assert.equal(metric(m, "herald_inbox_replayed_total"), 1, "and sent it again at once");

    const s = await stats();
    assert.equal(s.shown.filter((x) => x === id).length, 1, "shown once");
    assert.equal(await page.locator(`li[data-id="${id}"]`).count(), 1, "one entry on the page");
    assert.equal(s.duplicates, 1);
    assert.equal(s.acks.filter((x) => x === id).length, 1, "the duplicate frame was acked");
  });

  test("herald restarted with SIGTERM: the page reconnects after the advised delay and gets the next one", async () => {
    const before = await stats();
    const oldSession = before.sessionId;
    const closesBefore = before.closes.length;

    const exit = await herald.stop("SIGTERM");
    assert.deepEqual(exit, { code: 0, sig: null }, "herald drained and exited cleanly");

    await waitInPage(
      "the 4002 close and the scheduled reconnect",
      (n) => window.heraldDemo.stats.closes.length > n && window.heraldDemo.stats.reconnects.some((r) => r.reason === "server_shutdown"),
      closesBefore,
    );
    const s1 = await stats();
    const close = s1.closes[closesBefore];
    assert.equal(close.code, 4002);
    const m = /^reconnect_after_ms=(\d+)$/.exec(close.reason);
    assert.ok(m, `close reason ${close.reason}`);
    const advised = Number(m[1]);
    assert.ok(advised < 2000, "within gateway.reconnect_spread");
    const scheduled = s1.reconnects.find((r) => r.reason === "server_shutdown");
    assert.equal(scheduled.delayMs, advised, "the page waits exactly the delay herald advised");

    herald = new Herald(herald.port, 2);
    await herald.start();
    await waitInPage(
      "a new session",
      (old) => window.heraldDemo.stats.state === "connected" && window.heraldDemo.stats.sessionId !== old,
      oldSession,
    );
    const s2 = await stats();
    // The first attempt after the close came no earlier than the advice (the page's clock).
    const firstAttempt = s2.attempts.find((t) => t >= close.at);
    assert.ok(firstAttempt - close.at >= advised - 1, `attempted ${firstAttempt - close.at} ms after the close, advised ${advised}`);

    const id = await herald.notify("Third", "after the restart");
    await waitInPage("the notification after the restart", (id) => window.heraldDemo.stats.acks.includes(id), id);
    const m2 = await waitFor("the new herald to count the live delivery", async () => {
      const text = await herald.metrics();
      return metric(text, "herald_deliveries_total", { channel: "live", outcome: "delivered" }) === 1 ? text : null;
    });
    assert.equal(metric(m2, "herald_fallbacks_total"), 0);
    assert.equal(await page.locator("#notifications li[data-id]").count(), 3);

    await page.screenshot({ path: join(ARTIFACTS, "demo.png"), fullPage: true });
    assert.deepEqual(pageErrors, [], "no uncaught errors in the page");
  });

  test("a refused token from another origin: herald's 401 is readable (CORS), refetched once, then the client stops", async () => {
    // The demo is served from another origin than herald. The plain GET /v1/connect answer
    // carries Access-Control-Allow-Origin: * and the preflight allows Authorization, so the
    // page reads the 401 (README "401 detection") and stops after two, as on one origin.
    const refusedBefore = metric(await herald.metrics(), "herald_gateway_sessions_refused_total", { reason: "unauthorized" });
    const bad = await browser.newPage();
    try {
      await bad.goto(page.url());
      await bad.fill("#token", "not-a-valid-token");
      await bad.click("#connect");
      await bad.waitForFunction(() => window.heraldDemo.stats.stopped === "unauthorized", null, { timeout: DEADLINE_MS, polling: "raf" });
      const s = await bad.evaluate(() => JSON.parse(JSON.stringify(window.heraldDemo.stats)));
      assert.equal(s.attempts.length, 2, "the token was asked for again once, then no more");
      const refused = metric(await herald.metrics(), "herald_gateway_sessions_refused_total", { reason: "unauthorized" });
      // Two handshakes and the two probes that read their 401.
      assert.equal(refused - refusedBefore, 4);
      assert.equal(metric(await herald.metrics(), "herald_gateway_sessions_active"), 1, "only the good page's session");
    } finally {
      await bad.close();
    }
  });

  test("same origin as herald: a refused token is refetched once, then the client stops with `unauthorized`", async () => {
    const proxy = await sameOriginProxy(staticPort, herald.port);
    const origin = `http://127.0.0.1:${proxy.address().port}`;
    const refusedBefore = metric(await herald.metrics(), "herald_gateway_sessions_refused_total", { reason: "unauthorized" });
    const p = await browser.newPage();
    try {
      // First a good token through the proxy, so a refusal below is herald's word, not the proxy's.
      await p.goto(`${origin}/demo/?url=${encodeURIComponent(`ws://127.0.0.1:${proxy.address().port}/v1/connect`)}`);
      // Another device id: the main page's session must not be replaced (4001).
      await p.fill("#token", await herald.deviceToken("web-e2e-2"));
      await p.click("#connect");
      await p.waitForFunction(() => window.heraldDemo.stats.state === "connected", null, { timeout: DEADLINE_MS, polling: "raf" });
      await p.click("#disconnect");
      await p.waitForFunction(() => window.heraldDemo.stats.stopped === "closed", null, { timeout: DEADLINE_MS, polling: "raf" });

      await p.fill("#token", "not-a-valid-token");
      await p.evaluate(() => {
        window.heraldDemo.stats.attempts.length = 0;
      });
      await p.click("#connect");
      await p.waitForFunction(() => window.heraldDemo.stats.stopped === "unauthorized", null, { timeout: DEADLINE_MS, polling: "raf" });
      const s = await p.evaluate(() => JSON.parse(JSON.stringify(window.heraldDemo.stats)));
      assert.equal(s.attempts.length, 2, "the token was asked for again once, then no more");
      assert.deepEqual(s.reconnects.slice(-1).map((r) => [r.reason, r.delayMs]), [["unauthorized", 0]]);
      const refused = metric(await herald.metrics(), "herald_gateway_sessions_refused_total", { reason: "unauthorized" });
      // Two handshakes and the two probes that read their 401.
      assert.equal(refused - refusedBefore, 4);
      assert.match(await p.textContent("#log"), /the token was refused twice/);
      assert.equal(await p.textContent("#state"), "stopped");
      assert.equal((await stats()).state, "connected", "the main page's session (another device) is untouched");
    } finally {
      await p.close();
      proxy.closeAllConnections();
      proxy.close();
    }
  });
});
