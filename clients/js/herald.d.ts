// Types for herald.js (the device protocol client). Kept by hand next to the module;
// `npm run typecheck` compiles test/types-check.ts against both so they cannot drift apart
// unnoticed.

export declare const CloseCode: Readonly<{
  NORMAL: 1000;
  MESSAGE_TOO_BIG: 1009;
  PONG_TIMEOUT: 4000;
  REPLACED: 4001;
  SHUTDOWN: 4002;
  PROTOCOL_ERROR: 4003;
  SLOW_CONSUMER: 4004;
}>;

export declare const Defaults: Readonly<{
  backoffMinMs: number;
  backoffMaxMs: number;
  dedupeCapacity: number;
  handshakeTimeoutMs: number;
}>;

/** A notification frame, without its `type` (docs/protocol.md section 3). */
export interface HeraldNotification {
  /** UUID, stable across every delivery attempt and channel. */
  id: string;
  notification?: {
    title?: string;
    subtitle?: string;
    body?: string;
    badge?: number;
    sound?: string;
    image?: string;
    category?: string;
    thread_id?: string;
  };
  data?: Record<string, string>;
  priority: "high" | "normal";
  collapse_key?: string;
  accepted_at_ms: number;
  expires_at_ms: number;
  /** The server may add fields; they are passed through. */
  [extra: string]: unknown;
}

export interface HeraldHello {
  session_id: string;
  device_id: string;
  ping_interval_ms: number;
  pong_timeout_ms: number;
  ack_timeout_ms: number;
  max_frame_bytes: number;
  [extra: string]: unknown;
}

export type HeraldState = "idle" | "connecting" | "connected" | "waiting" | "stopped";

export type ReconnectReason =
  | "server_shutdown"
  | "pong_timeout"
  | "protocol_error"
  | "message_too_big"
  | "slow_consumer"
  | "connection_lost"
  | "heartbeat_timeout"
  | "connect_failed"
  | "server_unavailable"
  | "token_unavailable"
  | "unauthorized";

export interface CloseInfo {
  code: number;
  reason: string;
  wasClean: boolean;
}

export interface HeraldEvents {
  /** A new notification. Acked once every handler returned (or its promise settled). */
  notification: (n: HeraldNotification) => void | Promise<void>;
  /** A notification id seen before: acked, not passed to `notification`. */
  duplicate: (n: HeraldNotification) => void;
  state: (state: HeraldState, detail: Record<string, unknown>) => void;
  hello: (hello: HeraldHello) => void;
  disconnect: (close: CloseInfo) => void;
  reconnecting: (info: { delayMs: number; attempt: number; reason: ReconnectReason }) => void;
  /** The token was refused at connect twice in a row (a fresh one included). Stopped. */
  unauthorized: (info: { status: 401 }) => void;
  /** A newer session of this device took over (close 4001). Stopped. */
  replaced: (info: { code: number; reason: string }) => void;
  serverError: (info: { code: string; message: string }) => void;
  pong: (info: { nonce?: string }) => void;
  error: (err: unknown) => void;
}

export interface Timers {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
  now(): number;
}

export interface HeraldClientOptions {
  /** ws:// or wss:// URL of herald's /v1/connect. */
  url: string;
  /** The device token, or a function called before every (re)connect. */
  token: string | (() => string | Promise<string>);
  /** Default 250. */
  backoffMinMs?: number;
  /** Default 30000; also caps a server-advised reconnect delay. */
  backoffMaxMs?: number;
  /** Notification ids remembered for dedupe. Default 4096. */
  dedupeCapacity?: number;
  /** Open + hello deadline. Default 10000. */
  handshakeTimeoutMs?: number;
  /** WebSocket constructor. Default globalThis.WebSocket. */
  WebSocket?: unknown;
  /** For the 401 probe after a failed handshake; null disables it. Default globalThis.fetch. */
  fetch?: typeof fetch | null;
  /** Source of online/offline events; null to ignore them. Default globalThis.window. */
  window?: EventTarget | null;
  /** Source of visibilitychange; null to ignore it. Default globalThis.document. */
  document?: (EventTarget & { visibilityState?: string }) | null;
  /** Default globalThis.navigator. */
  navigator?: { onLine?: boolean } | null;
  /** Uniform in [0, 1). Default Math.random. */
  random?: () => number;
  /** Default: the global timers and Date.now. */
  timers?: Timers;
}

export declare class HeraldClient {
  constructor(options: HeraldClientOptions);
  readonly state: HeraldState;
  /** The current session's hello, null between sessions. */
  readonly hello: HeraldHello | null;
  on<E extends keyof HeraldEvents>(event: E, fn: HeraldEvents[E]): () => void;
  off<E extends keyof HeraldEvents>(event: E, fn: HeraldEvents[E]): void;
  /** Starts connecting; a no-op while already running. */
  connect(): void;
  /** Closes the session (1000) and stops reconnecting. */
  close(): void;
  /** Sends one ack. Overridable (a test page withholds one to provoke a re-send). */
  sendAck(socket: { send(data: string): void }, id: string): void;
}

export declare function parseFrame(text: unknown): { type: string; [k: string]: unknown } | null;
export declare function backoffDelay(minMs: number, maxMs: number, failures: number, random?: () => number): number;
export declare function advisedDelay(reason: string): number | null;
/** The subprotocol herald selects (offered beside the bearer entry). */
export declare const PROTOCOL: "herald.v1";
/** `["herald.v1", "herald.bearer.<token>"]`: how the client sends its token. */
export declare function tokenProtocols(token: string): string[];
/** The older `?token=` form (only for a gateway with `gateway.allow_query_token = true`). */
export declare function withToken(url: string, token: string): string;

export declare class DedupeWindow {
  constructor(capacity: number);
  readonly capacity: number;
  readonly size: number;
  /** True if `id` is new; false for a duplicate. */
  add(id: string): boolean;
}
