"""The demo page over WebTransport in a real browser (Debian's chromium, Playwright): a page
given the node's self-signed certificate hash (``?wt=<SHA-256>``) connects over WebTransport
(docs/web.md §8) and chats with a page on a WebSocket, both ways, each message once, in order.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import uvloop
from playwright.async_api import async_playwright, expect

from ctxstore.launcher import LocalCluster
from ctxstore.tlscert import generate

from .test_demo import CHROMIUM, FAST, WAIT_MS, Chat

pytestmark = pytest.mark.cluster


def test_a_webtransport_page_chats_with_a_websocket_page(tmp_path: Path) -> None:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
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
                    pages = []
                    for query in (f"user=alice&wt={cert.sha256}", "user=helper"):
                        page = await browser.new_page()
                        chat = Chat(page, query.split("user=")[1].split("&")[0])
                        await page.goto(f"http://{http}/?{query}")
                        await chat.node()
                        pages.append(chat)
                    alice, helper = pages
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
                    await helper.page.goto(f"http://{http}/?user=helper&session={sid}")
                    await helper.node()
                    said: list[str] = []
                    for chat, text in ((alice, "hello over QUIC"), (helper, "hi from TCP"),
                                       (alice, "one more"), (helper, "and back")):  # fmt: skip
                        await chat.send(text)
                        said.append(text)
                        for page in (alice, helper):
                            await page.shows(said)
                    await alice.page.screenshot(path=str(tmp_path / "wt.png"))
                    assert not alice.errors and not helper.errors
                finally:
                    await browser.close()
        finally:
            await cluster.stop()

    uvloop.run(asyncio.wait_for(main(), 90))
