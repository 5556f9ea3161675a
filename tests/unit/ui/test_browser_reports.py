"""The Data and Evaluation pages in a real headless Chromium: reached through the run page's
tabs, the histograms drawn, a long example opened with "show all", the evaluation tables
laid out. Screenshots: tests/artifacts/ui/data.png and evaluation.png (gitignored)."""

from __future__ import annotations

import json

from deploy_helpers import serve_in_thread

from tests.unit.ui.browser import ARTIFACTS, pytestmark, wait_for  # noqa: F401 - pytestmark: the skip
from tests.unit.ui.test_reports import compare_folder, eval_folder, prepared_run


def test_data_and_evaluation_pages_through_the_run_tabs(ui_app, runs_dir, tmp_path, tiny_model_dir, browser):
    # deferred: selenium is a test-only dependency, checked by importorskip above
    from selenium.webdriver.common.by import By

    run, _ = prepared_run(runs_dir, tmp_path, tiny_model_dir)
    (run / "eval.json").write_text(json.dumps({
        "base": {"n": 4, "scores": {"exact_match": 0.25, "token_f1": 0.5}, "seconds": 1.0, "generation": {}},
        "tuned": {"n": 4, "scores": {"exact_match": 0.75, "token_f1": 0.8}, "seconds": 1.0, "generation": {}}}))
    eval_folder(run)
    compare_folder(run)
    with serve_in_thread(ui_app) as url:
        browser.get(f"{url}/ui/runs/prep")
        browser.find_element(By.LINK_TEXT, "Data").click()
        wait_for(browser, lambda d: d.current_url.endswith("/ui/runs/prep/data"), 10)
        bars = browser.find_elements(By.CSS_SELECTOR, "svg.bars rect.bar")
        assert bars and all(b.is_displayed() for b in bars[:3])
        assert browser.find_element(By.CSS_SELECTOR, "svg.bars .marker-label").text == "max_length 160"
        assert browser.find_element(By.ID, "reasons").is_displayed()
        detail = browser.find_element(By.CSS_SELECTOR, ".example details.show-all")
        full = detail.find_element(By.TAG_NAME, "pre")
        assert not full.is_displayed()
        detail.find_element(By.TAG_NAME, "summary").click()
        wait_for(browser, lambda d: full.is_displayed(), 5)
        browser.execute_script("window.scrollTo(0, 0)")  # the screenshot: counts, reasons, histograms
        browser.save_screenshot(str(ARTIFACTS / "data.png"))

        browser.find_element(By.LINK_TEXT, "Evaluation").click()
        wait_for(browser, lambda d: d.current_url.endswith("/ui/runs/prep/evaluation"), 10)
        delta = browser.find_element(By.CSS_SELECTOR, '#trained-scores tr[data-metric="exact_match"] td.delta')
        assert delta.text == "+0.5" and "up" in delta.get_attribute("class")
        for element in ("report-scores", "forgetting", "diagnosis", "strategies", "recommendation"):
            assert browser.find_element(By.ID, element).is_displayed(), element
        browser.save_screenshot(str(ARTIFACTS / "evaluation.png"))
