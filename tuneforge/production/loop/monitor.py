"""``tuneforge monitor``: health, label-free quality, drift and alerts from the request log.

Recipe: window -> logged requests per (route, version) -> operational figures -> quality
signals (+ feedback, + optional judge) -> the same figures for the earlier window (length
shift) -> drift against the serving version's training prompts -> alerts (log + webhook)
-> Prometheus gauges -> drifted prompts onto the review queue -> report.
"""

from __future__ import annotations

import importlib
import json
import logging
import random
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime

import httpx
import numpy as np
from prometheus_client import Gauge
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tuneforge.production.config import MonitorConfig, parse_window
from tuneforge.production.loop import drift as dr
from tuneforge.production.loop.drift import logged_prompt
from tuneforge.registry.store import Registry, RegistryError, parse_ref
from tuneforge.registry.tables import Feedback, RequestLog, ReviewItem, utc_now

log = logging.getLogger("tuneforge.monitor")
# Module level: the default registry rejects a second metric of the same name.
MONITOR = Gauge("tuneforge_monitor", "figures of the latest `tuneforge monitor` run", ["metric", "route", "version"])

FENCED_JSON = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)


# --- label-free signals on one answer ----------------------------------------------------------------

def repeated_ngram_ratio(text: str, n: int = 3) -> float:
    """Share of the answer's word n-grams that are repeats of an earlier one (0: none repeat).
    A model stuck in a loop ("the the the", the same sentence again) scores near 1."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def json_valid(text: str) -> bool:
    """Valid JSON, also when wrapped in a ``` fence (what a JSON-mode client still parses)."""
    m = FENCED_JSON.match(text or "")
    try:
        json.loads(m.group(1) if m else text)
    except (ValueError, TypeError):
        return False
    return True


def is_refusal(text: str, patterns: list[re.Pattern]) -> bool:
    return any(p.search(text or "") for p in patterns)


# --- figures per group --------------------------------------------------------------------------------

@dataclass
class Row:
    """What the monitor reads of a logged request."""

    id: str
    at: datetime
    group: tuple[str, str]  # (route, version)
    status: int
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    fallback: bool
    json_requested: bool
    prompt: str | None
    response: str | None


def group_of(r: RequestLog) -> tuple[str, str]:
    """A route's name, or for a direct call the model name it asked for (bot:v2 -> bot)."""
    try:
        name = r.route or parse_ref(r.model)[0]
    except RegistryError:
        name = r.model
    return name, r.version or "-"


def load_rows(db, start: datetime, end: datetime, route: str | None = None) -> list[Row]:
    with Session(db) as s:
        q = select(RequestLog).where(RequestLog.at >= start, RequestLog.at < end).order_by(RequestLog.at)
        out = []
        for r in s.scalars(q):
            g = group_of(r)
            if route is None or g[0] == route:
                out.append(Row(r.id, r.at, g, r.status, r.latency_s, r.prompt_tokens, r.completion_tokens,
                               r.finish_reason, bool(r.fallback_reason) and r.status < 400, r.json_requested,
                               logged_prompt(r.messages, r.prompt), r.response))
        return out


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _examples(rows: list[Row], flags: list[bool], k: int = 3) -> list[str]:
    return [r.id for r, f in zip(rows, flags) if f][:k]


def figures(rows: list[Row], cfg: MonitorConfig) -> tuple[dict, dict]:
    """(figures, examples): operational and quality figures of one group's rows, and for
    each rate a few request ids that count towards it (an alert's evidence)."""
    ok = [r for r in rows if r.status < 400]
    lat = np.array([r.latency_s for r in ok]) if ok else None
    out = {"requests": len(rows), "ok": len(ok),
           "error_rate": _rate([r.status >= 500 for r in rows]),
           "client_error_rate": _rate([400 <= r.status < 500 for r in rows]),
           "latency_p50_s": float(np.percentile(lat, 50)) if ok else None,
           "latency_p95_s": float(np.percentile(lat, 95)) if ok else None,
           "latency_p99_s": float(np.percentile(lat, 99)) if ok else None,
           "fallback_rate": _rate([r.fallback for r in ok]),
           "prompt_tokens": sum(r.prompt_tokens for r in ok), "completion_tokens": sum(r.completion_tokens for r in ok),
           "mean_completion_tokens": float(np.mean([r.completion_tokens for r in ok])) if ok else None}
    ex = {"error_rate": _examples(rows, [r.status >= 500 for r in rows]),
          "fallback_rate": _examples(ok, [r.fallback for r in ok])}
    # Quality: only answers whose text was stored (opted-out keys and store_text=false have none).
    texts = [r for r in ok if r.response is not None]
    patterns = [re.compile(p, re.I) for p in cfg.refusal_patterns]
    flags = {"empty_rate": [not r.response.strip() for r in texts],
             "truncated_rate": [r.finish_reason == "length" for r in ok],
             "refusal_rate": [is_refusal(r.response, patterns) for r in texts],
             "repetition_rate": [repeated_ngram_ratio(r.response, cfg.repetition.n) >= cfg.repetition.max_ratio
                                 for r in texts]}
    for name, f in flags.items():
        out[name] = _rate(f)
        ex[name] = _examples(ok if name == "truncated_rate" else texts, f)
    wanted = [r for r in texts if r.json_requested]
    invalid = [not json_valid(r.response) for r in wanted]
    out["json_requests"], out["json_invalid_rate"] = len(wanted), _rate(invalid)
    ex["json_invalid_rate"] = _examples(wanted, invalid)
    out["mean_answer_chars"] = float(np.mean([len(r.response) for r in texts])) if texts else None
    return out, ex


def feedback_figures(db, ids: list[str]) -> tuple[dict, list[str]]:
    """Mean normalised feedback score of these requests, and the lowest-rated request ids."""
    if not ids:
        return {"feedback_n": 0, "feedback_mean": None}, []
    with Session(db) as s:
        got = []
        for i in range(0, len(ids), 500):  # keeps the IN (...) list under SQLite's variable limit
            got += s.execute(select(Feedback.request_id, Feedback.score)
                             .where(Feedback.request_id.in_(ids[i:i + 500]), Feedback.score.is_not(None))).all()
    scores = [sc for _, sc in got]
    low = [rid for rid, _ in sorted(got, key=lambda t: t[1])[:3]]
    return {"feedback_n": len(scores), "feedback_mean": float(np.mean(scores)) if scores else None}, low


class MonitorError(ValueError):
    """A problem the user can fix (the CLI prints it as one line)."""


def load_judge(spec: str) -> Callable[[str, str, str], float]:
    """'package.module:function' -> the function."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise MonitorError(f"judge.callable is 'module:function' (got {spec!r})")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise MonitorError(f"judge.callable {spec!r} cannot be loaded: {e}") from None


def judge_figures(rows: list[Row], cfg: MonitorConfig) -> dict:
    """Mean judge score over a seeded sample of answered requests (a plug point: any callable)."""
    texts = [r for r in rows if r.status < 400 and r.response is not None]
    if not cfg.judge.callable or not texts:
        return {}
    judge = load_judge(cfg.judge.callable)
    sample = random.Random(cfg.judge.seed).sample(texts, min(cfg.judge.sample, len(texts)))
    scores = []
    for r in sample:
        try:
            scores.append(float(judge(r.prompt or "", r.response, cfg.judge.rubric)))
        except Exception as e:  # noqa: BLE001 - user code: say which request it failed on
            raise MonitorError(f"judge {cfg.judge.callable} failed on request {r.id}: {type(e).__name__}: {e}") from e
    return {"judge_n": len(scores), "judge_mean": float(np.mean(scores))}


# --- alerts -----------------------------------------------------------------------------------------------

@dataclass
class Alert:
    metric: str
    route: str
    version: str
    window: str  # e.g. "7d (2026-11-22 10:00 -> 2026-11-29 10:00)"
    value: float
    threshold: float
    baseline: str  # what the value is compared with
    evidence: dict = field(default_factory=dict)

    @property
    def message(self) -> str:
        return (f"[{self.route} {self.version}] {self.metric} = {self.value:.4g} (threshold {self.threshold:g}) "
                f"over {self.window}; baseline: {self.baseline}; evidence: {json.dumps(self.evidence, default=str)}")


# Figures that alert when above their threshold of the same name.
UPPER_LIMITS = ("error_rate", "latency_p95_s", "fallback_rate", "empty_rate", "truncated_rate", "refusal_rate",
                "repetition_rate", "json_invalid_rate")


def check(group: dict, cfg: MonitorConfig, window: str) -> list[Alert]:
    """Alerts for one group's figures (a dict as built by :func:`monitor`)."""
    th, f, (route, version) = cfg.thresholds, group["figures"], group["group"]
    alerts = []

    def add(metric, value, threshold, baseline, evidence):
        alerts.append(Alert(metric, route, version, window, float(value), float(threshold), baseline, evidence))

    enough = f["requests"] >= cfg.min_requests
    for name in UPPER_LIMITS:
        limit, value = getattr(th, name), f.get(name)
        if enough and limit is not None and value is not None and value > limit:
            add(name, value, limit, f"threshold {limit:g} (monitor.yaml thresholds.{name})",
                {"requests": f["requests"], "examples": group["examples"].get(name, [])})
    earlier = group.get("earlier") or {}
    if (enough and th.length_shift is not None and f.get("mean_answer_chars") and earlier.get("mean_answer_chars")
            and earlier.get("requests", 0) >= cfg.min_requests):
        shift = f["mean_answer_chars"] / earlier["mean_answer_chars"] - 1
        if abs(shift) > th.length_shift:
            add("length_shift", shift, th.length_shift, f"the earlier window ({earlier['window']}): mean answer "
                f"{earlier['mean_answer_chars']:.0f} chars over {earlier['requests']} requests",
                {"mean_answer_chars": round(f["mean_answer_chars"], 1), "requests": f["requests"]})
    if th.feedback_min is not None and f.get("feedback_mean") is not None and f["feedback_n"] >= cfg.min_requests:
        if f["feedback_mean"] < th.feedback_min:
            add("feedback_mean", f["feedback_mean"], th.feedback_min, f"threshold {th.feedback_min:g}",
                {"ratings": f["feedback_n"], "lowest": group["examples"].get("feedback", [])})
    if th.judge_min is not None and f.get("judge_mean") is not None and f["judge_mean"] < th.judge_min:
        add("judge_mean", f["judge_mean"], th.judge_min, f"threshold {th.judge_min:g} ({cfg.judge.callable})",
            {"judged": f["judge_n"]})
    d = group.get("drift")
    if th.drift_p is not None and d and "p_value" in d and d["p_value"] < th.drift_p:
        add("drift_p_value", d["p_value"], th.drift_p, f"training prompts of {version} ({d['reference']}, "
            f"{d['n_reference']} sampled)", {"mmd2": d["mmd2"], "recent_prompts": d["n_recent"],
                                               "most_drifted": [x["prompt"][:200] for x in d["drifted"][:3]]})
    return alerts


def send_webhook(url: str, alerts: list[Alert], timeout_s: float, transport=None) -> str | None:
    """POST the alerts as JSON; the error text if it failed (the report says so; nothing raises)."""
    try:
        with httpx.Client(timeout=timeout_s, transport=transport) as client:
            r = client.post(url, json={"source": "tuneforge monitor",
                                       "alerts": [asdict(a) | {"message": a.message} for a in alerts]})
            r.raise_for_status()
    except httpx.HTTPError as e:
        return f"{type(e).__name__}: {e}"
    return None


# --- Prometheus and the review queue ---------------------------------------------------------------------

def publish_gauges(groups: list[dict]) -> None:
    """Every numeric figure as tuneforge_monitor{metric, route, version} in the default registry
    (served at the server's /metrics, or written with --metrics-file for a textfile collector)."""
    MONITOR.clear()  # only the latest run's figures: a route that went quiet must not keep old values
    for g in groups:
        route, version = g["group"]
        values = dict(g["figures"])
        if g.get("drift") and "p_value" in g["drift"]:
            values |= {"drift_p_value": g["drift"]["p_value"], "drift_mmd2": g["drift"]["mmd2"]}
        for metric, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                MONITOR.labels(metric, route, version).set(value)


def queue_for_review(db, items: list[tuple[str, str, str]]) -> int:
    """Put (request_id, reason, detail) on the human review queue; a request already queued
    (the unique request_id) is skipped. Returns how many were added."""
    added = 0
    for rid, reason, detail in items:
        try:
            with Session(db) as s, s.begin():
                if s.scalar(select(ReviewItem.id).where(ReviewItem.request_id == rid)) is not None:
                    continue
                s.add(ReviewItem(request_id=rid, reason=reason, detail=detail))
        except IntegrityError:  # queued by someone else between the check and the insert
            continue
        added += 1
    return added


# --- the command --------------------------------------------------------------------------------------

@dataclass
class MonitorResult:
    window: str
    start: datetime
    end: datetime
    groups: list[dict]
    alerts: list[Alert]
    webhook_error: str | None = None
    queued_for_review: int = 0


def measure(registry: Registry, cfg: MonitorConfig, route: str | None = None, now: datetime | None = None,
            embed=None, progress: Callable[[str], None] = lambda msg: None) -> MonitorResult:
    """The figures, drift and alerts of the window ending ``now``, with no side effect (no log
    line, webhook, gauge or review item): what :func:`monitor` reports and the dashboard's
    Models page draws, so both show the same numbers. ``embed`` replaces the MiniLM encoder."""
    end = now or utc_now()
    span = parse_window(cfg.since)
    start = end - span
    window = f"{cfg.since} ({start:%Y-%m-%d %H:%M} -> {end:%Y-%m-%d %H:%M} UTC)"
    earlier_window = f"{start - span:%Y-%m-%d %H:%M} -> {start:%Y-%m-%d %H:%M} UTC"

    progress("reading the request log")
    by_group, earlier = defaultdict(list), defaultdict(list)
    for r in load_rows(registry.engine, start, end, route):
        by_group[r.group].append(r)
    for r in load_rows(registry.engine, start - span, start, route):
        earlier[r.group].append(r)

    groups, references = [], {}
    for key in sorted(by_group):
        rows = by_group[key]
        progress(f"figures for {key[0]} {key[1]}")
        f, ex = figures(rows, cfg)
        fb, ex["feedback"] = feedback_figures(registry.engine, [r.id for r in rows])
        f |= fb | judge_figures(rows, cfg)
        g = {"group": key, "figures": f, "examples": ex,
             "latencies": [r.latency_s for r in rows if r.status < 400]}
        if earlier.get(key):
            g["earlier"] = {"window": earlier_window, **figures(earlier[key], cfg)[0]}
        if cfg.drift.enabled:
            progress(f"drift of {key[0]} {key[1]} against its training prompts")
            g["drift"] = _drift(registry, key, rows, cfg, references, embed or dr.minilm_pair)
        groups.append(g)

    return MonitorResult(window, start, end, groups, [a for g in groups for a in check(g, cfg, window)])


def monitor(registry: Registry, cfg: MonitorConfig, route: str | None = None, now: datetime | None = None,
            embed=None, transport=None, progress: Callable[[str], None] = lambda msg: None) -> MonitorResult:
    """Everything ``tuneforge monitor`` does: :func:`measure`, then the alerts to the log and the
    webhook, the figures to Prometheus, drifted prompts onto the review queue. ``embed``
    replaces the MiniLM encoder and ``transport`` the webhook's HTTP transport (tests)."""
    result = measure(registry, cfg, route, now, embed, progress)
    alerts, groups = result.alerts, result.groups
    for a in alerts:
        log.warning("ALERT %s", a.message)
    if alerts and cfg.webhook:
        progress("sending alerts to the webhook")
        result.webhook_error = send_webhook(cfg.webhook, alerts, cfg.webhook_timeout_s, transport)
        if result.webhook_error:
            log.error("alert webhook %s failed: %s", cfg.webhook, result.webhook_error)
    publish_gauges(groups)
    if cfg.drift.queue_for_review:
        result.queued_for_review = queue_for_review(registry.engine, [
            (x["request_id"], "drift", f"distance {x['distance']:.3f} from the nearest training prompt "
                                       f"(p={g['drift']['p_value']:.4f}); nearest: {x['nearest'][:200]}")
            for g in groups for a in alerts if a.metric == "drift_p_value" and (a.route, a.version) == g["group"]
            for x in g["drift"]["drifted"]])
    return result


def _drift(registry: Registry, key, rows: list[Row], cfg: MonitorConfig, references: dict, embed) -> dict:
    recent = [(r.id, r.prompt) for r in rows if r.prompt]
    if len(recent) < cfg.drift.min_prompts:
        return {"skipped": f"{len(recent)} prompts with text in the window (drift needs {cfg.drift.min_prompts})"}
    version = key[1]
    try:
        run_dir = registry.resolve(version).run_dir
        if run_dir not in references:
            references[run_dir] = dr.training_prompts(run_dir)
    except Exception as e:  # noqa: BLE001 - one version's unreadable run must not stop the report
        return {"skipped": f"training prompts of {version} unavailable: {type(e).__name__}: {e}"}
    if len(references[run_dir]) < 2:
        return {"skipped": f"{run_dir} has fewer than 2 training prompts"}
    res = dr.drift_test(references[run_dir], recent, max_prompts=cfg.drift.max_prompts,
                        permutations=cfg.drift.permutations, top=cfg.drift.top, seed=cfg.drift.seed,
                        source=run_dir, embed=embed)
    return {"mmd2": res.test.mmd2, "p_value": res.test.p_value, "bandwidth": res.test.bandwidth,
            "null": res.test.null, "n_recent": res.n_recent, "n_reference": res.n_reference,
            "reference": res.reference, "drifted": res.drifted}
