// The demo page: a small chat UI on ctxstore.js (docs/web.md "Demo page").
// ?nodes=ws://a/v1/ws,ws://b/v1/ws picks the nodes (default: the node serving the page);
// ?user=alice signs in at once. WebTransport where the browser has it and the node serves it
// (asked at /v1/transports), else WebSocket; ?wt=0: WebSocket only; ?wt=1 (a CA's certificate)
// or ?wt=<certificate SHA-256>: WebTransport tried at each node's own port without asking.
// The session's agent streams its reply live (a draft, from its chunks), replaced by the stored
// assistant message when it lands.
import { connect } from "/static/ctxstore.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const state = {
  client: null, me: null, inbox: null, session: null, sub: null, refresh: null, draft: null,
  drawing: false,
};
const WINDOW_REFRESH_MS = 150; // a burst of messages or context events: one get_context

$("nodes").value = params.get("nodes") ?? `ws://${location.host}/v1/ws`;
if (params.get("user")) $("user").value = params.get("user");

function showError(e) {
  $("error").textContent = e ? `${e.code ?? "error"}: ${e.message}` : "";
  $("error").hidden = !e;
}

function setStatus(s) {
  const el = $("status");
  el.dataset.state = s.state;
  el.dataset.node = s.state === "connected" ? String(s.nodeId) : "";
  el.dataset.transport = s.state === "connected" ? s.transport : "";
  el.textContent = {
    connecting: `connecting to ${s.target}…`,
    connected: `connected to node ${s.nodeId} (${s.target})` +
      (s.transport === "webtransport" ? " over WebTransport" : ""),
    disconnected: `lost ${s.target}, reconnecting…`,
    failed: `refused by ${s.target}: ${s.error?.message}`,
    closed: "not connected",
  }[s.state];
}

/** ?wt= (docs/web.md §8.5): absent (or anything else) "auto", 0 off, 1 on (a CA's certificate),
 * 64 hex digits: on with that certificate hash. */
function webTransportOption(wt) {
  if (wt === "0") return false;
  if (wt === "1") return true;
  if (/^[0-9a-f]{64}$/i.test(wt ?? "")) return { serverCertificateHashes: [wt] };
  return "auto";
}

async function signIn(event) {
  event.preventDefault();
  showError(null);
  state.client?.close();
  state.me = $("user").value.trim();
  const targets = $("nodes").value.split(",").map((t) => t.trim()).filter(Boolean);
  try {
    state.client = await connect({
      targets, clientName: "ctxstore-demo", onStatus: setStatus,
      webTransport: webTransportOption(params.get("wt")),
    });
    state.inbox = await state.client.subscribeInbox(state.me, renderInbox);
  } catch (e) {
    showError(e);
    return;
  }
  $("me-name").textContent = state.me;
  $("me").hidden = false;
  renderInbox();
  if (params.get("session")) await openSession(params.get("session"));
}

function renderInbox() {
  if (state.inbox === null) return;
  const entries = [...state.inbox.entries.values()];
  entries.sort((a, b) => b.last_activity - a.last_activity);
  $("inbox").replaceChildren(
    ...entries.map((e) => {
      const li = document.createElement("li");
      li.dataset.session = e.session_id;
      li.classList.toggle("current", e.session_id === state.session?.id);
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = `${e.agent_id} · ${e.session_id.slice(0, 8)}`;
      const unread = document.createElement("span");
      unread.className = "unread";
      unread.dataset.count = String(e.unread);
      unread.textContent = String(e.unread);
      const preview = document.createElement("span");
      preview.className = "preview";
      preview.textContent = e.preview || "(no messages yet)";
      li.append(name, unread, preview);
      li.onclick = () => openSession(e.session_id).catch(showError);
      return li;
    }),
  );
}

