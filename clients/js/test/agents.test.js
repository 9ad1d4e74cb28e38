// Agents in ctxstore.js: the registry, and live chunks drafting a reply that the stored message
// replaces, against a real node (node.js) calling a real webhook (agent.js); attempts and late
// chunks against a scripted node (fake.js).
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { ReplyDraft, connect } from "../ctxstore.js";
import { Agent, REASONING, TOOL_INPUT, TOOL_OUTPUT, WORDS } from "./agent.js";
import { fakeServer, until } from "./fake.js";
import { Node } from "./node.js";

const FAST = { backoffBaseMs: 20, backoffMaxMs: 200 };

describe("agents against a real node", () => {
  const node = new Node();
  const agent = new Agent();
  before(() => Promise.all([node.start(), agent.start()]));
  after(() => Promise.all([node.remove(), agent.stop()]));

  test("the registry: create, get, list, update, disable; bad fields", async () => {
    const client = await connect({ targets: [node.url] });
    try {
      const made = await client.createAgent({ id: "reg", url: agent.url, history: "tail 5" });
      assert.deepEqual(made, {
        id: "reg", url: agent.url, headers: {}, timeout_ms: 120000, idle_timeout_ms: 30000,
        debounce_ms: 500, history: "tail 5", max_attempts: 5, status: "active", protocol: "auto",
      });
      assert.deepEqual(await client.getAgent("reg"), made);
      assert.ok((await client.listAgents()).agents.some((a) => a.id === "reg"));
      const updated = await client.updateAgent({ id: "reg", url: agent.url, debounceMs: 0 });
      assert.equal(updated.debounce_ms, 0);
      assert.equal((await client.disableAgent("reg")).status, "disabled");
      await assert.rejects(client.createAgent({ id: "reg", url: agent.url }), { code: "conflict" });
      await assert.rejects(client.getAgent("nobody"), { code: "not_found" });
      await assert.rejects(
        client.createAgent({ id: "bad", url: "ftp://example.com/hook" }),
        (e) => e.code === "bad_request" && e.details.field.startsWith("agent"),
      );
    } finally {
      client.close();
    }
  });

  test("live chunks draft the reply; the stored message replaces the draft", async () => {
    const client = await connect({ targets: [node.url] });
    try {
      await client.createAgent({ id: "live", url: agent.url, debounceMs: 0, protocol: "h1" });
      const s = await client.createSession({ userId: "ada", agentId: "live" });
      const events = [];
      const sub = await client.subscribe(s.id, { streamChunks: true }, (e) => events.push(e));
      await client.append(s.id, { sender: "user", senderId: "ada", content: "weather?" });
      // every chunk before the held finish has come: the draft shows it all, live
      await until(() => sub.draft?.text === WORDS.join(""));
      const draft = sub.draft;
      assert.deepEqual([draft.triggerSeq, draft.attempt, draft.terminated], [1, 1, null]);
      assert.deepEqual(draft.parts, [
        { type: "step-start" },
        { type: "reasoning", text: REASONING, state: "done" },
        { type: "tool-weather", toolCallId: "c1", state: "output-available", input: TOOL_INPUT,
          output: TOOL_OUTPUT },
        { type: "text", text: WORDS.join(""), state: "streaming" },
      ]);
      assert.deepEqual(draft.metadata, { model: "js-test" });
      const chunks = events.filter((e) => e.type === "chunk");
      assert.ok(chunks.every((e) => e.draft === draft && e.triggerSeq === 1 && e.attempt === 1));
      assert.deepEqual(chunks.map((e) => e.chunk.type).slice(0, 3),
        ["start", "start-step", "reasoning-start"]);
      assert.equal(agent.calls.at(-1).messages.at(-1).parts[0].text, "weather?");

      agent.release();
      await until(() => events.some((e) => e.type === "message" && e.message.seq === 2));
      const stored = events.find((e) => e.type === "message" && e.message.seq === 2);
      assert.equal(stored.replaces, draft); // the draft goes: the stored message is the record
      assert.equal(sub.draft, null);
      const m = stored.message;
      assert.deepEqual([m.sender, m.sender_id, m.role], ["agent", "live", "assistant"]);
      const done = (p) => (p.type === "text" ? { ...p, state: "done" } : p);
      assert.deepEqual(m.parts, draft.parts.map(done));
      assert.equal(m.metadata.agent.trigger_seq, 1);
      assert.equal(draft.terminated, "finish"); // the finish chunk came just before it
      const user = events.find((e) => e.type === "message" && e.message.seq === 1);
      assert.equal(user.replaces, null);
    } finally {
      client.close();
    }
  });
});

