"""Agents in the demo page (ctxstore/static), in a real browser: Debian's chromium driven by
Playwright, a 3-node cluster and a real webhook agent (tests/ctxstore/agent_server.py, hypercorn).

Alice registers the agent and opens a session with it on one node; Bob follows the session on
another node.  Alice's question is answered by a call that is cut mid-stream and retried: both
pages draw the retry's chunks live as a draft (reasoning, the tool call with its output, the
text so far, marked as attempt 2) while the agent holds its stream open; when the agent
finishes, the stored assistant message replaces the draft on both pages, once.  A screenshot of
each state is saved in the test's tmp directory.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import uvloop
from playwright.async_api import Browser, Page, async_playwright, expect

from ctxstore.launcher import LocalCluster
from tests.ctxstore.agent_server import (
    HELD_INPUT,
    HELD_OUTPUT,
    HELD_REASONING,
    Served,
    agent_server,
    held_words,
)

pytestmark = pytest.mark.cluster

CHROMIUM = "/usr/bin/chromium"
FAST = ["--tick-ms", "20", "--groups", "16"]
WAIT_MS = 20_000


def compact(value: object) -> str:
    """JSON as JSON.stringify writes it."""
    return json.dumps(value, separators=(",", ":"))


async def open_page(
    browser: Browser, http: str, nodes: list[str], query: str, errors: list[str]
) -> Page:
    """A page of the demo, signed in by ``query``; its script errors go to ``errors``."""
    page = await browser.new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(f"http://{http}/?nodes={','.join(nodes)}&{query}")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    return page


def test_the_agent_streams_live_and_its_stored_reply_replaces_the_draft(tmp_path: Path) -> None:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    expect.set_options(timeout=WAIT_MS)

    async def main() -> None:
        cluster = LocalCluster(3, str(tmp_path / "cluster"), extra_args=FAST)
        await cluster.start()
        try:
            async with agent_server() as srv, async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM)
                try:
                    await scenario(cluster, srv, browser, tmp_path)
                finally:
                    await browser.close()
        finally:
            await cluster.stop()

    uvloop.run(asyncio.wait_for(main(), 120))


async def scenario(cluster: LocalCluster, srv: Served, browser: Browser, tmp_path: Path) -> None:
    srv.agent.plans["/held"] = ["cut", "held"]  # the first attempt is cut mid-stream
    ws = [f"ws://{c.ops_target}/v1/ws" for c in cluster.children.values()]
    http = [c.ops_target for c in cluster.children.values()]
    errors: list[str] = []
    alice = await open_page(browser, http[0], ws, "user=alice", errors)
    await alice.fill("#agent-id", "weather")
    await alice.fill("#agent-url", srv.url("/held"))
    await alice.click("#agent-form button")
    await expect(alice.locator("#agent-status")).to_contain_text("agent weather")
    await expect(alice.locator("#agent")).to_have_value("weather")
    await alice.click("#create button")
    session = alice.locator("#session-id")
    await expect(session).not_to_be_empty()
    sid = await session.inner_text()
    bob = await open_page(browser, http[1], [*ws[1:], ws[0]], f"user=bob&session={sid}", errors)
    await expect(bob.locator("#session-id")).to_have_text(sid)

    question = "what is the weather?"
    await alice.fill("#text", question)
    await alice.click("#send")
    words = held_words(question)
    for page in (alice, bob):  # the retry's chunks, live, while the agent holds its stream
        draft = page.locator("#messages li.draft")
        await expect(draft).to_have_attribute("data-attempt", "2")
        await expect(draft).to_have_attribute("data-state", "streaming")
        await expect(draft.locator(".content")).to_have_text("".join(words[:-1]))
        await expect(draft.locator(".from")).to_contain_text("attempt 2")
        await expect(draft.locator(".reasoning")).to_have_text(HELD_REASONING)
        tool = draft.locator(".tool")
        await expect(tool).to_have_attribute("data-state", "output-available")
        await expect(tool.locator(".tool-name")).to_have_text("weather")
        io = f"{compact(HELD_INPUT)} → {compact(HELD_OUTPUT)}"
        await expect(tool.locator(".tool-io")).to_have_text(io)
        await expect(page.locator("#messages li .content")).to_have_text(
            [question, "".join(words[:-1])]
        )
    await alice.screenshot(path=tmp_path / "draft.png", full_page=True)
    calls = [c for c in srv.agent.calls if c.path == "/held"]
    assert [c.body["attempt"] for c in calls] == [1, 2]

    srv.agent.release.set()
    for page in (alice, bob):  # the stored reply replaces the draft, once
        await expect(page.locator("#messages li.draft")).to_have_count(0)
        await expect(page.locator("#messages li .content")).to_have_text([question, "".join(words)])
        reply = page.locator("#messages li").nth(1)
        await expect(reply).to_have_attribute("data-seq", "2")
        await expect(reply.locator(".from")).to_have_text("#2 agent weather")
        await expect(reply.locator(".reasoning")).to_have_text(HELD_REASONING)
        await expect(reply.locator(".tool")).to_have_attribute("data-state", "output-available")
    await alice.screenshot(path=tmp_path / "stored.png", full_page=True)
    await asyncio.sleep(0.5)  # nothing more comes: no second reply, no draft again
    for page in (alice, bob):
        await expect(page.locator("#messages li")).to_have_count(2)
        await expect(page.locator("#error")).to_be_hidden()
    assert errors == []
