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
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement

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


def start_chromium(workdir: Path) -> WebDriver:
    """A fresh Chromium (its own profile in `workdir`), or a RuntimeError saying what is missing."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        raise RuntimeError(f"{' and '.join(missing)} missing: scripts/test.sh installs chromium and chromium-driver")
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not fetch a browser or a driver
    options = Options()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={workdir / 'profile'}"]:
        options.add_argument(flag)
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
