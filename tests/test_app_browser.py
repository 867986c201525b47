"""The app in a real browser: Debian's Chromium driven by Playwright, against the app served on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

import hub
from tests.test_app_tiny import Served

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


class SlowSteps:
    """The served engine with a pause after each decoding step, so the browser can watch the reply grow."""

    def __init__(self, engine, pause: float = 0.08) -> None:
        self._engine = engine
        self._pause = pause

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate_tokens(self, *args, **kwargs):
        for step in self._engine.generate_tokens(*args, **kwargs):
            time.sleep(self._pause)
            yield step


@pytest.fixture
def browser_page():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        try:
            yield page
        finally:
            browser.close()


def pick(page, *choices: str) -> None:
    """Open the adapter picker, tick each choice (a multiselect stays open), close it."""
    page.locator("#adapters input").first.click()
    for choice in choices:
        option = page.get_by_role("option", name=choice).first
        option.click()
        page.wait_for_function("(el) => el.getAttribute('aria-selected') === 'true'", arg=option.element_handle(),
                               timeout=10_000)
    page.locator("h1").first.click()  # close the list


def test_mix_chat_and_save_in_a_browser(tmp_path, browser_page):
    served = Served(tmp_path / "store")
    served.batcher.engine = SlowSteps(served.batcher.engine)
    page = browser_page
    try:
        page.goto(served.url)
        page.wait_for_selector("#adapters", timeout=30_000)

        # Pick two adapters: a weight slider appears for each.
        pick(page, "alice/math · road · v1", "bob/code · road · v1")
        page.wait_for_selector("#weight-1 input[type=range]", state="visible", timeout=10_000)
        expression = page.locator("#expression textarea")
        page.wait_for_function("() => document.querySelector('#expression textarea').value.includes('bob/code')",
                               timeout=10_000)
        assert expression.input_value() == "alice/math@v1 + bob/code@v1"

        # Move the second slider down to subtract that task (0.05 per key press).
        slider = page.locator("#weight-1 input[type=range]")
        slider.focus()
        for _ in range(26):
            page.keyboard.press("ArrowLeft")
        page.wait_for_function(
            "() => document.querySelector('#expression textarea').value === 'alice/math@v1 - 0.3*bob/code@v1'",
            timeout=10_000)
        assert "Exact" in page.locator("#deviation").inner_text()
        assert page.locator("#heatmap td").count() == 4
        assert "-0.07" in page.locator("#heatmap").inner_text()  # the subtracted task shows as opposed

        # Chat: watch the reply grow, step by step.
        page.evaluate("""() => {
            window.__lengths = [];
            new MutationObserver(() => {
                const bots = document.querySelectorAll('#chatbot .bot');
                if (bots.length) window.__lengths.push(bots[bots.length - 1].innerText.length);
            }).observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
        }""")
        page.get_by_text("Generation", exact=True).click()  # open the accordion
        page.locator("#max-new input[type=number]").fill("24")
        page.locator("#max-new input[type=number]").press("Enter")
        page.locator("#message textarea").fill("Hello there")
        page.locator("#message textarea").press("Enter")
        page.wait_for_function("() => document.querySelector('#chat-note').innerText.includes('Answered under')",
                               timeout=60_000)
        reply = page.locator("#chatbot .bot").last.inner_text().strip()
        expected = served.alone("alice/math@v1 - 0.3*bob/code@v1", "Hello there", max_new_tokens=24).strip()
        # The chat renders Markdown, so compare the letters and digits of the reply.
        assert reply and [c for c in reply if c.isalnum()] == [c for c in expected if c.isalnum()]
        lengths = [n for n in page.evaluate("window.__lengths") if n > 0]
        assert len(set(lengths)) > 2, lengths  # the reply arrived in pieces

        # An empty message gets a warning, not an answer.
        page.locator("#message textarea").fill("")
        page.locator("#message textarea").press("Enter")
        page.get_by_text("Type a message first").first.wait_for(timeout=10_000)
        assert page.locator("#chatbot .bot").count() == 1

        # Save the mix: the new version is in the store, the picker and the table at once.
        page.locator("#save-name textarea, #save-name input").first.fill("me/browser-mix")
        page.locator("#save").click()
        page.wait_for_function("() => document.querySelector('#save-status').innerText.includes('me/browser-mix@v1')",
                               timeout=30_000)
        assert hub.log("me/browser-mix", root=served.root)[0]["tags"] == ["v1"]
        page.locator("#adapters input").first.click()
        assert page.get_by_role("option", name="me/browser-mix · road · v1").count() == 1
        page.keyboard.press("Escape")
        shot = tmp_path / "app.png"
        page.screenshot(path=str(shot), full_page=True)
        page.get_by_role("tab", name="Adapters").click()
        page.get_by_text("me/browser-mix").first.wait_for(timeout=10_000)
        assert shot.stat().st_size > 10_000
        if os.environ.get("APP_SCREENSHOT"):
            shutil.copy(shot, os.environ["APP_SCREENSHOT"])
    finally:
        served.close()