async function openSession(sessionId) {
  showError(null);
  const session = await state.client.getSession(sessionId);
  state.sub?.close();
  state.session = session;
  $("session-id").textContent = session.id;
  $("session-who").textContent = `user ${session.user_id} · agent ${session.agent_id}`;
  $("mark-read").disabled = session.user_id !== state.me;
  $("messages").replaceChildren();
  renderWindow(null);
  $("session").hidden = false;
  renderInbox();
  const afterSeq = Math.max(0, session.last_seq - 500); // the latest 500 at most
  const options = { afterSeq, contextEvents: true, streamChunks: true };
  state.draft = null;
  state.sub = await state.client.subscribe(session.id, options, (event) => {
    if (state.session?.id !== session.id) return;
    if (event.type === "chunk") {
      state.draft = event.draft;
      drawDraftSoon();
      return;
    }
    if (event.replaces) {
      state.draft = null; // the stored reply (or the note of a dropped dispatch) replaces it
      $("messages").querySelector("li.draft")?.remove();
    }
    if (event.type !== "context") renderEvent(event);
    if (event.type === "context" || event.type === "message") refreshWindow(session.id);
  });
  refreshWindow(session.id);
}

/** Read the session's context window again soon (once for a burst of events). */
function refreshWindow(sessionId) {
  if (state.refresh !== null) return;
  state.refresh = setTimeout(async () => {
    state.refresh = null;
    try {
      const w = await state.client.getContext(sessionId);
      if (state.session?.id === sessionId) renderWindow(w);
    } catch {
      // shown again at the next event (the client retries what a node failover loses)
    }
  }, WINDOW_REFRESH_MS);
}

/** The open session's context window: its tokens (of its budget) and whether it needs a
 * compaction (docs/web.md, "Context windows"). */
function renderWindow(w) {
  const el = $("window");
  el.dataset.tokens = w === null ? "" : String(w.token_count);
  el.dataset.needsCompaction = String(w?.needs_compaction ?? false);
  if (w === null || w.config === null) {
    // a session has no window until it is configured (set_context_config)
    el.textContent = w === null ? "" : "no context window";
    return;
  }
  const budget = ` / ${w.config.token_budget}`;
  const count = `${w.messages.length} message${w.messages.length === 1 ? "" : "s"}`;
  el.textContent = `window: ${w.token_count}${budget} tokens, ${count}, v${w.version}` +
    (w.needs_compaction ? " · needs compaction" : "");
}

/** A message's text: its content, or the text of its text parts (a structured message). */
function messageText(m) {
  if (m.content || m.parts === null) return m.content;
  return m.parts.filter((p) => p.type === "text").map((p) => p.text).join("\n");
}

function span(className, text) {
  const el = document.createElement("span");
  el.className = className;
  el.textContent = text;
  return el;
}

/** The parts a chat shows besides the text: reasoning and tool calls (AI SDK UI parts). */
function renderParts(parts) {
  const out = [];
  for (const p of parts ?? []) {
    if (p.type === "reasoning") {
      out.push(span("reasoning", p.text));
    } else if (p.type === "dynamic-tool" || p.type.startsWith("tool-")) {
      const el = document.createElement("span");
      el.className = "tool";
      el.dataset.state = p.state ?? "";
      const name = p.type === "dynamic-tool" ? p.toolName : p.type.slice(5);
      const io = [p.input ?? p.rawInput, p.output ?? p.errorText]
        .filter((v) => v !== undefined)
        .map((v) => (typeof v === "string" ? v : JSON.stringify(v)));
      el.append(span("tool-name", name), " ", span("tool-state", p.state ?? ""));
      if (io.length) el.append(" ", span("tool-io", io.join(" → ")));
      out.push(el);
    }
  }
  return out;
}

/** Redraw the draft reply at most once a frame (chunks come faster than frames). */
function drawDraftSoon() {
  if (state.drawing) return;
  state.drawing = true;
  requestAnimationFrame(() => {
    state.drawing = false;
    drawDraft();
  });
}

