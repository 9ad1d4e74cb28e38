"""The demo page's files (ctxstore/static): what is served, and that it is shipped."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

from ctxstore.static import CONTENT_TYPES, assets

ROOT = Path(__file__).parents[2]
STATIC = ROOT / "ctxstore" / "static"


def test_the_page_and_the_client_are_served_with_their_types() -> None:
    served = assets()
    assert served[b"/"] == served[b"/static/index.html"]
    assert served[b"/static/ctxstore.js"][0] == "text/javascript; charset=utf-8"
    assert served[b"/static/ctxstore.js"][1] == (STATIC / "ctxstore.js").read_bytes()
    assert {b"/static/demo.js", b"/static/demo.css"} <= served.keys()
    assert b"/static/__init__.py" not in served


def test_there_is_one_copy_of_the_browser_client() -> None:
    link = ROOT / "clients" / "js" / "ctxstore.js"
    assert link.is_symlink() and link.resolve() == (STATIC / "ctxstore.js").resolve()


def test_every_served_file_is_package_data() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["ctxstore.static"]
    for path in STATIC.iterdir():
        if path.suffix in CONTENT_TYPES:
            assert any(fnmatch.fnmatch(path.name, p) for p in patterns), path.name
