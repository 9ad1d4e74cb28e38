"""A node that was removed from a group but never learned it (design §5.6).

A leader stops sending to a node once it applied the change removing it, so on an idle group
the removed follower (or learner) may never receive that entry: it never applies its own
removal, ``Driver.on_removed`` never fires, and it would keep the group for good.  So a node
that hosts a data group the cluster view no longer places on it (a *stray*) asks the group's
members, over the peer connection's application lane, whether it is still a member
(``MemberQuery``).  Only the group's leader answers with what counts (``MemberAnswer``): its
term, whether a membership change is pending there, and the members of its applied
configuration.

The node retires the group (``Retirer.retire``, as if it had applied its removal) only when:

- the answer comes from the group's leader, with no membership change pending there, and its
  applied (so committed) configuration excludes this node: the removal committed, and any
  later change must first be appended by a leader;
- the answer's term is no older than this node's term for the group when it asked (a deposed
  leader's answer is refused once this node heard from a newer one);
- this node's copy of the group did not change since it asked (same term, same last index,
  checked in the same step that removes it, ``Retirer.retire``'s ``still``): a leader that
  added this node back must send it the entry doing so, and that changes its log.  So a node
  retires a group only while it acknowledged nothing of a configuration that includes it.

Never on the view alone: mid-move a node the view no longer places may still be a voter the
group needs.  A stray the leader still counts is asked again later (``ASK_S``); at most
``ASKS_MAX`` groups are asked per round.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from raft import NONE, Role
from raft.driver import Driver

from .peer_messages import STRAY_ENVELOPES, MemberAnswer, MemberQuery
from .peer_messages import encode as _encode

logger = logging.getLogger(__name__)

ASK_S = 1.0  # a stray is asked about again after this long
ANSWER_S = 5.0  # an unanswered question is forgotten after this long
ASKS_MAX = 64  # groups asked about per round


@dataclass(frozen=True)
class _Asked:
    group: int
    term: int
    last_index: int
    at: float


@dataclass
class StrayStats:
    asked: int = 0  # questions sent
    answered: int = 0  # answers served to other nodes
    retired: int = 0  # strays retired on a leader's answer


class Strays:
    def __init__(
        self,
        node_id: int,
        driver: Driver,
        placed: Callable[[int], bool],
        send: Callable[[int, bytes], bool],
        retire: Callable[[int, Callable[[], bool]], None],
        meta_group: int,
        retiring: Callable[[int], bool] = lambda g: False,
    ) -> None:
        """``placed(group)``: the view places ``group`` here; ``send(peer, data)``: on the
        application lane (False if not connected); ``retire(group, still)``: retire ``group``
        if ``still()`` holds when it is removed."""
        self.id = node_id
        self.driver = driver
        self.placed = placed
        self.send = send
        self.retire = retire
        self.meta_group = meta_group
        self.retiring = retiring
        self.stats = StrayStats()
        self._qids = itertools.count(1)
        self._asked: dict[int, _Asked] = {}  # qid -> what was asked
        self._last: dict[int, float] = {}  # group -> when it was last asked about
        self._rotate = 0

    def strays(self) -> list[int]:
        """The data groups hosted here that the view does not place here (led ones left out:
        a leader that applies its own removal learns it)."""
        host = self.driver.host
        return [
            g
            for g in host.groups()
            if g != self.meta_group
            and not self.placed(g)
            and host.node(g).raft.role is not Role.LEADER
            and not self.retiring(g)
        ]

    def run_once(self, now: float) -> int:
        """Ask about the strays not asked about for ``ASK_S``; how many were asked."""
        self._asked = {q: a for q, a in self._asked.items() if now - a.at < ANSWER_S}
        strays = self.strays()
        if not strays:
            self._last.clear()
            return 0
        self._last = {g: t for g, t in self._last.items() if g in strays}
        host = self.driver.host
        asked = 0
        for g in strays:
            if asked >= ASKS_MAX:
                break
            if now - self._last.get(g, -ASK_S) < ASK_S:
                continue
            r = host.node(g).raft
            # The leader it knows, else every member it knows: only a leader's answer counts.
            peers = [r.lead] if r.lead not in (NONE, self.id) else []
            peers = peers or [n for n in (*r.voters, *r.learners) if n != self.id]
            qid = next(self._qids)
            sent = False
            for peer in peers:
                sent = self.send(peer, _encode(MemberQuery(qid, g))) or sent
            if sent:
                self._asked[qid] = _Asked(g, r.term, r.log.last_index(), now)
                self.stats.asked += 1
                asked += 1
            self._last[g] = now
        return asked

    def on_envelope(self, peer: int, envelope: MemberQuery | MemberAnswer) -> None:
        if isinstance(envelope, MemberQuery):
            self._answer(peer, envelope)
        else:
            self._answered(peer, envelope)

    def _answer(self, peer: int, q: MemberQuery) -> None:
        host = self.driver.host
        if q.group not in host or q.group == self.meta_group:
            return
        r = host.node(q.group).raft
        if r.role is not Role.LEADER:
            return  # (only a leader's answer counts; the asker asks again)
        st = host.status(q.group)
        members = sorted({*st.voters, *st.learners})
        self.send(peer, _encode(MemberAnswer(q.qid, q.group, st.term, True, st.conf_pending,
                                             members)))  # fmt: skip
        self.stats.answered += 1

    def _answered(self, peer: int, a: MemberAnswer) -> None:
        asked = self._asked.pop(a.qid, None)
        if asked is None or asked.group != a.group:
            return
        if not a.leader or a.pending or self.id in a.members or a.term < asked.term:
            return
        host, g = self.driver.host, a.group

        def still() -> bool:
            if g not in host or self.placed(g):
                return False
            r = host.node(g).raft
            return (
                r.role is not Role.LEADER
                and r.term == asked.term
                and r.log.last_index() == asked.last_index
            )

        if not still():
            return
        logger.info(
            "group %d: node %d (leader, term %d) no longer counts this node: retiring it",
            g, peer, a.term,
        )  # fmt: skip
        self.stats.retired += 1
        self.retire(g, still)


__all__ = [
    "ANSWER_S",
    "ASKS_MAX",
    "ASK_S",
    "STRAY_ENVELOPES",
    "MemberAnswer",
    "MemberQuery",
    "StrayStats",
    "Strays",
]
