"""A real browser for end-to-end tests: Debian's headless Chromium, driven by Selenium.

Chromium and its driver come from apt (scripts/setup.sh installs them): Selenium never downloads a
browser or a driver (SE_OFFLINE), and the browser resolves no host name, so it reaches loopback
addresses only, whatever a page asks for. Screenshots go to the artifacts directory, where a CI
run keeps them.
"""

from __future__ import annotations

import os
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import ElementClickInterceptedException
from selenium.common.exceptions import StaleElementReferenceException
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = [
    "--headless=new",
    "--no-sandbox",  # as root, Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
    # No DNS at all: the tests talk to 127.0.0.1 only, and nothing else may leave this machine.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


def start_chromium(workdir: Path, flags: tuple[str, ...] = (), capabilities: dict | None = None) -> WebDriver:
    """A fresh Chromium (its own profile in `workdir`), or a RuntimeError saying what is missing.
    `flags` and `capabilities` add to the defaults (scripts/bench_page.py: its performance log)."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        raise RuntimeError(f"{' and '.join(missing)} missing: scripts/test.sh installs chromium and chromium-driver")
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not fetch a browser or a driver
    options = Options()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, *flags, f"--user-data-dir={workdir / 'profile'}"]:
        options.add_argument(flag)
    for name, value in (capabilities or {}).items():
        options.set_capability(name, value)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(workdir / "chromedriver.log"))
    return webdriver.Chrome(options=options, service=service)


def artifacts_dir() -> Path:
    path = Path(os.environ.get("DATALAB_ARTIFACTS") or ROOT / ".state" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def screenshot(target: WebDriver | WebElement, name: str) -> Path:
    """Save what a user sees (the whole window, or one element) as browser-<name>.png; print where."""
    path = artifacts_dir() / f"browser-{name}.png"
    png = target.screenshot_as_png if isinstance(target, WebElement) else target.get_screenshot_as_png()
    path.write_bytes(png)
    print(f"screenshot: {path}")
    return path


# Waiting for JupyterLab and using it.

UI_WAIT = 120  # seconds: a bound on waiting for the UI (a cold start, a kernel's first boot), not a claim
RUN_SEEN = 3  # seconds for a run's [*] to show before the cell is run again (it shows at once)
STALE = [StaleElementReferenceException]  # JupyterLab re-renders what a wait found: look it up again


def wait(driver: WebDriver, timeout: float = UI_WAIT, poll: float = 0.25) -> WebDriverWait:
    return WebDriverWait(driver, timeout, poll_frequency=poll, ignored_exceptions=STALE)


def visible(driver: WebDriver, css: str) -> WebElement:
    return wait(driver).until(
        lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()), None)
    )


# Chromium aborts the requests in flight (net::ERR_NETWORK_CHANGED) when a network interface comes or
# goes: Docker makes one for every container that other tests (other xdist workers) start meanwhile.
# JupyterLab then shows this modal dialog over the page (its theme stylesheet did not load) and does
# not retry. That is the test machine, not the page: a page under it is reloaded, once per browser.
MACHINE_DIALOG = 'dialog[aria-label^="Error Loading Theme"]'


def reloaded_after_a_network_change(driver: WebDriver) -> bool:
    if getattr(driver, "datalab_reloaded", False) or not driver.find_elements(By.CSS_SELECTOR, MACHINE_DIALOG):
        return False
    screenshot(driver, "network-changed")
    driver.datalab_reloaded = True
    driver.refresh()
    return True


def click(driver: WebDriver, css: str) -> None:
    """Click what `css` shows; if it is re-rendered before the click lands (a new notebook's cell is
    replaced once its model loads), the new one."""

    def clicked(d: WebDriver) -> bool:
        if reloaded_after_a_network_change(d):
            return False
        try:
            visible(d, css).click()
        except ElementClickInterceptedException:  # by that dialog, shown meanwhile: the next look reloads
            return False
        return True

    wait(driver).until(clicked)


def showing(driver: WebDriver, css: str, text: str) -> WebElement:
    """Wait for an element that shows `text` (rendering takes a moment after it appears)."""
    return wait(driver).until(
        lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, css) if text in e.text), None)
    )


def type_and_run(driver: WebDriver, lines: list[str]) -> None:
    """Click into the active cell's editor, type, line by line, then run the cell (Ctrl+Enter: it
    stays active) until its prompt shows it taken ([*] or its number). A run before the page has its
    kernel connection is dropped (the prompt stays [ ]), and no page element tells that moment: the
    execution indicator says "idle" from the start, before any kernel status arrives."""
    active = ".jp-CodeCell.jp-mod-active"
    click(driver, f"{active} .cm-content")
    driver.switch_to.active_element.send_keys(Keys.ENTER.join(lines))

    def taken(_) -> bool:
        ActionChains(driver).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()
        try:  # a run that is taken shows [*] at once; a dropped one never does
            return wait(driver, RUN_SEEN, 0.1).until(
                lambda d: d.find_element(By.CSS_SELECTOR, f"{active} .jp-InputArea-prompt").text.strip("[]: ")
            )
        except TimeoutException:
            return False

    wait(driver).until(taken)
