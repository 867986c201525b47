"""The app in a real browser: Debian's Chromium driven by Playwright, against the app served on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import hub
from tests.helpers import Served, missing

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def slow_steps(model, pause: float = 0.08):
    """Pause after each forward pass of the served model (a prefill or one decoding step), so the browser can
    watch the reply grow and act while it streams. Returns the hook's handle (``.remove()``)."""
    return model.register_forward_hook(lambda *_: time.sleep(pause))


@pytest.fixture
def browser_page():
    if not Path(CHROMIUM).exists():
        missing(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright import sync_api
    except ImportError:
        missing("playwright is not installed (pip install -e '.[test]')")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        try:
            yield page
        finally:
            browser.close()


@contextmanager
def opened(page, store: Path, *, slow: bool = True) -> Iterator[Served]:
    """Serve the app on the tiny model over ``store`` (each step slowed, so the page can watch replies stream),
    open it in ``page``, and close the server however the test ends."""
    served = Served(store)
    if slow:
        slow_steps(served.model)
    try:
        page.goto(served.url)
        page.wait_for_selector("#adapters", timeout=30_000)
        yield served
    finally:
        served.close()


def pick(page, *choices: str) -> None:
    """Open the adapter picker, tick each choice (a multiselect stays open), close it."""
    page.locator("#adapters input").first.click()
    for choice in choices:
        option = page.get_by_role("option", name=choice).first
        option.click()
        page.wait_for_function("(el) => el.getAttribute('aria-selected') === 'true'", arg=option.element_handle(),
                               timeout=10_000)
    page.locator("h1").first.click()  # close the list


def alnum(text: str) -> list[str]:
    return [c for c in text if c.isalnum()]


def bubbles(page, who: str) -> list[str]:
    return [t.strip() for t in page.locator(f"#chatbot .{who}").all_inner_texts()]


def test_mix_chat_and_save_in_a_browser(tmp_path, browser_page):
    page = browser_page
    with opened(page, tmp_path / "store") as served:
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
        # The chat renders Markdown, so compare the letters and digits of the reply (its first line names the mix).
        label, _, reply = reply.partition("\n")
        assert label.strip() == "mix: alice/math@v1 - 0.3*bob/code@v1"
        assert reply and alnum(reply) == alnum(expected)
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


def set_max_new(page, n: int) -> None:
    if not page.locator("#max-new input[type=number]").is_visible():
        page.get_by_text("Generation", exact=True).click()  # open the accordion
    page.locator("#max-new input[type=number]").fill(str(n))
    page.locator("#max-new input[type=number]").press("Enter")


def send(page, text: str) -> None:
    page.locator("#message textarea").fill(text)
    page.locator("#message textarea").press("Enter")


def test_messages_sent_while_a_reply_streams_are_answered_in_order(tmp_path, browser_page):
    """Two messages, the second sent while the first reply streams: both answered, in order, each with the
    conversation before it; then a mix change with history on screen offers a new conversation."""
    from app.engine import Engine
    from app.ui.conversation import unlabelled

    page = browser_page
    with opened(page, tmp_path / "store") as served:
        pick(page, "alice/math · road · v1")
        page.wait_for_function("() => document.querySelector('#expression textarea').value === 'alice/math@v1'",
                               timeout=10_000)
        set_max_new(page, 20)
        send(page, "Hello there")
        # Wait until the first reply is streaming (text under its mix line), then send the second message.
        page.wait_for_function("""() => { const b = document.querySelectorAll('#chatbot .bot');
            return b.length === 1 && b[0].innerText.trim().split('\\n').length > 1; }""", timeout=30_000)
        assert "Answered" not in page.locator("#chat-note").inner_text()
        send(page, "And then?")
        # the second message shows at once, as waiting, and the box is free for typing
        page.wait_for_function("() => document.querySelectorAll('#chatbot .user').length === 2", timeout=10_000)
        assert page.locator("#message textarea").input_value() == ""
        assert served.batcher.running is not None
        page.wait_for_function("""() => document.querySelectorAll('#chatbot .bot').length === 2
            && document.querySelector('#chat-note').innerText.includes('Answered under')""", timeout=60_000)
        assert bubbles(page, "user") == ["Hello there", "And then?"]
        # Each reply is what the engine alone answers to the conversation before it (the mix line cut off).
        adapter, _ = served.mixer.evaluate("alice/math@v1")
        engine = Engine(served.model, served.tok)
        first = engine.generate([{"messages": [{"role": "user", "content": "Hello there"}], "mix": adapter}],
                                max_new_tokens=20)[0]
        second = engine.generate([{"messages": [{"role": "user", "content": "Hello there"},
                                                {"role": "assistant", "content": first},
                                                {"role": "user", "content": "And then?"}], "mix": adapter}],
                                 max_new_tokens=20)[0]
        shown = bubbles(page, "bot")
        for text, ref in zip(shown, (first, second)):
            label, _, reply = text.partition("\n")
            assert label.strip() == "mix: alice/math@v1"
            assert alnum(reply) == alnum(ref)
        assert unlabelled("*mix: alice/math@v1*\n\n" + first)[1] == first

        # Change the mix with the conversation on screen: the page offers to start a new one, naming the mixes.
        assert not page.locator("#new-conversation").is_visible()
        slider = page.locator("#weight-0 input[type=range]")
        slider.focus()
        for _ in range(10):
            page.keyboard.press("ArrowLeft")
        page.wait_for_function("() => document.querySelector('#expression textarea').value === '0.5*alice/math@v1'",
                               timeout=10_000)
        offer = page.locator("#new-conversation")
        offer.wait_for(state="visible", timeout=10_000)
        page.wait_for_function(
            "() => document.querySelector('#new-conversation-text').innerText.includes('uses 0.5*alice/math@v1')",
            timeout=10_000)
        assert "made with alice/math@v1;" in page.locator("#new-conversation-text").inner_text()
        page.locator("#new-conversation-yes").click()
        page.wait_for_function("() => document.querySelectorAll('#chatbot .bot, #chatbot .user').length === 0",
                               timeout=10_000)
        assert not offer.is_visible()

        # The stop button ends a streaming reply: its row leaves the batch.
        set_max_new(page, 200)
        before = served.batcher.cancelled
        send(page, "Tell me everything")
        page.wait_for_function("""() => { const b = document.querySelectorAll('#chatbot .bot');
            return b.length === 1 && b[0].innerText.trim().split('\\n').length > 1; }""", timeout=30_000)
        page.locator("#stop").click()
        page.wait_for_function("() => document.querySelector('#chat-note').innerText.includes('Stopped under')",
                               timeout=30_000)
        assert served.batcher.cancelled == before + 1
        assert "0.5*alice/math@v1" in bubbles(page, "bot")[0].split("\n")[0]

        # Closing a tab while its reply streams cancels that row too.
        other = page.context.browser.new_page()
        other.goto(served.url)
        other.wait_for_selector("#adapters", timeout=30_000)
        set_max_new(other, 200)
        send(other, "Tell me a long story")
        other.wait_for_function("""() => { const b = document.querySelectorAll('#chatbot .bot');
            return b.length === 1 && b[0].innerText.trim().split('\\n').length > 1; }""", timeout=30_000)
        other.close()
        deadline = time.monotonic() + 30
        while served.batcher.cancelled < before + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert served.batcher.cancelled == before + 2
        assert not served.batcher.running.rows


def test_rough_edges_error_text_heat_map_and_descriptions(tmp_path, browser_page):
    page = browser_page
    with opened(page, tmp_path / "store", slow=False):
        pick(page, "alice/math · road · v1", "bob/code · road · v1")
        page.wait_for_function("() => document.querySelector('#expression textarea').value.includes('bob/code')",
                               timeout=10_000)
        # An error text with <...> and quotes keeps every word.
        page.locator("#save-name textarea, #save-name input").first.fill("bad/name@<x>")
        page.locator("#save").click()
        page.wait_for_function("() => document.querySelector('#save-status').innerText.includes('Not saved')",
                               timeout=30_000)
        status = page.locator("#save-status").inner_text()
        assert "'bad/name@<x>'" in status and "'@<commit sha>'" in status and "&#" not in status, status
        # A RoAd mix with a prompt vector; what each adapter does, from its card.
        pick(page, "carol/style · prompt · v1")
        page.wait_for_function("() => document.querySelector('#expression textarea').value.includes(' ; ')",
                               timeout=10_000)
        about = page.locator("#adapter-descriptions").inner_text()
        assert "alice/math@v1" in about and "carol/style@v1" in about and "stored with" in about
        # The heat map stays inside its column.
        page.wait_for_function("() => document.querySelectorAll('#heatmap td').length === 9", timeout=10_000)
        box = page.evaluate("""() => { const t = document.querySelector('#heatmap table');
            const c = document.querySelector('#heatmap').getBoundingClientRect();
            const r = t.getBoundingClientRect(); return [r.left, r.right, c.left, c.right]; }""")
        assert box[0] >= box[2] - 1 and box[1] <= box[3] + 1, box
        # The Adapters tab shows every column, description included, inside the page.
        page.get_by_role("tab", name="Adapters").click()
        page.get_by_text("description").first.wait_for(timeout=10_000)
        width = page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
        assert width
