"""Builds the Raft core, the conversation state and the client protocol's framing with mypyc
(docs/raft.md "Compiled core"); everything else is in pyproject.toml.  ``CTXSTORE_PURE_PYTHON=1``
builds nothing: the same modules run interpreted.

The compiled modules are the deterministic core, the driver, the WAL's bookkeeping, the state
machine every replica applies (with its context windows) and the sans-I/O frame codec both
ends of a client connection run (``wire/framing.py``): strictly typed logic on the hot path of
every append.  They define
no wire Struct (mypyc erases the annotations msgspec reads: ctxstore/state_schema.py).

The WAL's record codec, the transport and the codecs stay interpreted: they spend their time in
the kernel, uvloop and msgspec, meet untyped objects from them, and define wire and disk
Structs.  What compiling changes, and what to keep out of compiled code: docs/raft.md."""

import os

from setuptools import setup

COMPILED = [
    "raft/log.py",
    "raft/progress.py",
    "raft/quorum.py",
    "raft/readonly.py",
    "raft/storage.py",
    "raft/core.py",
    "raft/rawnode.py",
    "raft/multi.py",
    "raft/pipeline.py",
    "raft/driver.py",
    "raft/wal_storage.py",
    "raft/wal.py",
    "raft/wal_segments.py",
    "ctxstore/state.py",
    "ctxstore/window.py",
    "wire/framing.py",
]

ext_modules = []
if os.environ.get("CTXSTORE_PURE_PYTHON", "") != "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(COMPILED, opt_level="3")

setup(ext_modules=ext_modules)
