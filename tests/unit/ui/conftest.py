"""A hand-made run folder and the server app with the dashboard (fake engine: no model loads)."""

from __future__ import annotations

import json

import pytest
import yaml

from tuneforge.deploy.config import ServeConfig
from tuneforge.registry.store import Registry
from tuneforge.ui.app import create_ui_app


class FakeEngine:
    async def stream(self, req):
        yield None

    async def close(self):
        pass


def make_run(root, name="alpha", steps=6, finished=True):
    d = root / name
    (d / "checkpoints").mkdir(parents=True)
    cfg = {"model": {"name": "smollm2-135m-instruct"}, "data": {"train": ["builtin:orders?n=60"]},
           "method": {"name": "lora", "r": 4}, "objective": {"name": "sft"}, "train": {"max_steps": steps},
           "run_name": name}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"kind": "train", "step": s, "loss": 2.0 - s / 10, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 900.0}
            for s in range(1, steps + 1)]
    rows += [{"kind": "eval", "step": s, "val_loss": 2.1 - s / 12} for s in (3, 6) if s <= steps]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["step"])))
    if finished:
        (d / "adapter").mkdir()
        (d / "summary.json").write_text(json.dumps({"steps": steps, "train_seconds": 1.5, "tokens_per_s": 900.0}))
        (d / "eval.json").write_text(json.dumps({"tuned": {"scores": {"json_exact": 0.75, "token_f1": 0.9}},
                                                 "base": {"scores": {"json_exact": 0.25, "token_f1": 0.6}}}))
    return d


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "alpha")
    make_run(root, "beta", steps=3, finished=False)
    return root


@pytest.fixture
def registry(tmp_path):
    return Registry(f"sqlite:///{tmp_path / 'reg.db'}")


@pytest.fixture
def ui_app(tmp_path, runs_dir, registry):
    cfg = ServeConfig.model_validate({"jobs": {"home": str(tmp_path / "home"), "save_every": 3}})
    return create_ui_app(cfg, registry, FakeEngine(), runs_dir=runs_dir)


@pytest.fixture
def browser():
    # deferred: selenium and the browser are test-only; modules using this import browser.pytestmark
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from tests.unit.ui.browser import ARTIFACTS, CHROMIUM, DRIVER

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
