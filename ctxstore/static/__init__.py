"""The demo page and the browser client, served by the HTTP port (docs/web.md "Demo page").

``GET /`` is ``index.html``; every other file of this directory with a known type is served at
``/static/<name>``: the page's script and style, and ``ctxstore.js``, the browser client
(``clients/js/ctxstore.js`` links to this copy, the only one).  The files are read once, when
the port opens: they are small and change only with the package.
"""

from __future__ import annotations

from importlib.resources import files

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


def assets() -> dict[bytes, tuple[str, bytes]]:
    """Each served path with its content type and body."""
    out: dict[bytes, tuple[str, bytes]] = {}
    for entry in files(__name__).iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        ctype = CONTENT_TYPES.get(suffix)
        if ctype is not None and entry.is_file():
            out[b"/static/" + entry.name.encode()] = (ctype, entry.read_bytes())
    out[b"/"] = out[b"/static/index.html"]
    return out
