"""wire package (see docs/architecture.md §4; docs/protocol.md).

- ``protocol``: the messages of the native binary protocol (the contract): requests,
  responses, and pushes (subscription events).
- ``framing``: its frames and connection states, sans I/O (``ServerConnection``,
  ``ClientConnection``).
- ``aio``: the asyncio server (``serve``, ``Handler``, ``BaseHandler``; ``Connection.push``).
- ``client``: the Python client (``connect``, ``Client``); ``client_connection``: one of its
  connections; ``subscription``: its subscriptions that resume by themselves
  (``Subscription``, ``InboxSubscription``; their states in ``TRANSITIONS``).
- ``errors``: ``ClientError``, ``LocalProtocolError``.

Imports neither ``raft`` nor ``ctxstore``.  ``framing`` is compiled with mypyc when the package
is installed (setup.py); importing the package refuses a compiled module older than its source.
"""

from . import _build  # noqa: F401  (first: refuses a stale compiled module)