describe("agent chunks against a scripted node", () => {
  const chunk = (triggerSeq, attempt, c) =>
    ({ type: "stream_chunk", sub_id: 1, trigger_seq: triggerSeq, attempt, chunk: c });
  const reply = (seq, trigger) => ({
    session_id: "s1", seq, sender: "agent", sender_id: "a1", kind: "text", content: "",
    metadata: { agent: { id: "a1", trigger_seq: trigger, attempt: 2 } }, client_msg_id: null,
    inserted_at: 1, token_count: null, role: "assistant", parts: [{ type: "text", text: "ok" }],
  });

  test("a later attempt replaces the draft; late and answered chunks are dropped", async () => {
    let ws = null;
    const server = fakeServer((m, answer, socket) => {
      if (m.type === "subscribe") {
        assert.equal(m.stream_chunks, true);
        ws = socket;
        answer({ type: "subscribed", rid: m.rid, sub_id: 1, last_seq: 1 });
      }
    });
    const client = await connect({ targets: ["ws://fake:1"], WebSocket: server.WebSocket, ...FAST });
    try {
      const events = [];
      const sub = await client.subscribe("s1", { afterSeq: 1, streamChunks: true },
        (e) => events.push(e));
      await until(() => ws !== null);
      // joined mid-stream: a delta for a text part never started still shows
      ws.push(chunk(1, 1, { type: "text-delta", id: "t", delta: "hal" }));
      await until(() => sub.draft?.text === "hal");
      const first = sub.draft;
      ws.push(chunk(1, 2, { type: "text-start", id: "t" })); // the retry: a new draft
      ws.push(chunk(1, 1, { type: "text-delta", id: "t", delta: "f" })); // late: dropped
      ws.push(chunk(1, 2, { type: "text-delta", id: "t", delta: "whole" }));
      await until(() => sub.draft?.text === "whole");
      assert.notEqual(sub.draft, first);
      assert.equal(events.filter((e) => e.type === "chunk").length, 3);
      assert.equal(events[1].replaces, first);
      assert.equal(first.text, "hal");
      ws.push({ type: "message_event", sub_id: 1, messages: [reply(2, 1)] });
      await until(() => sub.draft === null);
      assert.equal(events.at(-1).replaces.attempt, 2);
      ws.push(chunk(1, 2, { type: "text-delta", id: "t", delta: "late" })); // answered already
      ws.push(chunk(3, 1, { type: "text-start", id: "u" })); // the next trigger's: a new draft
      await until(() => sub.draft !== null);
      assert.deepEqual([sub.draft.triggerSeq, sub.draft.text], [3, ""]);
      assert.equal(events.filter((e) => e.type === "chunk").length, 4);
      // a gap past the draft's trigger may hold its reply: the draft goes with it
      const third = sub.draft;
      ws.push({ type: "gap_event", sub_id: 1, from_seq: 3, to_seq: 4, reason: "retention" });
      await until(() => sub.draft === null);
      assert.equal(events.at(-1).type, "gap");
      assert.equal(events.at(-1).replaces, third);
    } finally {
      client.close();
    }
  });

  test("a draft takes every chunk type, bounded and never throwing", () => {
    const d = new ReplyDraft(4, 1);
    const chunks = [
      { type: "start", messageId: "m", messageMetadata: { a: 1 } },
      { type: "data-weather", id: "w", data: { c: 1 } },
      { type: "data-weather", id: "w", data: { c: 2 } },
      { type: "data-progress", data: 50, transient: true },
      { type: "tool-input-start", toolCallId: "d", toolName: "search", dynamic: true },
      { type: "tool-input-delta", toolCallId: "d", inputTextDelta: "{\"q\":" },
      { type: "tool-input-error", toolCallId: "d", toolName: "search", input: "{\"q\":",
        errorText: "bad input" },
      { type: "tool-output-error", toolCallId: "x", errorText: "no such call" },
      { type: "file", url: "https://f/x.png", mediaType: "image/png" },
      { type: "source-url", sourceId: "s", url: "https://s" },
      { type: "source-document", sourceId: "d", mediaType: "text/plain", title: "T" },
      { type: "message-metadata", messageMetadata: { b: 2 } },
      { type: "finish-step" },
      { type: "some-future-type" },
      { type: "error", errorText: "model overloaded" },
      { type: "text-delta", id: "t", delta: "after the end" },
      null,
    ];
    const taken = chunks.map((c) => d.add(c));
    assert.deepEqual(taken.slice(-2), [false, false]);
    assert.deepEqual(d.parts, [
      { type: "data-weather", data: { c: 2 }, id: "w" },
      { type: "dynamic-tool", toolName: "search", toolCallId: "d", state: "output-error",
        input: "{\"q\":", errorText: "bad input" },
      // an output whose call was missed: shown under an unknown tool's name
      { type: "tool-unknown", toolCallId: "x", state: "output-error", errorText: "no such call" },
      { type: "file", mediaType: "image/png", url: "https://f/x.png" },
      { type: "source-url", sourceId: "s", url: "https://s" },
      { type: "source-document", sourceId: "d", title: "T", mediaType: "text/plain" },
    ]);
    assert.deepEqual(d.metadata, { a: 1, b: 2 });
    assert.deepEqual(d.transient, { "data-progress": 50 });
    assert.deepEqual([d.terminated, d.errorText], ["error", "model overloaded"]);
    const big = new ReplyDraft(1, 1);
    big.add({ type: "text-start", id: "t" });
    for (let i = 0; i < 3; i++) big.add({ type: "text-delta", id: "t", delta: "x".repeat(500000) });
    assert.equal(big.text.length, 1024 * 1024);
    for (let i = 0; i < 1100; i++) big.add({ type: "start-step" });
    assert.equal(big.parts.length, 1000);
  });
});
