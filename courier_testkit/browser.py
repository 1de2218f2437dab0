"""A real browser for tests: Debian's ``chromium``, headless, driven by selenium through
Debian's ``chromium-driver``.

Nothing is downloaded at run time: the browser and its driver are the system's (``.ci/run``
installs both; ``apt-get install chromium chromium-driver`` on a workstation), and selenium is
handed their paths, so its own driver manager never runs. ``missing()`` says what is not
installed, for a test to skip on (a skip fails the run in CI).

``chromium()`` starts one browser (about 0.5 s on 2 cores) and yields a ``Browser``: an async
facade whose every WebDriver call runs in a thread, so a test's event loop keeps serving (load,
stubs) while the browser waits for a page. ``Browser.screenshot`` saves the whole page, not
only the window, to ``build/console-screenshots/``; ``publish`` copies one into ``docs/images/``
for the README.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from .processes import REPO

SCREENSHOTS = REPO / "build" / "console-screenshots"
DOCS_IMAGES = REPO / "docs" / "images"
BROWSERS = ("chromium", "chromium-browser")  # Debian's name, then Ubuntu's
DRIVER = "chromedriver"  # what Debian's chromium-driver installs in /usr/bin
WINDOW = (1280, 900)
MAX_SCREENSHOT_HEIGHT = 4000  # a runaway page does not make a 100 MB image
POLL_SECONDS = 0.1
# Headless, as root in a container: no sandbox (it needs user namespaces), /tmp rather than a
# small /dev/shm, no GPU, and none of the first-run, sync or update traffic a desktop makes.
ARGUMENTS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)

T = TypeVar("T")

__all__ = ["DOCS_IMAGES", "SCREENSHOTS", "Browser", "chromium", "missing"]


def _executables() -> tuple[str | None, str | None]:
    browser = next(filter(None, map(shutil.which, BROWSERS)), None)
    return browser, shutil.which(DRIVER)


def missing() -> str | None:
    """Why no browser can start here (what to install), or None when chromium and its driver
    are both on PATH."""
    browser, driver = _executables()
    absent = [
        name for name, path in (("chromium", browser), ("chromium-driver", driver)) if not path
    ]
    if not absent:
        return None
    return (
        f"{' and '.join(absent)} not installed (Debian: apt-get install chromium chromium-driver)"
    )


class Browser:
    """One headless chromium page. Every method that talks to the browser is a coroutine that
    runs the WebDriver call in a thread; ``driver`` is the selenium WebDriver itself."""

    def __init__(self, driver: webdriver.Chrome, screenshots: Path) -> None:
        self.driver = driver
        self.screenshots = screenshots

    async def _call(self, function: Callable[[], T]) -> T:
        return await asyncio.to_thread(function)

    async def get(self, url: str) -> None:
        """Load ``url`` and wait for its load event."""
        await self._call(lambda: self.driver.get(url))

    async def url(self) -> str:
        """The address the page is at now (after any redirect)."""
        return await self._call(lambda: str(self.driver.current_url))

    async def find(self, css: str) -> list[WebElement]:
        """The elements matching ``css`` now (none: an empty list)."""
        return await self._call(lambda: self.driver.find_elements(By.CSS_SELECTOR, css))

    async def wait_for(self, css: str, timeout: float = 10) -> WebElement:  # noqa: ASYNC109
        """The first element matching ``css`` once it is on the page; fails after ``timeout``
        with the page's address and the start of its text."""
        return await self.wait_until(lambda: self._first(css), timeout, f"an element {css!r}")

    async def wait_gone(self, css: str, timeout: float = 10) -> None:  # noqa: ASYNC109
        """Until no element matches ``css``."""
        await self.wait_until(
            lambda: not self.driver.find_elements(By.CSS_SELECTOR, css), timeout, f"{css!r} gone"
        )

    async def wait_until(
        self,
        condition: Callable[[], T | None],
        timeout: float = 10,  # noqa: ASYNC109
        what: str = "",
    ) -> T:
        """``condition()`` (run in a thread, against ``driver``) once it is truthy, polled every
        0.1 s. An element going stale while a page reloads (``node_gone``) counts as not yet."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = await self._call(condition)
            except WebDriverException as exc:
                if not node_gone(exc):
                    raise
            else:
                if result:
                    return result
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out after {timeout:g}s waiting for {what or condition}"
                    f" on {self.driver.current_url}: {self._page_text()[:600]!r}"
                )
            await asyncio.sleep(POLL_SECONDS)

    async def text(self, css: str) -> str:
        """The visible text of the first element matching ``css`` (waiting for it)."""
        element = await self.wait_for(css)
        return await self._call(lambda: str(element.text))

    async def attribute(self, css: str, name: str) -> str:
        """Attribute ``name`` of the first element matching ``css`` ('' when absent)."""
        element = await self.wait_for(css)
        return await self._call(lambda: element.get_attribute(name) or "")

    async def type(self, css: str, text: str, *, clear: bool = True) -> None:
        """Type ``text`` into the field ``css`` (emptied first unless ``clear`` is false)."""
        element = await self.wait_for(css)

        def typing() -> None:
            if clear:
                element.clear()
            element.send_keys(text)

        await self._call(typing)

    async def click(self, css: str) -> None:
        """Click the first element matching ``css`` (scrolled into view first)."""
        element = await self.wait_for(css)

        def clicking() -> None:
            self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
            element.click()

        await self._call(clicking)

    async def follow(self, css: str, timeout: float = 20) -> None:  # noqa: ASYNC109
        """Click a link or submit button matching ``css`` and wait for the page it leads to
        (the old page gone, the new one loaded), so what is read next is the new page's."""
        old = await self._call(lambda: self.driver.find_element(By.TAG_NAME, "html"))
        await self.click(css)
        await self.wait_until(lambda: _stale(old), timeout, f"{css!r} to lead to a new page")
        await self.wait_until(
            lambda: self.driver.execute_script("return document.readyState") == "complete",
            timeout,
            "the new page to load",
        )

    async def log(self) -> list[str]:
        """What the pages wrote to the browser's console since the last call (script errors,
        Content-Security-Policy refusals, failed loads), as ``LEVEL message`` lines."""
        entries = await self._call(lambda: self.driver.get_log("browser"))  # type: ignore[no-untyped-call]
        return [f"{entry.get('level', '')} {entry.get('message', '')}" for entry in entries]

    async def cookies(self) -> dict[str, str]:
        """The page's cookies, name -> value (HttpOnly ones included: WebDriver sees them)."""
        found = await self._call(self.driver.get_cookies)
        return {str(cookie["name"]): str(cookie["value"]) for cookie in found}

    async def clear_cookies(self) -> None:
        """Forget every cookie: the next page is what someone new to the console sees."""
        await self._call(self.driver.delete_all_cookies)

    async def screenshot(self, name: str) -> Path:
        """The whole page (up to ``MAX_SCREENSHOT_HEIGHT`` px tall) as ``<screenshots>/<name>.png``."""
        path = self.screenshots / f"{name}.png"
        data = await self._call(self._full_page_png)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def _full_page_png(self) -> bytes:
        # WebDriver's own screenshot is the window only; DevTools can capture the whole layout.
        metrics = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        width = max(int(size["width"]), WINDOW[0])
        height = min(max(int(size["height"]), 1), MAX_SCREENSHOT_HEIGHT)
        clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
        shot = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True, "clip": clip},
        )
        return base64.b64decode(shot["data"])

    def _first(self, css: str) -> WebElement | None:
        found = self.driver.find_elements(By.CSS_SELECTOR, css)
        return found[0] if found else None

    def _page_text(self) -> str:
        try:
            return str(self.driver.find_element(By.TAG_NAME, "body").text)
        except WebDriverException as exc:
            return f"(no page text: {exc.msg})"


