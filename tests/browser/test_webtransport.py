"""The demo page over WebTransport in a real browser (Debian's chromium, Playwright).

The page is never told to use WebTransport: ctxstore.js asks the node (``GET /v1/transports``,
docs/web.md §8.5) and, on a node with ``--h3`` and a self-signed certificate, connects over
WebTransport with the hash the node gave (the badge says so) and chats with a page told to use
the WebSocket (``?wt=0``), both ways, each message once, in order; a page given the hash
(``?wt=<SHA-256>``) still connects over WebTransport.  On a node without ``--h3``, and on one
whose certificate the browser refuses (a CA's it does not trust), the page connects over the
WebSocket, quickly.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
import trustme
import uvloop
from playwright.async_api import Browser, async_playwright, expect

from ctxstore.launcher import LocalCluster
from ctxstore.tlscert import generate

from .test_demo import CHROMIUM, FAST, WAIT_MS, Chat

pytestmark = pytest.mark.cluster

FALLBACK_S = 4.0  # a page on the WebSocket after a refused WebTransport (the client's bound: 2 s)


# the WebTransport sessions a page opens (their URLs), recorded before the page's scripts run
RECORD_SESSIONS = """
window.wtSessions = [];
const Real = window.WebTransport;
window.WebTransport = class extends Real {
  constructor(url, init) { window.wtSessions.push(url); super(url, init); }
};
"""


def _need_chromium() -> None:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")


async def _open(browser: Browser, http: str, query: str) -> Chat:
    page = await browser.new_page()
    await page.add_init_script(RECORD_SESSIONS)
    chat = Chat(page, query.split("user=")[1].split("&")[0])
    await page.goto(f"http://{http}/?{query}")
    await chat.node()
    return chat


def test_a_webtransport_page_chats_with_a_websocket_page(tmp_path: Path) -> None:
    _need_chromium()
    expect.set_options(timeout=WAIT_MS)
    cert = generate(str(tmp_path / "tls"))

    async def main() -> None:
        cluster = LocalCluster(
            1, str(tmp_path / "cluster"), extra_args=FAST, tls=(cert.cert_path, cert.key_path)
        )
        await cluster.start()
        try:
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM)
                try:
                    http = cluster.children[1].ops_target
                    # no ?wt=: WebTransport, because the node says it serves it
                    alice = await _open(browser, http, "user=alice")
                    helper = await _open(browser, http, "user=helper&wt=0")
                    status = alice.page.locator("#status")
                    await expect(status).to_have_attribute("data-transport", "webtransport")
                    await expect(status).to_contain_text("over WebTransport")
                    await expect(helper.page.locator("#status")).to_have_attribute(
                        "data-transport", "websocket"
                    )
                    await alice.page.fill("#agent", "helper")
                    await alice.page.click("#create button")
                    session = alice.page.locator("#session-id")
                    await expect(session).not_to_be_empty()
                    sid = await session.inner_text()
                    await helper.page.goto(f"http://{http}/?user=helper&wt=0&session={sid}")
                    await helper.node()
                    said: list[str] = []
                    for chat, text in ((alice, "hello over QUIC"), (helper, "hi from TCP"),
                                       (alice, "one more"), (helper, "and back")):  # fmt: skip
                        await chat.send(text)
                        said.append(text)
                        for page in (alice, helper):
                            await page.shows(said)
                    await alice.page.screenshot(path=str(tmp_path / "wt.png"))
                    wt = f"https://{http}/v1/wt"  # (cluster up: UDP on the HTTP port's number)
                    assert await alice.page.evaluate("wtSessions") == [wt]
                    assert await helper.page.evaluate("wtSessions") == []
                    # the explicit hash, as before
                    told = await _open(browser, http, f"user=bob&wt={cert.sha256}")
                    await expect(told.page.locator("#status")).to_have_attribute(
                        "data-transport", "webtransport"
                    )
                    assert not alice.errors and not helper.errors and not told.errors
                finally:
                    await browser.close()
        finally:
            await cluster.stop()

    uvloop.run(asyncio.wait_for(main(), 90))


def test_without_webtransport_the_page_is_on_the_websocket_quickly(tmp_path: Path) -> None:
    """No ``--h3``: the node says so and the page connects over the WebSocket at once; a node
    whose certificate the browser refuses (issued by a CA it does not trust, so no hash is
    advertised): the session fails and the page is on the WebSocket within the bound."""
    _need_chromium()
    expect.set_options(timeout=WAIT_MS)
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))

    async def main() -> None:
        plain = LocalCluster(1, str(tmp_path / "plain"), extra_args=FAST)
        untrusted = LocalCluster(
            1, str(tmp_path / "ca"), extra_args=FAST, tls=(str(chain), str(key))
        )
        await asyncio.gather(plain.start(), untrusted.start())
        try:
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM)
                try:
                    for cluster in (plain, untrusted):
                        http = cluster.children[1].ops_target
                        page = await browser.new_page()
                        await page.add_init_script(RECORD_SESSIONS)
                        chat = Chat(page, "carol")
                        # the page is loaded first: the time is the connection's only
                        await page.goto(f"http://{http}/")
                        await page.fill("#user", "carol")
                        started = time.monotonic()
                        await page.click("#signin-button")
                        await chat.node()
                        took = time.monotonic() - started
                        status = page.locator("#status")
                        await expect(status).to_have_attribute("data-transport", "websocket")
                        assert took < FALLBACK_S, (http, took)
                        tried = [] if cluster is plain else [f"https://{http}/v1/wt"]
                        assert await page.evaluate("wtSessions") == tried
                        assert not chat.errors
                        # another node's answer is readable from this page (another origin)
                        other = (untrusted if cluster is plain else plain).children[1].ops_target
                        found = await page.evaluate(
                            f"fetch('http://{other}/v1/transports').then((r) => r.json())"
                        )
                        assert (found["webtransport"] is None) == (cluster is not plain)
                finally:
                    await browser.close()
        finally:
            await asyncio.gather(plain.stop(), untrusted.stop())

    uvloop.run(asyncio.wait_for(main(), 90))
