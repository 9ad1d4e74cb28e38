"""The Raft core runs compiled (setup.py builds it with mypyc) unless the install asked for the
interpreted one: a build that failed must not fall back without anyone noticing."""

from __future__ import annotations

import importlib
import os

import pytest

COMPILED = [
    "log",
    "progress",
    "quorum",
    "readonly",
    "storage",
    "core",
    "rawnode",
    "multi",
    "driver",
    "wal_storage",
    "wal",
]


def _setup_list() -> list[str]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "setup.py")) as f:
        text = f.read()
    return [name for name in COMPILED if f'"raft/{name}.py"' in text]


def test_the_list_matches_setup_py() -> None:
    assert _setup_list() == COMPILED


@pytest.mark.skipif(
    os.environ.get("CTXSTORE_PURE_PYTHON") == "1", reason="installed without compiling"
)
@pytest.mark.parametrize("name", COMPILED)
def test_core_module_is_compiled(name: str) -> None:
    module = importlib.import_module(f"raft.{name}")
    assert module.__file__ is not None and module.__file__.endswith(".so"), module.__file__
