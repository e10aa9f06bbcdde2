"""The web page (``hdm_platform/web/index.html``) in headless Chromium against the served app.

Playwright drives Debian's Chromium (``scripts/test.sh`` installs it) with a fresh profile;
the page talks to the real Serve application of the ``served_app`` fixture
(``tests/serving.py``), whose models are tiny random HDMs: results are valid images of the
input's size, not meaningful enhancements.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

# Minutes of Ray, Serve or subprocess start-ups on 2 cores: outside the fast subset.
pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
# The replicas are CPU-only and share a 2-core machine with the rest of the suite.
RESULT_TIMEOUT_MS = 60_000
INPUT_SIZE = (70, 46)  # width, height: neither a multiple of the network's stride


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page in a context of its own; the test fails on any uncaught script error."""
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    script_errors: list[Exception] = []
    page.on("pageerror", lambda error: script_errors.append(error))
    yield page
    context.close()
    assert not script_errors, f"the page raised: {script_errors}"


@pytest.fixture
def input_png(tmp_path: Path) -> Path:
    """A random RGB PNG of ``INPUT_SIZE``."""
    width, height = INPUT_SIZE
    pixels = np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path = tmp_path / "street.png"
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def _open_page(page: Page, base_url: str) -> None:
    page.goto(f"{base_url}/")
    expect(page.locator("#task")).to_be_enabled()


def _run(page: Page, image: Path, choice: str) -> None:
    page.set_input_files("#file", str(image))
    page.select_option("#task", choice)
    page.click("#run")
    expect(page.locator("#download")).to_be_visible(timeout=RESULT_TIMEOUT_MS)


def test_task_list_comes_from_the_models_route(page: Page, served_app) -> None:
    models = requests.get(f"{served_app.base_url}/v1/models", timeout=30).json()
    _open_page(page, served_app.base_url)

    choices = page.locator("#task option").evaluate_all("options => options.map(o => o.value)")
    tasks = sorted({model["task"] for model in models})
    assert choices == [f"task:{task}" for task in tasks] + ["pipeline:derain,dehaze"]
    # A registered model is named by name and version, a checkpoint folder by its hash.
    by_task = {model["task"]: model for model in models}
    dehaze = by_task["dehaze"]
    expect(page.locator("#task option[value='task:dehaze']")).to_have_text(
        f"dehaze — {dehaze['registered_model']} v{dehaze['version']}"
    )
    expect(page.locator("#task option[value='task:derain']")).to_have_text(
        f"derain — {by_task['derain']['model_version']}"
    )
    expect(page.locator("#run")).to_be_disabled()  # no image chosen yet


def test_enhance_shows_compares_and_downloads_the_result(
    page: Page, served_app, input_png: Path, tmp_path: Path
) -> None:
    _open_page(page, served_app.base_url)
    _run(page, input_png, "task:dehaze")

    natural_size = page.eval_on_selector("#after", "image => [image.naturalWidth, image.naturalHeight]")
    assert tuple(natural_size) == INPUT_SIZE
    status = page.locator("#status")
    expect(status).to_contain_text(f"Model {served_app.registered_model}/")
    expect(status).to_contain_text("inference")
    expect(page.locator("#error")).to_be_hidden()

    # The slider moves the edge of the clipped result (and the divider with it).
    clip = "image => getComputedStyle(image).clipPath"
    assert page.eval_on_selector("#after", clip) == "inset(0px 0px 0px 50%)"
    page.locator("#slider").fill("20")
    assert page.eval_on_selector("#after", clip) == "inset(0px 0px 0px 20%)"
    page.locator("#slider").fill("85")
    assert page.eval_on_selector("#after", clip) == "inset(0px 0px 0px 85%)"

    with page.expect_download() as download_info:
        page.click("#download")
    download = download_info.value
    assert download.suggested_filename == "street-dehaze.png"
    downloaded = Path(download.path()).read_bytes()
    direct = requests.post(
        f"{served_app.base_url}/v1/enhance/dehaze",
        data=input_png.read_bytes(),
        headers={"Content-Type": "image/png"},
        timeout=60,
    )
    assert direct.status_code == 200, direct.text
    assert downloaded == direct.content

    screenshot = tmp_path / "page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    with Image.open(screenshot) as image:
        assert image.format == "PNG"
        low, high = image.convert("L").getextrema()
    assert high - low > 100, "the screenshot is blank"


def test_pipeline_runs_both_models_in_order(page: Page, served_app, input_png: Path) -> None:
    _open_page(page, served_app.base_url)
    _run(page, input_png, "pipeline:derain,dehaze")

    # X-Model-Version names each stage: derain's checkpoint hash, then dehaze's version.
    expect(page.locator("#status")).to_contain_text("Model sha256:")
    expect(page.locator("#status")).to_contain_text(f",{served_app.registered_model}/")
    natural_size = page.eval_on_selector("#after", "image => [image.naturalWidth, image.naturalHeight]")
    assert tuple(natural_size) == INPUT_SIZE
    with page.expect_download() as download_info:
        page.click("#download")
    assert download_info.value.suggested_filename == "street-derain-dehaze.png"


def test_dropped_non_image_shows_the_servers_json_error(page: Page, served_app, input_png: Path) -> None:
    notes = "meeting notes, not a picture\n"
    expected = requests.post(
        f"{served_app.base_url}/v1/enhance/dehaze",
        data=notes.encode(),
        headers={"Content-Type": "text/plain"},
        timeout=30,
    )
    assert expected.status_code == 415
    error = expected.json()["error"]
    _open_page(page, served_app.base_url)
    # A result first: a failed run must not leave the previous result on show.
    _run(page, input_png, "task:dehaze")

    dropped = page.evaluate_handle(
        """text => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([text], "notes.txt", { type: "text/plain" }));
            return transfer;
        }""",
        notes,
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
    expect(page.locator("#status")).to_contain_text("notes.txt")
    page.click("#run")

    message = page.locator("#error")
    expect(message).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    expect(message).to_have_text(f"{error['kind']} (HTTP 415): {error['message']}")
    expect(page.locator("#comparison")).to_be_hidden()


def test_api_key_is_sent_when_filled(page: Page, served_app, input_png: Path) -> None:
    _open_page(page, served_app.base_url)
    page.fill("#api-key", "a-key-of-mine")
    page.locator("#api-key").press("Tab")  # the change event reloads the models with the key
    expect(page.locator("#task")).to_be_enabled()
    with page.expect_request(lambda request: "/v1/enhance/dehaze" in request.url) as sent:
        _run(page, input_png, "task:dehaze")
    assert sent.value.headers.get("authorization") == "Bearer a-key-of-mine"


def test_keyed_server_without_a_key_asks_for_one(page: Page, served_app) -> None:
    # Only /healthz is open on a keyed application, the page included: the key goes on the
    # page's own request here, so that what the page's scripts send is what is tested.
    def with_key(route: Route) -> None:
        route.continue_(headers={**route.request.headers, **served_app.strict_headers})

    page.route(f"{served_app.strict_url}/", with_key)
    page.goto(f"{served_app.strict_url}/")

    message = page.locator("#error")
    expect(message).to_contain_text("unauthorized (HTTP 401)")
    expect(message).to_contain_text("Enter the API key")
    expect(page.locator("#task")).to_be_disabled()
