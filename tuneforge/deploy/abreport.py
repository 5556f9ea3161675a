"""`tuneforge ab report ROUTE`: per-arm figures of an A/B route from the request log, with
significance tests of each arm against the control arm.

Reads ``request_logs`` (one row per request, written by the server's request logger) and
``feedback`` (scores users sent for a request). An error is a 5xx answer (the arm's fault;
4xx are the client's); latency percentiles are over answered (200) requests; a feedback
score is ``feedback.score`` (0..1), else thumbs up = 1 / down = 0.

Tests (scipy): Fisher's exact test on the error counts, Mann-Whitney U on feedback scores
and on latencies, two-sided; each arm is compared with the control (``--control``, default
the arm with the most requests). No correction for several arms is applied: with more than
two arms, read p-values against 0.05 / (arms - 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneforge.registry.store import Registry
from tuneforge.registry.tables import Feedback, RequestLog


@dataclass
class ArmStats:
    arm: str
    versions: dict[str, int] = field(default_factory=dict)  # version -> requests it answered
    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    latencies: list[float] = field(default_factory=list)  # answered requests, seconds
    scores: list[float] = field(default_factory=list)  # one per feedback row

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def latency(self, q: float) -> float | None:
        return float(np.percentile(self.latencies, q)) if self.latencies else None

    @property
    def mean_score(self) -> float | None:
        return float(np.mean(self.scores)) if self.scores else None


def arm_stats(registry: Registry, route: str, since: datetime | None = None) -> dict[str, ArmStats]:
    arms: dict[str, ArmStats] = {}
    with Session(registry.engine) as s:
        q = select(RequestLog.id, RequestLog.arm, RequestLog.version, RequestLog.status, RequestLog.latency_s,
                   RequestLog.fallback_reason).where(RequestLog.route == route)
        if since is not None:
            q = q.where(RequestLog.at >= since)
        arm_of = {}
        for rid, arm, version, status, latency, fallback in s.execute(q):
            a = arms.setdefault(arm or "-", ArmStats(arm or "-"))
            arm_of[rid] = a
            a.requests += 1
            a.errors += status >= 500
            a.fallbacks += fallback is not None
            if version:
                a.versions[version] = a.versions.get(version, 0) + 1
            if status == 200:
                a.latencies.append(latency)
        fq = (select(Feedback.request_id, Feedback.score, Feedback.thumbs)
              .join(RequestLog, Feedback.request_id == RequestLog.id).where(RequestLog.route == route))
        if since is not None:
            fq = fq.where(RequestLog.at >= since)
        for rid, score, thumbs in s.execute(fq):
            value = score if score is not None else {"up": 1.0, "down": 0.0}.get(thumbs or "")
            if value is not None and rid in arm_of:
                arm_of[rid].scores.append(float(value))
    return arms


def compare(control: ArmStats, other: ArmStats) -> dict[str, float | None]:
    """Two-sided p-values of ``other`` against ``control`` (None where a side has no data)."""
    from scipy.stats import (  # deferred: scipy loads for `tuneforge ab` only, not with the server
        fisher_exact,
        mannwhitneyu,
    )

    def mw(a, b):
        return float(mannwhitneyu(a, b, alternative="two-sided").pvalue) if a and b else None

    errors = None
    if control.requests and other.requests:
        table = [[control.errors, control.requests - control.errors], [other.errors, other.requests - other.errors]]
        errors = float(fisher_exact(table).pvalue)
    return {"errors": errors, "score": mw(control.scores, other.scores), "latency": mw(control.latencies,
                                                                                       other.latencies)}


def report(registry: Registry, route: str, control: str | None = None, since: datetime | None = None) -> dict:
    arms = arm_stats(registry, route, since)
    if not arms:
        return {"route": route, "arms": [], "control": None}
    if control is not None and control not in arms:
        raise ValueError(f"route {route} has no arm '{control}' in the log (arms: {', '.join(sorted(arms))})")
    control = control or min(arms.values(), key=lambda a: (-a.requests, a.arm)).arm  # ties: first by name
    rows = []
    for a in sorted(arms.values(), key=lambda a: (a.arm != control, a.arm)):
        rows.append({"arm": a.arm, "versions": a.versions, "requests": a.requests, "errors": a.errors,
                     "error_rate": a.error_rate, "fallbacks": a.fallbacks, "p50_s": a.latency(50),
                     "p95_s": a.latency(95), "feedback": len(a.scores), "mean_score": a.mean_score,
                     "p_values": None if a.arm == control else compare(arms[control], a)})
    return {"route": route, "arms": rows, "control": control}
