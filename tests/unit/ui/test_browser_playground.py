"""The Playground in a real headless Chromium against a real engine (the tiny Llama as the base
model and a LoRA adapter of it in the registry): a key logged in at the login page, Ctrl+Enter
sends one message to both columns, each answer is seen growing in the page as its tokens arrive,
a second message carries each column's own conversation, and a column whose model the key may
not call shows the server's refusal in that column. Screenshot: tests/artifacts/ui/playground.png."""

from __future__ import annotations

from deploy_helpers import fake_run, serve_in_thread

from tests.unit.ui.browser import ARTIFACTS, pytestmark, wait_for  # noqa: F401 - pytestmark: the skip
from tuneforge.deploy.config import ServeConfig
from tuneforge.deploy.engines import LocalEngine
from tuneforge.ui.app import create_ui_app

# Records, per column, the length of its newest answer's text at every change of the page, with
# the time: a streamed answer is seen at many lengths, one sent whole at one.
WATCH = """
window.grown = [];
document.querySelectorAll('.pg-col').forEach((col, i) => {
  window.grown[i] = [];
  new MutationObserver(() => {
    const answers = col.querySelectorAll('.pg-answer');
    const last = answers[answers.length - 1];
    if (last) window.grown[i].push([performance.now(), last.textContent.length]);
  }).observe(col, {childList: true, subtree: true, characterData: true});
});
"""


def test_two_columns_stream_base_and_adapter_side_by_side(tiny_model_dir, tmp_path, registry, browser):
    # deferred: selenium is a test-only dependency, checked by importorskip in browser.py
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    registry.add(fake_run(tiny_model_dir, tmp_path / "runs" / "bot", seed=1), "bot")
    _, key = registry.create_key("app", ["tiny", "bot"])
    records = []
    cfg = ServeConfig(base_model=tiny_model_dir, base_name="tiny", jobs={"enabled": False})
    app = create_ui_app(cfg, registry, LocalEngine("cpu", "fp32", max_batch=4, batch_wait_ms=20),
                        on_request=records.append, runs_dir=tmp_path / "runs")

    def columns():
        return browser.find_elements(By.CSS_SELECTOR, ".pg-col")

    def settled(d):
        return all(c.get_attribute("data-state") in ("done", "error") for c in columns())

    with serve_in_thread(app) as url:
        browser.get(f"{url}/ui/playground")
        wait_for(browser, lambda d: "/ui/login" in d.current_url, 10)
        browser.find_element(By.ID, "key").send_keys(key)
        browser.find_element(By.ID, "login").click()
        wait_for(browser, lambda d: d.find_elements(By.ID, "pg-columns"), 10)
        assert [Select(c.find_element(By.CSS_SELECTOR, "select")).first_selected_option.get_attribute("value")
                for c in columns()] == ["tiny", "bot"]

        # sampled (the random tiny model's greedy answer is newlines only), seeded: the same every run
        for field, value in (("pg-temperature", "1"), ("pg-max-tokens", "16"), ("pg-seed", "3")):
            browser.find_element(By.ID, field).clear()
            browser.find_element(By.ID, field).send_keys(value)
        browser.execute_script(WATCH)
        message = browser.find_element(By.ID, "pg-user")
        message.send_keys("hello world")
        message.send_keys(Keys.CONTROL, Keys.ENTER)
        wait_for(browser, settled, 60)

        first = [c.find_element(By.CSS_SELECTOR, ".pg-answer").get_attribute("textContent") for c in columns()]
        grown = browser.execute_script("return window.grown")
        for col, answer, seen in zip(columns(), first, grown, strict=True):
            assert col.get_attribute("data-state") == "done" and answer
            lengths = [n for _, n in seen]
            # streamed: the page showed the answer at several growing lengths, over time
            assert len(set(lengths)) >= 3 and lengths == sorted(lengths) and seen[-1][0] > seen[0][0], seen
            assert int(col.find_element(By.CSS_SELECTOR, ".pg-answer").get_attribute("data-chunks")) >= 3
            stats = col.find_element(By.CSS_SELECTOR, ".pg-stats").text
            assert "first token" in stats and "tokens/s" in stats
        assert [c.find_element(By.CSS_SELECTOR, ".pg-stats").text.split(" · ")[0] for c in columns()] == \
            ["tiny", "bot:v1"]

        # A third column on a model outside the key's scope (as a stale page could ask): its refusal shows there.
        browser.find_element(By.ID, "pg-add").click()
        browser.execute_script("""const s = document.querySelectorAll('.pg-model')[2];
            s.add(new Option('other', 'other')); s.value = 'other'; s.dispatchEvent(new Event('change'));""")
        browser.find_element(By.ID, "pg-max-tokens").clear()
        browser.find_element(By.ID, "pg-max-tokens").send_keys("4")  # short: this turn checks the history
        message.send_keys("and again")
        browser.find_element(By.ID, "pg-send").click()
        wait_for(browser, settled, 60)
        refused = columns()[2].find_element(By.CSS_SELECTOR, ".pg-answer .error").text
        assert refused.startswith("403 permission_error") and "may not call 'other'" in refused
        for col in columns()[:2]:
            assert len(col.find_elements(By.CSS_SELECTOR, ".pg-answer")) == 2
        browser.save_screenshot(str(ARTIFACTS / "playground.png"))

    # the second turn carried each column's own conversation: its first answer, then the new message
    second = {r.model: r.messages for r in records if r.status == 200 and len(r.messages) > 1}
    assert [m["content"] for m in second["tiny"]] == ["hello world", first[0], "and again"]
    assert [m["content"] for m in second["bot"]] == ["hello world", first[1], "and again"]
    assert [r.status for r in records if r.model == "other"] == [403]
