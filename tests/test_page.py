"""The page at `GET /`, in a real headless Chromium against the real API under uvicorn, reading with a model
really trained on MNIST (the session's `trained_model`, tests/trained_support.py).

Draw a 7 with pointer events (pen, mouse, touch; at 360 px too) and see it read as 7; a bad release live
misreads a photo, a rollback from the page (keyboard only) puts the trained model back and the photo, picked
and then another dropped, is read as its digit; 415 and 413 as sentences; train a small job with a real RQ
worker and watch it live, once going live past the promotion gate (it beats the bad release) and once kept
out by it (worse than the trained model), as the page says; a 503 before any model shown as a sentence
with the training's progress. Each state is screenshotted into a folder printed at the start
(PAGE_SCREENSHOTS=DIR puts them there instead); docs/page.png is the train test's last one.
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
from tests.serving_support import API_KEY, MODEL_ID, manifest, upload_files, weights_bytes
from tests.support import ServedApp
from tests.train_support import TINY_TRAINING, start_worker
from tests.trained_support import Photo, TrainedModel

ServeApp = Callable[..., ServedApp]

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


BAD_DIGIT = 1  # the bad release reads every image as this digit
BAD_VERSION = "bad-release"
PHOTO_CAP = 2 * 1024 * 1024  # API__READ_MAX_BYTES of the photo test's app: a bigger file answers 413


def pct(x: float) -> str:
    """An accuracy as the page writes it."""
    return f"{x * 100:.1f}%"


def release(api: ServedApp, trained: TrainedModel, *, bad: bool) -> None:
    """The trained model goes live as a worker's model does (uploaded; the first model passes the gate);
    with `bad`, a bad release is then forced live over it: a network whose classifier answers BAD_DIGIT
    to everything, as a broken training run's could."""
    result = trained.upload(api.url, API_KEY)
    assert result.activated and result.gate is not None and result.gate.decision == "passed", result.body
    if bad:
        data, files = upload_files(manifest(trained.model_id, BAD_VERSION), weights_bytes(BAD_DIGIT))
        answer = httpx.post(api.url + "/v1/admin/models/upload", data=data, files=files,
                            headers={"X-Api-Key": API_KEY}, timeout=60)
        assert answer.status_code == 200 and answer.json()["activated"], answer.text


@pytest.fixture(scope="module")
def photos(trained_model: TrainedModel) -> tuple[Photo, Photo]:
    """Two photos of MNIST test digits the trained model reads right: one to pick, one to drop; neither
    is a BAD_DIGIT nor a 7, and they show different digits."""
    picked = trained_model.photo("phone_photo", avoid=frozenset({BAD_DIGIT, 7}))
    dropped = trained_model.photo("grey_file", avoid=frozenset({BAD_DIGIT, 7, picked.digit}))
    return picked, dropped


def read_digit(page: Page, what: str) -> str:
    page.wait(lambda: page.visible("result"), what=what)
    return page.text("digit")


def job_result(page: Page, previous_job: str = "") -> str:
    """Wait for a job started from the page (another one than `previous_job`) to end; its closing sentence."""
    page.wait(lambda: page.visible("job") and page.text("job-id") not in ("", previous_job), what="the job to start")
    return page.wait(lambda: page.text("job-result"), timeout=240, what="the training to end")


CLOCK = re.compile(r"\d{1,2}:\d{2}")  # a time of day, as the page writes one (in the browser's locale)
GATE_FIGURES = re.compile(r"\(gate set: ([\d.]+)% against ([\d.]+)% for the model in service\)")


