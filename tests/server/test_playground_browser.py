"""The playground in a real headless browser (Debian's chromium driven by playwright), against
`lmql-backends serve-model builtin:tiny` running as a subprocess.

Runs wherever /usr/bin/chromium and playwright are installed; in CI (CI set) a missing browser
is a failure, locally a skip. Set PLAYGROUND_SCREENSHOT=path to also save the screenshot there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

import lmql_backends
from tests.test_cli import free_port, wait_for_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
QUERY = """argmax
    "Q: What is the capital of France?\\n"
    "A: [ANSWER]\\n"
    "Score from 1 to 9: [SCORE]\\n"
    "Correct? [OK]"
where
    STOPS_AT(ANSWER, "\\n") and len(TOKENS(ANSWER)) < 12 and INT(SCORE) and len(TOKENS(SCORE)) < 2
distribution
    OK in ["yes", "no"]"""
LONG_QUERY = 'argmax "Once upon a time[STORY]" where len(TOKENS(STORY)) < 1000'


def browser_or_skip():
    """playwright's sync API, or a skip (locally) / failure (CI) naming what is missing."""
    missing = []
    if shutil.which(CHROMIUM) is None:
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright package (pip install -e '.[test]')")
        sync_playwright = None
    if missing:
        message = "the browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright


@pytest.fixture
def server(tiny_model):
    port = free_port()
    cmd = [sys.executable, "-m", "lmql_backends.cli", "serve-model", tiny_model, "--port", str(port)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture
def page(server):
    sync_playwright = browser_or_skip()
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


@pytest.mark.timeout(300)
def test_the_page_runs_a_query_shows_its_tokens_and_stop_cancels(server, page, tmp_path):
    page.goto(server + "/")  # a browser's GET / lands on the playground
    assert page.url == server + "/playground"
    page.fill("#query", QUERY)
    page.click("text=Run")
    expected = lmql_backends.run_sync(QUERY)
    page.locator('td[data-variable="ANSWER"]').wait_for()
    for name in ("ANSWER", "SCORE", "OK"):
        assert page.locator(f'td[data-variable="{name}"]').inner_text() == str(expected.variables[name])
    assert page.locator(".bar").count() == 2  # P(OK): yes and no
    num_generated = int(page.locator(".stats b").nth(1).inner_text())
    assert num_generated > 0
    assert page.locator("[data-token-id][data-logprob]").count() >= num_generated
    assert page.locator("s.masked").count() >= 1  # INT(SCORE) removed the model's favourite
    page.locator("s.masked + .tok").last.hover()
    inspector = page.locator("#inspector")
    assert "allowed by the constraints" in inspector.inner_text() and "best token the mask removed" in inspector.inner_text()
    assert page.locator("#run").is_enabled()
    screenshot = tmp_path / "playground.png"
    page.screenshot(path=str(screenshot), full_page=True)
    if os.environ.get("PLAYGROUND_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["PLAYGROUND_SCREENSHOT"])
    assert screenshot.stat().st_size > 10_000

    page.reload()  # the last query is kept across reloads
    assert page.input_value("#query") == QUERY

    page.fill("#query", LONG_QUERY)
    page.click("text=Run")
    page.locator("[data-token-id]").nth(5).wait_for()
    page.click("text=Stop")
    page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
    assert page.locator('td[data-variable="STORY"]').count() == 0  # it never finished
    assert page.locator("#run").is_enabled()
    assert_engine_idle(server)


def assert_engine_idle(server: str) -> None:
    """The stopped query left nothing running: /metrics comes to zero running requests."""
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = requests.get(server + "/metrics", timeout=10).text
        gauges = dict(line.split() for line in metrics.splitlines() if not line.startswith("#"))
        if float(gauges["lmql_backends_num_running"]) == 0 and float(gauges["lmql_backends_num_waiting"]) == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"the engine still runs requests after Stop:\n{metrics}")


def test_a_syntax_error_points_at_its_line(server, page):
    page.goto(server + "/playground")
    page.fill("#query", 'argmax\n    "A: [ANSWER"\nwhere len(TOKENS(ANSWER)) < 5')
    page.click("text=Run")
    error = page.locator("#error")
    error.wait_for()
    text = error.inner_text()
    assert "line 2" in text and '"A: [ANSWER"' in text and "^" in text
