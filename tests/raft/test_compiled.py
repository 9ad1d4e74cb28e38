"""The Raft core and the conversation state run compiled (setup.py builds them with mypyc)
unless the install asked for interpreted modules: a build that failed must not fall back without
anyone noticing, and a compiled module must not run older code than its source."""

from __future__ import annotations

import ast
import importlib
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from raft import _build as raft_build
from wire import _build as wire_build

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with open(os.path.join(ROOT, "setup.py")) as _f:
    COMPILED = re.findall(r'^    "(\w+/\w+)\.py",$', _f.read(), re.MULTILINE)  # as the Makefile


def test_setup_py_compiles_the_core_the_driver_the_state_and_the_framing() -> None:
    core = {"raft/core", "raft/log", "raft/rawnode", "raft/multi", "raft/driver", "raft/wal"}
    core.add("raft/pipeline")
    assert core <= set(COMPILED)
    assert {"ctxstore/state", "wire/framing"} <= set(COMPILED)


@pytest.mark.skipif(
    os.environ.get("CTXSTORE_PURE_PYTHON") == "1", reason="installed without compiling"
)
@pytest.mark.parametrize("name", COMPILED)
def test_module_is_compiled(name: str) -> None:
    module = importlib.import_module(name.replace("/", "."))
    assert module.__file__ is not None and module.__file__.endswith(".so"), module.__file__


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_module_defines_no_wire_struct(name: str) -> None:
    """mypyc erases a class's annotations and drops its class keywords: a msgspec Struct of a
    compiled module encodes and decodes another schema than its source says.  In-process values
    (``SoftState``) may be Structs there; wire and disk types (``array_like``, ``tag``) may not
    (ctxstore/state_schema.py, raft/messages.py)."""
    tree = ast.parse(Path(ROOT, f"{name}.py").read_text())
    wire = [
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and any("Struct" in ast.unparse(base) for base in node.bases)
        and any(k.arg in ("array_like", "tag", "tag_field", "rename") for k in node.keywords)
    ]
    assert wire == [], f"{name}.py defines wire Structs {wire}"


@pytest.mark.parametrize(
    "refuse_stale_builds",
    [raft_build.refuse_stale_builds, wire_build.refuse_stale_builds],
    ids=["raft", "wire"],
)
def test_a_compiled_module_older_than_its_source_is_refused(
    tmp_path: Path, refuse_stale_builds: Callable[[str], None]
) -> None:
    built, source = tmp_path / "m.cpython-311-x86_64-linux-gnu.so", tmp_path / "m.py"
    built.write_bytes(b"")
    source.write_text("")
    os.utime(built, (1_000, 1_000))
    os.utime(source, (2_000, 2_000))
    with pytest.raises(ImportError, match="is older than"):
        refuse_stale_builds(str(tmp_path))
    os.utime(built, (3_000, 3_000))
    refuse_stale_builds(str(tmp_path))  # rebuilt: accepted
