// ctxstore.js against a real node (node.js) and, for what a node does not do on demand, a
// scripted one (fake.js).  Run: node --test clients/js/test/ (Node 20: --experimental-websocket).
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { after, before, describe, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";

import {
  CtxstoreError, connect, transportsUrl, webSocketUrl, webTransportOf, webTransportUrl,
} from "../ctxstore.js";
import { fakeServer, fakeWebTransport, until } from "./fake.js";
import { Node } from "./node.js";

const FAST = { backoffBaseMs: 20, backoffMaxMs: 200 };
const msg = (seq, content = `m${seq}`) => ({
  session_id: "s1", seq, sender: "user", sender_id: "u1", kind: "text", content, metadata: {},
  client_msg_id: null, inserted_at: 1, token_count: null,
});

/** An HS256 JWT (docs/auth.md) for the tests' node. */
function hs256(claims, secret) {
  const b64 = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const signed = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${signed}.${createHmac("sha256", secret).update(signed).digest("base64url")}`;
}

describe("against a real node with signed tokens", () => {
  const SECRET = "a-js-test-token-secret-of-32-bytes!";
  const node = new Node({
    env: {
      CTXSTORE_AUTH: "jwt", CTXSTORE_SECRET: "a-js-test-cluster-secret",
      CTXSTORE_AUTH_JWT_SECRET: SECRET, CTXSTORE_AUTH_JWT_LEEWAY_S: "0",
    },
  });
  before(() => node.start());
  after(() => node.remove());
  const alice = (ttlS) =>
    hs256({ sub: "alice", role: "user", exp: Math.floor(Date.now() / 1000) + ttlS }, SECRET);

  test("a token function refreshes the token on the open connection: a subscription outlives its first tokens", async () => {
    const statuses = [];
    let minted = 0;
    const token = async () => {
      minted++;
      return alice(3);
    };
    const client = await connect({ targets: [node.url], token, onStatus: (s) => statuses.push(s), ...FAST });
    try {
      await client.createSession({ userId: "alice", agentId: "bot", sessionId: "r1" });
      const events = [];
      await client.subscribe("r1", {}, (e) => events.push(e));
      for (let i = 1; i <= 3; i++) {
        await client.append("r1", { sender: "user", senderId: "alice", content: `m${i}` });
        await until(() => events.length === i);
        await sleep(2000); // 6 s in all: past the first tokens' expiries
      }
      assert.deepEqual(events.map((e) => e.message.content), ["m1", "m2", "m3"]);
      const states = statuses.map((s) => s.state);
      assert.equal(states.filter((s) => s === "connected").length, 1); // never reconnected
      assert.ok(states.filter((s) => s === "refreshed").length >= 2, states.join());
      assert.ok(minted >= 3);
      await assert.rejects(client.getSession("nowhere"), { code: "forbidden" });
    } finally {
      client.close();
    }
  });

  test("a plain token: the node closes the connection when it expires", async () => {
    const statuses = [];
    const client = await connect({
      targets: [node.url], token: alice(2), onStatus: (s) => statuses.push(s), ...FAST,
    });
    try {
      await client.createSession({ userId: "alice", agentId: "bot", sessionId: "r2" });
      await until(() => statuses.some((s) => s.state === "disconnected"), 5000);
      const lost = statuses.find((s) => s.state === "disconnected");
      assert.match(lost.error.message, /unauthorized: the token expired/);
    } finally {
      client.close();
    }
  });
});

describe("against a real node", () => {
  const node = new Node();
  before(() => node.start());
  after(() => node.remove());

  test("sessions, appends, reads and errors", async () => {
    const client = await connect({ targets: [node.url] });
    try {
      assert.equal(client.nodeId, 1);
      const s = await client.createSession({ userId: "u1", agentId: "a1", metadata: { t: 1 } });
      assert.deepEqual(await client.getSession(s.id), s);
      const a = await client.append(s.id, { sender: "user", senderId: "u1", content: "hi" });
      assert.equal(a.seq, 1);
      const again = await client.append(s.id, {
        sender: "user", senderId: "u1", content: "hi", clientMsgId: a.client_msg_id,
      });
      assert.deepEqual([again.seq, again.deduped], [1, true]);
      const page = await client.read(s.id, { afterSeq: 0 });
      assert.deepEqual(page.messages.map((m) => m.content), ["hi"]);
      const listed = await client.listSessions("u1");
      assert.ok(listed.sessions.some((x) => x.id === s.id));
      await assert.rejects(client.getSession("nope"), (e) => {
        assert.ok(e instanceof CtxstoreError);
        assert.deepEqual([e.code, e.retryable], ["not_found", false]);
        return true;
      });
      await assert.rejects(client.subscribe("nope", {}, () => {}), { code: "not_found" });
    } finally {
      client.close();
    }
  });

  test("structured messages and the context window: config, events, compaction", async () => {
    const client = await connect({ targets: [node.url] });
    try {
      const s = await client.createSession({ userId: "ctx-u", agentId: "a1" });
      const events = [];
      await client.subscribe(s.id, { contextEvents: true }, (e) => events.push(e));
      const parts = [
        { type: "reasoning", text: "Call the weather tool." },
        { type: "tool-weather", toolCallId: "c1", state: "output-available",
          input: { city: "Paris" }, output: { celsius: 21 } },
        { type: "text", text: "It is 21 degrees." },
      ];
      for (let i = 1; i <= 4; i++) {
        await client.append(s.id, { sender: "user", senderId: "ctx-u", content: `question ${i}` });
      }
      const a = await client.append(s.id, { sender: "agent", senderId: "a1", parts });
      assert.equal(a.seq, 5);
      const [stored] = (await client.read(s.id, { afterSeq: 4 })).messages;
      assert.deepEqual([stored.role, stored.parts, stored.content], ["assistant", parts, ""]);
      assert.equal(stored.token_count, null); // counted only for sessions with a window
      await assert.rejects(
        client.append(s.id, { sender: "user", senderId: "ctx-u", parts: [{ type: "text" }] }),
        (e) => e.code === "bad_request" && e.details.field === "parts[0].text",
      );
      const configured = await client.setContextConfig(s.id, {
        tokenBudget: 1000, policy: { type: "last_n", limit: 4 },
      });
      let w = await client.getContext(s.id);
      assert.deepEqual(w.messages.map((m) => m.seq), [2, 3, 4, 5]);
      assert.deepEqual(w.config, {
        token_budget: 1000, trigger_ratio: 0.7, policy: { type: "last_n", limit: 4 },
        tokenizer: "o200k_base",
      });
      assert.equal(w.version, configured.version);
      assert.equal(w.token_count, w.messages.reduce((n, m) => n + m.token_count, 0));
      await until(() => events.some((e) => e.type === "context" && e.reason === "configured"));
      // a stale ifVersion: conflict with the current version; a current one: compacted
      const summary = [{ role: "system", content: "The user asked three questions." }];
      await assert.rejects(
        client.compact(s.id, { fromSeq: 2, toSeq: 4, replacement: summary, ifVersion: 0 }),
        (e) => e.code === "conflict" && e.details.version === w.version,
      );
      await assert.rejects(
        client.append(s.id, { sender: "user", senderId: "ctx-u", content: "x", ifVersion: 0 }),
        { code: "conflict" },
      );
      const compacted = await client.compact(s.id, {
        fromSeq: 2, toSeq: 4, replacement: summary, ifVersion: w.version,
      });
      assert.ok(compacted.version > w.version);
      w = await client.getContext(s.id);
      assert.deepEqual(w.messages.map((m) => [m.seq, m.role]), [[0, "system"], [5, "assistant"]]);
      assert.equal(w.messages[0].content, "The user asked three questions.");
      assert.deepEqual(w.segments.map((g) => [g.from_seq, g.to_seq, g.compacted]),
        [[2, 4, true], [5, 5, false]]);
      await until(() => events.some((e) => e.type === "context" && e.reason === "compacted"));
      const event = events.find((e) => e.reason === "compacted");
      assert.deepEqual(event, {
        type: "context", reason: "compacted", version: compacted.version,
        tokenCount: compacted.token_count, needsCompaction: false, windowFirstSeq: 2,
      });
      assert.deepEqual(events.filter((e) => e.type === "message").map((e) => e.message.seq),
        [1, 2, 3, 4, 5]);
      // the history is never rewritten
      assert.equal((await client.read(s.id)).messages.length, 5);
    } finally {
      client.close();
    }
  });

  test("the inbox counts unread messages and mark-read clears them", async () => {
    const client = await connect({ targets: [node.url] });
    try {
      const s = await client.createSession({ userId: "inbox-u", agentId: "a1" });
      const events = [];
      const inbox = await client.subscribeInbox("inbox-u", (e) => events.push(e));
      assert.equal(events[0].type, "snapshot");
      for (const content of ["one", "two"]) {
        await client.append(s.id, { sender: "agent", senderId: "a1", content });
      }
      await until(() => inbox.entries.get(s.id)?.unread === 2);
      await client.markRead(s.id, "inbox-u", 2);
      await until(() => inbox.entries.get(s.id)?.unread === 0);
      assert.equal(inbox.entries.get(s.id).preview, "two");
    } finally {
      client.close();
    }
  });

  test("a subscription resumes across a node restart: every message once, in order", async () => {
    const dead = "ws://127.0.0.1:1/v1/ws"; // nothing listens there: tried, then skipped
    const statuses = [];
    const client = await connect({
      targets: [node.url, dead], ...FAST, onStatus: (s) => statuses.push(s.state),
    });
    try {
      const s = await client.createSession({ userId: "u2", agentId: "a1" });
      const seqs = [];
      const sub = await client.subscribe(s.id, { afterSeq: 0 }, (e) => {
        assert.equal(e.type, "message");
        seqs.push(e.message.seq);
      });
      const send = (i) => client.append(s.id, { sender: "user", senderId: "u2", content: `m${i}` });
      for (let i = 1; i <= 5; i++) await send(i);
      await until(() => seqs.length === 5);
      await node.kill("SIGKILL");
      const inFlight = send(6); // retried until the node is back
      await node.start();
      assert.equal((await inFlight).seq, 6);
      for (let i = 7; i <= 10; i++) await send(i);
      await until(() => seqs.length >= 10);
      assert.deepEqual(seqs, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
      assert.ok(sub.resubscribes >= 1, "it subscribed again");
      assert.ok(statuses.includes("disconnected"));
      assert.equal(sub.lastSeq, 10);
    } finally {
      client.close();
    }
  });
});

describe("WebTransport by default: the node says whether and where (GET /v1/transports)", () => {
  const plain = new Node(); // no HTTP/3 listener
  const h3 = new Node({ h3: true }); // one, on a UDP port of its own, self-signed
  before(() => Promise.all([plain.start(), h3.start()]));
  after(() => Promise.all([plain.remove(), h3.remove()]));

  /** The transport of the last connection made. */
  const over = (statuses) => statuses.findLast((s) => s.state === "connected")?.transport;

  /** connect() to `node` with a scripted WebTransport class (Node has none); the statuses,
   * the session objects made, the fetches and how long connecting took. */
  async function connectTo(node, wtOptions = {}, options = {}) {
    const wt = fakeWebTransport(() => {}, wtOptions);
    const fetched = [];
    const statuses = [];
    const started = performance.now();
    const client = await connect({
      targets: [node.url], WebTransport: wt.WebTransport, onStatus: (s) => statuses.push(s),
      fetch: (url, init) => fetched.push(url) && fetch(url, init), ...options,
    });
    return { client, wt, fetched, statuses, ms: performance.now() - started };
  }

  test("a node without HTTP/3: WebSocket after one quick question, no session tried", async () => {
    const { client, wt, fetched, statuses, ms } = await connectTo(plain);
    try {
      assert.deepEqual(fetched, [`http://${plain.http}/v1/transports`]);
      assert.equal(wt.sessions.length, 0);
      assert.equal(over(statuses), "websocket");
      assert.ok(ms < 1000, `connected in ${ms} ms`);
      const s = await client.createSession({ userId: "u1", agentId: "a1" });
      assert.equal((await client.append(s.id, { sender: "user", senderId: "u1", content: "x" })).seq, 1);
    } finally {
      client.close();
    }
  });

  test("a node with HTTP/3: WebTransport at its port with its certificate's hash", async () => {
    const { client, wt, fetched, statuses } = await connectTo(h3);
    try {
      assert.equal(fetched.length, 1);
      assert.equal(wt.sessions.length, 1);
      const [session] = wt.sessions;
      const port = h3.h3.split(":").at(-1);
      assert.equal(session.url, `https://127.0.0.1:${port}/v1/wt`);
      const [hash] = session.init.serverCertificateHashes;
      assert.equal(hash.algorithm, "sha-256");
      assert.equal(Buffer.from(hash.value).toString("hex"), h3.cert.cert_sha256);
      assert.equal(over(statuses), "webtransport");
    } finally {
      client.close();
    }
  });

  test("a session that never opens: WebSocket within webTransportTimeoutMs (2 s)", async () => {
    const { client, wt, statuses, ms } = await connectTo(h3, { hang: true });
    try {
      assert.equal(wt.sessions.length, 1);
      assert.equal(over(statuses), "websocket");
      assert.ok(ms >= 2000 && ms < 3500, `connected in ${ms} ms`);
      const s = await client.createSession({ userId: "u1", agentId: "a1" });
      assert.equal((await client.getSession(s.id)).id, s.id);
      // the connection lost: the next one goes straight to the WebSocket (WebTransport failed)
      client.link.close(1000, "test");
      await client.getSession(s.id);
      assert.equal(wt.sessions.length, 1);
      assert.equal(over(statuses), "websocket");
    } finally {
      client.close();
    }
  });

  test("a session refused: WebSocket at once; a short webTransportTimeoutMs is kept", async () => {
    const refused = await connectTo(h3, { refuse: true });
    refused.client.close();
    assert.equal(refused.wt.sessions.length, 1);
    assert.equal(over(refused.statuses), "websocket");
    assert.ok(refused.ms < 1000, `connected in ${refused.ms} ms`);
    const hung = await connectTo(h3, { hang: true }, { webTransportTimeoutMs: 300 });
    hung.client.close();
    assert.equal(over(hung.statuses), "websocket");
    assert.ok(hung.ms >= 300 && hung.ms < 1300, `connected in ${hung.ms} ms`);
  });

  test("webTransport: false never asks; an unreachable node is asked again", async () => {
    const off = await connectTo(h3, {}, { webTransport: false });
    off.client.close();
    assert.deepEqual([off.fetched.length, off.wt.sessions.length], [0, 0]);
    assert.equal(over(off.statuses), "websocket");
    // a question unanswered (here: refused) is not taken for "no WebTransport" for good
    let calls = 0;
    const flaky = await connectTo(h3, {}, {
      fetch: (url, init) => (++calls === 1 ? Promise.reject(new TypeError("down")) : fetch(url, init)),
    });
    try {
      assert.equal(over(flaky.statuses), "websocket");
      flaky.client.link.close(1000, "test");
      await flaky.client._link(5000); // (connecting again: asked again)
      assert.equal(calls, 2);
      assert.equal(over(flaky.statuses), "webtransport");
    } finally {
      flaky.client.close();
    }
  });

  test("an answer cannot point elsewhere: only a port, a path and hashes are taken", () => {
    const target = "ws://node.example:7600/v1/ws";
    assert.equal(transportsUrl(target), "http://node.example:7600/v1/transports");
    assert.equal(transportsUrl("wss://n:443/v1/ws?token=x"), "https://n/v1/transports");
    const good = { port: 7700, path: "/v1/wt", protocols: [], cert_sha256: ["ab".repeat(32)] };
    assert.deepEqual(webTransportOf(target, { webtransport: good }), {
      url: "https://node.example:7700/v1/wt", hashes: ["ab".repeat(32)],
    });
    assert.equal(webTransportOf(target, { webtransport: null }), null);
    for (const bad of [
      { port: 0 }, { port: 70000 }, { port: "7700" }, { path: "//evil.example/x" },
      { path: "https://evil.example/v1/wt" }, { path: "/v1/wt?x=1" }, { cert_sha256: ["ab"] },
      { cert_sha256: "ab".repeat(32) }, { cert_sha256: Array(9).fill("ab".repeat(32)) },
    ]) {
      assert.equal(webTransportOf(target, { webtransport: { ...good, ...bad } }), null, JSON.stringify(bad));
    }
  });
});

