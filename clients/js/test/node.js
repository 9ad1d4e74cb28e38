// Start a real ctxstore node for the tests: `ctxstore serve` on free ports in a temporary
// directory (CTXSTORE_BIN: the ctxstore executable, default the repository's .venv; the python
// beside it makes the HTTP/3 listener's certificate).
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL("../../..", import.meta.url));
const BIN = process.env.CTXSTORE_BIN ?? join(ROOT, ".venv", "bin", "ctxstore");
// The node warns about CTXSTORE_* variables it does not know: CTXSTORE_BIN is ours, not its.
const ENV = Object.fromEntries(Object.entries(process.env).filter(([k]) => k !== "CTXSTORE_BIN"));

export class Node {
  /** `env`: more CTXSTORE_* settings (auth, say); `h3`: an HTTP/3 listener too (UDP, a port of
   * its own) with a new self-signed certificate (`this.cert.cert_sha256`). */
  constructor({ env = {}, h3 = false } = {}) {
    this.env = { ...ENV, ...env };
    this.dataDir = mkdtempSync(join(tmpdir(), "ctxstore-js-"));
    this.http = null; // host:port of the HTTP port, fixed after the first start
    this.h3 = null; // host:port of the HTTP/3 listener, if any
    this.process = null;
    this.cert = null;
    if (h3) {
      const python = join(dirname(BIN), "python");
      const args = ["-m", "ctxstore.tlscert", join(this.dataDir, "tls")];
      this.cert = JSON.parse(execFileSync(python, args, { env: this.env, encoding: "utf8" }));
    }
  }

  get url() {
    return `ws://${this.http}/v1/ws`;
  }

  /** Start (again, on the same HTTP port); resolves once the node is ready. */
  start(timeoutMs = 30000) {
    const args = [
      "serve", "--data-dir", this.dataDir, "--listen", "127.0.0.1:0",
      "--peer-listen", "127.0.0.1:0", "--http", this.http ?? "127.0.0.1:0",
      "--tick-ms", "20", "--groups", "4", "--wal-writer", "inline",
    ];
    if (this.cert !== null) {
      const { cert, key } = this.cert;
      args.push("--h3", this.h3 ?? "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key);
    }
    const child = spawn(BIN, args, { env: this.env, stdio: ["ignore", "pipe", "inherit"] });
    this.process = child;
    this.exited = new Promise((resolve) => child.once("exit", resolve));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("node not ready in time")), timeoutMs);
      child.once("exit", (code) => reject(new Error(`node exited with ${code}`)));
      createInterface({ input: child.stdout }).on("line", (line) => {
        let event;
        try {
          event = JSON.parse(line);
        } catch {
          return;
        }
        if (event.event === "listening") {
          this.http = event.http;
          this.h3 = event.h3 ?? null;
        }
        if (event.event === "ready") {
          clearTimeout(timer);
          resolve();
        }
      });
    });
  }

  async kill(signal = "SIGKILL") {
    if (this.process?.exitCode === null && this.process.signalCode === null) {
      this.process.kill(signal);
      await this.exited;
    }
  }

  async remove() {
    await this.kill();
    rmSync(this.dataDir, { recursive: true, force: true });
  }
}
