"""The Models page in a real headless Chromium, logged in with an admin key: an A/B route's
arms with their figures, the monitoring charts and an open alert; the split form saves the
new weights (the page reloads with them); the window select shows the last 7 days.
Screenshot: tests/artifacts/ui/models-ab.png."""

from __future__ import annotations

import pytest
from deploy_helpers import serve_in_thread

from tests.unit.ui.browser import ARTIFACTS, pytestmark, wait_for  # noqa: F401 - pytestmark: the skip
from tests.unit.ui.test_models_page import ab_app, log_requests  # noqa: F401 - ab_app: the fixture


@pytest.fixture
def monkey():  # the request logger's clock, set per batch (monkeypatch is taken by the fixture order)
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_ab_arms_charts_alert_and_split_in_the_browser(ab_app, registry, monkey, browser):  # noqa: F811
    # deferred: selenium is a test-only dependency, checked by importorskip above
    from selenium.webdriver.common.by import By

    log_requests(registry, monkey, [("prod", "bot:v1", 15, 0, 0.2), ("canary", "bot:v2", 15, 1, 0.4)], 5)
    log_requests(registry, monkey, [("prod", "bot:v1", 15, 0, 0.25), ("canary", "bot:v2", 15, 5, 0.45)], 2)
    _, admin = registry.create_key("ops", ["*"], admin=True)
    with serve_in_thread(ab_app) as url:
        browser.get(f"{url}/ui/models")
        wait_for(browser, lambda d: "/ui/login" in d.current_url, 10)
        browser.find_element(By.ID, "key").send_keys(admin)
        browser.find_element(By.ID, "login").click()
        wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-arm="canary"]'), 10)
        canary = browser.find_element(By.CSS_SELECTOR, 'tr[data-arm="canary"]')
        assert canary.find_element(By.CSS_SELECTOR, "td.requests").text == "30"
        assert canary.find_element(By.CSS_SELECTOR, "td.errors").text == "6 (20.0%)"
        bot = browser.find_element(By.CSS_SELECTOR, 'section[data-name="bot"]')
        # requests, latency, errors: a line per version; no feedback was sent, and its chart says so
        assert len(bot.find_elements(By.CSS_SELECTOR, ".charts svg.chart polyline")) == 6
        assert "no data yet" in bot.find_element(By.CSS_SELECTOR, 'svg[aria-label^="mean feedback"]').text
        alert = bot.find_element(By.CSS_SELECTOR, "tr.alert.critical")
        assert "error_rate" in alert.text and "bot:v2" in alert.text
        # the arms, the charts and the alert in one screen
        browser.execute_script("arguments[0].scrollIntoView()", bot.find_element(By.CSS_SELECTOR, "div.route"))
        browser.save_screenshot(str(ARTIFACTS / "models-ab.png"))

        form = browser.find_element(By.CSS_SELECTOR, 'div[data-route="bot-ab"] form.split')
        for arm, weight in (("prod", "9"), ("canary", "1")):
            field = form.find_element(By.NAME, arm)
            field.clear()
            field.send_keys(weight)
        form.find_element(By.TAG_NAME, "button").click()
        wait_for(browser, lambda d: registry.route_arms("bot-ab") is not None, 10)
        assert {a["name"]: a["weight"] for a in registry.route_arms("bot-ab")} == {"prod": 9, "canary": 1}
        wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, 'tr[data-arm="prod"] td.share')
                 .text.startswith("90%"), 10)

        select = browser.find_element(By.CSS_SELECTOR, '#models-window select[name="window"]')
        select.find_element(By.CSS_SELECTOR, 'option[value="7d"]').click()  # the page follows the select
        wait_for(browser, lambda d: "window=7d" in d.current_url, 10)
        assert browser.find_elements(By.CSS_SELECTOR, 'svg.chart[aria-label="requests per 6h"]')
