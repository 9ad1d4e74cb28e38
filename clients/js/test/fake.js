// A scripted stand-in for a node's WebSocket (options.WebSocket), for what a real node does not
// do on demand: duplicates, holes, unanswered requests, retryable errors.
export function fakeServer(handle) {
  const server = { sockets: [], received: [] };
  server.WebSocket = class {
    constructor(url, protocols) {
      this.url = url;
      this.protocol = protocols[0];
      this.readyState = 0;
      server.sockets.push(this);
      setTimeout(() => {
        this.readyState = 1;
        this.onopen?.({});
      }, 0);
    }
    send(text) {
      const msg = JSON.parse(text);
      server.received.push(msg);
      const reply = (m) => this.push(m);
      if (msg.type === "hello") reply({ type: "welcome", rid: msg.rid, node_id: 1 });
      else handle(msg, reply, this);
    }
    push(msg) {
      setTimeout(() => this.readyState === 1 && this.onmessage?.({ data: JSON.stringify(msg) }), 0);
    }
    close(code = 1000, reason = "") {
      if (this.readyState === 3) return;
      this.readyState = 3;
      setTimeout(() => this.onclose?.({ code, reason }), 0);
    }
  };
  return server;
}

export function until(predicate, timeoutMs = 10000) {
  const deadline = Date.now() + timeoutMs;
  return new Promise((resolve, reject) => {
    const poll = () => {
      if (predicate()) resolve();
      else if (Date.now() > deadline) reject(new Error(`not true in ${timeoutMs} ms: ${predicate}`));
      else setTimeout(poll, 5);
    };
    poll();
  });
}

// A scripted stand-in for a node's WebTransport endpoint (options.WebTransport): each request
// on a bidirectional stream, each push on a unidirectional stream of its subscription (made by
// `push(msg)`), as ctxstore/webtransport.py does; `refuse`: the session is refused at once;
// `hang`: it never opens (nothing answers: UDP blocked) until closed.
export function fakeWebTransport(handle, { refuse = false, hang = false } = {}) {
  const server = { sessions: [], received: [], streams: 0 };
  const frame = (msg) => {
    const body = new TextEncoder().encode(JSON.stringify(msg));
    const out = new Uint8Array(4 + body.length);
    new DataView(out.buffer).setUint32(0, body.length);
    out.set(body, 4);
    return out;
  };
  server.WebTransport = class {
    constructor(url, init) {
      this.url = url;
      this.init = init;
      this.uni = new Map(); // sub_id -> controller of its stream
      server.sessions.push(this);
      let closeSession;
      this.closed = new Promise((resolve, reject) => (closeSession = { resolve, reject }));
      this._close = closeSession;
      this.ready = refuse
        ? Promise.reject(new Error("WebTransport: connection refused"))
        : hang
          ? new Promise(() => {})
          : Promise.resolve();
      if (refuse) setTimeout(() => closeSession.reject(new Error("refused")), 0);
      this.incomingUnidirectionalStreams = new ReadableStream({
        start: (c) => (this._incoming = c),
      });
    }
    push(msg) {
      let c = this.uni.get(msg.sub_id);
      if (c === undefined) {
        this._incoming.enqueue(new ReadableStream({ start: (ctl) => (c = ctl) }));
        this.uni.set(msg.sub_id, c);
      }
      c.enqueue(frame(msg));
    }
    async createBidirectionalStream() {
      server.streams += 1;
      let answer;
      const readable = new ReadableStream({ start: (c) => (answer = c) });
      const session = this;
      const writable = new WritableStream({
        write(chunk) {
          const msg = JSON.parse(new TextDecoder().decode(chunk.subarray(4)));
          server.received.push(msg);
          const reply = (m) => {
            answer.enqueue(frame(m));
            answer.close();
          };
          if (msg.type === "hello") reply({ type: "welcome", rid: msg.rid, node_id: 7 });
          else handle(msg, reply, session);
        },
      });
      return { readable, writable };
    }
    close(info = {}) {
      this._close.resolve({ closeCode: info.closeCode ?? 0, reason: info.reason ?? "" });
    }
  };
  return server;
}
