"""tuneforge monitor: label-free signals, the MMD permutation test, figures and alerts from a
seeded request log, webhook, Prometheus gauges, the review queue, the HTML report, the CLI."""

import hashlib
import json
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from prometheus_client import REGISTRY
from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneforge.cli import main
from tuneforge.production.config import JudgeSettings, MonitorConfig, load_monitor_config, parse_window
from tuneforge.production.loop.drift import mmd_permutation_test, row_prompt, training_prompts
from tuneforge.production.loop.monitor import MonitorError, json_valid, monitor, queue_for_review, repeated_ngram_ratio
from tuneforge.registry.tables import Feedback, RequestLog, ReviewItem, utc_now
from tuneforge.registry.store import Registry

REPO = Path(__file__).resolve().parents[3]


# --- signals -----------------------------------------------------------------------------------------

def test_repetition_json_and_window_parsing():
    assert repeated_ngram_ratio("the cat sat on the mat", 3) == 0.0
    assert repeated_ngram_ratio("go on " * 10, 2) == pytest.approx(1 - 2 / 19)  # 19 bigrams, 2 distinct
    assert repeated_ngram_ratio("short", 3) == 0.0
    assert json_valid('{"a": 1}') and json_valid('```json\n{"a": 1}\n```') and not json_valid("Sure! {a: 1}")
    assert parse_window("7d") == timedelta(days=7) and parse_window("30m") == timedelta(minutes=30)
    with pytest.raises(ValueError, match="unit m/h/d/w"):
        parse_window("7 days")
    with pytest.raises(Exception, match="since"):
        MonitorConfig(since="yesterday")
    with pytest.raises(Exception, match="not a regular expression"):
        MonitorConfig(refusal_patterns=["(unclosed"])


def test_row_prompt_takes_the_users_side_of_each_row_kind():
    assert row_prompt({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "a"}]}) == "q"
    assert row_prompt({"prompt": "p", "chosen": "c", "rejected": "r"}) == "p"
    assert row_prompt({"text": "t", "label": "x"}) == "t"


# --- the MMD permutation test ----------------------------------------------------------------------------

def test_mmd_statistic_matches_the_definition():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 3, generator=g), torch.randn(7, 3, generator=g) + 1
    res = mmd_permutation_test(x, y, permutations=50)
    z = torch.cat([x, y]).double()
    sigma = res.bandwidth
    k = lambda a, b: torch.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * sigma**2))  # noqa: E731
    xd, yd = x.double(), y.double()
    want = k(xd, xd).mean() + k(yd, yd).mean() - 2 * k(xd, yd).mean()
    assert res.mmd2 == pytest.approx(float(want), rel=1e-9)
    d = torch.cdist(z, z)
    assert sigma == pytest.approx(float(d[torch.triu(torch.ones(12, 12, dtype=torch.bool), 1)].median()))
    assert len(res.null) == 50 and 0 < res.p_value <= 1


def test_mmd_false_alarm_rate_and_power_on_synthetic_vectors():
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(200, 16, generator=g)
    # 40 windows from the same distribution: a calibrated test alarms at about alpha.
    alarms = sum(mmd_permutation_test(torch.randn(40, 16, generator=g), reference, 200, seed=i).p_value < 0.05
                 for i in range(40))
    assert alarms <= 5  # binomial(40, 0.05): P(more than 5) ~ 1.4%; fixed seeds make it repeatable
    shifted = torch.randn(40, 16, generator=g) + torch.tensor([0.8] + [0.0] * 15)
    assert mmd_permutation_test(shifted, reference, 200).p_value < 0.01
    with pytest.raises(ValueError, match="at least 2"):
        mmd_permutation_test(reference[:1], reference)


# --- figures and alerts from a seeded log -----------------------------------------------------------------

REVIEW = "Read the product review and reply with JSON.\n\n"


