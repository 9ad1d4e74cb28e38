"""``ctxstore-bench agents``: live agent chunks and the append path while agents stream.

    ctxstore-bench agents --nodes 3 --conversations 200 --duration 20
    ctxstore-bench agents --nodes 3 --slow-sessions 500 --slow-agent-s 2 --duration 20

A local echo agent (HTTP/1.1 on h11, in a child process of its own, so that the measuring loop
does not also serve the calls; ``--agent-in-process`` puts it in this process, as before
2026-12-06 23:00) answers every call with an SSE stream:
``--deltas`` text deltas ``--delta-gap-ms`` apart, each preceded by a transient ``data-t``
chunk carrying the monotonic time it was written.  ``--conversations`` sessions each hold a
subscription with ``stream_chunks`` and loop: append a user message, wait for the stored reply.
``--turn-every-ms T`` makes the turns open-loop: each conversation begins one every T ms
(their first turns spread over one period), or at once when a reply comes later than that
(``turns_late``), so the load does not follow how fast the replies come back (in the closed
loop, a build that shows replies sooner also runs more turns a second).
Each ``data-t`` chunk's time from the agent's write to its arrival at the subscriber is
recorded (CLOCK_MONOTONIC, one clock for every process of the machine), and split by where
the conversation subscribed: at its session's leader or at another node, to which the leader
relays the chunk.  The gate: that p99 <= ``--p99-target-ms`` (20 ms by default).

With ``--slow-sessions N``: appends are measured twice for ``--duration`` each, on other
sessions whose agent is not registered, with ``--append-concurrency`` in flight (or, with
``--append-rate R``, R a second on a fixed schedule, each timed from its scheduled start, at
most ``--append-concurrency`` x 16 outstanding): first with no agent running, then while N
sessions keep an agent that takes ``--slow-agent-s`` per call busy (each reply triggers the
next; ``--busy-spread-s``: their first messages spread over that many seconds, else all at
once, so that their replies come in bursts).  Both p99s are reported (appends never wait on
agents).  The N sessions' users are a child process of their own (``BusyUsers``), as the
agent is: the other users of a deployment are not in the measuring client, whose loop would
otherwise also take every reply's push.
The nodes run their own default WAL writer, the writer thread (``--wal-writer``; other local
clusters run ``inline``, which buys appends per second on a shared box and makes every push
wait behind the loop's fsyncs: at 200 conversations the chunks' p50 halved in six pairs of six
with the thread, docs/benchmarks.md).
Each phase also reports the CPU its processes used (``cpu``: the nodes, this process, the agent's
child; % of one core) and the machine's, since other work on the machine moves the figures.
Exit status: 0 gate passed, 1 not, 2 could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import h11

from ctxstore.launcher import LocalCluster
from wire.client import Client, ClientError, agent, connect
from wire.placement import group_of
from wire.protocol import ChunkEvent, Message

from .histogram import LatencyHistogram
from .report import log, write_json
from .sysinfo import cpu_between, sample_cpu

QUANTILES = (0.5, 0.9, 0.99, 0.999, 1.0)


class AgentProcess:
    """An ``EchoAgent`` in a child process (``python -m bench.agents --serve-echo``): it prints
    its port, serves until its stdin closes, then prints its counts."""

    def __init__(self, deltas: int, gap_s: float, slow_s: float) -> None:
        self.args = [str(deltas), str(gap_s), str(slow_s)]
        self.calls = 0
        self.connections = 0
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    async def start(self) -> int:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.agents", "--serve-echo", *self.args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        if not line:
            raise RuntimeError("the echo agent process did not start")
        return int(json.loads(line)["port"])

    async def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 10)
            counts = json.loads(line) if line else {}
            self.calls, self.connections = counts.get("calls", 0), counts.get("connections", 0)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def _serve_echo(deltas: int, gap_s: float, slow_s: float) -> None:
    agent = EchoAgent(deltas, gap_s, slow_s)
    port = await agent.start()
    print(json.dumps({"port": port}), flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    await stdin.read()  # until the bench closes it
    await agent.stop()
    print(json.dumps({"calls": agent.calls, "connections": agent.connections}), flush=True)


class BusyUsers:
    """The users of the slow-agent sessions in a child process (``python -m bench.agents
    --serve-busy N TARGETS WAIT SPREAD``): each of ``busy-0`` .. ``busy-{N-1}`` appends a user
    message, waits for the agent's reply (a subscription), and again, until its stdin closes;
    then it prints how many replies came."""

    def __init__(
        self, sessions: int, targets: Sequence[str], wait_s: float, spread_s: float
    ) -> None:
        self.args = [str(sessions), ",".join(targets), str(wait_s), str(spread_s)]
        self.replies = 0
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.agents", "--serve-busy", *self.args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        if not line:
            raise RuntimeError("the busy users' process did not start")

    async def stop(self, timeout_s: float) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout_s + 10)
            self.replies = json.loads(line).get("replies", 0) if line else 0
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def _serve_busy(sessions: int, targets: list[str], wait_s: float, spread: float) -> None:
    clients = [await connect(targets[k % len(targets):] + targets[:k % len(targets)],
                             client_name="ctxstore-bench-busy") for k in range(8)]  # fmt: skip
    stop = asyncio.Event()
    replies = [0]

    async def staggered(i: int) -> None:
        await asyncio.sleep(spread * i / sessions)
        await _keep_busy(clients[i % len(clients)], f"busy-{i}", stop, replies)

    tasks = [asyncio.create_task(staggered(i)) for i in range(sessions)]
    print(json.dumps({"started": sessions}), flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    await stdin.read()  # until the bench closes it
    stop.set()
    await asyncio.wait(tasks, timeout=wait_s)
    for t in tasks:
        t.cancel()
    for client in clients:
        await client.close()
    print(json.dumps({"replies": replies[0]}), flush=True)


_START = json.dumps({"type": "start"})
_TEXT_START = json.dumps({"type": "text-start", "id": "t"})
_TEXT_END = json.dumps({"type": "text-end", "id": "t"})
_FINISH = json.dumps({"type": "finish"})


class EchoAgent:
    """An agent webhook on h11: answers each POST with the SSE stream described above."""

    def __init__(self, deltas: int, gap_s: float, slow_s: float) -> None:
        self.deltas, self.gap_s, self.slow_s = deltas, gap_s, slow_s
        self.calls = 0
        self.connections = 0  # accepted (a node's pool reuses keep-alive connections)
        self.server: asyncio.Server | None = None
        self.pid: int | None = None  # (in this process: its CPU is the bench's)

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        self.connections += 1
        try:
            while True:
                body = b""
                request = None
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(65536)
                        conn.receive_data(data)
                        if not data and conn.their_state is not h11.DONE:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                assert request is not None
                self.calls += 1
                await self._answer(conn, writer, json.loads(body))
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            return
        finally:
            writer.close()

    async def _answer(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, call: dict[str, Any]
    ) -> None:
        headers = [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")]
        writer.write(conn.send(h11.Response(status_code=200, headers=headers)) or b"")
        if self.slow_s:
            await asyncio.sleep(self.slow_s)

        def event(text: str) -> bytes:
            return conn.send(h11.Data(data=f"data: {text}\n\n".encode())) or b""

        # The fixed chunks' JSON once, and each delta's two events (its ``data-t`` and its
        # text) in one write: the node still reads two HTTP chunks, two SSE events, but the
        # agent, which shares the machine's cores with the nodes, makes one syscall, not two.
        writer.write(event(_START) + event(_TEXT_START))
        for i in range(self.deltas):
            writer.write(
                event(f'{{"type":"data-t","data":{time.monotonic_ns()},"transient":true}}')
                + event(f'{{"type":"text-delta","id":"t","delta":"w{i} "}}')
            )
            await writer.drain()
            if self.gap_s:
                await asyncio.sleep(self.gap_s)
        writer.write(event(_TEXT_END) + event(_FINISH) + event("[DONE]"))
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()


async def _conversation(
    client: Client, sid: str, user: str, until: float, chunks: LatencyHistogram, counts: list[int],
    path: LatencyHistogram, every_s: float = 0.0, offset_s: float = 0.0,
) -> None:  # fmt: skip
    """``path``: also records each chunk (the split by where the subscription is).  With
    ``every_s``: the first turn ``offset_s`` from now, each next one ``every_s`` after the
    previous one began, or when its reply came if that is later (counted in ``counts[1]``)."""
    async with client.subscribe(sid, stream_chunks=True) as sub:
        turn = 0
        next_at = time.monotonic() + offset_s
        while time.monotonic() < until:
            if every_s:
                wait = next_at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    if time.monotonic() >= until:
                        break
                elif turn:
                    counts[1] += 1  # its reply came after this turn's time
                next_at = time.monotonic() + every_s
            turn += 1
            await client.append(sid, f"turn {turn}", "user", user)
            async for item in sub:
                if isinstance(item, ChunkEvent):
                    if item.chunk["type"] == "data-t":
                        us = (time.monotonic_ns() - item.chunk["data"]) // 1000
                        chunks.record_us(us)
                        path.record_us(us)
                elif isinstance(item, Message) and item.sender == "agent":
                    counts[0] += 1
                    break


async def _appends(
    clients: list[Client], sessions: list[str], concurrency: int, until: float,
    hist: LatencyHistogram, rate: float | None = None,
) -> int:  # fmt: skip
    if rate:
        return await _appends_at(clients, sessions, concurrency * 16, until, hist, rate)
    done = [0]

    async def worker(k: int) -> None:
        client = clients[k % len(clients)]
        i = 0
        while time.monotonic() < until:
            sid = sessions[(k + i * concurrency) % len(sessions)]
            started = time.perf_counter()
            await client.append(sid, "x" * 100, "system", "", "note")
            hist.record_s(time.perf_counter() - started)
            done[0] += 1
            i += 1

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return done[0]


async def _appends_at(
    clients: list[Client], sessions: list[str], outstanding_max: int, until: float,
    hist: LatencyHistogram, rate: float,
) -> int:  # fmt: skip
    """Appends at ``rate`` a second on a fixed schedule, each timed from its scheduled start
    (a stalled node delays the ones behind it: no coordinated omission); at most
    ``outstanding_max`` in flight (beyond: the schedule slips, and the wait counts)."""
    done = [0]
    slots = asyncio.Semaphore(outstanding_max)
    tasks: set[asyncio.Task[None]] = set()

    async def one(k: int, due: float) -> None:
        try:
            client = clients[k % len(clients)]
            await client.append(sessions[k % len(sessions)], "x" * 100, "system", "", "note")
            hist.record_s(time.perf_counter() - due)
            done[0] += 1
        finally:
            slots.release()

    gap = 1.0 / rate
    start, k = time.perf_counter(), 0
    end = start + (until - time.monotonic())
    while True:
        due = start + k * gap
        if due >= end:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        task = asyncio.create_task(one(k, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        k += 1
    if tasks:
        await asyncio.wait(tasks)
    return done[0]


async def _keep_busy(
    client: Client, sid: str, stop: asyncio.Event, replies: list[int] | None = None
) -> None:
    async with client.subscribe(sid) as sub:
        while not stop.is_set():
            await client.append(sid, "again", "user", "u")
            async for item in sub:
                if isinstance(item, Message) and item.sender == "agent":
                    if replies is not None:
                        replies[0] += 1
                    break


def _figures(hist: LatencyHistogram) -> dict[str, float]:
    values = hist.quantiles_us(QUANTILES)
    names = ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")
    return {
        "count": hist.count,
        **{n: round(v / 1000, 3) for n, v in zip(names, values, strict=True)},
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = tempfile.mkdtemp(prefix="ctxstore-bench-agents-")
    cluster = LocalCluster(args.nodes, data_dir, extra_args=args.node_args,
                           wal_writer=args.wal_writer)  # fmt: skip
    kind = EchoAgent if args.agent_in_process else AgentProcess
    echo = kind(args.deltas, args.delta_gap_ms / 1000, 0.0)
    slow = kind(3, 0.0, args.slow_agent_s)
    clients: list[Client] = []
    try:
        log(f"starting {args.nodes} local nodes ({shlex.join(cluster.extra_args)}) in {data_dir}",
            args.quiet)  # fmt: skip
        await cluster.start()
        port, slow_port = await echo.start(), await slow.start()
        targets = cluster.targets
        clients = [await connect(targets[k % len(targets):] + targets[:k % len(targets)],
                                 client_name="ctxstore-bench") for k in range(8)]  # fmt: skip
        c = clients[0]
        pids = {f"node{i}": ch.process.pid for i, ch in cluster.children.items()
                if ch.process is not None}  # fmt: skip
        pids["bench"] = os.getpid()
        await c.create_agent(agent("echo", f"http://127.0.0.1:{port}/", debounce_ms=0,
                                   history="tail 4", protocol="h1"))  # fmt: skip
        await c.create_agent(agent("slow", f"http://127.0.0.1:{slow_port}/", debounce_ms=0,
                                   history="tail 4", timeout_ms=60_000))  # fmt: skip
        doc: dict[str, Any] = {"scenario": "agents", "config": {
            k: v for k, v in vars(args).items() if k not in ("json", "quiet")},
            "cluster": {"node_args": cluster.extra_args}}  # fmt: skip
        if args.slow_sessions:
            plain = [f"plain-{i}" for i in range(64)]
            busy = [f"busy-{i}" for i in range(args.slow_sessions)]
            for sid in plain:
                await c.create_session("u", "nobody", {}, sid)
            for sid in busy:
                await c.create_session("u", "slow", {}, sid)
            base = LatencyHistogram()
            log(f"appends without agents for {args.duration} s", args.quiet)
            cpu0 = sample_cpu(pids)
            rate = args.append_rate
            n = await _appends(clients, plain, args.append_concurrency,
                               time.monotonic() + args.duration, base, rate)  # fmt: skip
            cpu_base = cpu_between(cpu0, sample_cpu(pids))
            users = BusyUsers(len(busy), targets, args.slow_agent_s * 3 + 5, args.busy_spread_s)
            await users.start()
            await asyncio.sleep(1.0)
            log(f"appends while {len(busy)} sessions call a {args.slow_agent_s} s agent",
                args.quiet)  # fmt: skip
            loaded = LatencyHistogram()
            slow_pids = {**pids, "agent": slow.pid} if slow.pid is not None else pids
            if users.pid is not None:
                slow_pids["users"] = users.pid
            cpu0 = sample_cpu(slow_pids)
            m = await _appends(clients, plain, args.append_concurrency,
                               time.monotonic() + args.duration, loaded, rate)  # fmt: skip
            cpu_loaded = cpu_between(cpu0, sample_cpu(slow_pids))
            await users.stop(args.slow_agent_s * 3 + 5)
            await slow.stop()  # (its counts come with its end)
            doc["appends_without_agents"] = {**_figures(base), "per_s": round(n / args.duration),
                                             "cpu": cpu_base}  # fmt: skip
            doc["appends_with_agents"] = {**_figures(loaded), "per_s": round(m / args.duration),
                                          "agent_calls": slow.calls,
                                          "agent_connections": slow.connections,
                                          "replies": users.replies,
                                          "cpu": cpu_loaded}  # fmt: skip
        sessions = [f"conv-{i}" for i in range(args.conversations)]
        for sid in sessions:
            await c.create_session(f"user-{sid}", "echo", {}, sid)
        chunks = LatencyHistogram()
        # Where each conversation's chunks go: its client's node (client k dials target k
        # first) is the session's leader (the leader pushes them itself), or not (the leader
        # relays them to that node, which pushes them): one more process hop.
        nodes = list(cluster.children)
        node_of = [nodes[k % len(targets)] for k in range(len(clients))]
        leaders = (await c.get_routes()).leaders
        at_leader, relayed = LatencyHistogram(), LatencyHistogram()
        paths = [at_leader if leaders[group_of(sid, len(leaders))] == node_of[i % len(clients)]
                 else relayed for i, sid in enumerate(sessions)]  # fmt: skip
        replies = [0, 0]  # replies, turns started late (``--turn-every-ms``)
        log(f"{len(sessions)} conversations for {args.duration} s", args.quiet)
        until = time.monotonic() + args.duration
        echo_pids = {**pids, "agent": echo.pid} if echo.pid is not None else pids
        cpu0 = sample_cpu(echo_pids)
        every_s = args.turn_every_ms / 1000
        await asyncio.gather(*(
            _conversation(clients[i % len(clients)], sid, f"user-{sid}", until, chunks, replies,
                          paths[i], every_s, every_s * i / len(sessions))
            for i, sid in enumerate(sessions)
        ))  # fmt: skip
        cpu_chunks = cpu_between(cpu0, sample_cpu(echo_pids))
        after = (await c.get_routes()).leaders
        moved = sum(
            after[g] != leaders[g] for g in {group_of(sid, len(leaders)) for sid in sessions}
        )
        await echo.stop()

        def split(h: LatencyHistogram) -> dict[str, Any]:
            return {"sessions": sum(p is h for p in paths), **_figures(h)}

        doc["chunk_latency"] = {**_figures(chunks), "replies": replies[0],
                                "turns_late": replies[1],
                                "agent_calls": echo.calls,
                                "agent_connections": echo.connections,
                                "cpu": cpu_chunks,
                                "subscribed_at_leader": split(at_leader),
                                "relayed": split(relayed),
                                "groups_whose_leader_moved": moved}  # fmt: skip
        p99 = doc["chunk_latency"]["p99_ms"]
        doc["gate"] = {"p99_target_ms": args.p99_target_ms, "passed": p99 <= args.p99_target_ms}
        return doc
    finally:
        for client in clients:
            await client.close()
        await echo.stop()
        await slow.stop()
        await cluster.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctxstore-bench agents", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=3, help="local nodes (default: 3)")
    p.add_argument("--conversations", type=int, default=200, help="(default: 200)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per phase (default: 20)")
    p.add_argument("--deltas", type=int, default=20, help="per reply (default: 20)")
    p.add_argument("--delta-gap-ms", type=float, default=20.0, help="(default: 20)")
    p.add_argument("--p99-target-ms", type=float, default=20.0, help="(default: 20)")
    p.add_argument("--turn-every-ms", type=float, default=0.0,
                   help="each conversation begins a turn this often, the conversations' first "
                        "turns spread over one such period; a turn whose reply comes later "
                        "begins the next at once, counted in turns_late (default: 0, each turn "
                        "as soon as the last reply came: a closed loop)")  # fmt: skip
    p.add_argument("--slow-sessions", type=int, default=0, help="(default: 0, no append phase)")
    p.add_argument("--slow-agent-s", type=float, default=2.0, help="(default: 2)")
    p.add_argument("--busy-spread-s", type=float, default=0.0,
                   help="the slow sessions' first messages spread over this many seconds "
                        "(default: 0, all at once: their replies come in bursts)")  # fmt: skip
    p.add_argument("--append-concurrency", type=int, default=64, help="(default: 64)")
    p.add_argument("--append-rate", type=float, default=None,
                   help="appends a second, on a schedule (default: a closed loop)")  # fmt: skip
    p.add_argument("--wal-writer", choices=("thread", "inline"), default="thread",
                   help="the nodes' WAL writer (default: thread, a node's own default; other "
                        "local clusters run inline, for appends per second)")  # fmt: skip
    p.add_argument("--agent-in-process", action="store_true",
                   help="serve the echo agents from this process (the measuring one)")  # fmt: skip
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if argv[:1] == ["--serve-echo"]:  # the child of AgentProcess
        import uvloop

        uvloop.run(_serve_echo(int(argv[1]), float(argv[2]), float(argv[3])))
        return 0
    if argv[:1] == ["--serve-busy"]:  # the child of BusyUsers
        import uvloop

        uvloop.run(_serve_busy(int(argv[1]), argv[2].split(","), float(argv[3]), float(argv[4])))
        return 0
    node_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, node_args = argv[:cut], argv[cut + 1 :]
    args = parser().parse_args(argv)
    args.node_args = node_args
    import uvloop

    try:
        doc = uvloop.run(run(args))
    except KeyboardInterrupt:
        return 2
    except (ClientError, RuntimeError, TimeoutError, OSError) as e:
        log(f"ctxstore-bench agents: {e}")
        return 2
    print(json.dumps(doc, indent=2))
    if args.json:
        write_json(args.json, doc)
    return 0 if doc["gate"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
