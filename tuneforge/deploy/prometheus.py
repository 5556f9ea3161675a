"""Prometheus metrics of the gateway, on prometheus_client's default REGISTRY (so other
modules, e.g. production monitoring, add their own gauges to the same /metrics page).

Labels: endpoint (chat|completion), route (A/B route or ""), version (what served it,
e.g. support-bot:v2, "fixed-reply", or "" when nothing did), arm, status (HTTP status).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LABELS = ("endpoint", "route", "version", "arm", "status")

REQUESTS = Counter("tuneforge_requests", "completion requests answered", _LABELS)
LATENCY = Histogram("tuneforge_request_latency_seconds", "time from request to the last byte of the answer",
                    _LABELS, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
PROMPT_TOKENS = Counter("tuneforge_prompt_tokens", "prompt tokens processed", ("version",))
COMPLETION_TOKENS = Counter("tuneforge_completion_tokens", "tokens generated", ("version",))
FALLBACKS = Counter("tuneforge_fallbacks", "targets skipped down a fallback chain, by reason class "
                    "(unknown_model, timeout, error, guard_empty, guard_json_object, guard_blocklist)",
                    ("route", "reason"))
RESIDENT_ADAPTERS = Gauge("tuneforge_resident_adapters", "adapters loaded in the local engine")
PREFIX_REUSED = Gauge("tuneforge_prefix_cache_reused_tokens",
                      "prompt tokens the local engine took from its prefix cache instead of computing, since start")
PREFIX_BYTES = Gauge("tuneforge_prefix_cache_bytes", "memory held by the local engine's prefix cache")


def observe(record) -> None:
    """Count one finished request (a RequestRecord)."""
    labels = (record.endpoint, record.route or "", record.version or "", record.arm or "", str(record.status))
    REQUESTS.labels(*labels).inc()
    LATENCY.labels(*labels).observe(record.latency_s)
    if record.version:
        PROMPT_TOKENS.labels(record.version).inc(record.prompt_tokens)
        COMPLETION_TOKENS.labels(record.version).inc(record.completion_tokens)
