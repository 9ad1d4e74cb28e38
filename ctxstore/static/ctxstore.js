// ctxstore.js: the browser client of ctxstore's WebSocket protocol (docs/web.md, "Browser client").
//
// One dependency-free ES module (types: clients/js/ctxstore.d.ts).  A Client holds one WebSocket
// (subprotocol ctxstore.v1.json), or a WebTransport session where the browser has WebTransport
// and the node serves it (options.webTransport), to one of the nodes it was given and
// multiplexes on it:
// - requests are promises matched by rid, each with a timeout;
// - idempotent requests (append with its client_msg_id, reads, mark_read) are retried on a
//   retryable error or a lost connection with jittered exponential backoff, a bounded number of
//   times; a connection lost is replaced by one to the next node, in turn;
// - a subscription delivers every message after its afterSeq once, in seq order: it resumes
//   after a reconnect from the last seq it delivered, drops what it already delivered, reports
//   what will not come as a gap event, and resubscribes rather than skip over a hole;
// - protocol version 2 (docs/protocol.md): structured messages (role, parts) and context
//   windows (setContextConfig, getContext, compact, context events of a subscription);
// - protocol version 3: the agents registry (createAgent...) and a session's live agent chunks
//   (subscribe's streamChunks), assembled into a draft reply (ReplyDraft) that the stored
//   assistant message replaces when it lands;
// - protocol version 4: with a token function (options.token), the token is refreshed on the
//   open connection (a second hello) before it expires (welcome.expires_in_ms), so the
//   connection and its subscriptions go on (docs/auth.md).

export const SUBPROTOCOL = "ctxstore.v1.json";
export const PROTOCOL_VERSION = 4; // needs a node of version 4 (it serves 1 to 4)
const REFRESH_AHEAD_MS = 60000; // a token is refreshed this long before it expires, or with a
// quarter of its life left if that is shorter
const REFRESH_EXTENDS_MS = 100; // a refresh moving the expiry less got no new token: no more
const RETRYABLE = new Set(["unavailable", "timeout", "rate_limited"]);
const PUSHES = new Set([
  "message_event", "gap_event", "inbox_delta", "subscription_closed", "context_event",
  "stream_chunk",
]);
const ROTATE_AFTER_ATTEMPTS = 3; // a request failing this often on one node moves to the next

export const DEFAULTS = Object.freeze({
  token: null, // a string, or a function giving one (or a promise of one) for each hello
  clientName: "ctxstore.js",
  requestTimeoutMs: 10000, // one attempt of one request
  connectTimeoutMs: 5000, // from opening a WebSocket to its welcome
  retryAttempts: 8, // attempts of a retried request, in all
  backoffBaseMs: 100, // the first retry waits 50-100 ms, each next one twice that, up to
  backoffMaxMs: 5000,
  onStatus: null,
  WebSocket: null, // the WebSocket class: globalThis.WebSocket if null
  // WebTransport (docs/web.md section 8.5), always given up for the WebSocket if it fails:
  // "auto": when the WebTransport class is there, the node is asked (GET /v1/transports)
  // whether and on which port it serves WebTransport, and with which certificate hash;
  // true or {serverCertificateHashes: [hex SHA-256, ...]}: tried at https://host:port/v1/wt (the
  // target's port) without asking; false or null: WebSocket only
  webTransport: "auto",
  webTransportTimeoutMs: 2000, // asking the node; a WebTransport session's hello answered
  WebTransport: null, // the WebTransport class: globalThis.WebTransport if null
  fetch: null, // for asking the node: globalThis.fetch if null
});

/** An error of the protocol (docs/protocol.md section 5): a stable code, retryable or not. */
export class CtxstoreError extends Error {
  constructor(code, message, retryable = RETRYABLE.has(code), details = {}) {
    super(message);
    this.name = "CtxstoreError";
    this.code = code;
    this.retryable = retryable;
    this.details = details;
  }
}

const closedError = () => new CtxstoreError("unavailable", "closed by the client", false);

/** A fresh client_msg_id: "c-" and 128 random bits (crypto.getRandomValues works on http too). */
export function newClientMsgId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return "c-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** A WebSocket URL: ws(s)://host:port[/v1/ws]; http(s) is taken as its ws(s) counterpart. */
export function webSocketUrl(target) {
  const url = new URL(target);
  if (url.protocol === "http:") url.protocol = "ws:";
  if (url.protocol === "https:") url.protocol = "wss:";
  if (url.protocol !== "ws:" && url.protocol !== "wss:") {
    throw new TypeError(`target ${target}: not a ws:// or wss:// URL`);
  }
  if (url.pathname === "/") url.pathname = "/v1/ws";
  return url.href;
}

function strip(answer) {
  const { type: _type, rid: _rid, ...rest } = answer;
  return rest;
}

/** The protocol's NewMessage (a compaction's replacement) of a JS one. */
function newMessage({ role, content, parts = null, kind = "text", metadata = {}, tokenCount }) {
  return {
    role,
    kind,
    content: content ?? (parts === null ? undefined : ""),
    parts,
    metadata,
    token_count: tokenCount ?? null,
  };
}

/** The protocol's Agent (every field) of a JS one; the defaults are the Python client's. */
function agentOf({
  id, url, headers = {}, timeoutMs = 120000, idleTimeoutMs = 30000, debounceMs = 500,
  history = "all", maxAttempts = 5, status = "active", protocol = "auto",
}) {
  return {
    id, url, headers, timeout_ms: timeoutMs, idle_timeout_ms: idleTimeoutMs,
    debounce_ms: debounceMs, history, max_attempts: maxAttempts, status, protocol,
  };
}

