"""A real headless Chromium (Debian's `chromium` + `chromium-driver`) driven by Selenium, for the page's tests.

Nothing is downloaded: the driver and the browser are given by path, so Selenium Manager never runs.
Without the Debian packages the browser tests skip, saying what to install (`.ci/run` installs them).
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MISSING = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
needs_chromium = pytest.mark.skipif(
    bool(MISSING),
    reason=f"no {' and '.join(MISSING)}: `apt-get install -y chromium chromium-driver` (.ci/run does)",
)

T = TypeVar("T")


class Page:
    """One browser tab on the app, with the helpers the tests share."""

    def __init__(self, driver: webdriver.Chrome, shots: Path) -> None:
        self.driver = driver
        self.shots = shots

    def open(self, url: str, width: int = 1280, height: int = 900) -> None:
        self.driver.set_window_size(width, height)
        self.driver.get(url)
        self.wait(lambda: self.text("status") not in ("", "Loading…"), what="the page to load")

    def el(self, element_id: str) -> WebElement:
        return self.driver.find_element(By.ID, element_id)

    def text(self, element_id: str) -> str:
        return str(self.el(element_id).text)

    def visible(self, element_id: str) -> bool:
        return bool(self.el(element_id).is_displayed())

    def wait(self, check: Callable[[], T], timeout: float = 60.0, what: str = "the page") -> T:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.1)
        self.shot("timed-out")
        raise AssertionError(f"timed out waiting for {what}; status line: {self.text('status')!r}")

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def click(self, css: str) -> None:
        """Click the element `css` selects, finding it again if the page re-rendered it meanwhile."""
        def attempt() -> bool:
            try:
                self.driver.find_element(By.CSS_SELECTOR, css).click()
            except StaleElementReferenceException:
                return False
            return True
        self.wait(attempt, timeout=10, what=f"a click on {css}")

    def rows(self, css: str = "#versions tr") -> list[tuple[str, list[str]]]:
        """The text (whitespace collapsed) and classes of each element `css` selects, read in one go in the
        page: nothing goes stale when the page re-renders a table meanwhile."""
        found = self.driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map((e) => [e.innerText, e.className])", css)
        return [(" ".join(str(text).split()), str(classes).split()) for text, classes in found]

    def seen_image(self) -> Image.Image:
        """The 28x28 (enlarged) image the model saw, as the page shows it."""
        src = str(self.el("seen").get_attribute("src"))
        assert src.startswith("data:image/png;base64,"), src[:60]
        return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("L")

    def console_errors(self, allowed: tuple[str, ...] = ()) -> list[str]:
        """SEVERE entries of the browser's console log, but for those naming an `allowed` text."""
        entries = self.driver.get_log("browser")
        return [e["message"] for e in entries
                if e["level"] == "SEVERE" and not any(a in e["message"] for a in allowed)]

    def no_horizontal_scroll(self) -> bool:
        return bool(self.driver.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth"))

    def fit_height(self) -> None:
        """Make the window as tall as the page, so that a screenshot shows all of it."""
        chrome_px, page_px = self.driver.execute_script(
            "return [window.outerHeight - window.innerHeight, document.documentElement.scrollHeight]")
        self.driver.set_window_size(self.driver.get_window_size()["width"], int(chrome_px) + int(page_px))

    def drop_file(self, element_id: str, name: str, data: bytes, mime: str) -> None:
        """Drop a file on an element as a drag and drop from the desktop would (a DataTransfer holding it)."""
        self._file_event(element_id, name, data, mime,
                         """target.dispatchEvent(new DragEvent("dragover", { dataTransfer: dt, bubbles: true,
                                                                           cancelable: true }));
                         target.dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true,
                                                                      cancelable: true }));""")

    def paste_file(self, element_id: str, name: str, data: bytes, mime: str) -> None:
        """Paste a file into the page with focus on an element, as Ctrl-V of a copied image would."""
        self._file_event(element_id, name, data, mime,
                         """target.dispatchEvent(new ClipboardEvent("paste", { clipboardData: dt, bubbles: true,
                                                                              cancelable: true }));""")

    def _file_event(self, element_id: str, name: str, data: bytes, mime: str, dispatch: str) -> None:
        """Run `dispatch` with `dt` a DataTransfer holding the file and `target` the element."""
        self.driver.execute_script(
            """const [id, name, b64, mime] = arguments;
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: mime }));
            const target = document.getElementById(id);
            """ + dispatch,
            element_id, name, base64.b64encode(data).decode("ascii"), mime)


def chrome() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-extensions", "--no-first-run", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=os.devnull)
    return webdriver.Chrome(options=options, service=service)


def open_browser(shots: Path) -> Iterator[Page]:
    driver = chrome()
    try:
        yield Page(driver, shots)
    finally:
        driver.quit()


def describe(obj: object) -> str:
    return json.dumps(obj, default=str)[:500]
