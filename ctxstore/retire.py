"""A node leaves a group: its Raft group, state and archive rows go, in a crash-safe order
(design §5.6, docs/raft.md "WAL: group tombstones").

The driver reports a group once this node applied its own removal from the group's membership
(``Driver.on_removed``); ``Retirer.retire`` then drops it:

1. Raft: ``Driver.remove_group`` stops the group at once (no entry is applied after it) and
   writes a tombstone to the WAL;  the state is dropped in the same step
   (``ConversationState.drop_group``), so nothing of the group is served from then on;
2. once the tombstone is durable, the archive deletes the group's rows
   (``Archive.drop_group``, on its writer thread, with the sessions the state held).

What a restart sees after a crash at any point:

- before the tombstone is durable: the group is whole in the WAL, the state is rebuilt from it
  and the archive still holds its rows (nothing was deleted yet).  The node applies its
  removal again (the pipeline takes no snapshot past it) and retires the group again;
- after it, before the archive drop committed (or in the middle of it): the WAL no longer
  knows the group, so it is not hosted and the state is empty; the archive still holds its
  index row (deleted last), and ``recover`` drops what is left;
- after both: nothing of the group is left.

The archive is never dropped before the tombstone is durable: a restart must not find a group
whose log was compacted up to rows that are gone.  While a group is retiring (``retiring``),
the node must not host it again; afterwards it may, empty, and it comes back as a learner
that receives a snapshot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from raft import GroupNotHosted
from raft.driver import Driver

from .archive import Archive
from .state import ConversationState

logger = logging.getLogger(__name__)


class Retirer:
    def __init__(self, driver: Driver, state: ConversationState, archive: Archive) -> None:
        self.driver = driver
        self.state = state
        self.archive = archive
        self.retiring: set[int] = set()  # groups being retired: not to be hosted again yet
        self.retired = 0

    async def retire(self, group: int, still: Callable[[], bool] | None = None) -> None:
        """Drop ``group`` from this node: Raft and state now, the archive once the tombstone is
        durable.  Raises ``NodeStopped`` if the driver stops first (a restart finishes it).
        With ``still``: nothing is done unless ``still()`` holds in the step that removes the
        group (ctxstore/strays.py: its copy did not change since its leader was asked)."""
        if group in self.retiring:
            return
        if still is not None and not still():
            return
        self.retiring.add(group)
        try:
            try:
                durable = self.driver.remove_group(group)
            except GroupNotHosted:
                durable = None  # removed already (a retirement cut short): the rest only
            sessions = self.state.drop_group(group)
            if durable is not None:
                await durable
            await self.archive.drop_group(group, sessions)
        finally:
            self.retiring.discard(group)
        self.retired += 1
        logger.info("group %d retired from this node (%d sessions)", group, len(sessions))

    async def recover(self, removed: Iterable[int]) -> list[int]:
        """At start, after the archive started: finish the retirements a crash cut short (the
        WAL's ``removed`` groups the archive still holds).  Returns those groups."""
        out = []
        for group in removed:
            if self.archive.holds_group(group):
                await self.archive.drop_group(group)  # the state no longer knows its sessions
                out.append(group)
        if out:
            logger.info("finished retiring groups %s", out)
        return out


__all__ = ["Retirer"]