@needs_chromium
def test_draw_a_seven_with_the_pen_and_read_it(
    served_app: ServeApp, data_dir: Path, trained_model: TrainedModel, page: Page
) -> None:
    api = served_app(data_dir=data_dir, handwriting_api_key=API_KEY)
    release(api, trained_model, bad=False)
    page.open(api.url)
    # The model panel: the trained model with its manifest's accuracies and when it went live.
    assert page.text("model-version") == trained_model.version and page.text("model-id") == MODEL_ID
    assert page.text("model-val") == pct(trained_model.val_acc)
    assert page.text("model-test") == pct(trained_model.test_acc)
    assert CLOCK.search(page.text("model-live")) and CLOCK.search(page.text("model-created"))
    page.shot("1-loaded")

    draw(page, SEVEN, interaction.POINTER_PEN)
    assert read_digit(page, "the answer") == "7"
    assert float(page.text("confidence").split("%")[0]) > 50
    bars = page.driver.find_elements("css selector", "#probs li")
    assert len(bars) == 10 and "top" in str(bars[7].get_attribute("class"))
    assert trained_model.version in page.text("read-model")
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
    # With the key, the stored versions fit too (the table does not scroll sideways either).
    page.el("key").send_keys(API_KEY, Keys.ENTER)
    page.wait(lambda: page.visible("versions-table"), what="the stored versions")
    assert page.driver.execute_script(
        "const t = document.querySelector('.table-wrap'); return t.scrollWidth <= t.clientWidth")
    assert page.no_horizontal_scroll()
    assert page.console_errors() == []


@needs_chromium
def test_roll_back_a_bad_release_then_photos_picked_and_dropped_read_right(
    served_app: ServeApp, data_dir: Path, trained_model: TrainedModel, photos: tuple[Photo, Photo],
    tmp_path: Path, page: Page,
) -> None:
    picked, dropped = photos
    assert len(picked.data) < PHOTO_CAP and len(dropped.data) < PHOTO_CAP
    api = served_app(data_dir=data_dir, handwriting_api_key=API_KEY, api={"read_max_bytes": PHOTO_CAP})
    release(api, trained_model, bad=True)
    page.open(api.url)
    assert page.text("model-version") == BAD_VERSION
    # The photo picker is keyboard-reachable and shows it has the focus: Tab from Clear.
    page.el("clear").send_keys(Keys.TAB)
    assert page.driver.switch_to.active_element.get_attribute("id") == "file"
    assert page.driver.execute_script(
        "return getComputedStyle(document.querySelector('label[for=file]')).outlineStyle") == "solid"
    # The bad release is live: the photo is misread.
    page.el("file").send_keys(str(picked.save(tmp_path)))
    assert read_digit(page, "the photo read") == str(BAD_DIGIT) and BAD_VERSION in page.text("read-model")
    assert page.visible("versions-hint") and not page.visible("versions-table")
    page.shot("1-bad-release-misreads")

    # Keyboard only: type the key, Enter; then Tab to the trained version's Activate button, Enter.
    page.el("key").send_keys(API_KEY, Keys.ENTER)
    page.wait(lambda: page.visible("versions-table"), what="the stored versions")
    rows = page.rows()
    assert [text.split()[0] for text, _ in rows] == [BAD_VERSION, trained_model.version]  # received last first
    assert rows[0][0].endswith("forced active") and "active" in rows[0][1] and "passed" in rows[1][0]
    page.shot("2-versions")
    page.el("key").send_keys(Keys.SHIFT, Keys.TAB)  # back from the key field: the last button of the table
    focused = page.driver.switch_to.active_element
    assert focused.get_attribute("aria-label") == f"Activate {MODEL_ID} {trained_model.version}"
    focused.send_keys(Keys.ENTER)
    page.wait(lambda: page.text("model-version") == trained_model.version, what="the rollback")
    assert httpx.get(api.url + "/v1/models/active").json()["version"] == trained_model.version
    assert CLOCK.search(page.text("model-live"))  # when the rollback put it live
    assert page.text("model-test") == pct(trained_model.test_acc)
    page.shot("3-rolled-back")

    # The same photo, read by the trained model: its digit.
    page.el("file").send_keys(str(picked.save(tmp_path)))
    page.wait(lambda: trained_model.version in page.text("read-model"), what="the photo read again")
    assert page.text("digit") == str(picked.digit)
    ink_rows_and_cols(page)
    page.shot("4-photo-read")

    page.el("clear").click()
    page.drop_file("drop", dropped.name, dropped.data, dropped.mime)
    assert read_digit(page, "the dropped photo read") == str(dropped.digit)
    page.shot("5-photo-dropped")
    page.el("clear").click()  # the focus is on a button, not in a text field: a paste there reads the image
    page.paste_file("clear", picked.name, picked.data, picked.mime)
    assert read_digit(page, "the pasted photo read") == str(picked.digit)
    # Not an image: 415 as a sentence.
    page.drop_file("drop", "notes.txt", b"not an image at all", "text/plain")
    page.wait(lambda: page.visible("read-error"), what="the refusal")
    assert page.text("read-error").startswith("That file is not a PNG or JPEG image:")
    assert not page.visible("result")
    page.shot("6-not-an-image")
    # Over API__READ_MAX_BYTES: 413 as a sentence.
    page.drop_file("drop", "huge.png", b"\x89PNG\r\n\x1a\n" + bytes(PHOTO_CAP), "image/png")
    page.wait(lambda: page.text("read-error").startswith("That image is too large to read:"), what="the 413")
    assert page.text("read-error").endswith(".") and not page.visible("result")
    page.shot("7-too-large")
    assert page.console_errors(allowed=("/v1/read?visualize=true - Failed to load resource",)) == []


