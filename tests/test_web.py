"""The Gradio chat page in a real headless Chromium (Debian's ``chromium`` package, driven by Playwright).

The page runs on the API server's app (``serve --web``); the browser picks a prefix, sends a message, watches the
reply stream in, regenerates, clears, changes a knob, and compares base and prefix side by side. Every greedy reply
must equal ``generate_replies`` for that prefix alone. The page may not request anything outside the server.
"""

import os
import shutil
import time

import pytest

from ptuning.server import build
from test_server import files, running, slow_down, solo  # noqa: F401 - files is a fixture

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="headless browser test needs Debian's chromium: apt-get install -y chromium")


@pytest.fixture(scope="module")
def page_server(files):  # noqa: F811
    model_dir, dirs, _, _ = files
    app, _ = build(["--model_name_or_path", model_dir, "--prefix", f"support={dirs['support']}",
                    "--prefix", f"legal={dirs['legal']}", "--max_tokens", "64", "--web"])
    with running(app) as url:
        yield url, app.state.service


@needs_chromium
def test_chat_page_streams_regenerates_clears_and_compares(page_server, files, tmp_path, monkeypatch):  # noqa: F811
    from playwright import sync_api as playwright
    url, service = page_server
    slow_down(monkeypatch, service.engine, 0.015)  # 15 ms a token, so the browser can see the reply grow
    text = "hello there"
    expected = {m: solo(files, m, text, 24) for m in ("tiny-base", "support", "legal")}
    outside = []

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(30_000)

            def only_this_server(route):
                request_url = route.request.url
                if request_url.startswith(url) or request_url.startswith(("data:", "blob:")):
                    return route.continue_()
                outside.append(request_url)
                return route.abort()

            page.route("**/*", only_this_server)
            page.goto(url + "/")
            expect = playwright.expect

            # knobs: 24 new tokens, greedy
            page.get_by_text("Generation settings").click()
            tokens = page.locator("#max-tokens input[type=number]")
            tokens.fill("24")
            tokens.press("Enter")

            # chat with the "legal" prefix; the reply grows in several updates, then equals the solo reply
            page.locator("#model input").click()
            page.get_by_role("option", name="legal").click()
            page.locator("#message textarea").fill(text)
            page.locator("#send").click()
            bot = page.locator("#chatbot .bot").last
            seen = set()
            deadline = time.time() + 30
            while time.time() < deadline:
                if bot.count():
                    seen.add(" ".join(bot.inner_text().split()))
                if " ".join(expected["legal"].split()) in seen:
                    break
                time.sleep(0.01)
            expect(bot).to_have_text(expected["legal"])
            assert len([s for s in seen if s]) >= 3, f"the reply did not stream: {seen}"
            page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)

            page.locator("#regenerate").click()  # greedy: the same reply again, still one exchange
            expect(bot).to_have_text(expected["legal"])
            expect(page.locator("#chatbot .bot")).to_have_count(1)
            page.locator("#clear").click()
            expect(page.locator("#chatbot .bot")).to_have_count(0)

            # compare: base and the "support" prefix side by side
            page.get_by_role("tab", name="Compare").click()
            page.locator("#compare-model input").click()
            page.get_by_role("option", name="support").click()
            page.locator("#compare-message textarea").fill(text)
            page.locator("#compare").click()
            expect(page.locator("#base-reply textarea")).to_have_value(expected["tiny-base"], timeout=30_000)
            expect(page.locator("#prefix-reply textarea")).to_have_value(expected["support"], timeout=30_000)
            page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
        finally:
            browser.close()
    assert min((tmp_path / f).stat().st_size for f in ("chat.png", "compare.png")) > 10_000
    assert outside == [], f"the page reached outside the server: {outside}"


def test_with_an_api_key_the_page_asks_for_it_as_password(files):  # noqa: F811
    import httpx

    app, _ = build(["--model_name_or_path", files[0], "--web", "--api_key", "k1"])
    with running(app) as url:
        assert httpx.get(url + "/config").status_code == 401
        assert httpx.post(url + "/login", data={"username": "me", "password": "wrong"}).status_code == 400
        with httpx.Client() as browser:
            assert browser.post(url + "/login", data={"username": "me", "password": "k1"}).status_code == 200
            assert browser.get(url + "/config").status_code == 200
        assert httpx.get(url + "/v1/models").status_code == 401
