"""Shared pieces of the dashboard's browser tests: a headless Debian Chromium driven by
Selenium (no browser download), a wait that tolerates navigation, and the screenshot folder.
A browser test module imports `pytestmark` from here (skipped with the reason when Selenium,
chromium or chromedriver is missing) and takes the `browser` fixture (conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="no chromium / chromedriver (apt-get install chromium chromium-driver)")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "ui"
__all__ = ["ARTIFACTS", "pytestmark", "wait_for"]


def wait_for(driver, condition, timeout: float):
    # deferred: selenium is a test-only dependency, checked by importorskip above
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    # an element read while the page navigates goes stale: poll again, as for a missing one
    return WebDriverWait(driver, timeout, poll_frequency=0.3,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(condition)
