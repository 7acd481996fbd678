// The demo page: the client as an app would use it, plus what it does shown on screen.
import { HeraldClient } from "../herald.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

/** Log lines kept on screen: enough to follow a few reconnects, bounded so it never grows. */
const LOG_LINES = 200;

$("url").value = params.get("url") ?? `ws://${location.hostname || "localhost"}:8080/v1/connect`;

/** What the page saw, for people (rendered) and for the end-to-end test (read). */
const stats = {
  state: "idle",
  sessionId: null,
  shown: [],
  /** Frames per notification id, duplicates included. */
  frames: {},
  duplicates: 0,
  acks: [],
  reconnects: [],
  closes: [],
  /** When each connection attempt started (performance.now()). */
  attempts: [],
  /** Why the client stopped, once it has. */
  stopped: null,
  /** Answers to the client's application-level pings. */
  pongs: 0,
};
let client = null;
let withheld = 0;

function log(line) {
  const el = $("log");
  const t = new Date().toISOString().slice(11, 23);
  el.textContent = `${t}  ${line}\n${el.textContent}`.split("\n").slice(0, LOG_LINES).join("\n");
}

function render() {
  const badge = $("state");
  badge.textContent = stats.state;
  badge.className = `badge ${stats.state}`;
  $("session").textContent = stats.sessionId ? stats.sessionId.slice(0, 13) + "…" : "-";
  $("shown").textContent = String(stats.shown.length);
  $("duplicates").textContent = String(stats.duplicates);
  $("acks").textContent = String(stats.acks.length);
  $("connect").disabled = client !== null;
  $("disconnect").disabled = client === null;
}

function show(n) {
  const list = $("notifications");
  list.querySelector(".empty")?.remove();
  const li = document.createElement("li");
  li.dataset.id = n.id;
  const title = document.createElement("div");
  title.className = "title";
  title.textContent = n.notification?.title ?? "(data only)";
  const body = document.createElement("div");
  body.textContent = n.notification?.body ?? "";
  const meta = document.createElement("div");
  meta.className = "meta";
  const data = n.data ? `  data ${JSON.stringify(n.data)}` : "";
  meta.textContent = `${n.id}  ${n.priority}${data}`;
  li.append(title, body, meta);
  list.prepend(li);
}

function start() {
  const url = $("url").value.trim();
  client = new HeraldClient({
    url,
    // Read on every (re)connect: paste a fresh token and the next reconnect uses it.
    token: () => $("token").value.trim(),
  });
  // Count acks as they go out. With ?test-hooks, `heraldTest.withholdNextAck()` drops one
  // instead, so herald re-sends that notification after its ack timeout: a real duplicate,
  // which the page must ack and not show twice.
  const sendAck = client.sendAck.bind(client);
  client.sendAck = (socket, id) => {
    if (withheld > 0) {
      withheld--;
      log(`test hook: ack for ${id} withheld`);
      return;
    }
    stats.acks.push(id);
    sendAck(socket, id);
    render();
  };
  client.on("state", (state, detail) => {
    stats.state = state;
    if (state === "connecting") stats.attempts.push(performance.now());
    if (state !== "connected") stats.sessionId = null;
    if (state === "stopped") {
      stats.stopped = detail.reason;
      log(`stopped (${detail.reason})`);
      client = null;
    }
    render();
  });
  client.on("hello", (h) => {
    stats.sessionId = h.session_id;
    $("device").textContent = h.device_id;
    log(`connected: session ${h.session_id}, ping every ${h.ping_interval_ms} ms`);
    render();
  });
  client.on("notification", (n) => {
    stats.frames[n.id] = (stats.frames[n.id] ?? 0) + 1;
    stats.shown.push(n.id);
    show(n);
    log(`notification ${n.id}`);
    render();
  });
  client.on("duplicate", (n) => {
    stats.frames[n.id] = (stats.frames[n.id] ?? 0) + 1;
    stats.duplicates++;
    log(`duplicate ${n.id}: acked, not shown again`);
    render();
  });
  client.on("disconnect", (c) => {
    stats.closes.push({ code: c.code, reason: c.reason, at: performance.now() });
    log(`closed: ${c.code} ${c.reason}`);
  });
  client.on("reconnecting", (r) => {
    stats.reconnects.push({ ...r, at: performance.now() });
    log(`reconnecting in ${r.delayMs} ms (${r.reason})`);
  });
  client.on("unauthorized", () => log("the token was refused twice: paste a new one and connect"));
  client.on("replaced", () => log("another tab or device took over this device id (4001): not reconnecting"));
  client.on("pong", () => {
    stats.pongs++;
  });
  client.on("serverError", (e) => log(`server error frame: ${e.code} ${e.message}`));
  client.on("error", (e) => log(`error: ${e?.message ?? e}`));
  client.connect();
  render();
}

$("connect-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  if (!client) start();
});
$("disconnect").addEventListener("click", () => client?.close());

window.heraldDemo = { stats, get client() { return client; } };
if (params.has("test-hooks")) {
  window.heraldTest = {
    withholdNextAck() {
      withheld++;
    },
  };
}
render();