/** One WebSocket to one node: its requests in flight and the subscriptions made on it. */
/** What a link to one node does whatever carries it: requests and their answers by rid, pushes
 * to their subscriptions, the server's goodbye, and failing what waits once it closes.  A
 * transport supplies `_send(text)` and `_closeTransport(code, reason)`. */
class LinkBase {
  constructor(target) {
    this.target = target;
    this.nodeId = null;
    this.open = false;
    this.nextRid = 1;
    this.pending = new Map(); // rid -> {resolve, reject, timer, onAnswer}
    this.subs = new Map(); // sub_id -> Subscription
    this.goodbye = null; // the server's last word (error with rid 0)
    this.done = new Promise((resolve) => (this._done = resolve)); // resolved once closed
    this.closed = false;
  }

  /** Send a request (a body without rid); the answer, or a CtxstoreError. `onAnswer` is called
   * at once with the answer, before any later message of the link is handled. */
  request(body, timeoutMs, onAnswer = null) {
    if (this.closed) return Promise.reject(this._lost());
    const rid = this.nextRid++;
    const text = JSON.stringify({ ...body, rid });
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(rid);
        reject(new CtxstoreError("timeout", `${body.type}: no answer in ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(rid, { resolve, reject, timer, onAnswer });
      this._send(text);
    });
  }

  close(code = 1000, reason = "") {
    if (this.closed) return;
    try {
      this._closeTransport(code, reason);
    } catch {
      // already closing
    }
    this._closed(code, reason || "closed by the client");
  }

  _receive(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      this.close(1003, "not JSON");
      return;
    }
    this._handle(msg);
  }

  _handle(msg) {
    if (PUSHES.has(msg.type)) {
      this.subs.get(msg.sub_id)?._push(this, msg);
      return;
    }
    if (msg.rid === 0) {
      this.goodbye = msg; // the close follows
      return;
    }
    const entry = this.pending.get(msg.rid);
    if (entry === undefined) return; // answered after its timeout
    this.pending.delete(msg.rid);
    clearTimeout(entry.timer);
    if (msg.type === "error") {
      entry.reject(new CtxstoreError(msg.code, msg.message, msg.retryable, msg.details ?? {}));
      return;
    }
    try {
      entry.onAnswer?.(msg);
    } catch (e) {
      entry.reject(e);
      return;
    }
    entry.resolve(msg);
  }

  _lost() {
    const why = this.goodbye ? `${this.goodbye.code}: ${this.goodbye.message}` : "connection lost";
    return new CtxstoreError("unavailable", `${this.target}: ${why}`, true);
  }

  _closed(code, reason) {
    if (this.closed) return;
    this.closed = true;
    this.open = false;
    this.closeCode = code;
    this.closeReason = reason;
    const error = this._lost();
    for (const entry of this.pending.values()) {
      clearTimeout(entry.timer);
      entry.reject(error);
    }
    this.pending.clear();
    clearTimeout(this.refreshTimer);
    this._done(error);
  }
}

/** A link over a WebSocket. */
class Link extends LinkBase {
  constructor(target, options) {
    super(target);
    this.outbox = []; // what was sent before the socket opened
    const ws = new options.WebSocket(target, [SUBPROTOCOL]);
    this.ws = ws;
    ws.onopen = () => {
      for (const text of this.outbox) ws.send(text);
      this.outbox = [];
    };
    ws.onmessage = (e) => this._receive(e.data);
    ws.onerror = () => {}; // a close follows
    ws.onclose = (e) => this._closed(e.code, e.reason);
  }

  _send(text) {
    if (this.ws.readyState === 1) this.ws.send(text);
    else this.outbox.push(text);
  }

  _closeTransport(code, reason) {
    this.ws.close(code, reason);
  }
}

/** The WebTransport URL of a WebSocket target: https://host:port/v1/wt (same port, UDP). */
export function webTransportUrl(target, port = null, path = "/v1/wt") {
  const url = new URL(target);
  url.protocol = "https:";
  if (port !== null) url.port = String(port);
  url.pathname = path;
  url.search = "";
  url.hash = "";
  return url.href;
}

/** Where a node says what it serves: http(s)://host:port/v1/transports of a WebSocket target. */
export function transportsUrl(target) {
  const url = new URL(target);
  url.protocol = url.protocol === "wss:" ? "https:" : "http:";
  url.pathname = "/v1/transports";
  url.search = "";
  url.hash = "";
  return url.href;
}

const TRANSPORTS_BYTES_MAX = 65536;
const HASHES_MAX = 8;
const SHA256_HEX = /^[0-9a-f]{64}$/i;

/** The WebTransport endpoint of `target` a node's /v1/transports answer names: {url, hashes},
 * or null if it names none or anything odd.  Only a port and a path are taken from it: the
 * host stays the target's, so an answer cannot send the client to another machine. */
export function webTransportOf(target, answer) {
  const wt = answer?.webtransport;
  if (wt === null || typeof wt !== "object") return null;
  const { port, path } = wt;
  const hashes = wt.cert_sha256 ?? [];
  if (!Number.isInteger(port) || port < 1 || port > 65535) return null;
  if (typeof path !== "string" || !/^\/[A-Za-z0-9._~/-]{0,255}$/.test(path)) return null;
  if (path.startsWith("//")) return null;
  if (!Array.isArray(hashes) || hashes.length > HASHES_MAX) return null;
  if (!hashes.every((h) => typeof h === "string" && SHA256_HEX.test(h))) return null;
  const url = webTransportUrl(target, port, path);
  if (new URL(url).hostname !== new URL(target).hostname) return null;
  return { url, hashes };
}

const textEncoder = new TextEncoder();
const textDecoder = new TextDecoder();

/** A message on a WebTransport stream: its 4-byte big-endian length, then the JSON text. */
function wtFrame(text) {
  const body = textEncoder.encode(text);
  const out = new Uint8Array(4 + body.length);
  new DataView(out.buffer).setUint32(0, body.length);
  out.set(body, 4);
  return out;
}

/** Calls `onText` with each message of a stream until it ends. */
async function readWtMessages(readable, onText) {
  const reader = readable.getReader();
  let buf = new Uint8Array(0);
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    const joined = new Uint8Array(buf.length + value.length);
    joined.set(buf);
    joined.set(value, buf.length);
    buf = joined;
    while (buf.length >= 4) {
      const n = new DataView(buf.buffer, buf.byteOffset, buf.byteLength).getUint32(0);
      if (buf.length < 4 + n) break;
      onText(textDecoder.decode(buf.subarray(4, 4 + n)));
      buf = buf.subarray(4 + n);
    }
  }
}

const EARLY_PUSHES_MAX = 10000; // pushes of a subscription whose answer has not come yet

/** The subscriptions of a WtLink: a push that overtook its subscription's answer (they come on
 * different streams) is handed over once the subscription is attached. */
class WtSubs extends Map {
  constructor(link) {
    super();
    this.link = link;
  }

  set(subId, sub) {
    super.set(subId, sub);
    const early = this.link.early.get(subId);
    if (early !== undefined) {
      this.link.early.delete(subId);
      queueMicrotask(() => {
        for (const msg of early) sub._push(this.link, msg);
      });
    }
    return this;
  }
}

/** One WebTransport session to one node (docs/web.md section 8): each request on a
 * bidirectional stream of its own, each subscription's pushes on a unidirectional stream the
 * node opens; otherwise as a Link (whose answer handling it shares). */
class WtLink extends LinkBase {
  constructor(target, hashes, options) {
    super(target);
    this.subs = new WtSubs(this);
    this.early = new Map(); // sub_id -> pushes before its subscription was attached
    this.earlyCount = 0;
    const init = {};
    if (hashes?.length) {
      init.serverCertificateHashes = hashes.map((hex) => ({
        algorithm: "sha-256",
        value: new Uint8Array(hex.match(/../g).map((b) => parseInt(b, 16))),
      }));
    }
    const wt = new options.WebTransport(target, init);
    this.wt = wt;
    wt.closed.then(
      (info) => this._closed(info?.closeCode ?? 1000, info?.reason ?? ""),
      (e) => this._closed(1006, String(e?.message ?? e)),
    );
    wt.ready.then(() => this._acceptPushStreams(), () => {});
  }

  async _acceptPushStreams() {
    const reader = this.wt.incomingUnidirectionalStreams.getReader();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        readWtMessages(value, (text) => this._receive(text)).catch(() => {});
      }
    } catch {
      // the session closed
    }
  }

  _send(text) {
    this._exchange(text).catch(() => {}); // (a failed stream: the session's close follows)
  }

  async _exchange(text) {
    await this.wt.ready;
    const stream = await this.wt.createBidirectionalStream();
    const writer = stream.writable.getWriter();
    await writer.write(wtFrame(text));
    await writer.close();
    await readWtMessages(stream.readable, (answer) => this._receive(answer));
  }

  _closeTransport(code, reason) {
    this.wt.close({ closeCode: code, reason });
  }

  _handle(msg) {
    if (PUSHES.has(msg.type) && !this.subs.has(msg.sub_id)) {
      if (this.earlyCount++ >= EARLY_PUSHES_MAX) return; // (its subscription never came)
      const list = this.early.get(msg.sub_id) ?? [];
      list.push(msg);
      this.early.set(msg.sub_id, list);
      return;
    }
    super._handle(msg);
  }
}

const DRAFT_PARTS_MAX = 1000; // parts of a draft reply (more are not shown)
const DRAFT_BYTES_MAX = 1024 * 1024; // text, input and output of a draft (the rest is cut)

/** An agent's reply as its live chunks (AI SDK UI message stream) build it, the way the node
 * assembles the stored message (ctxstore/agents/assemble.py): parts in the order of their
 * first chunk, text and reasoning by id, tools by toolCallId, data-* replaced by id (transient
 * ones are shown, not kept).  Lenient where the node is strict: chunks are best effort (a
 * subscriber that joins mid-stream or falls behind misses some), so a delta for a part never
 * started starts it, and nothing throws.  Bounded by DRAFT_PARTS_MAX and DRAFT_BYTES_MAX. */
export class ReplyDraft {
  constructor(triggerSeq, attempt) {
    this.triggerSeq = triggerSeq; // the newest user message the reply answers
    this.attempt = attempt; // the call (a later one replaces this draft)
    this.parts = [];
    this.metadata = {};
    this.terminated = null; // "finish" | "abort" | "error": the stream ended (not stored yet)
    this.errorText = null;
    this.chunks = 0;
    this.transient = {}; // data-<name> -> the last transient data of that name
    this._bytes = 0;
    this._text = new Map(); // "text:id" / "reasoning:id" -> part
    this._tools = new Map(); // toolCallId -> part
    this._data = new Map(); // "data-x:id" -> index in parts
  }

  /** Take one chunk in; false if it was ignored (after the end, or over a bound). */
  add(chunk) {
    if (this.terminated !== null || chunk === null || typeof chunk !== "object") return false;
    const kind = String(chunk.type ?? "");
    this.chunks += 1;
    const dash = kind.indexOf("-");
    const family = dash < 0 ? kind : kind.slice(0, dash);
    const what = dash < 0 ? "" : kind.slice(dash + 1);
    if ((family === "text" || family === "reasoning") && ["start", "delta", "end"].includes(what)) {
      return this._textChunk(family, what, chunk);
    }
    if (kind.startsWith("tool-")) return this._toolChunk(kind, chunk);
    if (family === "data") return this._dataChunk(kind, chunk);
    switch (kind) {
      case "start-step":
        return this._add({ type: "step-start" }) !== null;
      case "file":
        return this._add({ type: "file", mediaType: chunk.mediaType, url: chunk.url }) !== null;
      case "source-url":
      case "source-document": {
        const part = { type: kind };
        for (const k of ["sourceId", "url", "title", "mediaType", "filename"]) {
          if (chunk[k] !== undefined && chunk[k] !== null) part[k] = chunk[k];
        }
        return this._add(part) !== null;
      }
      case "start":
      case "message-metadata":
      case "finish":
        if (chunk.messageMetadata && typeof chunk.messageMetadata === "object") {
          Object.assign(this.metadata, chunk.messageMetadata);
        }
        if (kind === "finish") {
          this.terminated = "finish";
          for (const part of this._text.values()) part.state = "done";
        }
        return true;
      case "abort":
        this.terminated = "abort";
        return true;
      case "error":
        this.terminated = "error"; // this attempt failed: a retry (a later attempt) may follow
        this.errorText = String(chunk.errorText ?? "");
        return true;
      default:
        return true; // finish-step, and types of later versions: nothing to show
    }
  }

  /** The text of its text parts (what a chat shows first). */
  get text() {
    return this.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
  }

  _add(part) {
    if (this.parts.length >= DRAFT_PARTS_MAX) return null;
    this.parts.push(part);
    return this.parts.length - 1;
  }

  _count(text) {
    const room = DRAFT_BYTES_MAX - this._bytes;
    const kept = text.length <= room ? text : text.slice(0, Math.max(0, room));
    this._bytes += kept.length;
    return kept;
  }

  _textChunk(family, what, chunk) {
    const key = `${family}:${chunk.id}`;
    let part = this._text.get(key);
    if (part === undefined) {
      part = { type: family, text: "", state: "streaming" };
      if (this._add(part) === null) return false;
      this._text.set(key, part);
    }
    if (what === "delta") part.text += this._count(String(chunk.delta ?? ""));
    else if (what === "end") part.state = "done";
    return true;
  }

  _toolChunk(kind, chunk) {
    const callId = chunk.toolCallId;
    let part = this._tools.get(callId);
    if (part === undefined) {
      const name = chunk.toolName ?? "unknown";
      part = chunk.dynamic
        ? { type: "dynamic-tool", toolName: name, toolCallId: callId }
        : { type: `tool-${name}`, toolCallId: callId };
      part.state = "input-streaming";
      if (this._add(part) === null) return false;
      this._tools.set(callId, part);
    }
    switch (kind) {
      case "tool-input-start":
        part.state = "input-streaming";
        break;
      case "tool-input-delta":
        part.rawInput = (part.rawInput ?? "") + this._count(String(chunk.inputTextDelta ?? ""));
        break;
      case "tool-input-available":
        part.state = "input-available";
        part.input = chunk.input;
        delete part.rawInput;
        break;
      case "tool-input-error":
        part.state = "output-error";
        part.input = chunk.input;
        part.errorText = chunk.errorText ?? "";
        delete part.rawInput;
        break;
      case "tool-output-available":
        part.state = "output-available";
        part.output = chunk.output;
        if (chunk.preliminary) part.preliminary = true;
        else delete part.preliminary;
        break;
      case "tool-output-error":
        part.state = "output-error";
        part.errorText = chunk.errorText ?? "";
        break;
      default:
        return false;
    }
    return true;
  }

  _dataChunk(kind, chunk) {
    if (chunk.transient) {
      this.transient[kind] = chunk.data;
      return true;
    }
    const part = { type: kind, data: chunk.data };
    if (chunk.id === undefined || chunk.id === null) return this._add(part) !== null;
    part.id = chunk.id;
    const key = `${kind}:${chunk.id}`;
    const at = this._data.get(key);
    if (at !== undefined) {
      this.parts[at] = part;
      return true;
    }
    const added = this._add(part);
    if (added === null) return false;
    this._data.set(key, added);
    return true;
  }
}

/** The trigger seq a stored message answers (an agent's reply or a dropped dispatch's note,
 * both with metadata.agent.trigger_seq), or null. */
export function answeredTrigger(message) {
  const seq = message?.metadata?.agent?.trigger_seq;
  return Number.isInteger(seq) ? seq : null;
}

/** A subscription to a session's messages or to a user's inbox; see Client.subscribe. */
export class Subscription {
  constructor(client, kind, key, afterSeq, onEvent, contextEvents = false, streamChunks = false) {
    this.client = client;
    this.kind = kind; // "session" or "inbox"
    this.key = key; // the session id or the user id
    this.contextEvents = contextEvents; // session: also the context window's changes
    this.streamChunks = streamChunks; // session: also the agent's live chunks (drafts)
    this.draft = null; // the agent's reply being streamed (a ReplyDraft), until it is stored
    this.answered = 0; // the newest trigger seq a stored message answered
    this.lastSeq = afterSeq; // the last seq delivered (a message's or a gap's to_seq)
    this.entries = new Map(); // inbox: session_id -> entry, kept up to date
    this.onEvent = onEvent;
    this.closed = false;
    this.link = null;
    this.subId = null;
    this.resubscribes = 0; // attachments after the first
    this._wake = null;
    this._failures = 0;
  }

  /** Stop: unsubscribe (if connected); no event is delivered after this. */
  close() {
    if (this.closed) return;
    this.closed = true;
    this.client.subs.delete(this);
    const { link, subId } = this;
    this._detach();
    if (link !== null && !link.closed) {
      link
        .request({ type: "unsubscribe", sub_id: subId }, this.client.options.requestTimeoutMs)
        .catch(() => {});
    }
  }

  _emit(event) {
    if (this.closed) return;
    try {
      this.onEvent(event);
    } catch (e) {
      console.error("ctxstore: a subscription's onEvent threw", e);
    }
  }

  _detach(why = null) {
    if (this.link !== null) this.link.subs.delete(this.subId);
    this.link = null;
    this.subId = null;
    this._wake?.(why);
  }

  _request() {
    return this.kind === "session"
      ? {
          type: "subscribe",
          session_id: this.key,
          after_seq: this.lastSeq,
          context_events: this.contextEvents,
          stream_chunks: this.streamChunks,
        }
      : { type: "subscribe_inbox", user_id: this.key };
  }

  _attached(link, answer) {
    if (this.closed) {
      this._unsubscribe(link, answer.sub_id); // closed while subscribing
      return;
    }
    this.link = link;
    this.subId = answer.sub_id;
    link.subs.set(answer.sub_id, this);
    if (this.kind === "inbox") {
      this.entries = new Map(answer.entries.map((e) => [e.session_id, e]));
      this._emit({ type: "snapshot", entries: answer.entries, truncated: answer.truncated });
    }
  }

  /** Attach to the client's connection, again after each loss, until closed. */
  async _run(first) {
    const client = this.client;
    while (!this.closed) {
      const woken = new Promise((resolve) => (this._wake = resolve));
      let link;
      try {
        link = await client._link(Infinity);
        if (this.closed) return;
        await link.request(this._request(), client.options.requestTimeoutMs, (answer) =>
          this._attached(link, answer),
        );
        if (this.closed) throw closedError();
      } catch (e) {
        if (this.closed) {
          first?.reject(closedError());
          return;
        }
        if (!(e instanceof CtxstoreError) || !e.retryable) {
          this._end(e, first);
          return;
        }
        this._failures += 1;
        await client._sleep(client._backoff(this._failures));
        continue;
      }
      if (first !== null) first.resolve(this);
      else this.resubscribes += 1;
      first = null;
      const why = await Promise.race([woken, link.done.then(() => "lost")]);
      this._detach();
      if (why === "shutdown") client._rotate(link);
      if (why !== "lost" && !this.closed) {
        this._failures += 1; // closed by the server or out of order: resubscribe, backing off
        await client._sleep(client._backoff(this._failures));
      }
    }
  }

  _end(error, first) {
    const wasOpen = !this.closed;
    this.closed = true;
    this.client.subs.delete(this);
    this._detach();
    if (first !== null) first.reject(error);
    else if (wasOpen) {
      try {
        this.onEvent({ type: "closed", reason: error.code ?? "error", message: error.message });
      } catch (e) {
        console.error("ctxstore: a subscription's onEvent threw", e);
      }
    }
  }

  _push(link, msg) {
    if (this.closed || link !== this.link || msg.sub_id !== this.subId) return;
    switch (msg.type) {
      case "message_event":
        for (const m of msg.messages) {
          if (m.seq <= this.lastSeq) continue; // delivered already
          if (m.seq !== this.lastSeq + 1) {
            // a hole nobody reported: never skip it, ask again from the last seq delivered
            this._unsubscribe(link, msg.sub_id);
            this._detach("out_of_order");
            return;
          }
          this.lastSeq = m.seq;
          this._failures = 0;
          const trigger = answeredTrigger(m);
          let replaces = null;
          if (trigger !== null) {
            this.answered = Math.max(this.answered, trigger);
            if (this.draft !== null && this.draft.triggerSeq <= trigger) {
              replaces = this.draft; // the stored message is the record: the draft goes
              this.draft = null;
            }
          }
          this._emit({ type: "message", message: m, replaces });
        }
        return;
      case "gap_event": {
        if (msg.to_seq <= this.lastSeq) return;
        const fromSeq = Math.max(msg.from_seq, this.lastSeq + 1);
        if (fromSeq !== this.lastSeq + 1) {
          this._unsubscribe(link, msg.sub_id);
          this._detach("out_of_order");
          return;
        }
        this.lastSeq = msg.to_seq;
        let replaces = null;
        if (this.draft !== null && msg.to_seq > this.draft.triggerSeq) {
          replaces = this.draft; // its stored reply may be in the gap: it will not come
          this.draft = null;
        }
        this._emit({ type: "gap", fromSeq, toSeq: msg.to_seq, reason: msg.reason, replaces });
        return;
      }
      case "context_event": {
        // not replayed on a resubscription: read getContext again after one (resubscribes)
        const { reason, version, token_count, needs_compaction, window_first_seq } = msg;
        this._emit({
          type: "context", reason, version, tokenCount: token_count,
          needsCompaction: needs_compaction, windowFirstSeq: window_first_seq,
        });
        return;
      }
      case "stream_chunk": {
        // Best effort and not replayed: an attempt replaces an earlier one (a newer trigger, or
        // the same with a higher attempt); chunks of what is answered already are late.
        const { trigger_seq: triggerSeq, attempt, chunk } = msg;
        if (triggerSeq <= this.answered) return;
        const d = this.draft;
        if (d !== null && (triggerSeq < d.triggerSeq ||
            (triggerSeq === d.triggerSeq && attempt < d.attempt))) return;
        let replaces = null;
        if (d === null || triggerSeq !== d.triggerSeq || attempt !== d.attempt) {
          replaces = d;
          this.draft = new ReplyDraft(triggerSeq, attempt);
        }
        this.draft.add(chunk);
        this._emit({ type: "chunk", triggerSeq, attempt, chunk, draft: this.draft, replaces });
        return;
      }
      case "inbox_delta":
        for (const e of msg.entries) this.entries.set(e.session_id, e);
        this._emit({ type: "delta", entries: msg.entries });
        return;
      case "subscription_closed":
        if (msg.reason === "not_found") {
          this._end(new CtxstoreError("not_found", msg.message, false), null);
        } else {
          this._detach(msg.reason); // slow_consumer, unavailable, shutdown: subscribe again
        }
        return;
    }
  }

  _unsubscribe(link, subId) {
    link
      .request({ type: "unsubscribe", sub_id: subId }, this.client.options.requestTimeoutMs)
      .catch(() => {});
  }
}

/** A connection to a ctxstore cluster through the nodes' WebSocket URLs. */
export class Client {
  constructor(options) {
    const opts = { ...DEFAULTS, ...options };
    if (!Array.isArray(opts.targets) || opts.targets.length === 0) {
      throw new TypeError("targets: give at least one ws:// URL");
    }
    opts.WebSocket ??= globalThis.WebSocket;
    if (typeof opts.WebSocket !== "function") {
      throw new TypeError("no WebSocket class: pass options.WebSocket");
    }
    this.options = opts;
    this.targets = opts.targets.map(webSocketUrl);
    this.link = null;
    this.subs = new Set();
    this.closed = false;
    this.fatal = null; // a non-retryable refusal of the hello (a wrong token)
    this._next = 0; // the target tried next
    this._connecting = null;
    this._sleepers = new Set();
    opts.WebTransport ??= globalThis.WebTransport ?? null;
    opts.fetch ??= globalThis.fetch?.bind(globalThis) ?? null;
    this._wtFailed = new Set(); // targets whose WebTransport failed: WebSocket from then on
    this._wtFound = new Map(); // target -> {url, hashes} or null: what its node said
  }

  /** A new link to `target`: WebTransport if wanted, available, served there and not failed
   * there; the WebSocket otherwise. */
  async _newLink(target) {
    const endpoint = await this._webTransportOf(target);
    if (endpoint !== null) {
      const link = new WtLink(endpoint.url, endpoint.hashes, this.options);
      link.wsTarget = target;
      return link;
    }
    return new Link(target, this.options);
  }

  /** Where to open a WebTransport session to `target` ({url, hashes}), or null: WebSocket. */
  async _webTransportOf(target) {
    const { webTransport, WebTransport } = this.options;
    if (!webTransport || typeof WebTransport !== "function" || this._wtFailed.has(target)) {
      return null;
    }
    if (webTransport !== "auto") {
      const hashes = webTransport.serverCertificateHashes ?? [];
      return { url: webTransportUrl(target), hashes };
    }
    if (!this._wtFound.has(target)) {
      const found = await this._askTransports(target);
      if (found === undefined) return null; // no answer: WebSocket, and ask again next time
      this._wtFound.set(target, found);
    }
    return this._wtFound.get(target);
  }

  /** GET /v1/transports of `target`'s node, within webTransportTimeoutMs: its WebTransport
   * endpoint, null if it serves none (or is a node without the route), undefined if it did
   * not answer. */
  async _askTransports(target) {
    const { fetch, webTransportTimeoutMs } = this.options;
    if (typeof fetch !== "function") return null;
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), webTransportTimeoutMs);
    try {
      const answer = await fetch(transportsUrl(target), {
        signal: abort.signal, credentials: "omit", cache: "no-store", redirect: "error",
      });
      if (answer.status === 404) return null;
      if (!answer.ok) return undefined;
      const text = await answer.text();
      if (text.length > TRANSPORTS_BYTES_MAX) return null;
      return webTransportOf(target, JSON.parse(text));
    } catch {
      return undefined; // unreachable, too slow, or not JSON
    } finally {
      clearTimeout(timer);
    }
  }

  /** The node and URL connected to (null while reconnecting). */
  get nodeId() {
    return this.link?.open ? this.link.nodeId : null;
  }

  get target() {
    return this.link?.open ? this.link.target : null;
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    for (const sub of [...this.subs]) sub.close();
    this.link?.close(1000, "client closed");
    for (const wake of this._sleepers) wake();
    this._status({ state: "closed" });
  }

  createSession({ userId, agentId, metadata = {}, sessionId = null }) {
    // not retried: a retry after a lost answer could find the session made (conflict)
    const body = { type: "create_session", user_id: userId, agent_id: agentId };
    return this._call({ ...body, metadata, session_id: sessionId }, false).then((a) => a.session);
  }

  getSession(sessionId) {
    return this._call({ type: "get_session", session_id: sessionId }, true).then((a) => a.session);
  }

  listSessions(userId, { cursor = null, limit = 50 } = {}) {
    const body = { type: "list_sessions", user_id: userId, cursor, limit };
    return this._call(body, true).then(strip);
  }

  /** Append; retried with the same client_msg_id (given, or made here) until acknowledged
   * (a resend the node applied already answers its seq, deduped, before any ifVersion check).
   * A structured message gives `parts` (AI SDK UI-message parts) and no content. */
  async append(sessionId, options) {
    const { sender, senderId, kind = "text", metadata = {} } = options;
    const parts = options.parts ?? null;
    const content = options.content ?? (parts === null ? undefined : "");
    const clientMsgId = options.clientMsgId ?? newClientMsgId();
    const body = {
      type: "append",
      session_id: sessionId,
      sender,
      sender_id: senderId,
      kind,
      content,
      metadata,
      client_msg_id: clientMsgId,
      expected_seq: options.expectedSeq ?? null,
      token_count: options.tokenCount ?? null,
      role: options.role ?? null,
      parts,
      if_version: options.ifVersion ?? null,
    };
    const answer = await this._call(body, true);
    return { ...strip(answer), client_msg_id: clientMsgId };
  }

  read(sessionId, { afterSeq = 0, limit = 100 } = {}) {
    const body = { type: "read", session_id: sessionId, after_seq: afterSeq, limit };
    return this._call(body, true).then(strip);
  }

  markRead(sessionId, userId, seq) {
    const body = { type: "mark_read", session_id: sessionId, user_id: userId, seq };
    return this._call(body, true).then(strip);
  }

  /** Configure the session's context window: tokenBudget, triggerRatio (default 0.7), policy
   * ({type: "last_n", limit}, {type: "skip_parts", types, limit}, {type: "token_budget"},
   * {type: "manual"}), tokenizer (null: the node's).  Retried: the same configuration again
   * changes nothing but the version. */
  setContextConfig(sessionId, { tokenBudget, triggerRatio = 0.7, policy, tokenizer = null }) {
    const body = {
      type: "set_context_config",
      session_id: sessionId,
      token_budget: tokenBudget,
      trigger_ratio: triggerRatio,
      policy,
      tokenizer,
    };
    return this._call(body, true).then(strip);
  }

  /** The session's context window: {session_id, messages, segments, token_count, version,
   * needs_compaction, window_first_seq, last_seq, config}. */
  getContext(sessionId) {
    return this._call({ type: "get_context", session_id: sessionId }, true).then(strip);
  }

  /** Replace the window's messages fromSeq..toSeq (whole segments) with `replacement`
   * ([{role, content, parts?, kind?, metadata?, tokenCount?}]); ifVersion: only while the
   * window is at that version (else CtxstoreError "conflict", details.version the current
   * one).  Not retried: a compaction applied whose answer was lost would then conflict or
   * apply twice. */
  compact(sessionId, { fromSeq, toSeq, replacement, ifVersion = null }) {
    const body = {
      type: "compact",
      session_id: sessionId,
      from_seq: fromSeq,
      to_seq: toSeq,
      replacement: replacement.map(newMessage),
      if_version: ifVersion,
    };
    return this._call(body, false).then(strip);
  }

  /** Follow a session from afterSeq: resolves once subscribed; onEvent gets
   * {type: "message", message, replaces}, {type: "gap", fromSeq, toSeq, reason, replaces}, with
   * contextEvents {type: "context", reason, version, tokenCount, needsCompaction,
   * windowFirstSeq}, with streamChunks {type: "chunk", triggerSeq, attempt, chunk, draft,
   * replaces} (draft: the ReplyDraft the chunk went into, also `subscription.draft`;
   * replaces: the draft of an earlier attempt it supersedes, or null) and, at the end,
   * {type: "closed", reason, message}.  A message that answers the draft's trigger (the
   * agent's reply, or the note of a dropped dispatch) comes with `replaces` the draft; so
   * does a gap past the draft's trigger (the reply may be in it). */
  subscribe(sessionId, options = {}, onEvent) {
    const { afterSeq = 0, contextEvents = false, streamChunks = false } = options;
    const sub = new Subscription(
      this, "session", sessionId, afterSeq, onEvent, contextEvents, streamChunks,
    );
    return this._subscribe(sub);
  }

  /** Register an agent (docs/agents.md): {id, url} and any of headers, timeoutMs,
   * idleTimeoutMs, debounceMs, history ("all", "tail N", "window"), maxAttempts, status,
   * protocol; the agent as stored.  Not retried (a lost answer would then be a conflict). */
  createAgent(fields) {
    return this._call({ type: "create_agent", agent: agentOf(fields) }, false).then((a) => a.agent);
  }

  /** Replace an agent's fields (those left out take the defaults); retried. */
  updateAgent(fields) {
    return this._call({ type: "update_agent", agent: agentOf(fields) }, true).then((a) => a.agent);
  }

  getAgent(agentId) {
    return this._call({ type: "get_agent", agent_id: agentId }, true).then((a) => a.agent);
  }

  listAgents({ cursor = null, limit = 100 } = {}) {
    return this._call({ type: "list_agents", cursor, limit }, true).then(strip);
  }

  disableAgent(agentId) {
    return this._call({ type: "disable_agent", agent_id: agentId }, true).then((a) => a.agent);
  }

  /** Follow a user's inbox: {type: "snapshot", entries, truncated} on each (re)subscription,
   * then {type: "delta", entries}; `subscription.entries` holds the current state. */
  subscribeInbox(userId, onEvent) {
    return this._subscribe(new Subscription(this, "inbox", userId, 0, onEvent));
  }

  _subscribe(sub) {
    if (typeof sub.onEvent !== "function") throw new TypeError("onEvent: a function");
    if (this.closed) return Promise.reject(closedError());
    this.subs.add(sub);
    return new Promise((resolve, reject) => sub._run({ resolve, reject }));
  }

  /** One request, retried (if `retry`) on retryable errors and lost connections. */
  async _call(body, retry) {
    const { requestTimeoutMs, retryAttempts } = this.options;
    for (let attempt = 1; ; attempt++) {
      let link = null;
      try {
        link = await this._link(requestTimeoutMs);
        return await link.request(body, requestTimeoutMs);
      } catch (e) {
        const retryable = e instanceof CtxstoreError && e.retryable;
        if (!retry || !retryable || attempt >= retryAttempts || this.closed) throw e;
        if (attempt >= ROTATE_AFTER_ATTEMPTS && link !== null) this._rotate(link);
        await this._sleep(this._backoff(attempt));
      }
    }
  }

  /** The open link, connecting (in turn to each target, backing off) if there is none. */
  _link(timeoutMs) {
    if (this.closed) return Promise.reject(this.fatal ?? closedError());
    if (this.link?.open) return Promise.resolve(this.link);
    if (this._connecting === null) {
      this._connecting = this._connectLoop();
      this._connecting.catch(() => {});
    }
    if (timeoutMs === Infinity) return this._connecting;
    let timer;
    const late = new Promise((_, reject) => {
      timer = setTimeout(
        () => reject(new CtxstoreError("unavailable", `no node answered in ${timeoutMs} ms`)),
        timeoutMs,
      );
    });
    return Promise.race([this._connecting, late]).finally(() => clearTimeout(timer));
  }

  async _connectLoop() {
    try {
      for (let attempt = 1; !this.closed; attempt++) {
        const target = this.targets[this._next];
        this._next = (this._next + 1) % this.targets.length;
        this._status({ state: "connecting", target });
        const link = await this._newLink(target);
        if (this.closed) {
          link.close(1000, "client closed");
          break;
        }
        const { connectTimeoutMs, webTransportTimeoutMs } = this.options;
        const wt = link instanceof WtLink; // (its session must come quickly: WebSocket then)
        try {
          const welcome = await link.request(
            {
              type: "hello",
              protocol_version: PROTOCOL_VERSION,
              client_name: this.options.clientName,
              token: await this._token(),
            },
            wt ? Math.min(connectTimeoutMs, webTransportTimeoutMs) : connectTimeoutMs,
          );
          if (this.closed) break;
          link.nodeId = welcome.node_id;
          link.open = true;
          this.link = link;
          link.done.then((error) => this._lost(link, error));
          const transport = wt ? "webtransport" : "websocket";
          this._status({ state: "connected", target, nodeId: welcome.node_id, transport });
          this._refreshLater(link, welcome);
          return link;
        } catch (e) {
          link.close(1000, "handshake failed");
          if (e instanceof CtxstoreError && !e.retryable) {
            this.fatal = e;
            this._status({ state: "failed", target, error: e });
            this.close();
            throw e;
          }
          this._status({ state: "disconnected", target, error: e });
          if (wt) {
            // no WebTransport there after all (UDP blocked, a certificate refused, no session
            // within webTransportTimeoutMs): the same target over WebSocket, at once
            this._wtFailed.add(target);
            this._next = (this._next + this.targets.length - 1) % this.targets.length;
            continue;
          }
          // every target once at once, then backing off between attempts
          if (attempt >= this.targets.length) await this._sleep(this._backoff(attempt));
        }
      }
      throw this.fatal ?? closedError();
    } finally {
      this._connecting = null;
    }
  }

  /** The token for a hello: options.token, or what the function there gives. */
  async _token() {
    const { token } = this.options;
    return typeof token === "function" ? ((await token()) ?? null) : token;
  }

  /** With a token function, send `link` a new token in a second hello before the one
   * `welcome` answered expires: the node then keeps the connection open past it. */
  _refreshLater(link, welcome) {
    const left = welcome.expires_in_ms;
    if (typeof left !== "number" || typeof this.options.token !== "function") return;
    if (link.closed || this.closed) return;
    const expires = Date.now() + left;
    const delay = left - Math.min(REFRESH_AHEAD_MS, left / 4);
    link.refreshTimer = setTimeout(() => this._refresh(link, expires), delay);
  }

  async _refresh(link, expires) {
    let welcome;
    try {
      const hello = {
        type: "hello",
        protocol_version: PROTOCOL_VERSION,
        client_name: this.options.clientName,
        token: await this._token(),
      };
      welcome = await link.request(hello, this.options.requestTimeoutMs);
    } catch (error) {
      if (link.closed || this.closed) return; // the next link gets a fresh token
      this._status({ state: "refresh_failed", target: link.target, error });
      const left = expires - Date.now();
      if (left > 1000) link.refreshTimer = setTimeout(() => this._refresh(link, expires), left / 2);
      return;
    }
    this._status({ state: "refreshed", target: link.target, expiresInMs: welcome.expires_in_ms });
    const next = welcome.expires_in_ms;
    if (typeof next !== "number" || Date.now() + next > expires + REFRESH_EXTENDS_MS) {
      this._refreshLater(link, welcome);
    } else {
      const error = new CtxstoreError("unauthorized", "the token function gave no later token");
      this._status({ state: "refresh_failed", target: link.target, error });
    }
  }

  _lost(link, error) {
    if (this.link !== link) return;
    this.link = null;
    if (!this.closed) this._status({ state: "disconnected", target: link.target, error });
  }

  /** Give up a node that keeps failing (or is going away): the next link goes to another. */
  _rotate(link) {
    if (this.link === link) link.close(1000, "moving to another node");
  }

  _backoff(attempt) {
    const { backoffBaseMs, backoffMaxMs } = this.options;
    const ceiling = Math.min(backoffMaxMs, backoffBaseMs * 2 ** Math.min(attempt - 1, 30));
    return ceiling * (0.5 + Math.random() / 2);
  }

  _sleep(ms) {
    if (this.closed) return Promise.resolve();
    return new Promise((resolve) => {
      const wake = () => {
        clearTimeout(timer);
        this._sleepers.delete(wake);
        resolve();
      };
      const timer = setTimeout(wake, ms);
      this._sleepers.add(wake);
    });
  }

  _status(status) {
    try {
      this.options.onStatus?.(status);
    } catch (e) {
      console.error("ctxstore: onStatus threw", e);
    }
  }
}

/** A client connected to one of `targets` (tried in the order given). */
export async function connect(options) {
  const client = new Client(options);
  try {
    await client._link(client.options.requestTimeoutMs);
  } catch (e) {
    client.close();
    throw e;
  }
  return client;
}
