"""Who may do what: the authorization table of the client operations (docs/auth.md).

A client's token names a principal (``sub``) and a role; every request is authorized by one
table, ``TABLE``: for each operation (the request's wire tag) and role, what the principal
reaches: ``ANY`` resource, only its ``OWN`` ones, or ``NONE``.

Rules of this file:
- Pure: no I/O, no clock, no token parsing (ctxstore/auth.py verifies tokens); the state machine
  (ctxstore/state.py) calls ``owns`` when it applies a command carrying an ``Actor``, so the
  leader enforces the rule the node that took the request checked.
- Own: a ``user`` owns the sessions whose ``user_id`` is its ``sub`` (and its inbox, its read
  cursors, its session list); an ``agent`` the sessions whose ``agent_id`` is its ``sub``.
  A ``service`` reaches everything.  An operation missing from the table (the agent registry,
  admin requests) is for services only.
- A token's ``sessions`` claim narrows it to the listed session ids; such a token reaches no
  per-user listing (``list_sessions``, ``subscribe_inbox``), which would name other sessions.
- Refusals are ``forbidden`` and read the same whether or not the session exists.
"""

from __future__ import annotations

from typing import Final, Literal

Role = Literal["user", "agent", "service"]
Access = Literal["any", "own", "none"]
ANY: Final = "any"
OWN: Final = "own"
NONE: Final = "none"

FORBIDDEN_MESSAGE: Final = "this token may not do that (or the session does not exist)"
"""One message for every refusal of a resource: a refusal never tells whether it exists."""

# operation (wire tag) -> (user, agent); a service reaches everything.
TABLE: Final[dict[str, tuple[Access, Access]]] = {
    "create_session": (OWN, NONE),  # user: its own user_id
    "get_session": (OWN, OWN),
    "list_sessions": (OWN, NONE),  # user: its own user_id
    "append": (OWN, OWN),  # the sender is the token's (user / agent)
    "read": (OWN, OWN),
    "subscribe": (OWN, OWN),
    "subscribe_inbox": (OWN, NONE),  # user: its own user_id
    "mark_read": (OWN, NONE),  # user: its own user_id, on its own session
    "set_context_config": (OWN, OWN),
    "get_context": (OWN, OWN),
    "compact": (OWN, OWN),
    "unsubscribe": (ANY, ANY),  # the connection's own subscriptions
    "ping": (ANY, ANY),
    "get_routes": (ANY, ANY),
}

USER_KEYED: Final = frozenset({"create_session", "list_sessions", "subscribe_inbox", "mark_read"})
"""Operations naming a ``user_id``: a user token may name only its own ``sub``."""
LISTINGS: Final = frozenset({"list_sessions", "subscribe_inbox"})
"""Operations a token narrowed by a ``sessions`` claim may not use."""


def access(role: str, operation: str) -> Access:
    """What ``role`` reaches with ``operation``."""
    if role == "service":
        return ANY
    pair = TABLE.get(operation)
    if pair is None:
        return NONE
    if role == "user":
        return pair[0]
    if role == "agent":
        return pair[1]
    return NONE


def owns(role: str, sub: str, user_id: str, agent_id: str) -> bool:
    """Whether ``role``/``sub`` owns the session of ``user_id`` and ``agent_id``."""
    if role == "service":
        return True
    if role == "user":
        return user_id == sub
    if role == "agent":
        return agent_id == sub
    return False


def admit(
    role: str,
    sub: str,
    sessions: frozenset[str] | None,
    operation: str,
    session_id: str | None,
    user_id: str | None,
) -> bool:
    """The checks that need no state: whether ``operation`` on ``session_id`` (a session's
    id, if the request names one; None for create_session without an id) and ``user_id`` (if
    it names one) may go on.  A session's owner is checked later, against its state
    (``owns``)."""
    if access(role, operation) == NONE:
        return False
    if sessions is not None:
        if operation in LISTINGS:
            return False
        names_session = session_id is not None or operation == "create_session"
        if names_session and (session_id is None or session_id not in sessions):
            return False
    return not (role == "user" and operation in USER_KEYED and user_id != sub)


__all__ = [
    "ANY",
    "FORBIDDEN_MESSAGE",
    "LISTINGS",
    "NONE",
    "OWN",
    "TABLE",
    "USER_KEYED",
    "Access",
    "Role",
    "access",
    "admit",
    "owns",
]
