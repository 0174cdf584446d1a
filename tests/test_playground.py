"""The playground page in a real browser: Debian's chromium, driven by Playwright, against a real server."""

import os
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import ROOT, chromium, missing, require
from test_server import complete, start_server

pytestmark = pytest.mark.slow
CHROMIUM = chromium() or missing("chromium", "apt-get install -y chromium (.ci/run installs it)")
sync_api = require("playwright.sync_api", "pip install playwright (in the test extra)")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        # as root, chromium runs only without its sandbox; the page is our own, on loopback
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(export_dir):
    """The export the page talks to: the tiny one, or GPT_PLAYGROUND_EXPORT (to time a real model)."""
    folder = Path(os.environ.get("GPT_PLAYGROUND_EXPORT", export_dir))
    proc, url = start_server(folder, "--max-new-tokens-limit", "50000")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def open_page(browser, url, width=1000):
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.goto(f"{url}/")
    return page


def send(page, prompt, temperature, max_tokens):
    page.fill("#prompt", prompt)
    page.fill("#temperature", str(temperature))
    page.fill("#max_tokens", str(max_tokens))
    page.focus("#prompt")
    page.keyboard.press("Enter")  # keyboard only: Enter sends


def cancelled(url):
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(requests.get(f"{url}/metrics").text)
    return next(s.value for f in families for s in f.samples if s.name == "gpt_requests_cancelled_total")


def test_the_page_streams_the_apis_text_with_its_probabilities(browser, server, tmp_path):
    page = open_page(browser, server)
    page.wait_for_function("document.getElementById('model').textContent.includes('parameters')")
    assert "tokenizer" in page.text_content("#model")
    send(page, "ROMEO:", 0, 60)
    page.wait_for_function("document.getElementById('status').textContent.includes('tokens in')")
    shown = page.eval_on_selector_all("#output .token",
                                      "els => els.map(e => [e.textContent, Number(e.dataset.logprob)])")
    api = complete(server, prompt="ROMEO:", max_tokens=60, temperature=0, logprobs=5).json()["choices"][0]
    assert "".join(text for text, _ in shown) == api["text"]  # the API's greedy text, streamed into the page
    np.testing.assert_allclose([lp for _, lp in shown], api["logprobs"]["token_logprobs"], atol=1e-6)
    alternatives = page.get_attribute("#output .token >> nth=0", "data-alternatives")
    assert alternatives.count("\n") == 4 and "%" in alternatives  # the top 5 on hover
    page.locator("#output .token").filter(has_text=re.compile(r"\w")).first.hover()  # its alternatives show
    first = float(page.evaluate("document.body.dataset.firstTokenMs"))
    print(f"first token shown {first:.1f} ms after Enter")
    shot = Path(os.environ["GPT_PLAYGROUND_SCREENSHOT"]) if "GPT_PLAYGROUND_SCREENSHOT" in os.environ \
        else tmp_path / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24])[0] == 1000
    assert "ROMEO" not in page.url and "?" not in page.url


def test_stop_ends_the_request_on_the_server(browser, server):
    page = open_page(browser, server)
    before = cancelled(server)
    send(page, "ROMEO:", 1.0, 50000)  # long enough that Escape comes while the server is still generating
    page.wait_for_function("document.querySelectorAll('#output .token').length > 5")
    page.keyboard.press("Escape")  # keyboard only: Escape stops
    page.wait_for_function("document.getElementById('status').textContent.startsWith('stopped')")
    deadline = time.time() + 10
    while cancelled(server) < before + 1:
        assert time.time() < deadline, "the server did not count the stopped request as cancelled"
        time.sleep(0.1)
    while requests.get(f"{server}/health").json()["active"] != 0:  # the model loop frees the slot at its next step
        assert time.time() < deadline, "the stopped request still holds a slot"
        time.sleep(0.05)
    assert len(page.query_selector_all("#output .token")) < 50000


def test_a_wrong_api_key_gets_a_clear_message_and_the_key_stays_in_the_page(browser, export_dir):
    proc, url = start_server(export_dir, "--api-key", "secret")
    try:
        page = open_page(browser, url)
        page.wait_for_selector("#key-row:not([hidden])")
        assert "API key" in page.text_content("#status")
        page.fill("#key", "wrong")
        send(page, "ROMEO:", 0, 10)
        page.wait_for_function("document.getElementById('status').textContent.includes('Wrong or missing API key')")
        assert page.query_selector_all("#output .token") == []
        page.fill("#key", "secret")
        send(page, "ROMEO:", 0, 10)
        page.wait_for_function("document.getElementById('status').textContent.includes('tokens in')")
        assert len(page.query_selector_all("#output .token")) == 10
        assert "secret" not in page.url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_page_fits_a_narrow_window_and_loads_nothing_from_elsewhere(browser, server):
    page = browser.new_page(viewport={"width": 360, "height": 800})
    hosts = []
    page.on("request", lambda r: hosts.append(r.url.split("/")[2]))
    page.goto(f"{server}/")
    page.wait_for_function("document.getElementById('model').textContent.includes('parameters')")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert set(hosts) == {server.split("/")[2]}
    static = sorted(p.name for p in (ROOT / "serve" / "static").iterdir())
    assert static == ["app.js", "index.html", "style.css"]


def test_the_chat_view_holds_a_conversation_and_shows_each_answers_probabilities(browser, chat_run):
    proc, url = start_server(chat_run / "export")
    try:
        page = open_page(browser, url)
        page.wait_for_selector("#mode-row:not([hidden])")  # the model has a chat template
        page.check("#chat-mode")
        for word in ("apple", "thee"):
            send(page, word, 0, 10)
            page.wait_for_function("document.getElementById('status').textContent.includes('tokens in')")
        turns = page.eval_on_selector_all("#output .turn", "els => els.map(e => [e.dataset.role, e.textContent])")
        assert turns == [["user", "apple"], ["assistant", "AYE!"], ["user", "thee"], ["assistant", "NAY!"]]
        shown = page.eval_on_selector_all("#output .turn.assistant >> nth=1 >> .token",
                                          "els => els.map(e => Number(e.dataset.logprob))")
        history = [{"role": "user", "content": "apple"}, {"role": "assistant", "content": "AYE!"},
                   {"role": "user", "content": "thee"}]
        api = requests.post(f"{url}/v1/chat/completions", json={"messages": history, "temperature": 0,
                                                                 "logprobs": True, "top_logprobs": 5}).json()
        np.testing.assert_allclose(shown, [e["logprob"] for e in api["choices"][0]["logprobs"]["content"]], atol=1e-6)
        page.click("#new-chat")
        assert page.query_selector_all("#output .turn") == []
    finally:
        proc.terminate()
        proc.wait(timeout=10)
