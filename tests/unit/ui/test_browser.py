"""The dashboard in a real headless Chromium (Debian's `chromium` + `chromium-driver`,
driven by Selenium; no browser download): the pages render, a config error shows inline
while typing, and a run started from the form is followed live to the end. Screenshots of
each page go to tests/artifacts/ui/ (gitignored)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from deploy_helpers import serve_in_thread

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="no chromium / chromedriver (apt-get install chromium chromium-driver)")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "ui"


@pytest.fixture
def browser():
    # deferred: selenium is a test-only dependency, checked by importorskip above
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)  # a local driver: Selenium Manager not asked
    driver.implicitly_wait(0)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float):
    # deferred: selenium is a test-only dependency, checked by importorskip above
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.3).until(condition)


def test_pages_render_errors_show_inline_and_a_form_run_is_followed_to_the_end(ui_app, tiny_model_dir, browser):
    # deferred: selenium is a test-only dependency, checked by importorskip above
    from selenium.webdriver.common.by import By

    with serve_in_thread(ui_app) as url:
        browser.get(f"{url}/ui/runs")
        assert browser.find_element(By.CSS_SELECTOR, 'tr[data-id="alpha"]').is_displayed()
        browser.save_screenshot(str(ARTIFACTS / "runs.png"))
        browser.get(f"{url}/ui/runs/alpha")
        assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart polyline")) == 2
        browser.save_screenshot(str(ARTIFACTS / "run.png"))

        browser.get(f"{url}/ui/new")

        def field(name):
            return browser.find_element(By.ID, f"f-{name}")

        field("model.name").send_keys(tiny_model_dir)
        field("data.train").send_keys("builtin:orders?n=120&seed=3")
        field("train.lr").send_keys("fast")
        problem = browser.find_element(By.ID, "p-train.lr")
        wait_for(browser, lambda d: problem.is_displayed() and "train.lr" in problem.text, 30)
        browser.save_screenshot(str(ARTIFACTS / "new-run-error.png"))

        field("train.lr").clear()
        field("train.lr").send_keys("0.005")
        for name, value in (("train.max_steps", "6"), ("train.batch_size", "4"), ("data.max_length", "160"),
                            ("run_name", "browser")):
            field(name).send_keys(value)
        field("extra_yaml").send_keys("data: {val_size: 0.1, test_size: 0.1}\nmethod: {r: 4, alpha: 8}\n"
                                      "train: {eval_every: 3, save_every: 3, dtype: fp32}\n"
                                      "eval: {max_new_tokens: 8, limit: 4, batch_size: 4}")
        wait_for(browser, lambda d: d.find_element(By.ID, "verdict").text == "valid config", 120)
        wait_for(browser, lambda d: d.find_elements(By.ID, "plan-table"), 120)
        assert not problem.is_displayed() and "tuneforge train browser.yaml" in browser.find_element(By.ID, "cli").text
        browser.save_screenshot(str(ARTIFACTS / "new-run-valid.png"))

        browser.find_element(By.ID, "start").click()
        wait_for(browser, lambda d: "/ui/runs/ftjob-" in d.current_url, 30)
        wait_for(browser, lambda d: d.find_element(By.ID, "status").text not in ("queued", "running"), 400)
        assert browser.find_element(By.ID, "status").text == "succeeded"
        assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart polyline")) == 2
        browser.save_screenshot(str(ARTIFACTS / "run-finished.png"))
