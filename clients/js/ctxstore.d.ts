// Types of ctxstore.js, the browser client of ctxstore's WebSocket protocol (docs/web.md).
// Objects the server sends keep the protocol's JSON field names (snake_case).

export declare const SUBPROTOCOL: "ctxstore.v1.json";
export declare const PROTOCOL_VERSION: 3;

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

export type Role = "user" | "assistant" | "system" | "tool";

/** A part of a structured message: the AI SDK's UIMessage part shapes (camelCase keys), checked
 * by the node (docs/protocol.md, "Structured messages"). */
export type Part =
  | { type: "text" | "reasoning"; text: string; state?: "streaming" | "done";
      providerMetadata?: Record<string, unknown> }
  | { type: "step-start" }
  | { type: "file"; mediaType: string; url: string; filename?: string;
      providerMetadata?: Record<string, unknown> }
  | { type: "source-url"; sourceId: string; url: string; title?: string;
      providerMetadata?: Record<string, unknown> }
  | { type: "source-document"; sourceId: string; mediaType: string; title: string;
      filename?: string; providerMetadata?: Record<string, unknown> }
  | ToolPart
  | DynamicToolPart
  | { type: `data-${string}`; data: unknown; id?: string };

/** A tool call, and once it ran its result: input-available needs input, output-available
 * output, output-error errorText. */
export interface ToolCall {
  toolCallId: string;
  state: "input-streaming" | "input-available" | "approval-requested" | "approval-responded"
    | "output-available" | "output-error" | "output-denied";
  input?: unknown; output?: unknown; errorText?: string; rawInput?: unknown;
  providerExecuted?: boolean; preliminary?: boolean;
  callProviderMetadata?: Record<string, unknown>;
  approval?: { id: string; approved?: boolean; reason?: string };
}

export type ToolPart = ToolCall & { type: `tool-${string}` };
export type DynamicToolPart = ToolCall & { type: "dynamic-tool"; toolName: string };

export interface Message {
  /** seq 0: a compaction's replacement message (in a context window only). */
  session_id: string; seq: number; sender: Sender; sender_id: string; kind: string;
  content: string; metadata: Metadata; client_msg_id: string | null; inserted_at: number;
  token_count: number | null;
  /** null only for messages stored by protocol version 1 (see sender). */
  role: Role | null;
  /** null: the short form, content is one text part. */
  parts: Part[] | null;
}

export type Policy =
  | { type: "last_n"; limit: number }
  | { type: "skip_parts"; types: string[]; limit?: number | null }
  | { type: "token_budget" }
  | { type: "manual" };

export type Tokenizer = "o200k_base" | "cl100k_base";

export interface ContextConfig {
  token_budget: number; trigger_ratio: number; policy: Policy; tokenizer: Tokenizer;
}

export interface Segment {
  from_seq: number; to_seq: number; count: number; compacted: boolean;
}

export interface Context {
  session_id: string; messages: Message[]; segments: Segment[]; token_count: number;
  version: number; needs_compaction: boolean; window_first_seq: number; last_seq: number;
  /** null: never configured (manual, no budget). */
  config: ContextConfig | null;
}

export interface ContextChanged {
  session_id: string; version: number; token_count: number; needs_compaction: boolean;
  window_first_seq: number;
}

/** A compaction's replacement message. */
export interface NewMessage {
  role: Role;
  /** Empty (or left out) when parts are given. */
  content?: string;
  parts?: Part[] | null;
  kind?: string;
  metadata?: Metadata;
  /** null: counted by the node. */
  tokenCount?: number | null;
}

export interface InboxEntry {
  session_id: string; agent_id: string; last_seq: number; unread: number;
  last_activity: number; last_sender: Sender | null; last_sender_id: string | null;
  preview: string;
}

export type Status =
  | { state: "connecting"; target: string }
  | { state: "connected"; target: string; nodeId: number;
      transport: "websocket" | "webtransport" }
  | { state: "disconnected"; target: string; error: Error }
  | { state: "failed"; target: string; error: CtxstoreError }
  /** The token was refreshed on the open connection (a token function: Options.token). */
  | { state: "refreshed"; target: string; expiresInMs: number | null }
  /** A refresh failed: tried again with half the time left; else the node closes the
   * connection when the token expires and the client connects again with a new one. */
  | { state: "refresh_failed"; target: string; error: Error }
  | { state: "closed" };

export interface Options {
  /** The nodes' WebSocket URLs (ws://host:port/v1/ws; a bare ws://host:port gets /v1/ws). */
  targets: string[];
  /** The node's --token, or a signed token (docs/auth.md); or a function giving one (or a
   * promise of one), called for each connection's hello and again before that connection's
   * token expires (a second hello refreshes it: the connection and its subscriptions go on). */
  token?: string | null | (() => string | null | Promise<string | null>);
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
  /** WebTransport (docs/web.md section 8.5), given up for the WebSocket wherever it fails.
   * "auto" (default): where the browser has WebTransport, each target's node is asked
   * (GET /v1/transports) whether, on which port and with which certificate hash it serves it;
   * true, or the SHA-256s (hex) of a self-signed certificate: tried at https://host:port/v1/wt
   * (the target's own port) without asking; false or null: WebSocket only. */
  webTransport?: "auto" | boolean | { serverCertificateHashes?: string[] } | null;
  /** The bound on asking a node, and on a WebTransport session's hello being answered
   * (default 2 000): past it, the WebSocket. */
  webTransportTimeoutMs?: number;
  /** The WebTransport class (default: globalThis.WebTransport). */
  WebTransport?: (new (url: string, init?: object) => unknown) | null;
  /** The fetch function that asks a node (default: globalThis.fetch). */
  fetch?: typeof fetch | null;
}

