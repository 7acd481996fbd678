// Compiled (never run) by `npm run typecheck`: the README's usage must type-check against
// herald.d.ts, and herald.js's JSDoc must agree with it (checkJs).
import { HeraldClient, type HeraldNotification, CloseCode, backoffDelay } from "../herald.js";

declare function fetchToken(): Promise<string>;
declare function show(n: HeraldNotification): void;

const h = new HeraldClient({ url: "wss://push.example.com/v1/connect", token: () => fetchToken() });
h.on("notification", (n) => show(n));
h.on("notification", async (n) => {
  const title: string | undefined = n.notification?.title;
  const data: Record<string, string> | undefined = n.data;
  void title;
  void data;
});
const off = h.on("reconnecting", ({ delayMs, reason }) => console.log(delayMs, reason));
off();
h.on("unauthorized", ({ status }) => console.log(status));
h.on("state", (state) => {
  if (state === "stopped") console.log("stopped");
});
h.connect();
h.close();
const code: 4002 = CloseCode.SHUTDOWN;
const d: number = backoffDelay(250, 30_000, 3);
void code;
void d;