describe("against a scripted node", () => {
  test("duplicates are dropped, a gap is reported once, a hole makes it subscribe again", async () => {
    let subscribes = 0;
    const server = fakeServer((m, reply) => {
      if (m.type === "subscribe") {
        subscribes += 1;
        reply({ type: "subscribed", rid: m.rid, sub_id: subscribes, last_seq: 9 });
        const sub_id = subscribes;
        if (subscribes === 1) {
          assert.equal(m.after_seq, 0);
          reply({ type: "message_event", sub_id, messages: [msg(1), msg(2), msg(2)] });
          reply({ type: "gap_event", sub_id, from_seq: 2, to_seq: 4, reason: "retention" });
          reply({ type: "message_event", sub_id, messages: [msg(5), msg(7)] }); // 6 missing
        } else {
          assert.equal(m.after_seq, 5); // from the last seq delivered
          reply({ type: "message_event", sub_id, messages: [msg(6), msg(7)] });
        }
      } else if (m.type === "unsubscribe") {
        reply({ type: "unsubscribed", rid: m.rid, sub_id: m.sub_id });
      }
    });
    const client = await connect({ targets: ["ws://fake:1"], WebSocket: server.WebSocket, ...FAST });
    try {
      const events = [];
      await client.subscribe("s1", {}, (e) => events.push(e));
      await until(() => events.length === 6);
      assert.deepEqual(
        events.map((e) => (e.type === "gap" ? `gap ${e.fromSeq}-${e.toSeq}` : e.message.seq)),
        [1, 2, "gap 3-4", 5, 6, 7],
      );
      assert.equal(subscribes, 2);
      assert.equal(server.received[0].protocol_version, 4); // the hello
      assert.equal(server.received[1].context_events, false);
      assert.equal(server.received[1].stream_chunks, false);
    } finally {
      client.close();
    }
  });

  test("an append is retried with the same client_msg_id; a request times out", async () => {
    const appends = [];
    const server = fakeServer((m, reply) => {
      if (m.type === "append") {
        appends.push(m);
        if (appends.length === 1) {
          reply({ type: "error", rid: m.rid, code: "timeout", message: "t", retryable: true,
            details: {} });
        } else {
          reply({ type: "appended", rid: m.rid, seq: 3, inserted_at: 1, deduped: true });
        }
      } // a get_session is never answered
    });
    const client = await connect({
      targets: ["ws://fake:1"], WebSocket: server.WebSocket, requestTimeoutMs: 100, retryAttempts: 2,
      ...FAST,
    });
    try {
      const a = await client.append("s1", { sender: "user", senderId: "u1", content: "x" });
      assert.equal(a.seq, 3);
      assert.equal(appends.length, 2);
      assert.equal(appends[0].client_msg_id, appends[1].client_msg_id);
      assert.match(appends[0].client_msg_id, /^c-[0-9a-f]{32}$/);
      assert.notEqual(appends[0].rid, appends[1].rid);
      await assert.rejects(client.getSession("s1"), { code: "timeout" });
    } finally {
      client.close();
    }
  });

  test("a subscription closed while subscribing is unsubscribed once it is made", async () => {
    const server = fakeServer((m, reply) => {
      if (m.type === "subscribe") {
        setTimeout(() => reply({ type: "subscribed", rid: m.rid, sub_id: 7, last_seq: 0 }), 50);
      } else if (m.type === "unsubscribe") {
        reply({ type: "unsubscribed", rid: m.rid, sub_id: m.sub_id });
      }
    });
    const client = await connect({ targets: ["ws://fake:1"], WebSocket: server.WebSocket, ...FAST });
    try {
      const events = [];
      const made = client.subscribe("s1", {}, (e) => events.push(e)).catch((e) => e.code);
      await until(() => server.received.some((m) => m.type === "subscribe"));
      client.subs.values().next().value.close();
      await until(() => server.received.some((m) => m.type === "unsubscribe" && m.sub_id === 7));
      server.sockets[0].push({ type: "message_event", sub_id: 7, messages: [msg(1)] });
      assert.equal(await made, "unavailable"); // closed before it was made
      assert.deepEqual(events, []);
    } finally {
      client.close();
    }
  });

  test("a token function: a refused refresh is tried again on the same connection", async () => {
    let hellos = 0;
    const server = fakeServer(() => {});
    const Expiring = class extends server.WebSocket {
      send(text) {
        const m = JSON.parse(text);
        if (m.type !== "hello") return super.send(text);
        server.received.push(m);
        hellos++;
        if (hellos === 2) {
          this.push({ type: "error", rid: m.rid, code: "unauthorized", message: "bad token",
            retryable: false, details: {} });
        } else {
          this.push({ type: "welcome", rid: m.rid, node_id: 1, expires_in_ms: 6000 });
        }
      }
    };
    const statuses = [];
    let n = 0;
    const client = await connect({
      targets: ["ws://fake:1"], WebSocket: Expiring, token: () => `t${++n}`,
      onStatus: (s) => statuses.push(s.state), ...FAST,
    });
    try {
      // 6 s tokens: refreshed 4.5 s in (refused), again with half of the 1.5 s left (taken)
      await until(() => statuses.includes("refreshed"), 8000);
      const refreshes = statuses.filter((s) => s.startsWith("refresh"));
      assert.deepEqual(refreshes, ["refresh_failed", "refreshed"]);
      assert.deepEqual(server.received.map((m) => m.token), ["t1", "t2", "t3"]);
      assert.equal(server.sockets.length, 1);
    } finally {
      client.close();
    }
  });

  test("an unauthorized hello fails connect; targets are normalised", async () => {
    const server = fakeServer(() => {});
    const Refusing = class extends server.WebSocket {
      send(text) {
        const m = JSON.parse(text);
        this.push({ type: "error", rid: m.rid, code: "unauthorized", message: "bad token",
          retryable: false, details: {} });
      }
    };
    await assert.rejects(
      connect({ targets: ["ws://fake:1"], WebSocket: Refusing, token: "x" }),
      { code: "unauthorized" },
    );
    assert.equal(webSocketUrl("http://127.0.0.1:7600"), "ws://127.0.0.1:7600/v1/ws");
    assert.throws(() => webSocketUrl("ftp://x"), TypeError);
  });

  test("WebTransport: a stream per request, pushes that overtake their answer", async () => {
    const server = fakeWebTransport((m, reply, session) => {
      if (m.type === "subscribe") {
        // the push's stream arrives before the answer's: it waits for its subscription
        session.push({ type: "message_event", sub_id: 3, messages: [msg(1)] });
        setTimeout(() => reply({ type: "subscribed", rid: m.rid, sub_id: 3, last_seq: 1 }), 20);
        setTimeout(() => session.push({ type: "message_event", sub_id: 3, messages: [msg(2)] }), 40);
      } else if (m.type === "ping") {
        reply({ type: "pong", rid: m.rid });
      }
    });
    const statuses = [];
    const client = await connect({
      targets: ["ws://fake:7600"], WebSocket: fakeServer(() => {}).WebSocket,
      WebTransport: server.WebTransport, webTransport: { serverCertificateHashes: ["ab01"] },
      onStatus: (s) => statuses.push(s), ...FAST,
    });
    try {
      assert.equal(server.sessions[0].url, "https://fake:7600/v1/wt");
      assert.deepEqual([...server.sessions[0].init.serverCertificateHashes[0].value], [0xab, 1]);
      assert.equal(statuses.at(-1).transport, "webtransport");
      const events = [];
      await client.subscribe("s1", {}, (e) => events.push(e));
      await until(() => events.length === 2);
      assert.deepEqual(events.map((e) => e.message.seq), [1, 2]);
      assert.equal(server.streams, 2); // the hello's and the subscribe's
    } finally {
      client.close();
    }
    assert.equal(webTransportUrl("ws://h:1/v1/ws"), "https://h:1/v1/wt");
  });

  test("WebTransport asked for where there is none: WebSocket", async () => {
    assert.equal(globalThis.WebTransport, undefined); // (Node has none)
    const ws = fakeServer((m, reply) => reply({ type: "pong", rid: m.rid }));
    const statuses = [];
    const client = await connect({
      targets: ["ws://fake:7600"], WebSocket: ws.WebSocket, webTransport: true,
      onStatus: (s) => statuses.push(s), ...FAST,
    });
    try {
      assert.equal(statuses.at(-1).transport, "websocket");
      assert.equal(ws.sockets.length, 1);
    } finally {
      client.close();
    }
  });

  test("WebTransport refused: the same target over WebSocket", async () => {
    const wt = fakeWebTransport(() => {}, { refuse: true });
    const ws = fakeServer((m, reply) => reply({ type: "pong", rid: m.rid }));
    const statuses = [];
    const client = await connect({
      targets: ["ws://fake:7600"], WebSocket: ws.WebSocket, WebTransport: wt.WebTransport,
      webTransport: true, onStatus: (s) => statuses.push(s), ...FAST,
    });
    try {
      assert.equal(wt.sessions.length, 1);
      assert.equal(statuses.at(-1).transport, "websocket");
      assert.equal(ws.sockets.length, 1);
    } finally {
      client.close();
    }
  });
});
