"""The layering rules of design.md §2, checked by reading the source with ``ast`` (no imports).

- Dependency direction: raft and wire import neither each other nor the product; only bench
  may import bench; bench uses ctxstore only through its public client (``wire``) and its
  commands (the launcher of ``ctxstore cluster up``, or a subprocess), never its internals.
- Purity: the consensus core and the domain state machine import no I/O, no clock and no global
  randomness.  Randomness enters only as a ``random.Random`` built from a seed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("raft", "wire", "ctxstore", "bench")

# package -> top-level packages it must never import
FORBIDDEN_DEPS: dict[str, frozenset[str]] = {
    "raft": frozenset({"wire", "ctxstore", "bench"}),
    "wire": frozenset({"raft", "ctxstore", "bench"}),
    "ctxstore": frozenset({"bench"}),
    "bench": frozenset(),
}

# The only modules of ctxstore bench may import: the launcher behind ``ctxstore cluster up``.
BENCH_MAY_IMPORT = frozenset({"ctxstore.launcher"})

# The raft modules allowed to do I/O.  Every other module under raft/ is pure.
RAFT_IO_MODULES = frozenset(
    {
        "raft/wal.py",
        "raft/wal_segments.py",
        "raft/transport.py",
        "raft/driver.py",
        "raft/logs.py",  # log lines' timestamps (the test node's and ctxstore serve's)
        "raft/_build.py",  # compares the compiled modules' file times with their sources'
    }
)
# Pure modules outside raft/ (the domain state machine).
PURE_MODULES = frozenset(
    {
        "ctxstore/state.py",
        "ctxstore/state_schema.py",
        "ctxstore/commands.py",
        "ctxstore/placement.py",
        "ctxstore/membership.py",
        "ctxstore/reconciler.py",
        "ctxstore/meta.py",
    }
)

IMPURE_IMPORTS = frozenset(
    {
        "asyncio", "socket", "time", "os", "threading", "selectors", "subprocess", "datetime",
        "uuid", "secrets", "signal", "sqlite3", "ssl",
    }
)  # fmt: skip


def is_pure(rel: str) -> bool:
    return (rel.startswith("raft/") and rel not in RAFT_IO_MODULES) or rel in PURE_MODULES


def resolve(node: ast.ImportFrom, rel: str) -> str | None:
    """The absolute module a ``from`` import names; None if it climbs out of the package."""
    if node.level == 0:
        return node.module or ""
    package = Path(rel).parent.parts  # for a/__init__.py and a/b.py alike: ("a",)
    if node.level - 1 >= len(package):
        return None
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def check_source(source: str, rel: str) -> list[str]:
    """Violations of the layering rules in ``source``, the file at ``rel`` (e.g. raft/core.py)."""
    tree = ast.parse(source, filename=rel)
    forbidden = FORBIDDEN_DEPS.get(rel.split("/")[0], frozenset())
    pure = is_pure(rel)
    out: list[str] = []
    random_names: set[str] = set()  # names bound to the random module

    def bad(node: ast.AST, message: str) -> None:
        out.append(f"{rel}:{getattr(node, 'lineno', 0)}: {message}")

    bench = rel.startswith("bench/")

    def bench_reaches_inside(module: str) -> bool:
        return bench and module.split(".")[0] == "ctxstore" and module not in BENCH_MAY_IMPORT

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in forbidden:
                    bad(node, f"{rel.split('/')[0]}/ must not import {top} (import {alias.name})")
                if bench_reaches_inside(alias.name):
                    bad(node, f"bench/ must not use ctxstore's internals (import {alias.name})")
                if pure and top in IMPURE_IMPORTS:
                    bad(node, f"pure module imports {alias.name} (I/O, clock or nondeterminism)")
                if top == "random":
                    random_names.add(alias.asname or "random")
        elif isinstance(node, ast.ImportFrom):
            module = resolve(node, rel)
            if module is None:
                bad(node, f"relative import (level {node.level}) climbs out of its package")
                continue
            top = module.split(".")[0]
            if top in forbidden:
                bad(node, f"{rel.split('/')[0]}/ must not import {top} (from {module} import ...)")
            names = [module] if module != "ctxstore" else [f"ctxstore.{a.name}" for a in node.names]
            for name in names:
                if bench_reaches_inside(name):
                    bad(node, f"bench/ must not use ctxstore's internals (from {module} import)")
            if pure and top in IMPURE_IMPORTS:
                bad(node, f"pure module imports from {module} (I/O, clock or nondeterminism)")
            if pure and module == "random":
                for alias in node.names:
                    if alias.name != "Random":
                        bad(node, f"pure module imports random.{alias.name}; use random.Random")
    if pure:
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in random_names
                and node.attr != "Random"
            ):
                bad(node, f"pure module uses the global generator random.{node.attr}")
    return out


def source_files() -> list[str]:
    return sorted(
        p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
    )


def test_packages_respect_layering_and_purity() -> None:
    files = source_files()
    assert "raft/core.py" in files, f"no sources found under {ROOT}"
    violations = [v for rel in files for v in check_source((ROOT / rel).read_text("utf-8"), rel)]
    assert not violations, "layering violations:\n" + "\n".join(violations)


@pytest.mark.parametrize(
    ("rel", "source"),
    [
        ("raft/core.py", "import asyncio"),
        ("raft/core.py", "from wire import x"),
        ("raft/core.py", "import ctxstore.state"),
        ("raft/sub/mod.py", "import os.path"),  # a future raft module is pure by default
        ("raft/log.py", "import random\nx = random.randrange(3)"),
        ("raft/log.py", "import random as r\nr.seed(1)"),
        ("raft/log.py", "from random import choice"),
        ("raft/log.py", "from ..wire import x"),
        ("wire/codec.py", "from raft.messages import Entry"),
        ("ctxstore/state.py", "from time import monotonic"),
        ("ctxstore/server.py", "from bench import cli"),
        ("bench/load.py", "from ctxstore.placement import group_of"),
        ("bench/load.py", "import ctxstore.archive"),
        ("bench/load.py", "from ctxstore import state"),
    ],
)
def test_checker_reports_violations(rel: str, source: str) -> None:
    violations = check_source(source, rel)
    assert violations, f"no violation reported for {source!r} in {rel}"
    assert all(v.startswith(f"{rel}:") for v in violations)


def test_violation_names_file_and_line() -> None:
    assert check_source('"""Doc."""\n\nimport socket\n', "raft/quorum.py") == [
        "raft/quorum.py:3: pure module imports socket (I/O, clock or nondeterminism)"
    ]


@pytest.mark.parametrize(
    ("rel", "source"),
    [
        ("raft/core.py", "import random\nrng = random.Random(7)\nrng.random()"),
        ("raft/core.py", "from random import Random\nfrom . import log\nfrom .errors import E"),
        ("raft/wal.py", "import os\nimport threading\nos.fsync(3)"),
        ("ctxstore/server.py", "import asyncio\nfrom raft import RawNode\nfrom wire import x"),
        ("bench/cli.py", "import time\nfrom wire import client\nfrom ctxstore import launcher"),
        ("bench/scenarios.py", "from ctxstore.launcher import LocalCluster\nimport raft.wal"),
    ],
)
def test_checker_accepts_allowed_imports(rel: str, source: str) -> None:
    assert check_source(source, rel) == []
