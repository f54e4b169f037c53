"""The page at `GET /`, in a real headless Chromium against the real API under uvicorn.

Draw a 7 with pointer events and read it, roll back to another stored version and read a photo from
examples/, drop a photo, train a tiny model with a real RQ worker and watch it live, and a 503 before any
model shown as a sentence with the training's progress. Each state is screenshotted into a folder printed
at the start (PAGE_SCREENSHOTS=DIR puts them there instead).
"""

from __future__ import annotations

import itertools
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from selenium.webdriver.common.actions import interaction
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.common.actions.pointer_input import PointerInput
from selenium.webdriver.common.keys import Keys

from app.routes.page import _asset
from tests.browser_support import Page, needs_chromium, open_browser
from tests.serving_support import API_KEY, MODEL_ID, install_model
from tests.support import ROOT, ServedApp
from tests.train_support import TINY_TRAINING, start_worker

ServeApp = Callable[..., ServedApp]
EXAMPLES = ROOT / "examples"

# One stroke of a 7 in pad fractions: the bar, then the slanted leg.
SEVEN = [(0.22, 0.2), (0.5, 0.2), (0.78, 0.2), (0.68, 0.45), (0.58, 0.68), (0.5, 0.86)]


@pytest.fixture(scope="session")
def shots_root(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Path:
    wanted = os.environ.get("PAGE_SCREENSHOTS")
    root = Path(wanted) if wanted else tmp_path_factory.mktemp("page-screenshots")
    root.mkdir(parents=True, exist_ok=True)
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\npage screenshots: {root}")
    return root


@pytest.fixture
def page(shots_root: Path, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A headless Chromium tab; ask for it after the app so that it closes (and its streams with it) first."""
    shots = shots_root / request.node.name
    shots.mkdir(exist_ok=True)
    yield from open_browser(shots)


def draw(page: Page, stroke: list[tuple[float, float]], kind: str = interaction.POINTER_MOUSE) -> None:
    """Draw one stroke on the pad with real pointer input (mouse, pen or touch), lifting at the end."""
    pad = page.el("pad")
    width, height = pad.size["width"], pad.size["height"]
    pointer = PointerInput(kind, kind)
    actions = ActionBuilder(page.driver, mouse=pointer)

    def at(fx: float, fy: float) -> tuple[int, int]:  # Selenium's offsets are from the element's centre
        return int((fx - 0.5) * width), int((fy - 0.5) * height)

    actions.pointer_action.move_to(pad, *at(*stroke[0])).pointer_down()
    for (x0, y0), (x1, y1) in itertools.pairwise(stroke):
        for t in (0.25, 0.5, 0.75, 1.0):
            actions.pointer_action.move_to(pad, *at(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t))
    actions.pointer_action.pointer_up()
    actions.perform()


def ink_rows_and_cols(page: Page) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
    """Where the 28x28 the model saw has ink (bright: the model sees white on black), by row and column."""
    seen = np.asarray(page.seen_image().resize((28, 28)), dtype=np.float32) / 255.0
    ink: npt.NDArray[np.bool_] = seen > 0.4
    assert ink.sum() > 20, "the model saw an empty image"
    return np.flatnonzero(ink.any(axis=1)), ink


@pytest.fixture
def api_with_models(served_app: ServeApp, data_dir: Path) -> ServedApp:
    """The API with two stored versions: v7 (always answers 7, active) and v3 (always answers 3)."""
    install_model(data_dir, "v3", forced_digit=3, activate=False)
    install_model(data_dir, "v7", forced_digit=7)
    return served_app(data_dir=data_dir, handwriting_api_key=API_KEY)


@needs_chromium
def test_draw_a_seven_with_the_pen_and_read_it(api_with_models: ServedApp, page: Page) -> None:
    page.open(api_with_models.url)
    assert page.text("model-version") == "v7" and page.text("model-id") == MODEL_ID
    page.shot("1-loaded")

    draw(page, SEVEN, interaction.POINTER_PEN)
    page.wait(lambda: page.visible("result"), what="the answer")
    assert page.text("digit") == "7"
    assert page.text("confidence").startswith("100.0%")
    bars = page.driver.find_elements("css selector", "#probs li")
    assert len(bars) == 10 and "top" in str(bars[7].get_attribute("class"))
    # What the model saw is the stroke just drawn: ink along the top (the bar), the leg below it.
    rows, ink = ink_rows_and_cols(page)
    top = rows.min()
    assert ink[top : top + 4].any(axis=0).sum() >= 8, "no bar across the top of the 7"
    assert rows.max() - top >= 14, "the 7's leg is missing"
    assert ink[rows.max() - 3 : rows.max() + 1].any(axis=0).sum() <= 8, "the bottom is not a narrow leg"
    page.shot("2-read-seven")

    page.el("clear").click()
    assert not page.visible("result")
    page.shot("3-cleared")
    draw(page, SEVEN, interaction.POINTER_MOUSE)
    page.wait(lambda: page.visible("result") and page.text("digit") == "7", what="the redrawn 7 read")

    # 360 px wide (a small phone): nothing scrolls sideways and the pad still draws.
    page.driver.set_window_size(360, 800)
    assert page.wait(page.no_horizontal_scroll, timeout=5, what="a 360 px layout")
    page.el("clear").click()
    draw(page, SEVEN, interaction.POINTER_TOUCH)
    page.wait(lambda: page.visible("result") and page.text("digit") == "7", what="the 7 drawn by touch")
    page.shot("4-phone-360px")
    assert page.console_errors() == []


@needs_chromium
def test_roll_back_then_read_a_photo_picked_and_dropped(api_with_models: ServedApp, page: Page) -> None:
    page.open(api_with_models.url)
    assert page.visible("versions-hint") and not page.visible("versions-table")
    # Keyboard only: type the key, Enter.
    page.el("key").send_keys(API_KEY, Keys.ENTER)
    page.wait(lambda: page.visible("versions-table"), what="the stored versions")
    rows = page.driver.find_elements("css selector", "#versions tr")
    assert [r.text.split()[0] for r in rows] == ["v7", "v3"]
    assert rows[0].text.endswith("active")
    page.shot("1-versions")

    page.driver.find_element("css selector", f"button[aria-label='Activate {MODEL_ID} v3']").click()
    page.wait(lambda: page.text("model-version") == "v3", what="v3 to become active")
    assert httpx.get(api_with_models.url + "/v1/models/active").json()["version"] == "v3"
    assert page.text("model-live").startswith("live since ")  # when the rollback put it live
    page.shot("2-rolled-back")

    page.el("file").send_keys(str(EXAMPLES / "digit-3.jpg"))
    page.wait(lambda: page.visible("result"), what="the photo read")
    assert page.text("digit") == "3" and "v3" in page.text("read-model")
    ink_rows_and_cols(page)
    page.shot("3-photo-read")

    page.el("clear").click()
    page.drop_file("drop", "digit-9.png", (EXAMPLES / "digit-9.png").read_bytes(), "image/png")
    page.wait(lambda: page.visible("result"), what="the dropped photo read")
    assert page.text("digit") == "3"
    # Not an image: 415 as a sentence.
    page.drop_file("drop", "notes.txt", b"not an image at all", "text/plain")
    page.wait(lambda: page.visible("read-error"), what="the refusal")
    assert page.text("read-error").startswith("That file is not a PNG or JPEG image:")
    assert not page.visible("result")
    page.shot("4-not-an-image")
    assert page.console_errors(allowed=("/v1/read?visualize=true - Failed to load resource",)) == []


@needs_chromium
def test_train_from_the_page_and_watch_it_to_the_new_version(
    served_app: ServeApp, redis_url: str, data_dir: Path, tmp_path: Path, page: Page
) -> None:
    install_model(data_dir, "v7", forced_digit=7)
    # v7 is random weights and the job trains on 16 images: the promotion gate would pick between two
    # near-random models by chance, so here it lets any candidate through (tests/test_gate.py tests it).
    api = served_app(data_dir=data_dir, handwriting_api_key=API_KEY, redis_url=redis_url,
                     api={"gate_tolerance": 100, "gate_size": 50})
    worker = start_worker({"REDIS_URL": redis_url, **TINY_TRAINING, "DATA_DIR": str(data_dir / "worker"),
                           "HANDWRITING_API_URL": api.url, "HANDWRITING_API_KEY": API_KEY}, tmp_path, redis_url)
    try:
        page.open(api.url)
        assert page.el("train-start").get_attribute("disabled") is not None  # no key yet
        page.el("key").send_keys(API_KEY, Keys.ENTER)
        page.wait(lambda: page.visible("versions-table"), what="the stored versions")
        form = {name: page.driver.find_element("name", name) for name in ("epochs", "batch_size", "lr", "model_id")}
        # The page holds the API's bounds (DigitsTrainJobV1) and the /train defaults.
        assert (form["epochs"].get_attribute("min"), form["epochs"].get_attribute("max")) == ("1", "100")
        assert form["batch_size"].get_attribute("max") == "4096" and form["lr"].get_attribute("max") == "1"
        assert form["model_id"].get_attribute("value") == MODEL_ID
        form["epochs"].clear()
        form["epochs"].send_keys("101")
        page.el("train-start").click()
        assert page.text("train-error").startswith("Epochs:")  # refused in the page, nothing sent
        form["epochs"].clear()
        form["epochs"].send_keys("1")
        form["batch_size"].clear()
        form["batch_size"].send_keys("8")
        page.shot("1-form")
        page.el("train-start").click()
        page.wait(lambda: page.visible("job"), what="the job to start")
        page.shot("2-started")
        page.wait(lambda: page.text("job-result"), timeout=240, what="the training to end")
        page.shot("3-finished")
        assert page.el("job-bar").get_attribute("value") == "100"
        assert page.text("job-pct") == "100%" and page.text("job-stage") == "completed"
        assert re.fullmatch(r"[\d.]+", page.text("job-loss")) and page.text("job-speed").isdigit()
        version = re.search(r"version (\S+),", page.text("job-result"))
        assert version and "it is now the active model" in page.text("job-result"), page.text("job-result")
        page.wait(lambda: page.text("model-version") == version[1], what="the model panel to show it")
        listed = page.wait(lambda: page.driver.find_elements("css selector", "#versions tr.active"),
                           what="the new version listed")
        assert version[1] in listed[0].text
        page.shot("4-new-version")
        assert page.console_errors() == []
    finally:
        worker.stop(signal.SIGINT, timeout=3)
        worker.stop(signal.SIGINT, timeout=10)


@needs_chromium
def test_before_any_model_a_read_says_so_with_the_training_progress(
    served_app: ServeApp, redis_url: str, data_dir: Path, page: Page
) -> None:
    api = served_app(data_dir=data_dir, handwriting_api_key=API_KEY, redis_url=redis_url)
    job = httpx.post(api.url + "/v1/train", headers={"X-Api-Key": API_KEY}, json={"epochs": 1}).json()["job_id"]
    page.open(api.url)
    assert page.text("status") == "No model is loaded yet."
    draw(page, SEVEN)
    page.wait(lambda: page.visible("read-error"), what="the 503")
    sentence = page.text("read-error")
    assert sentence.startswith("The service is not ready: no model is loaded yet: a model is training now")
    assert f"job {job}" in sentence and sentence.endswith(".")
    page.wait(lambda: page.visible("training-note"), what="the training's progress")
    assert page.text("note-pct") == "queued, 0%"
    page.shot("1-not-ready")
    assert page.console_errors(allowed=("/v1/read?visualize=true - Failed to load resource",)) == []
    # The page still follows the job (its event stream stays open until the job ends): leave before the app
    # stops, as uvicorn waits for open responses when it shuts down.
    page.driver.get("about:blank")


def test_the_page_calls_only_documented_routes(served_app: ServeApp, data_dir: Path) -> None:
    api = served_app(data_dir=data_dir)
    documented = httpx.get(api.url + "/openapi.json").json()["paths"]
    patterns = [re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$") for path in documented]
    html = httpx.get(api.url + "/").text
    used = set(re.findall(r"""["'`](/(?:v1|assets)/[^"'`?]*)""", html + _asset("app.js")))
    assert {"/assets/app.js", "/assets/app.css", "/v1/read", "/v1/train", "/v1/models/active"} <= used
    concrete = {re.sub(r"\$\{[^}]+\}", "x", path) for path in used}
    assert all(any(p.match(path) for p in patterns) for path in concrete), concrete
    assert not re.search(r"https?://|//cdn", html + _asset("app.js") + _asset("app.css"))  # nothing from elsewhere