# ChromeDriver reports an element of a document being replaced either as stale or, when the
# navigation races the command (seen in CI with Chromium 156), as an inspector error naming
# the node: both mean the page it was on is going.
NODE_GONE_MESSAGES = (
    "Node with given id does not belong to the document",
    "No node with given id found",
)


def node_gone(exc: WebDriverException) -> bool:
    """Whether ``exc`` says the element's page is gone (stale, in either of ChromeDriver's ways)."""
    if isinstance(exc, StaleElementReferenceException):
        return True
    return any(message in (exc.msg or "") for message in NODE_GONE_MESSAGES)


def _stale(element: WebElement) -> bool:
    try:
        element.is_enabled()
    except WebDriverException as exc:
        if node_gone(exc):
            return True
        raise
    return False


def publish(screenshot: Path, name: str, directory: Path = DOCS_IMAGES) -> Path:
    """Copy ``screenshot`` to ``<directory>/<name>`` (the README's images); returns the copy."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    shutil.copyfile(screenshot, target)
    return target


def _options(browser: str, width: int, height: int) -> webdriver.ChromeOptions:
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (*ARGUMENTS, f"--window-size={width},{height}", "--lang=en-US"):
        options.add_argument(argument)
    # Keep the page's console (script errors, Content-Security-Policy refusals) for ``log``.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return options


def _start(width: int, height: int, log: Path | None) -> webdriver.Chrome:
    browser, driver_path = _executables()
    if browser is None or driver_path is None:
        raise RuntimeError(missing())
    service = Service(driver_path, log_output=str(log) if log else os.devnull)
    return webdriver.Chrome(options=_options(browser, width, height), service=service)


@contextlib.asynccontextmanager
async def chromium(
    *,
    width: int = WINDOW[0],
    height: int = WINDOW[1],
    screenshots: Path = SCREENSHOTS,
    page_load_timeout: float = 20,
    driver_log: Path | None = None,
) -> AsyncIterator[Browser]:
    """A headless chromium with a ``width`` x ``height`` window, quit on exit (also after a
    failure). ``driver_log`` keeps chromedriver's log (default: discarded)."""
    driver = await asyncio.to_thread(_start, width, height, driver_log)
    try:
        driver.set_page_load_timeout(page_load_timeout)
        yield Browser(driver, screenshots)
    finally:
        await asyncio.to_thread(driver.quit)
