"""The demo page (ctxstore/static) in a real browser: Debian's chromium driven by Playwright.

Two pages chat in one session on a 3-node cluster; the node the first page is connected to is
killed with kill -9 mid-conversation, and both pages go on through the others with every
message exactly once, in order, each with its token count, and the session's context window
with their sum; the first page's inbox counts the unread messages and clears them on
mark-read.  A screenshot of the page is saved in the test's tmp directory.

Chromium is the system's (``.ci/run`` installs the ``chromium`` package when it is missing);
Playwright never downloads a browser here.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from pathlib import Path

import pytest
import uvloop
from playwright.async_api import Browser, Locator, Page, async_playwright, expect

from ctxstore.launcher import LocalCluster

pytestmark = pytest.mark.cluster

CHROMIUM = "/usr/bin/chromium"
FAST = ["--tick-ms", "20", "--groups", "16"]
WAIT_MS = 20_000  # an explicit wait for page content (elections after the kill included)


class Chat:
    """One page of the demo, signed in as ``user``."""

    def __init__(self, page: Page, user: str) -> None:
        self.page = page
        self.user = user
        self.errors: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    async def node(self) -> int:
        status = self.page.locator("#status")
        await expect(status).to_have_attribute("data-state", "connected")
        return int(await status.get_attribute("data-node") or 0)

    async def send(self, text: str) -> None:
        await self.page.fill("#text", text)
        await self.page.click("#send")

    async def shows(self, contents: list[str]) -> None:
        """Exactly these messages, in this order (each once)."""
        await expect(self.page.locator("#messages li .content")).to_have_text(contents)

    def unread(self, session_id: str) -> Locator:
        return self.page.locator(f"#inbox li[data-session='{session_id}'] .unread")


def configure_window(http: str, session_id: str) -> None:
    """Open the session's context window (manual, a budget no chat here reaches)."""
    config = {"token_budget": 100_000, "trigger_ratio": 0.7, "policy": {"type": "manual"}}
    request = urllib.request.Request(
        f"http://{http}/v1/sessions/{session_id}/context/config",
        data=json.dumps(config).encode(), headers={"content-type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


async def open_chat(browser: Browser, http: str, nodes: list[str], query: str) -> Chat:
    page = await browser.new_page()
    user = query.split("user=")[1].split("&")[0]
    chat = Chat(page, user)
    await page.goto(f"http://{http}/?nodes={','.join(nodes)}&{query}")
    await chat.node()
    return chat


def test_two_pages_chat_through_a_kill_9_and_the_inbox_counts_unread(tmp_path: Path) -> None:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    expect.set_options(timeout=WAIT_MS)

    async def main() -> None:
        cluster = LocalCluster(3, str(tmp_path / "cluster"), extra_args=FAST)
        await cluster.start()
        try:
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM)
                try:
                    await scenario(cluster, browser, tmp_path)
                finally:
                    await browser.close()
        finally:
            await cluster.stop()

    uvloop.run(asyncio.wait_for(main(), 120))


async def scenario(cluster: LocalCluster, browser: Browser, tmp_path: Path) -> None:
    ws = [f"ws://{c.ops_target}/v1/ws" for c in cluster.children.values()]
    http = [c.ops_target for c in cluster.children.values()]
    alice = await open_chat(browser, http[0], ws, "user=alice")
    await alice.page.fill("#agent", "helper")
    await alice.page.click("#create button")
    session = alice.page.locator("#session-id")
    await expect(session).not_to_be_empty()
    sid = await session.inner_text()
    helper = await open_chat(browser, http[1], [*ws[1:], ws[0]], f"user=helper&session={sid}")
    await expect(helper.page.locator("#session-id")).to_have_text(sid)
    for chat in (alice, helper):
        await expect(chat.page.locator("#window")).to_have_text("no context window")
    await asyncio.to_thread(configure_window, http[2], sid)  # both pages get its event
    for chat in (alice, helper):
        await expect(chat.page.locator("#window")).to_contain_text("0 / 100000 tokens")

    said: list[str] = []

    async def say(chat: Chat, text: str) -> None:
        await chat.send(text)
        said.append(text)
        for page in (alice, helper):  # acknowledged and pushed to both before the next
            await page.shows(said)

    await say(alice, "hello, is anyone there?")
    await say(helper, "hi alice, how can I help?")
    await say(alice, "my order is late")

    killed = await alice.node()
    cluster.kill(killed)  # kill -9, mid-conversation
    await say(alice, "it was due on monday")  # sent as the node dies: retried elsewhere
    assert await alice.node() != killed
    await say(helper, "let me look it up")
    await say(alice, "thanks")
    await say(helper, "it ships tomorrow")
    await say(helper, "anything else?")

    unread = alice.unread(sid)
    await expect(unread).to_have_text("2")  # helper's last two, after alice's "thanks"
    # each message shows its token count; the session's window, their sum (manual policy)
    for chat in (alice, helper):
        texts = await chat.page.locator("#messages li .tokens").all_inner_texts()
        tokens = [int(t.split()[0]) for t in texts]
        assert len(tokens) == len(said) and all(n > 0 for n in tokens), texts
        window = chat.page.locator("#window")
        await expect(window).to_have_attribute("data-tokens", str(sum(tokens)))
        await expect(window).to_have_attribute("data-needs-compaction", "false")
    await alice.page.screenshot(path=tmp_path / "demo.png", full_page=True)
    await alice.page.click("#mark-read")
    await expect(unread).to_have_text("0")
    await expect(alice.page.locator("#error")).to_be_hidden()
    assert alice.errors == [] and helper.errors == []
