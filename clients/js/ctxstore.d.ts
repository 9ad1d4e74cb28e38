// Types of ctxstore.js, the browser client of ctxstore's WebSocket protocol (docs/web.md).
// Objects the server sends keep the protocol's JSON field names (snake_case).

export declare const SUBPROTOCOL: "ctxstore.v1.json";
export declare const PROTOCOL_VERSION: 1;

export type ErrorCode =
  | "bad_request" | "unauthorized" | "forbidden" | "not_found" | "conflict" | "too_large"
  | "rate_limited" | "unavailable" | "timeout" | "internal";

export declare class CtxstoreError extends Error {
  constructor(code: ErrorCode, message: string, retryable?: boolean, details?: Record<string, unknown>);
  readonly code: ErrorCode;
  readonly retryable: boolean;
  readonly details: Record<string, unknown>;
}

export type Sender = "user" | "agent" | "system";
export type Metadata = Record<string, unknown>;

export interface Session {
  id: string; user_id: string; agent_id: string; created_at: number;
  metadata: Metadata; last_seq: number;
}

export interface Message {
  session_id: string; seq: number; sender: Sender; sender_id: string; kind: string;
  content: string; metadata: Metadata; client_msg_id: string | null; inserted_at: number;
  token_count: number | null;
}

export interface InboxEntry {
  session_id: string; agent_id: string; last_seq: number; unread: number;
  last_activity: number; last_sender: Sender | null; last_sender_id: string | null;
  preview: string;
}

export type Status =
  | { state: "connecting"; target: string }
  | { state: "connected"; target: string; nodeId: number }
  | { state: "disconnected"; target: string; error: Error }
  | { state: "failed"; target: string; error: CtxstoreError }
  | { state: "closed" };

export interface Options {
  /** The nodes' WebSocket URLs (ws://host:port/v1/ws; a bare ws://host:port gets /v1/ws). */
  targets: string[];
  /** The node's --token, if it has any. */
  token?: string | null;
  clientName?: string;
  /** One attempt of one request (default 10 000). */
  requestTimeoutMs?: number;
  /** From opening a WebSocket to its welcome (default 5 000). */
  connectTimeoutMs?: number;
  /** Attempts of a retried request, in all (default 8). */
  retryAttempts?: number;
  /** Jittered exponential backoff: 50-100 % of base * 2^(n-1), at most max (100, 5 000). */
  backoffBaseMs?: number;
  backoffMaxMs?: number;
  /** Called on each change of connection. */
  onStatus?: ((status: Status) => void) | null;
  /** The WebSocket class (default: globalThis.WebSocket). */
  WebSocket?: typeof WebSocket | null;
}

export declare const DEFAULTS: Readonly<Required<Omit<Options, "targets">>>;

export type SessionEvent =
  | { type: "message"; message: Message }
  | { type: "gap"; fromSeq: number; toSeq: number; reason: "retention" | "unavailable" }
  | { type: "closed"; reason: string; message: string };

export type InboxEvent =
  | { type: "snapshot"; entries: InboxEntry[]; truncated: boolean }
  | { type: "delta"; entries: InboxEntry[] }
  | { type: "closed"; reason: string; message: string };

export declare class Subscription {
  readonly kind: "session" | "inbox";
  /** The session id or the user id. */
  readonly key: string;
  /** The last seq delivered: a message's seq or a gap's toSeq (sessions). */
  readonly lastSeq: number;
  /** The inbox as it stands: session_id -> entry (inbox subscriptions). */
  readonly entries: Map<string, InboxEntry>;
  readonly closed: boolean;
  /** How many times it subscribed again (after a reconnect or a subscription_closed). */
  readonly resubscribes: number;
  close(): void;
}

export interface AppendOptions {
  sender: Sender;
  senderId: string;
  content: string;
  kind?: string;
  metadata?: Metadata;
  /** Made here if not given; the retries of this append reuse it. */
  clientMsgId?: string;
  expectedSeq?: number | null;
  tokenCount?: number | null;
}

export interface Appended {
  seq: number; inserted_at: number; deduped: boolean; client_msg_id: string;
}

export declare class Client {
  constructor(options: Options);
  readonly targets: string[];
  /** The node connected to, null while (re)connecting. */
  readonly nodeId: number | null;
  readonly target: string | null;
  readonly closed: boolean;
  close(): void;
  createSession(options: {
    userId: string; agentId: string; metadata?: Metadata; sessionId?: string | null;
  }): Promise<Session>;
  getSession(sessionId: string): Promise<Session>;
  listSessions(userId: string, options?: { cursor?: string | null; limit?: number }):
    Promise<{ sessions: Session[]; next_cursor: string | null }>;
  append(sessionId: string, options: AppendOptions): Promise<Appended>;
  read(sessionId: string, options?: { afterSeq?: number; limit?: number }):
    Promise<{ messages: Message[]; last_seq: number }>;
  markRead(sessionId: string, userId: string, seq: number):
    Promise<{ session_id: string; user_id: string; seq: number }>;
  subscribe(sessionId: string, options: { afterSeq?: number } | undefined,
    onEvent: (event: SessionEvent) => void): Promise<Subscription>;
  subscribeInbox(userId: string, onEvent: (event: InboxEvent) => void): Promise<Subscription>;
}

/** A client connected to one of the targets (tried in the order given). */
export declare function connect(options: Options): Promise<Client>;
export declare function newClientMsgId(): string;
export declare function webSocketUrl(target: string): string;