/** The WebTransport URL of a WebSocket target: https://host:port/v1/wt (or the given port and
 * path). */
export declare function webTransportUrl(
  target: string, port?: number | null, path?: string): string;

/** Where a target's node says what it serves: http(s)://host:port/v1/transports. */
export declare function transportsUrl(target: string): string;

/** The WebTransport endpoint a /v1/transports answer names for `target` (its host, the
 * answer's port and path), or null (none, or an odd answer). */
export declare function webTransportOf(
  target: string, answer: unknown): { url: string; hashes: string[] } | null;

export declare const DEFAULTS: Readonly<Required<Omit<Options, "targets">>>;

/** An agent as registered (docs/agents.md), in the protocol's JSON shape. */
export interface Agent {
  id: string; url: string; headers: Record<string, string>; timeout_ms: number;
  idle_timeout_ms: number; debounce_ms: number; history: string; max_attempts: number;
  status: "active" | "disabled"; protocol: "auto" | "h1" | "h2";
}

/** The fields of createAgent / updateAgent (left out: the defaults of docs/agents.md). */
export interface AgentFields {
  id: string; url: string; headers?: Record<string, string>; timeoutMs?: number;
  idleTimeoutMs?: number; debounceMs?: number; history?: string; maxAttempts?: number;
  status?: "active" | "disabled"; protocol?: "auto" | "h1" | "h2";
}

/** An agent's reply as its live chunks build it (lenient: chunks are best effort). */
export declare class ReplyDraft {
  constructor(triggerSeq: number, attempt: number);
  readonly triggerSeq: number;
  readonly attempt: number;
  readonly parts: Part[];
  readonly metadata: Metadata;
  /** The stream ended ("error": this attempt failed; a later one may follow). */
  readonly terminated: "finish" | "abort" | "error" | null;
  readonly errorText: string | null;
  readonly chunks: number;
  /** data-<name> -> the last transient data of that name (shown, never stored). */
  readonly transient: Record<string, unknown>;
  /** The text of its text parts. */
  readonly text: string;
  add(chunk: Record<string, unknown>): boolean;
}

/** The trigger seq a stored message answers (metadata.agent.trigger_seq), or null. */
export declare function answeredTrigger(message: Message): number | null;

export type SessionEvent =
  /** replaces: the draft this message (the agent's reply, or a dropped dispatch's note) ends. */
  | { type: "message"; message: Message; replaces: ReplyDraft | null }
  /** With streamChunks: one live chunk of the agent's reply, and the draft it went into. */
  | { type: "chunk"; triggerSeq: number; attempt: number; chunk: Record<string, unknown>;
      draft: ReplyDraft; replaces: ReplyDraft | null }
  /** replaces: the draft whose reply may be in the gap (the gap is past its trigger). */
  | { type: "gap"; fromSeq: number; toSeq: number; reason: "retention" | "unavailable";
      replaces: ReplyDraft | null }
  /** With contextEvents: the window changed other than by an append, or went over budget. */
  | { type: "context"; reason: "compacted" | "trimmed" | "configured" | "needs_compaction";
      version: number; tokenCount: number; needsCompaction: boolean; windowFirstSeq: number }
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
  /** With streamChunks: the agent's reply being streamed, until the stored one lands. */
  readonly draft: ReplyDraft | null;
  close(): void;
}

export interface AppendOptions {
  sender: Sender;
  senderId: string;
  /** Left out (or empty) when parts are given. */
  content?: string;
  /** Default: the sender's (user: user, agent: assistant, system: system). */
  role?: Role | null;
  parts?: Part[] | null;
  /** Append only while the context window is at this version (else "conflict"). */
  ifVersion?: number | null;
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
  setContextConfig(sessionId: string, options: {
    tokenBudget: number; triggerRatio?: number; policy: Policy; tokenizer?: Tokenizer | null;
  }): Promise<ContextChanged>;
  getContext(sessionId: string): Promise<Context>;
  compact(sessionId: string, options: {
    fromSeq: number; toSeq: number; replacement: NewMessage[]; ifVersion?: number | null;
  }): Promise<ContextChanged>;
  subscribe(sessionId: string,
    options: { afterSeq?: number; contextEvents?: boolean; streamChunks?: boolean } | undefined,
    onEvent: (event: SessionEvent) => void): Promise<Subscription>;
  createAgent(fields: AgentFields): Promise<Agent>;
  updateAgent(fields: AgentFields): Promise<Agent>;
  getAgent(agentId: string): Promise<Agent>;
  listAgents(options?: { cursor?: string | null; limit?: number }):
    Promise<{ agents: Agent[]; next_cursor: string | null }>;
  disableAgent(agentId: string): Promise<Agent>;
  subscribeInbox(userId: string, onEvent: (event: InboxEvent) => void): Promise<Subscription>;
}

/** A client connected to one of the targets (tried in the order given). */
export declare function connect(options: Options): Promise<Client>;
export declare function newClientMsgId(): string;
export declare function webSocketUrl(target: string): string;
