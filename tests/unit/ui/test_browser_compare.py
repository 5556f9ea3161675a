"""Compare runs and clone a run in a real headless Chromium: tick two runs in the runs
table, press Compare, the page overlays both runs' curves; a run's "clone into the form"
link fills the New run form with its config. Screenshot: tests/artifacts/ui/compare.png."""

from __future__ import annotations

from deploy_helpers import serve_in_thread

from tests.unit.ui.browser import ARTIFACTS, pytestmark, wait_for  # noqa: F401 - pytestmark: the skip
from tests.unit.ui.test_compare import gamma


def test_two_runs_ticked_in_the_table_are_compared_and_a_run_clones_into_the_form(ui_app, runs_dir, browser):
    # deferred: selenium is a test-only dependency, checked by importorskip in tests.unit.ui.browser
    from selenium.webdriver.common.by import By

    gamma(runs_dir)
    with serve_in_thread(ui_app) as url:
        browser.get(f"{url}/ui/runs")
        for run in ("alpha", "gamma"):
            browser.find_element(By.CSS_SELECTOR, f'input[name="run"][value="{run}"]').click()
        browser.find_element(By.ID, "compare").click()
        wait_for(browser, lambda d: d.find_elements(By.ID, "compare-curves"), 10)
        assert sorted(browser.current_url.split("?")[1].split("&")) == ["run=alpha", "run=gamma"]
        lines = browser.find_elements(By.CSS_SELECTOR, "#chart-train svg.chart polyline")
        assert len(lines) == 2 and all(line.is_displayed() for line in lines)
        assert {line.find_element(By.TAG_NAME, "title").get_attribute("textContent") for line in lines} \
            == {"alpha", "gamma"}
        keys = {tr.get_attribute("data-key") for tr in browser.find_elements(By.CSS_SELECTOR, "#config-diff tr[data-key]")}
        assert keys == {"run_name", "train.lr", "train.max_steps", "method.r"}
        browser.save_screenshot(str(ARTIFACTS / "compare.png"))

        browser.find_element(By.LINK_TEXT, "gamma").click()
        browser.find_element(By.ID, "clone").click()
        wait_for(browser, lambda d: d.find_elements(By.ID, "cloned-from"), 10)

        def field(name):
            return browser.find_element(By.ID, f"f-{name}").get_attribute("value")

        assert field("run_name") == "gamma-2" and field("train.lr") == "0.002" and field("train.max_steps") == "4"
        assert field("method.name") == "lora" and "r: 8" in field("extra_yaml")