/** The agent's reply being streamed: the last item of the list until the stored one lands. */
function drawDraft() {
  const list = $("messages");
  let li = list.querySelector("li.draft");
  const d = state.draft;
  if (d === null) {
    li?.remove();
    return;
  }
  if (li === null) {
    li = document.createElement("li");
    li.className = "draft";
    list.append(li);
  }
  li.dataset.triggerSeq = String(d.triggerSeq);
  li.dataset.attempt = String(d.attempt);
  li.dataset.state = d.terminated ?? "streaming";
  li.dataset.chunks = String(d.chunks);
  const agentId = state.session?.agent_id ?? "agent";
  const how = d.terminated === "error" ? `failed: ${d.errorText}` : "typing…";
  const from = span("from", `${agentId} ${how}` + (d.attempt > 1 ? ` (attempt ${d.attempt})` : ""));
  li.replaceChildren(from, ...renderParts(d.parts), span("content", d.text));
  list.scrollTop = list.scrollHeight;
}

function renderEvent(event) {
  const li = document.createElement("li");
  if (event.type === "message") {
    const m = event.message;
    li.dataset.seq = String(m.seq);
    li.classList.toggle("mine", m.sender_id === state.me);
    const from = document.createElement("span");
    from.className = "from";
    from.textContent = `#${m.seq} ${m.sender} ${m.sender_id}`;
    if (m.token_count !== null) {
      const tokens = document.createElement("span");
      tokens.className = "tokens";
      tokens.textContent = `${m.token_count} token${m.token_count === 1 ? "" : "s"}`;
      from.append(" · ", tokens);
    }
    li.append(from, ...renderParts(m.parts), span("content", messageText(m)));
  } else if (event.type === "gap") {
    li.className = "gap";
    li.textContent = `messages ${event.fromSeq}-${event.toSeq} are gone (${event.reason})`;
  } else {
    li.className = "gap";
    li.textContent = `subscription ended: ${event.message}`;
  }
  const list = $("messages");
  list.insertBefore(li, list.querySelector("li.draft")); // a draft stays last
  list.scrollTop = list.scrollHeight;
}

async function send(event) {
  event.preventDefault();
  const input = $("text");
  const content = input.value;
  const session = state.session;
  if (!content || session === null) return;
  input.value = "";
  const sender = session.user_id === state.me ? "user" : "agent";
  try {
    await state.client.append(session.id, { sender, senderId: state.me, content });
  } catch (e) {
    showError(e);
    input.value ||= content;
  }
}

async function create(event) {
  event.preventDefault();
  try {
    const s = await state.client.createSession({ userId: state.me, agentId: $("agent").value });
    await openSession(s.id);
  } catch (e) {
    showError(e);
  }
}

/** Register the agent of new sessions (docs/agents.md): its webhook is called for each user
 * message of a session that names it. */
async function registerAgent(event) {
  event.preventDefault();
  showError(null);
  const id = $("agent-id").value.trim();
  const url = $("agent-url").value.trim();
  try {
    let agent;
    try {
      agent = await state.client.createAgent({ id, url, debounceMs: 200 });
    } catch (e) {
      if (e.code !== "conflict") throw e;
      agent = await state.client.updateAgent({ id, url, debounceMs: 200 });
    }
    $("agent-status").textContent = `agent ${agent.id} → ${agent.url} (${agent.status})`;
    $("agent").value = agent.id;
  } catch (e) {
    showError(e);
  }
}

async function markRead() {
  try {
    await state.client.markRead(state.session.id, state.me, state.sub.lastSeq);
  } catch (e) {
    showError(e);
  }
}

$("signin").onsubmit = signIn;
$("create").onsubmit = create;
$("agent-form").onsubmit = registerAgent;
$("open").onsubmit = (e) => {
  e.preventDefault();
  openSession($("open-id").value.trim()).catch(showError);
};
$("composer").onsubmit = send;
$("mark-read").onclick = markRead;
if (params.get("user")) $("signin").requestSubmit();