def fake_embed(reference, recent):
    """Deterministic 8-d vectors: prompts about cooking sit far from everything else."""
    def one(t):
        h = torch.Generator().manual_seed(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))
        v = torch.randn(8, generator=h) * 0.3 + (torch.tensor([3.0] + [0.0] * 7) if "cook" in t else 0)
        return torch.nn.functional.normalize(v, dim=0)
    return torch.stack([one(t) for t in reference]), torch.stack([one(t) for t in recent])


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    cfg = {"model": {"name": "smollm2-135m-instruct"}, "method": {"name": "lora"},  # never loaded
           "data": {"train": ["builtin:reviews?n=120&seed=1"]}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_model.safetensors").write_bytes(b"x")  # registry add hashes it; never loaded
    return d


def seed_log(reg, now, n=40, cooking=False, earlier_chars=10):
    """n requests to route 'bot-ab' (bot:v1) in the last day, 40 a week before (shorter answers)."""
    with Session(reg.engine) as s, s.begin():
        for i in range(n):
            prompt = f"How do I cook pasta number {i}?" if cooking else f"{REVIEW}Nice mug number {i}. Five stars."
            response = ("I'm sorry, but I cannot help with that." if i % 10 == 1 else
                        "" if i % 10 == 2 else "spam " * 30 if i % 10 == 3 else '{"rating": 5}')
            s.add(RequestLog(id=f"r{i}", at=now - timedelta(hours=1) + timedelta(seconds=i), endpoint="chat", model="bot-ab",
                             route="bot-ab", version="bot:v1", status=500 if i % 10 == 4 else 200,
                             latency_s=0.1 + i / 100, prompt_tokens=10, completion_tokens=5,
                             finish_reason="length" if i % 10 == 5 else "stop",
                             fallback_reason="bot:v2: timed out" if i % 10 == 6 else None,
                             json_requested=True, messages=[{"role": "user", "content": prompt}],
                             response=None if i % 10 == 4 else response))
        for i in range(40):
            s.add(RequestLog(id=f"old{i}", at=now - timedelta(days=8, minutes=i), endpoint="chat", model="bot-ab",
                             route="bot-ab", version="bot:v1", status=200, latency_s=0.1,
                             messages=[{"role": "user", "content": f"{REVIEW}Old mug {i}."}],
                             response="x" * earlier_chars, finish_reason="stop"))
        s.flush()
        for i in range(n):
            s.add(Feedback(request_id=f"r{i}", score=0.0 if i % 2 else 0.5))


@pytest.fixture
def reg(tmp_path, run_dir):
    r = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    r.add(run_dir, "bot")
    return r


def test_figures_alerts_webhook_and_gauges(reg):
    now = utc_now()
    seed_log(reg, now)
    received = []

    def receiver(request: httpx.Request) -> httpx.Response:
        received.append(json.loads(request.content))
        return httpx.Response(204)

    cfg = MonitorConfig(webhook="http://alerts.local/hook", drift={"enabled": False})
    res = monitor(reg, cfg, now=now, transport=httpx.MockTransport(receiver))
    [g] = res.groups
    f = g["figures"]
    assert g["group"] == ("bot-ab", "bot:v1") and f["requests"] == 40 and f["ok"] == 36
    assert f["error_rate"] == pytest.approx(0.1) and f["fallback_rate"] == pytest.approx(4 / 36)
    assert f["empty_rate"] == pytest.approx(4 / 36) and f["refusal_rate"] == pytest.approx(4 / 36)
    assert f["repetition_rate"] == pytest.approx(4 / 36) and f["truncated_rate"] == pytest.approx(4 / 36)
    # JSON asked for on every request: the refusal, the empty and the repetitive answers are not JSON.
    assert f["json_requests"] == 36 and f["json_invalid_rate"] == pytest.approx(12 / 36)
    assert f["feedback_n"] == 40 and f["feedback_mean"] == pytest.approx(0.25)
    assert f["latency_p50_s"] < f["latency_p95_s"] <= f["latency_p99_s"]

    alerts = {a.metric: a for a in res.alerts}
    assert set(alerts) == {"error_rate", "fallback_rate", "empty_rate", "refusal_rate", "repetition_rate",
                           "json_invalid_rate", "feedback_mean", "length_shift"}  # truncated 11% < 20%
    a = alerts["error_rate"]
    assert a.window.startswith("7d (") and "threshold 0.05" in a.baseline and a.evidence["examples"] == ["r4", "r14", "r24"]
    shift = alerts["length_shift"]
    assert "earlier window" in shift.baseline and "10 chars over 40 requests" in shift.baseline
    assert alerts["feedback_mean"].evidence["ratings"] == 40

    [payload] = received
    assert {x["metric"] for x in payload["alerts"]} == set(alerts) and res.webhook_error is None
    labels = {"metric": "error_rate", "route": "bot-ab", "version": "bot:v1"}
    assert REGISTRY.get_sample_value("tuneforge_monitor", labels) == pytest.approx(0.1)

    down = monitor(reg, cfg, now=now, transport=httpx.MockTransport(lambda r: httpx.Response(502)))
    assert "502" in down.webhook_error and down.alerts  # reported, not raised

    quiet = monitor(reg, MonitorConfig(min_requests=100, thresholds={"feedback_min": None},
                                       drift={"enabled": False}), now=now)
    assert quiet.alerts == []  # too few requests to alert on rates
    assert monitor(reg, cfg.model_copy(update={"since": "30m"}), now=now).groups == []


def test_drift_alert_queues_drifted_prompts_for_review(reg, run_dir):
    now = utc_now()
    seed_log(reg, now, cooking=True)
    cfg = MonitorConfig(thresholds={k: None for k in ("error_rate", "fallback_rate", "empty_rate", "refusal_rate",
                                                       "repetition_rate", "json_invalid_rate", "feedback_min",
                                                       "length_shift")},
                        drift={"permutations": 200, "top": 3})
    res = monitor(reg, cfg, now=now, embed=fake_embed)
    [alert] = res.alerts
    assert alert.metric == "drift_p_value" and alert.value < 0.01 and str(run_dir) in alert.baseline
    assert all("cook" in p for p in alert.evidence["most_drifted"])
    d = res.groups[0]["drift"]
    assert d["n_reference"] == len(training_prompts(run_dir)) and len(d["drifted"]) == 3
    assert res.queued_for_review == 3
    with Session(reg.engine) as s:
        items = list(s.scalars(select(ReviewItem)))
    assert {i.reason for i in items} == {"drift"} and all("nearest" in i.detail for i in items)
    again = monitor(reg, cfg, now=now, embed=fake_embed)
    assert again.queued_for_review == 0  # already queued: skipped via the unique request_id
    assert queue_for_review(reg.engine, [(items[0].request_id, "drift", "again")]) == 0


def test_same_distribution_window_does_not_alert(reg):
    now = utc_now()
    seed_log(reg, now)  # review prompts, like the training data
    res = monitor(reg, MonitorConfig(drift={"permutations": 200}), now=now, embed=fake_embed)
    assert "drift_p_value" not in {a.metric for a in res.alerts}
    assert res.groups[0]["drift"]["p_value"] > 0.01


def test_judge_plug_point(reg):
    now = utc_now()
    seed_log(reg, now)
    cfg = MonitorConfig(judge={"callable": "test_monitor:judge_json", "sample": 10}, drift={"enabled": False})
    f = monitor(reg, cfg, now=now).groups[0]["figures"]
    assert f["judge_n"] == 10 and 0 <= f["judge_mean"] <= 1
    with pytest.raises(MonitorError, match="cannot be loaded"):
        monitor(reg, cfg.model_copy(update={"judge": JudgeSettings(callable="test_monitor:nope")}), now=now)
    with pytest.raises(MonitorError, match="failed on request r"):
        monitor(reg, cfg.model_copy(update={"judge": JudgeSettings(callable="test_monitor:judge_broken")}), now=now)


def judge_broken(prompt: str, response: str, rubric: str) -> float:
    raise RuntimeError("model offline")


def judge_json(prompt: str, response: str, rubric: str) -> float:
    return 1.0 if json_valid(response) else 0.0


def test_cli_writes_html_and_metrics(reg, tmp_path, capsys):
    seed_log(reg, utc_now())
    html, metrics = tmp_path / "report.html", tmp_path / "metrics.prom"
    url = str(reg.engine.url)
    assert main(["monitor", "--registry", url, "--no-drift", "--html", str(html), "--metrics-file", str(metrics)]) == 0
    page = html.read_text()
    assert "data:image/png;base64," in page and "error_rate" in page and "<script" not in page
    assert 'tuneforge_monitor{metric="error_rate",route="bot-ab",version="bot:v1"}' in metrics.read_text()
    assert "ALERT [bot-ab bot:v1] error_rate = 0.1 " in capsys.readouterr().out  # not eaten as rich markup
    assert main(["monitor", "--registry", url, "--no-drift", "--fail-on-alert"]) == 1
    assert main(["monitor", "--registry", url, "--route", "nobody", "--fail-on-alert"]) == 0
    assert main(["monitor", "--registry", url, "--since", "forever"]) == 2  # a clear config error


def test_example_monitor_config_validates():
    cfg = load_monitor_config(REPO / "examples" / "monitor.yaml")
    assert cfg.thresholds.drift_p is not None