@needs_chromium
def test_train_from_the_page_and_see_the_gate_decide_both_ways(
    served_app: ServeApp, redis_url: str, data_dir: Path, tmp_path: Path, trained_model: TrainedModel,
    page: Page,
) -> None:
    """The bad release is live; a small job beats it and goes live. After a rollback to the trained model the
    same job is worse than the model in service: the gate keeps it out, and the page says so."""
    api = served_app(data_dir=data_dir, handwriting_api_key=API_KEY, redis_url=redis_url, api={"gate_size": 50})
    release(api, trained_model, bad=True)
    # 256 images: enough to beat a network that answers one digit, far from the trained model's accuracy.
    worker = start_worker({"REDIS_URL": redis_url, **TINY_TRAINING, "TRAIN__LIMIT": "256",
                           "DATA_DIR": str(data_dir / "worker"), "HANDWRITING_API_URL": api.url,
                           "HANDWRITING_API_KEY": API_KEY}, tmp_path, redis_url)
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
        form["batch_size"].send_keys("16")
        page.shot("1-form")
        page.el("train-start").click()
        page.wait(lambda: page.visible("job"), what="the job to start")
        page.shot("2-started")
        passed = job_result(page)
        page.fit_height()
        page.shot("3-finished-and-live")
        assert page.el("job-bar").get_attribute("value") == "100"
        assert page.text("job-pct") == "100%" and page.text("job-stage") == "completed"
        assert re.fullmatch(r"[\d.]+", page.text("job-loss")) and page.text("job-speed").isdigit()
        version = re.search(r"version (\S+),", passed)
        figures = GATE_FIGURES.search(passed)
        assert version and figures and "it is now the active model (gate set: " in passed, passed
        assert float(figures[1]) >= float(figures[2])  # the candidate is not worse than the bad release
        page.wait(lambda: page.text("model-version") == version[1], what="the model panel to show it")
        page.wait(lambda: [text.split()[0] for text, classes in page.rows() if "active" in classes] == [version[1]],
                  what="the new version listed as the active one")
        assert next(text for text, _ in page.rows() if text.startswith(version[1])).endswith("passed active")
        page.shot("4-new-version")

        # Roll back to the trained model, then train the same small job again.
        page.click(f"button[aria-label='Activate {MODEL_ID} {trained_model.version}']")
        page.wait(lambda: page.text("model-version") == trained_model.version, what="the rollback")
        first_job = page.text("job-id")
        page.el("train-start").click()
        refused = job_result(page, first_job)
        again = re.search(r"version (\S+),", refused)
        figures = GATE_FIGURES.search(refused)
        assert again and figures, refused
        assert "it did not go live: the promotion gate found it worse than the model in service" in refused
        assert float(figures[1]) < float(figures[2])
        assert page.text("model-version") == trained_model.version  # still the trained model
        page.wait(lambda: [(text.split()[-2:], classes) for text, classes in page.rows()
                           if text.startswith(again[1])] == [(["refused", "Activate"], [])],
                  what="the refused version listed, not active")
        assert httpx.get(api.url + "/v1/models/active").json()["version"] == trained_model.version

        # The model in service still reads: the state the README's screenshot shows.
        draw(page, SEVEN)
        page.wait(lambda: trained_model.version in page.text("read-model"), what="the 7 read")
        assert page.text("digit") == "7"
        page.fit_height()
        page.shot("5-refused-and-reading")  # docs/page.png
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
