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
