"""The read-back check: every acknowledged append is stored exactly once, at its acked seq.

After the load, every session is read back from seq 0 (``read`` pages of 1 000) and checked:

- the seqs read are 1..n, each once, in order (n = the session's ``last_seq``);
- each acknowledged (session, client_msg_id) appears exactly once, at the seq its ack gave;
- no client_msg_id appears twice in a session (an unacked append that landed is fine once).

Sessions whose oldest messages left the node's in-memory tail (``not_found`` with
``first_seq``) are checked from ``first_seq`` on; the acks below it are counted as evicted.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable, Sequence

from wire.client import Client, ClientError

PAGE = 1000
READ_CONCURRENCY = 16
ATTEMPTS = 20
PROBLEMS_KEPT = 20


@dataclasses.dataclass
class Verdict:
    sessions: int = 0
    messages: int = 0
    acked: int = 0
    missing: int = 0  # acked, not found
    duplicated: int = 0  # a client_msg_id stored more than once
    misplaced: int = 0  # acked at one seq, stored at another
    bad_seqs: int = 0  # sessions whose seqs are not first..n in order
    landed_unacked: int = 0  # ours, stored, not acked (outcome was unknown): allowed
    evicted: int = 0  # acked below the first seq still held
    unreadable: int = 0  # sessions that could not be read
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.missing or self.duplicated or self.misplaced or self.bad_seqs or self.unreadable
        )

    def problem(self, text: str) -> None:
        if len(self.problems) < PROBLEMS_KEPT:
            self.problems.append(text)

    def as_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "ok": self.ok}


def check_session(
    verdict: Verdict,
    session: str,
    stored: Sequence[tuple[int, str | None]],
    acked: Iterable[tuple[str, int]],
    first_seq: int = 1,
    ours: str = "",
) -> None:
    """Check one session: ``stored`` = (seq, client_msg_id) as read back from ``first_seq`` on,
    ``acked`` = (client_msg_id, seq) of its acknowledged appends.  ``ours``: the id prefix of
    this run's appends (to count the unacked ones that landed)."""
    verdict.sessions += 1
    verdict.messages += len(stored)
    seqs = [seq for seq, _ in stored]
    if seqs != list(range(first_seq, first_seq + len(seqs))):
        verdict.bad_seqs += 1
        verdict.problem(f"{session}: seqs are not {first_seq}..{first_seq + len(seqs) - 1}")
    where: dict[str, list[int]] = {}
    for seq, msg_id in stored:
        if msg_id is not None:
            where.setdefault(msg_id, []).append(seq)
    for msg_id, at in where.items():
        if len(at) > 1:
            verdict.duplicated += 1
            verdict.problem(f"{session}: {msg_id} stored at seqs {at}")
    acked_ids: set[str] = set()
    for msg_id, seq in acked:
        verdict.acked += 1
        acked_ids.add(msg_id)
        if seq < first_seq:
            verdict.evicted += 1
            continue
        stored_at = where.get(msg_id)
        if not stored_at:
            verdict.missing += 1
            verdict.problem(f"{session}: {msg_id} acked at seq {seq}, not stored")
        elif seq not in stored_at:
            verdict.misplaced += 1
            verdict.problem(f"{session}: {msg_id} acked at seq {seq}, stored at {stored_at}")
    if ours:
        verdict.landed_unacked += sum(
            1 for msg_id in where if msg_id.startswith(ours) and msg_id not in acked_ids
        )


async def read_session(client: Client, session: str) -> tuple[int, list[tuple[int, str | None]]]:
    """(first seq held, [(seq, client_msg_id)]) of ``session``, read in pages, retried."""
    out: list[tuple[int, str | None]] = []
    first_seq, after, attempts = 1, 0, 0
    while True:
        try:
            page = await client.read(session, after, PAGE)
        except ClientError as e:
            if e.code == "not_found" and "first_seq" in e.details and not out:
                first_seq = int(e.details["first_seq"])
                after = first_seq - 1
                continue
            attempts += 1
            if not e.retryable or attempts >= ATTEMPTS:
                raise
            await asyncio.sleep(0.1 * attempts)
            continue
        out += [(m.seq, m.client_msg_id) for m in page.messages]
        if not page.messages or page.messages[-1].seq >= page.last_seq:
            return first_seq, out
        after = page.messages[-1].seq


async def verify(client: Client, acked: dict[str, list[tuple[str, int]]], ours: str) -> Verdict:
    """Read every session of ``acked`` back through ``client`` and check it."""
    verdict = Verdict()
    sessions = sorted(acked)
    semaphore = asyncio.Semaphore(READ_CONCURRENCY)

    async def one(session: str) -> None:
        async with semaphore:
            try:
                first_seq, stored = await read_session(client, session)
            except ClientError as e:
                verdict.unreadable += 1
                verdict.problem(f"{session}: read failed: {e}")
                return
        check_session(verdict, session, stored, acked[session], first_seq, ours)

    await asyncio.gather(*(one(s) for s in sessions))
    return verdict


__all__ = ["Verdict", "check_session", "read_session", "verify"]
