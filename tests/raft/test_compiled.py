"""The Raft core runs compiled (setup.py builds it with mypyc) unless the install asked for the
interpreted one: a build that failed must not fall back without anyone noticing."""

from __future__ import annotations

import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with open(os.path.join(ROOT, "setup.py")) as _f:
    COMPILED = re.findall(r'^    "raft/(\w+)\.py",$', _f.read(), re.MULTILINE)  # as the Makefile


def test_setup_py_compiles_the_core_and_the_driver() -> None:
    assert {"core", "log", "rawnode", "multi", "driver", "wal"} <= set(COMPILED)


@pytest.mark.skipif(
    os.environ.get("CTXSTORE_PURE_PYTHON") == "1", reason="installed without compiling"
)
@pytest.mark.parametrize("name", COMPILED)
def test_core_module_is_compiled(name: str) -> None:
    module = importlib.import_module(f"raft.{name}")
    assert module.__file__ is not None and module.__file__.endswith(".so"), module.__file__
