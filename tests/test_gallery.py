"""The gallery in a real browser: Debian's chromium, driven by Playwright for Python.

A person's path through the page: type a prompt and a target, pick 64x64, submit;
the request's card appears, its progress bar advances as progress events arrive
(Server-Sent Events), then the image and its cut-outs load. Behind it: the gateway on
127.0.0.1 and the generator and segmenter runtimes (tiny models) on the session's
tansu broker. Chromium runs without its background networking, so nothing but the
gateway on loopback is contacted.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import async_playwright, expect

from genseg.gateway import Gateway
from plumbing.broker import EmbeddedBroker
from plumbing.settings import Settings
from tests.test_gateway_helpers import OUTCOME_S, fresh_settings, gateway, pipeline

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STEPS = 80  # seconds of denoising even on a quiet machine: several progress events
#: Records every value the page's progress bars take (each set is one mutation, with
#: the value before it), so the test sees the bar move however fast the steps come.
PROGRESS_RECORDER = """
window.__progress = [];
new MutationObserver((records) => {
  for (const r of records) {
    if (r.target.matches("progress.steps")) {
      window.__progress.push(Number(r.oldValue || 0), Number(r.target.getAttribute("value")));
    }
  }
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["value"],
                      attributeOldValue: true});
"""


@pytest.fixture(scope="module")
def chromium() -> str:
    if shutil.which(CHROMIUM) is None:
        pytest.fail("chromium is not installed: run scripts/ci-system-deps.sh", pytrace=False)
    return CHROMIUM


@pytest.fixture(scope="module")
def gallery_settings(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return fresh_settings(broker.bootstrap_servers, tmp_path_factory.mktemp("blobs"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(
    gallery_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Gateway]:
    db = tmp_path_factory.mktemp("view") / "view.sqlite3"
    async with pipeline(gallery_settings), gateway(gallery_settings, db) as (gw, _client):
        yield gw


async def test_submit_from_the_form_and_watch_it_finish(
    served: Gateway, chromium: str, tmp_path: Path
) -> None:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1100, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.add_init_script(PROGRESS_RECORDER)
            await page.goto(served.url)
            await expect(page.locator("#empty")).to_be_visible()

            await page.fill("#prompt", "a red circle next to a blue square")
            await page.fill("#targets", "circle, square")
            await page.select_option("#size", "64")
            await page.fill("#steps", str(STEPS))
            await page.fill("#min-confidence", "0")
            await page.click("#submit")

            card = page.locator(".card").first
            await expect(card.locator(".prompt")).to_have_text("a red circle next to a blue square")
            await expect(card.locator(".badge")).to_have_text("done", timeout=OUTCOME_S * 1000)
            values = await page.evaluate("window.__progress")
            assert any(0 < v < STEPS for v in values), f"the bar never moved between: {values}"
            assert await card.locator("progress.steps").get_attribute("value") == str(STEPS)

            image = card.locator("figure:not(.cutout) img").first
            cutout = card.locator("figure.cutout img").first
            for img in (image, cutout):
                await expect(img).to_have_js_property("complete", True)
                assert await img.evaluate("el => el.naturalWidth") > 0
            caption = await card.locator("figure.cutout figcaption").first.text_content()
            assert caption and caption.split()[-1].replace(".", "").isdigit(), caption
            await page.screenshot(path=tmp_path / "gallery.png", full_page=True)
            assert (tmp_path / "gallery.png").stat().st_size > 0
            assert not errors, errors
        finally:
            await browser.close()


async def test_a_refused_submission_shows_the_reason(served: Gateway, chromium: str) -> None:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(served.url)
            await page.fill("#prompt", "a cup")
            await page.fill("#targets", ", ".join(f"t{i}" for i in range(11)))
            await page.click("#submit")
            await expect(page.locator("#form-error")).to_contain_text("targets")
        finally:
            await browser.close()
