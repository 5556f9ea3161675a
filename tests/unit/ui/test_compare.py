"""Compare runs (/ui/compare) and clone a run into the New run form, through the server app
(TestClient, hand-made run folders): only the config keys that differ, both runs' curves in
one chart, deltas against the first run with a paired bootstrap interval only where both
runs scored the same examples, access as /ui/runs/{id}; the run page's throughput chart."""

from __future__ import annotations

import json
import re

import yaml
from fastapi.testclient import TestClient

from tests.unit.ui.conftest import make_run
from tuneforge.evaluate.stats import paired_bootstrap
from tuneforge.ui.compare import paired
from tuneforge.ui.newrun import form_to_raw

PROMPTS = [f"order {i}" for i in range(8)]
ALPHA_F1 = [1.0, 0.5, 1.0, 0.0, 1.0, 1.0, 0.5, 1.0]  # mean 0.75
GAMMA_F1 = [1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0]  # mean 0.9375


def with_config(run_dir, **changes):
    """Changes dotted keys of a hand-made run's config.yaml."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        node = cfg
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))


def with_eval(run_dir, f1: list[float], prompts=PROMPTS, samples=True):
    """eval.json as the generation eval writes it (token_f1 first: the main metric, one score
    per example in eval_samples.jsonl) and a BLEU-like corpus metric without per-example scores."""
    (run_dir / "eval.json").write_text(json.dumps({
        "base": {"n": len(f1), "scores": {"token_f1": 0.5, "bleu": 10.0}},
        "tuned": {"n": len(f1), "scores": {"token_f1": sum(f1) / len(f1), "bleu": 20.0 + sum(f1)}}}))
    rows = [{"model": "tuned", "prompt": p, "reference": f"ref {p}", "prediction": "x", "score": s}
            for p, s in zip(prompts, f1)]
    rows += [{"model": "base", "prompt": p, "reference": f"ref {p}", "prediction": "y", "score": 0.0} for p in prompts]
    if samples:
        (run_dir / "eval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def gamma(runs_dir):
    """A finished run beside alpha: 4 steps, another lr and rank, its own (higher) curves."""
    d = make_run(runs_dir, "gamma", steps=4)
    with_config(d, **{"train.lr": 0.002, "method.r": 8})
    rows = [{"kind": "train", "step": s, "loss": 2.2 - s / 8, "tokens_per_s": 1200.0} for s in range(1, 5)]
    rows += [{"kind": "eval", "step": s, "val_loss": 2.25 - s / 10} for s in (2, 4)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def delta_cell(html: str, metric: str) -> str:
    row = re.search(rf'<tr data-metric="{metric}">(.*?)</tr>', html, re.DOTALL).group(1)
    return re.findall(r'<td class="delta">(.*?)</td>', row, re.DOTALL)[0]


def test_compare_shows_only_the_differing_config_keys_and_both_runs_curves(ui_app, runs_dir):
    gamma(runs_dir)
    with TestClient(ui_app) as c:
        r = c.get("/ui/compare?run=alpha&run=gamma")
    assert r.status_code == 200
    diff = re.search(r'<table class="grid" id="config-diff">(.*?)</table>', r.text, re.DOTALL).group(1)
    assert set(re.findall(r'data-key="([^"]+)"', diff)) == {"run_name", "train.lr", "train.max_steps", "method.r"}
    lr = re.search(r'data-key="train.lr">(.*?)</tr>', diff, re.DOTALL).group(1)
    assert re.findall(r"<td><code>(.*?)</code></td>", lr)[1:] == ["(not set)", "0.002"]  # alpha has no lr key
    same = re.search(r'<details id="config-same">(.*?)</details>', r.text, re.DOTALL).group(1)
    assert "4 keys identical" in same and "method.name" in same and "method.r" not in same
    train = re.search(r'<div id="chart-train">(.*?)</div>', r.text, re.DOTALL).group(1)
    val = re.search(r'<div id="chart-val">(.*?)</div>', r.text, re.DOTALL).group(1)
    for chart in (train, val):
        assert re.findall(r"<polyline[^>]*><title>(.*?)</title>", chart) == ["alpha", "gamma"]
    assert "alpha 1.4" in train and "gamma 1.7" in train  # each line labelled with its last loss
    summary = re.search(r'id="compare-summary">(.*?)</table>', r.text, re.DOTALL).group(1)
    assert re.search(r"<th>steps</th>\s*<td>6</td>\s*<td>4</td>", summary)


def test_eval_deltas_carry_a_paired_bootstrap_interval_only_with_per_example_scores(ui_app, runs_dir):
    with_eval(runs_dir / "alpha", ALPHA_F1)
    with_eval(gamma(runs_dir), GAMMA_F1)
    with TestClient(ui_app) as c:
        html = c.get("/ui/compare?run=alpha&run=gamma").text
    cell = delta_cell(html, "token_f1")
    expected = paired_bootstrap(ALPHA_F1, GAMMA_F1)
    assert "<b>+0.1875</b>" in cell
    assert f"[{expected['low']:+.4g}, {expected['high']:+.4g}]" in cell and "n=8" in cell
    assert expected["low"] < 0.1875 < expected["high"]
    bleu = delta_cell(html, "bleu")  # a corpus metric: aggregates only
    assert "<b>+1.5</b>" in bleu and "no interval: eval.json has no per-example scores" in bleu and "[" not in bleu


def test_no_interval_when_one_run_lacks_per_example_scores_or_scored_other_examples(ui_app, runs_dir):
    with_eval(runs_dir / "alpha", ALPHA_F1)
    with_eval(gamma(runs_dir), GAMMA_F1, samples=False)
    with_eval(make_run(runs_dir, "delta"), GAMMA_F1, prompts=[f"other {i}" for i in range(8)])
    with TestClient(ui_app) as c:
        lacking = delta_cell(c.get("/ui/compare?run=alpha&run=gamma").text, "token_f1")
        other = delta_cell(c.get("/ui/compare?run=alpha&run=delta").text, "token_f1")
    assert "<b>+0.1875</b>" in lacking and "no interval: eval.json has no per-example scores (gamma)" in lacking
    assert "<b>+0.1875</b>" in other and "no interval: the runs were scored on different examples" in other
    assert "[" not in lacking + other


def test_examples_pair_by_prompt_and_reference_in_any_order_and_unlisted_ones_do_not_pair():
    keys = [("p1", "r1"), ("p2", "r2"), ("p3", "r3")]
    same = paired((keys, {"f1": [1.0, 0.0, 0.5]}), (keys[::-1], {"f1": [0.5, 0.0, 1.0]}), "f1", "b", "a")
    assert same == {"low": 0.0, "high": 0.0, "n": 3}  # the same scores once aligned: no difference at all
    unlisted = paired((None, {"f1": [1.0]}), (None, {"f1": [0.0]}), "f1", "b", "a")
    assert "cannot be paired" in unlisted["note"] and "low" not in unlisted


def test_a_tenant_key_cannot_compare_local_runs_and_one_run_gets_a_message(ui_app, registry, runs_dir):
    gamma(runs_dir)
    admin = registry.create_key("ops", ["*"], admin=True)[1]
    tenant = registry.create_key("app", ["*"])[1]
    with TestClient(ui_app) as c:
        as_tenant = c.get("/ui/compare?run=alpha&run=gamma", headers={"Authorization": f"Bearer {tenant}"})
        clone = c.get("/ui/api/runs/alpha/form", headers={"Authorization": f"Bearer {tenant}"})
        as_admin = c.get("/ui/compare?run=alpha&run=gamma", headers={"Authorization": f"Bearer {admin}"})
        unknown = c.get("/ui/compare?run=alpha&run=nope", headers={"Authorization": f"Bearer {admin}"})
        one = c.get("/ui/compare?run=alpha&run=alpha", headers={"Authorization": f"Bearer {admin}"})
        none = c.get("/ui/compare", headers={"Authorization": f"Bearer {admin}"})
    assert as_tenant.status_code == 404 and "no run &#39;alpha&#39;" in as_tenant.text and "config-diff" not in as_tenant.text
    assert clone.status_code == 404
    assert as_admin.status_code == 200 and 'id="config-diff"' in as_admin.text
    assert unknown.status_code == 404 and "no run &#39;nope&#39;" in unknown.text
    assert one.status_code == 400 and "at least two different runs" in one.text and "(chosen: alpha)" in one.text
    assert none.status_code == 400 and 'id="compare-message"' in none.text


def test_the_runs_table_has_a_compare_form_with_a_checkbox_per_run(ui_app):
    with TestClient(ui_app) as c:
        html = c.get("/ui/runs").text
    form = re.search(r'<form id="compare-form" method="get" action="/ui/compare">(.*?)</form>', html, re.DOTALL).group(1)
    assert sorted(re.findall(r'<input type="checkbox" name="run" value="([^"]+)"', form)) == ["alpha", "beta"]
    assert 'id="compare"' in form


def test_clone_gives_the_form_the_runs_config_with_a_new_run_name(ui_app, runs_dir):
    with_config(runs_dir / "alpha", **{"train.lr": 0.002, "train.warmup": None, "eval.limit": 20})
    with TestClient(ui_app) as c:
        body = c.get("/ui/api/runs/alpha/form").json()
        page = c.get("/ui/runs/alpha").text
    form = body["form"]
    assert form["run_name"] == "alpha-2" and form["train.lr"] == "0.002" and form["method.name"] == "lora"
    assert form["data.train"] == "builtin:orders?n=60" and form["train.max_steps"] == "6"
    assert yaml.safe_load(form["extra_yaml"]) == {"method": {"r": 4}, "train": {"warmup": None}, "eval": {"limit": 20}}
    raw, problems = form_to_raw(form)  # the form gives back the run's config, under the new name
    original = yaml.safe_load((runs_dir / "alpha" / "config.yaml").read_text())
    assert problems == [] and raw == original | {"run_name": "alpha-2"}
    assert 'href="/ui/new?from=alpha"' in page


def test_the_run_page_has_a_throughput_chart(ui_app, runs_dir):
    with TestClient(ui_app) as c:
        html = c.get("/ui/runs/alpha").text
    chart = re.search(r'<div id="throughput">(.*?)</div>', html, re.DOTALL).group(1)
    assert "throughput (tokens/s)" in chart and chart.count("<circle") == 6  # one point per training step
    assert re.search(r"<polyline[^>]*><title>tokens/s</title>", chart) and "tokens/s 900" in chart
