"""End to end in a real browser: headless Debian chromium driven by Playwright loads the demo, picks
a sample scene, asks with token_pruning attached, and sees both answers, the heatmap and the costs."""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Locally a missing browser skips the test; in CI (.ci/run installs chromium) it is a failure.
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does it)",
)


@contextlib.contextmanager
def demo_page(url: str):
    """The demo open in headless chromium."""
    assert CHROMIUM, "chromium is missing: .ci/run should have installed Debian's chromium package"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url)
            yield page
        finally:
            browser.close()


def test_sample_scene_question_with_token_pruning(demo_url):
    with demo_page(demo_url) as page:
        question = "how many red objects are there ?"
        page.locator("tr", has_text=question).first.click(timeout=30_000)  # a sample scene
        playwright.expect(page.locator("#question textarea")).to_have_value(question)
        page.get_by_role("button", name="Ask").click()
        page.locator("#heatmap").scroll_into_view_if_needed()  # images load when in view
        page.locator("#heatmap img").wait_for(timeout=60_000)
        page.locator("#stats", has_text="prefill GFLOPs").wait_for(timeout=10_000)
        for box in ("answer_base", "answer_plugged"):  # both answers appear (tiny random model)
            playwright.expect(page.locator(f"#{box} textarea")).not_to_have_value("")
        assert "visual tokens at last layer" in page.locator("#stats").inner_text()
        assert page.locator(".toast-body").count() == 0  # no error message


def test_rollout_tab_plays_an_episode(demo_url):
    pytest.importorskip("vtoken.robot.envs")
    with demo_page(demo_url) as page:
        page.get_by_role("tab", name="robot rollout").click()
        page.get_by_role("button", name="Run an episode").click()  # token_pruning attached
        for box in ("rollout_base", "rollout_plugged"):
            page.locator(f"#{box}").scroll_into_view_if_needed()
            page.locator(f"#{box} img").wait_for(timeout=120_000)
        page.locator("#rollout_stats", has_text="model call ms p50").wait_for(timeout=10_000)
        assert page.locator(".toast-body").count() == 0
