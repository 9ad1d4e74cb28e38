// A webhook agent for the tests: a real HTTP/1.1 server (node:http) answering each call with an
// AI SDK UI message stream as SSE: reasoning, a tool call and its output, then text deltas; it
// holds the stream before `finish` until the test calls release() (so a test sees the draft).
import { createServer } from "node:http";

export const REASONING = "The user greets me; check the weather first.";
export const TOOL_INPUT = { city: "Paris" };
export const TOOL_OUTPUT = { celsius: 21 };
export const WORDS = ["It is ", "21 degrees ", "in Paris."];

export class Agent {
  constructor() {
    this.calls = [];
    this._gates = [];
    this.server = createServer((req, res) => this._answer(req, res));
  }

  get url() {
    return `http://127.0.0.1:${this.server.address().port}/chat`;
  }

  start() {
    return new Promise((resolve) => this.server.listen(0, "127.0.0.1", resolve));
  }

  stop() {
    this.server.closeAllConnections();
    return new Promise((resolve) => this.server.close(resolve));
  }

  /** Let the oldest held stream finish. */
  release() {
    this._gates.shift()?.();
  }

  async _answer(req, res) {
    let body = "";
    for await (const part of req) body += part;
    this.calls.push(JSON.parse(body));
    res.writeHead(200, { "content-type": "text/event-stream" });
    const send = (chunk) => res.write(`data: ${JSON.stringify(chunk)}\n\n`);
    send({ type: "start", messageMetadata: { model: "js-test" } });
    send({ type: "start-step" });
    send({ type: "reasoning-start", id: "r" });
    send({ type: "reasoning-delta", id: "r", delta: REASONING });
    send({ type: "reasoning-end", id: "r" });
    send({ type: "tool-input-start", toolCallId: "c1", toolName: "weather" });
    send({ type: "tool-input-delta", toolCallId: "c1", inputTextDelta: JSON.stringify(TOOL_INPUT) });
    send({ type: "tool-input-available", toolCallId: "c1", toolName: "weather", input: TOOL_INPUT });
    send({ type: "tool-output-available", toolCallId: "c1", output: TOOL_OUTPUT });
    send({ type: "text-start", id: "t" });
    for (const delta of WORDS) send({ type: "text-delta", id: "t", delta });
    await new Promise((resolve) => this._gates.push(resolve));
    send({ type: "text-end", id: "t" });
    send({ type: "finish-step" });
    send({ type: "finish", messageMetadata: { tokens: 9 } });
    res.end("data: [DONE]\n\n");
  }
}
