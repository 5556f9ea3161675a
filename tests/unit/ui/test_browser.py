"""The dashboard in a real headless Chromium (Debian's `chromium` + `chromium-driver`,
driven by Selenium; no browser download): the pages render, a config error shows inline
while typing, and a run started from the form is followed live to the end. Screenshots of
each page go to tests/artifacts/ui/ (gitignored). With an admin key logged in: review
decisions by keyboard and click are saved, promote then rollback moves the alias."""

from __future__ import annotations

from deploy_helpers import serve_in_thread

from tests.unit.ui.browser import ARTIFACTS, pytestmark, wait_for  # noqa: F401 - pytestmark: the skip
from tests.unit.ui.conftest import make_run
from tests.unit.ui.test_review_models import add_request
from tuneforge.production.loop.review_queue import QueueRules, fill_queue, list_items


def test_pages_render_errors_show_inline_and_a_form_run_is_followed_to_the_end(ui_app, tiny_model_dir, browser):
    # deferred: selenium is a test-only dependency, checked by importorskip above
    from selenium.webdriver.common.by import By

    with serve_in_thread(ui_app) as url:
        browser.get(f"{url}/ui/runs")
        assert browser.find_element(By.CSS_SELECTOR, 'tr[data-id="alpha"]').is_displayed()
        browser.save_screenshot(str(ARTIFACTS / "runs.png"))
        browser.get(f"{url}/ui/runs/alpha")
        assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart polyline")) == 3  # loss, val loss, tokens/s
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
        assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart polyline")) == 3  # loss, val loss, tokens/s
        browser.save_screenshot(str(ARTIFACTS / "run-finished.png"))


def test_review_keys_and_promote_then_rollback_with_a_logged_in_admin_key(ui_app, registry, tmp_path, browser):
    # deferred: selenium is a test-only dependency, checked by importorskip above
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    add_request(registry, "r1", score=0.1, comment="wrong sum")
    add_request(registry, "r2", thumbs="down", correction="4")
    fill_queue(registry, QueueRules(sample_rate=0))
    for n in (1, 2):
        d = make_run(tmp_path / "reg-runs", f"r{n}")
        (d / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * n)
        registry.add(d, "bot")
    _, admin = registry.create_key("ops", ["*"], admin=True)
    with serve_in_thread(ui_app) as url:
        browser.get(f"{url}/ui/review")  # no cookie yet: the login page, then back here
        wait_for(browser, lambda d: "/ui/login" in d.current_url, 10)
        browser.find_element(By.ID, "key").send_keys(admin)
        browser.find_element(By.ID, "login").click()
        wait_for(browser, lambda d: d.find_elements(By.ID, "review-item"), 10)
        first = browser.find_element(By.ID, "review-item").get_attribute("data-id")
        browser.save_screenshot(str(ARTIFACTS / "review.png"))
        browser.find_element(By.TAG_NAME, "body").send_keys("a")  # accept, then the next item
        wait_for(browser, lambda d: d.find_element(By.ID, "review-item").get_attribute("data-id") != first, 10)
        browser.find_element(By.TAG_NAME, "body").send_keys("c")  # focus the corrected answer (prefilled "4")
        corrected = browser.find_element(By.ID, "corrected")
        assert browser.switch_to.active_element == corrected and corrected.get_attribute("value") == "4"
        corrected.send_keys(Keys.END, "!")  # typed text, not a shortcut
        browser.find_element(By.CSS_SELECTOR, 'button[data-decision="correct"]').click()
        wait_for(browser, lambda d: d.find_elements(By.ID, "empty"), 10)
        decided = {i["request_id"]: (i["decision"], i["corrected"], i["reviewer"])
                   for i in list_items(registry, "decided")}
        assert decided == {"r1": ("accept", None, "ops"), "r2": ("correct", "4!", "ops")}

        for version in ("1", "2"):
            browser.get(f"{url}/ui/models")  # a fresh page each time: the last click's reload may still be due
            form = browser.find_element(By.CSS_SELECTOR, f'tr[data-version="{version}"] form.promote')
            form.find_element(By.TAG_NAME, "button").click()
            wait_for(browser, lambda d, n=int(version): registry.aliases("bot") == {"prod": n}, 10)
        browser.get(f"{url}/ui/models")  # the reloads are done: the page shows v2
        assert "bot@prod → v2" in browser.find_element(By.CSS_SELECTOR, ".alias").text
        browser.save_screenshot(str(ARTIFACTS / "models.png"))
        browser.find_element(By.CSS_SELECTOR, 'button.rollback[data-alias="prod"]').click()
        wait_for(browser, lambda d: registry.aliases("bot") == {"prod": 1}, 10)
        wait_for(browser, lambda d: "v1" in d.find_element(By.CSS_SELECTOR, ".alias").text, 10)
