"""The demo in a real browser: headless Chromium (Debian's ``chromium`` package) opens the page, visits
every tab, saves a screenshot of each, and the Generate tab shows a gallery after a request.

Screenshots go to ``$BESPOKE_SCREENSHOTS`` when set (the README's ``docs/demo_*.png`` are made that
way, with the concept trained as a user would: the ``balanced`` preset and the demo's own settings,
a few CPU minutes), else to a temporary folder whose path the test prints (a 12-step concept). The test skips, saying why, when
Chromium or Python's playwright is missing; CI installs both (see the README's test command).
"""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
]

REQUIRED = os.environ.get("BESPOKE_REQUIRE_BROWSER") == "1"  # .ci/run sets it: in CI a missing browser fails, never skips
if not REQUIRED and not Path(CHROMIUM).is_file():
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)", allow_module_level=True)
if REQUIRED:
    from playwright import sync_api
else:
    sync_api = pytest.importorskip("playwright.sync_api", reason="Python playwright is not installed (pip install -e '.[test]')")

from demo.jobs import JobState  # noqa: E402
from demo.service import DemoService, DemoSettings  # noqa: E402
from demo_support import gradio_env, tiny_service  # noqa: E402
from gen.base import load_base  # noqa: E402

README_PICTURES = bool(os.environ.get("BESPOKE_SCREENSHOTS"))
PRESET, RANK = ("balanced", 8) if README_PICTURES else ("quick", 4)


@pytest.fixture(scope="module")
def local_app(tmp_path_factory):
    """The demo without login (one local user) with one trained concept, so every tab has something to show."""
    from demo.app import launch

    root = tmp_path_factory.mktemp("demo_browser")
    with gradio_env(root):
        if README_PICTURES:
            service = DemoService(lambda: load_base("builtin"), DemoSettings(outputs=root / "outputs", registry=root / "registry"))
        else:
            service = tiny_service(root, auth=False)
        try:
            steps = None if README_PICTURES else 12
            service.start_training("local", concept="my-robot", class_word="robot", preset=PRESET, subject="robot-3", n_photos=4, steps=steps)
            deadline = time.monotonic() + 600
            status = service.jobs.latest("local")
            while not status.state.finished and time.monotonic() < deadline:
                status = service.jobs.wait("local", status.revision, 1.0)
            assert status.state is JobState.DONE, status
            demo = launch(service, prevent_thread_lock=True, quiet=True)
            try:
                yield demo.local_url
            finally:
                demo.close()
        finally:
            service.close()


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory) -> Path:
    explicit = os.environ.get("BESPOKE_SCREENSHOTS")
    folder = Path(explicit) if explicit else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {folder}")
    return folder


def save_screenshot(page, path: Path) -> Path:
    """A page screenshot as a small palette PNG (a UI has few colours; the README's copies stay under 300 KB)."""
    image = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def visible(locator):
    """The first match that is visible (hidden tabs keep their elements in the page)."""
    return locator.filter(visible=True).first


def test_every_tab_renders_and_generate_shows_a_gallery(local_app, screenshot_dir):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(120_000)
            page.goto(local_app)
            page.get_by_text("Local mode").wait_for()
            # The finished job's status, loss curve and validation images come back on page load.
            page.get_by_text("registered as version 1").wait_for()
            page.locator(".pixelated img").first.wait_for()
            shots = [save_screenshot(page, screenshot_dir / "demo_personalize.png")]

            page.get_by_role("tab", name="Generate").click()
            page.get_by_role("button", name="Generate", exact=True).click()
            images = page.locator("#gallery-personalized img")
            images.first.wait_for()
            page.locator("#gallery-base img").first.wait_for()
            assert images.count() >= 1
            shots.append(save_screenshot(page, screenshot_dir / "demo_generate.png"))

            page.get_by_role("tab", name="My concepts").click()
            visible(page.get_by_text("<my-robot>", exact=True)).wait_for()  # in the concepts table
            visible(page.get_by_text("latest", exact=True)).wait_for()  # in v1's row of the history table
            shots.append(save_screenshot(page, screenshot_dir / "demo_concepts.png"))

            page.get_by_role("tab", name="Diagnostics").click()
            page.get_by_role("button", name="Show", exact=True).click()
            visible(page.get_by_text(f"rank {RANK}", exact=False)).wait_for()
            visible(page.get_by_text("subject_fidelity", exact=True)).wait_for()
            shots.append(save_screenshot(page, screenshot_dir / "demo_diagnostics.png"))
        finally:
            browser.close()
    for shot in shots:
        assert shot.stat().st_size > 5_000, shot
        print(f"saved {shot} ({shot.stat().st_size // 1024} KB)")
