"""`tuneforge ab report`: per-arm figures and significance tests from request_logs/feedback rows
(inserted directly here; the server's request logger writes them in production)."""

import random
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from tuneforge.cli import main
from tuneforge.deploy.abreport import report
from tuneforge.registry.tables import Feedback, RequestLog, utc_now
from tuneforge.registry.store import Registry


def _fill(reg, rng):
    """control: 300 requests, 1% errors, ~1 s, scores ~0.8; candidate: 150, 12% errors, ~1.5 s,
    scores ~0.5; twin: 300 like control; 'other' route rows must be ignored."""
    rows, feedback = [], []
    plan = [("control", "bot:v1", 300, 0.01, 1.0, 0.8), ("candidate", "bot:v2", 150, 0.12, 1.5, 0.5),
            ("twin", "bot:v1", 300, 0.01, 1.0, 0.8)]
    for arm, version, n, err, lat, score in plan:
        errors = round(n * err)
        for i in range(n):
            rid = f"chatcmpl-{arm}-{i}"
            failed = i < errors
            rows.append(RequestLog(id=rid, endpoint="chat", model="bot-ab", route="bot-ab", arm=arm,
                                   version=None if failed else version, status=503 if failed else 200,
                                   latency_s=max(0.05, rng.gauss(lat, 0.2)),
                                   fallback_reason="bot:v2: timed out" if arm == "candidate" and i % 10 == 0 else None))
            if not failed and i % 3 == 0:
                feedback.append(Feedback(request_id=rid, score=min(1.0, max(0.0, rng.gauss(score, 0.15)))))
    rows.append(RequestLog(id="chatcmpl-elsewhere", endpoint="chat", model="x", route="other", arm="control",
                           version="x:v1", status=500, latency_s=9.0))
    rows.append(RequestLog(id="chatcmpl-old", endpoint="chat", model="bot-ab", route="bot-ab", arm="control",
                           version="bot:v1", status=500, latency_s=9.0, at=utc_now() - timedelta(days=3)))
    feedback.append(Feedback(request_id="chatcmpl-control-5", thumbs="down"))  # thumbs count as 0/1
    with Session(reg.engine) as s, s.begin():
        s.add_all(rows)
        s.flush()
        s.add_all(feedback)


@pytest.fixture
def reg(tmp_path):
    r = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    _fill(r, random.Random(0))
    return r


def test_per_arm_figures_and_tests_against_the_control(reg):
    r = report(reg, "bot-ab", since=utc_now() - timedelta(days=1))
    assert r["control"] == "control"  # control and twin tie on requests: the first by name
    arms = {a["arm"]: a for a in r["arms"]}
    c, cand, twin = arms["control"], arms["candidate"], arms["twin"]
    assert (c["requests"], c["errors"], cand["requests"], cand["errors"]) == (300, 3, 150, 18)
    assert cand["fallbacks"] == 15 and cand["versions"] == {"bot:v2": 132}
    assert 0.9 < c["p50_s"] < 1.1 and 1.4 < cand["p50_s"] < 1.6 and c["p95_s"] > c["p50_s"]
    assert c["feedback"] == 100 and 0.75 < c["mean_score"] < 0.82  # 99 scores ~0.8 and one thumbs-down
    # The candidate differs from control on every measure; the twin on none.
    assert all(p < 0.001 for p in cand["p_values"].values()), cand["p_values"]
    assert all(p > 0.05 for p in twin["p_values"].values()), twin["p_values"]
    assert c["p_values"] is None
    # Without a time window the 3-day-old error counts too.
    assert {a["arm"]: a["errors"] for a in report(reg, "bot-ab")["arms"]}["control"] == 4


def test_cli_prints_the_table(reg, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    url = str(reg.engine.url)
    assert main(["ab", "report", "bot-ab", "--registry", url, "--control", "twin", "--hours", "24"]) == 0
    out = capsys.readouterr().out
    assert "control: twin" in out and "18 (12.0%)" in out and "bot:v2 (132)" in out
    assert main(["ab", "report", "bot-ab", "--registry", url, "--control", "nobody"]) == 2
    assert "no arm 'nobody'" in capsys.readouterr().err
    assert main(["ab", "report", "nothing", "--registry", url]) == 0
    assert "no logged requests" in capsys.readouterr().out
