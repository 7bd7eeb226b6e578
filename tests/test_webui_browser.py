"""The web UI in headless Chromium (Debian's /usr/bin/chromium driven by playwright) against a live server on a
loopback port: type a prompt, generate, see the image and its preview; an image prompt from the IP-Adapter
panel; load a region layout and generate with its regions; a screenshot of each tab kept under
$DIFFSTUDIO_SCREENSHOTS (default: the test's tmp folder)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INSTALL = ('the browser tests need Debian\'s chromium and playwright: apt-get install -y chromium; '
           'pip install -e ".[test]" (gradio, playwright)')

pytestmark = pytest.mark.browser


def _require() -> None:
    missing = [what for what, ok in (("chromium at /usr/bin/chromium", shutil.which(CHROMIUM) is not None),
                                     ("playwright", _importable("playwright")), ("gradio", _importable("gradio")))
               if not ok]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: {INSTALL}")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("DIFFSTUDIO_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _require()
    import diffstudio
    from diffstudio.server.app import create_app
    from diffstudio.webui import mount_ui
    from tests.server_fixtures import LiveServer

    models = diffstudio.load()
    live = LiveServer(create_app(None, tmp_path_factory.mktemp("outputs"), loader=lambda entry: models,
                                 ui=mount_ui))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium-profile")),
                                                       executable_path=CHROMIUM, args=ARGS, headless=True,
                                                       viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(f"{server.url}/")  # redirects to /ui/
        page.wait_for_selector("#prompt textarea")
        yield page
        context.close()


def _fast(page) -> None:
    for field, value in (("#steps", "2"), ("#width", "64"), ("#height", "64")):
        box = page.locator(f"{field} input[type=number]")
        box.fill(value)
        box.press("Enter")


def _job_ids(server) -> set[str]:
    return {p.stem for p in (server.app.state.server.outputs / "jobs").glob("*.json")}


def _last_job(server) -> dict:
    folder = server.app.state.server.outputs / "jobs"
    newest = max(folder.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    return json.loads(newest.read_text())


def test_type_a_prompt_generate_and_see_the_image(page, server, shots):
    page.fill("#prompt textarea", "a red circle")
    _fast(page)
    page.click("#generate")
    page.wait_for_selector("#gallery img")
    page.wait_for_function("document.querySelector('#status').innerText.startsWith('done')")
    job = _last_job(server)
    assert job["state"] == "done" and job["params"]["prompt"] == "a red circle" and job["params"]["steps"] == 2
    assert "a red circle" in page.inner_text("#recipe")
    page.wait_for_selector("#preview img")  # the last step's preview stays in the pane
    assert job["params"]["preview_every"] == 5
    page.screenshot(path=str(shots / "image-tab.png"), full_page=True)


def test_an_image_prompt_from_the_ip_adapter_panel(page, server, tmp_path):
    from tests.server_fixtures import picture

    reference = tmp_path / "reference.png"
    picture(4).save(reference)
    page.get_by_text("IP-Adapter: image prompt").click()
    page.locator("#ip-adapter input").click()
    page.locator("ul[role=listbox] li", has_text="shapes-ip-adapter").click()
    page.locator("#ip-images input[type=file]").set_input_files(str(reference))
    page.wait_for_selector("#ip-images img")
    before = _job_ids(server)
    page.click("#generate")
    deadline = time.time() + 60
    while not (new := _job_ids(server) - before) and time.time() < deadline:
        page.wait_for_timeout(100)
    assert len(new) == 1
    job = server.wait_job(new.pop())
    assert job["state"] == "done", job.get("error")
    assert job["params"]["ip_adapter"]["name"] == "shapes-ip-adapter"
    assert job["info"]["recipes"][0]["extra"]["ip_adapter"][0]["scale"] == 0.7


def test_load_a_region_layout_and_generate(page, server, shots, tmp_path):
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"global_weight": 0.3, "regions": [
        {"prompt": "a blue square", "box": [0.5, 0, 1, 1], "weight": 0.9}]}))
    page.get_by_text("Regions (a prompt per painted area)").click()
    page.locator("#layout-upload input[type=file]").set_input_files(str(layout))
    page.wait_for_function("document.querySelector('#region-prompt-1 textarea, #region-prompt-1 input')"
                           ".value === 'a blue square'")
    before = _job_ids(server)
    page.click("#generate")
    deadline = time.time() + 60
    while not (new := _job_ids(server) - before) and time.time() < deadline:
        page.wait_for_timeout(100)
    assert len(new) == 1
    job = server.wait_job(new.pop())
    assert job["state"] == "done", job.get("error")
    assert [(r["prompt"], r["weight"]) for r in job["params"]["regions"]] == [("a blue square", 0.9)]
    assert job["params"]["global_weight"] == 0.3
    page.locator("#region-canvas").screenshot(path=str(shots / "region-painter.png"))


@pytest.mark.parametrize("tab", ["video", "training"])
def test_a_screenshot_of_each_tab(page, shots, tab):
    page.click(f"button[role=tab]:has-text('{tab.capitalize()}')")
    page.wait_for_selector(f"#tab-{tab}", state="visible")
    page.screenshot(path=str(shots / f"{tab}-tab.png"), full_page=True)
    assert (shots / f"{tab}-tab.png").stat().st_size > 0
