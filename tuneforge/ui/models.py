"""The Models page: registry versions and aliases (promote through the gate, rollback), each
model's A/B routes with their arms and per-arm figures, monitoring charts and open alerts.

Nothing here computes a figure of its own: the arms' figures and p-values are
``deploy.abreport.report`` (what `tuneforge ab report` prints), the charts and alerts are
``production.loop.monitor.measure`` (what `tuneforge monitor` reports), run once over the
chosen window for the alerts and once per time bucket for the charts. Changing a split or
ending a test writes a route override (``Registry.set_route_arms`` / ``clear_route_arms``,
what `tuneforge improve` uses for its canary): the gateway reads it on every request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneforge.deploy.abreport import report
from tuneforge.production.config import MonitorConfig, parse_window
from tuneforge.production.http import ApiError, may_call, read_json
from tuneforge.production.loop.monitor import UPPER_LIMITS, MonitorResult, measure
from tuneforge.registry.store import Arm, PromotionRefused, RegistryError, parse_ref
from tuneforge.registry.tables import RouteOverride, utc_now
from tuneforge.ui.charts import line_chart
from tuneforge.ui.web import authenticate, page_key, render


@dataclass(frozen=True)
class Window:
    since: str  # the monitor's window syntax
    bucket: str  # one chart point per bucket, the same syntax
    buckets: int
    unit_s: float  # the chart's x unit
    unit: str


WINDOWS = {"24h": Window("24h", "1h", 24, 3600, "hours"), "7d": Window("7d", "6h", 28, 86400, "days")}
CHARTS = [("requests", "requests per {bucket}"), ("latency_p95_s", "latency p95 (s)"),
          ("error_rate", "error rate (5xx share)"), ("feedback_mean", "mean feedback score (0-1)")]
# Failing or slow answers hurt every user now; quality, feedback and drift need a look.
CRITICAL = {"error_rate", "latency_p95_s", "fallback_rate"}


def monitor_config(window: Window, drift: bool) -> MonitorConfig:
    """monitor.yaml's defaults over ``window``. The drift test loads the sentence encoder and
    the versions' training data, so it runs only when asked for; the dashboard never puts
    drifted prompts on the review queue (`tuneforge monitor` does)."""
    cfg = MonitorConfig(since=window.since)
    cfg.drift.enabled, cfg.drift.queue_for_review = drift, False
    return cfg


def rules(cfg: MonitorConfig) -> str:
    th = cfg.thresholds
    parts = [f"{name} > {getattr(th, name):g}" for name in UPPER_LIMITS if getattr(th, name) is not None]
    if th.length_shift is not None:
        parts.append(f"|answer length shift| > {th.length_shift:g}")
    if th.feedback_min is not None:
        parts.append(f"feedback_mean < {th.feedback_min:g}")
    if th.drift_p is not None:
        parts.append(f"drift p-value < {th.drift_p:g}" + ("" if cfg.drift.enabled else " (drift test off)"))
    return "; ".join(parts) + f"; each over at least {cfg.min_requests} requests in the window"


def model_of(ref: str) -> str:
    try:
        return parse_ref(ref)[0]
    except RegistryError:
        return ref


# --- A/B routes --------------------------------------------------------------------------------------

def route_arms(request: Request, route: str) -> tuple[list[dict], dict | None]:
    """The arms the gateway uses for ``route`` now (an override's, else serve.yaml's) and the override."""
    override = request.app.state.registry.route_override(route)
    if override:
        return override["arms"], override
    cfg_route = request.app.state.gateway.cfg.routes.get(route)
    return ([a.model_dump() for a in cfg_route.arms] if cfg_route else []), None


def ab_routes(request: Request, name: str, since: datetime) -> list[dict]:
    """The routes with an arm on model ``name``, each arm with abreport's figures since ``since``."""
    reg = request.app.state.registry
    with Session(reg.engine) as s:
        names = set(s.scalars(select(RouteOverride.route))) | set(request.app.state.gateway.cfg.routes)
    out = []
    for route in sorted(names):
        arms, override = route_arms(request, route)
        if not any(model_of(a["target"]) == name for a in arms):
            continue
        rep = report(reg, route, since=since)
        logged = {a["arm"]: a for a in rep["arms"]}
        total = sum(a["weight"] for a in arms)
        rows = [{**a, "share": a["weight"] / total, "live": True, "figures": logged.pop(a["name"], None)}
                for a in arms]
        # Arms that served in the window but are not in the route now (a test ended, a split changed).
        rows += [{"name": n, "target": None, "weight": None, "share": None, "live": False, "figures": f}
                 for n, f in logged.items()]
        out.append({"name": route, "arms": rows, "override": override, "control": rep["control"],
                    "in_serve_yaml": route in request.app.state.gateway.cfg.routes})
    return out


# --- monitoring --------------------------------------------------------------------------------------

def belongs(group: tuple[str, str], name: str, routes: set[str]) -> bool:
    """A monitor group (route or model name, version) is ``name``'s when its version is, or, for
    requests no version answered, when it was asked for ``name`` or one of its routes."""
    route, version = group
    return model_of(version) == name if version != "-" else route == name or route in routes


def monitoring(request: Request, models: list[str], routes: dict[str, set[str]], window: Window,
               drift: bool, end: datetime) -> dict[str, dict]:
    """Per model: SVG charts (one line per route and version) and open alerts over ``window``."""
    reg, cfg = request.app.state.registry, monitor_config(window, drift)
    whole = measure(reg, cfg, now=end)
    # Charts: the same figures per bucket; the drift test (seconds each) runs once, over the whole window.
    bucket_cfg = cfg.model_copy(update={"since": window.bucket,
                                        "drift": cfg.drift.model_copy(update={"enabled": False})})
    step = (end - whole.start) / window.buckets
    buckets = [measure(reg, bucket_cfg, now=whole.start + step * (i + 1)) for i in range(window.buckets)]
    out = {}
    for name in models:
        mine = lambda g: belongs(g, name, routes[name])  # noqa: E731
        out[name] = {"charts": charts(buckets, mine, end, window),
                     "alerts": [alert_row(a, buckets, whole) for a in whole.alerts if mine((a.route, a.version))],
                     "groups": [g for g in whole.groups if mine(g["group"])]}
    return out


def charts(buckets: list[MonitorResult], mine, end: datetime, window: Window) -> list[str]:
    names = sorted({g["group"] for b in buckets for g in b.groups if mine(g["group"])})
    svgs = []
    for metric, title in CHARTS:
        series = {}
        for group in names:
            points = []
            for b in buckets:
                x = -(end - b.end).total_seconds() / window.unit_s
                f = next((g["figures"] for g in b.groups if g["group"] == group), None)
                if f is None and metric == "requests":
                    points.append((x, 0.0))  # no request in this bucket: a zero, not a gap
                elif f is not None and f.get(metric) is not None:
                    points.append((x, float(f[metric])))
            series[" ".join(group)] = points
        svgs.append(line_chart(series, title.format(bucket=window.bucket), x_label=f"{window.unit} (0 = now)",
                               width=580, height=220))
    return svgs


def alert_row(alert, buckets: list[MonitorResult], whole: MonitorResult) -> dict:
    """The alert with a severity and since when: the start of the first chart bucket where the
    monitor's check fires alone, else the window's start (it fires only over the whole window)."""
    first = next((b for b in buckets if any((a.metric, a.route, a.version) == (alert.metric, alert.route, alert.version)
                                            for a in b.alerts)), None)
    lower = alert.metric in ("feedback_mean", "judge_mean", "drift_p_value")
    return {"alert": alert, "severity": "critical" if alert.metric in CRITICAL else "warning",
            "since": first.start if first else whole.start, "in_bucket": first is not None,
            "compare": "<" if lower else ">" if alert.metric != "length_shift" else "|shift| >"}


# --- the page and its calls --------------------------------------------------------------------------

def model_views(request: Request, key, window: Window, drift: bool) -> tuple[list[dict], MonitorConfig]:
    """The registry models ``key`` may call: versions, aliases, alias history, A/B routes, monitoring."""
    reg, end = request.app.state.registry, utc_now()
    names = [n for n in reg.models() if may_call(key, n)]
    start = end - parse_window(window.since)
    views = [{"name": n, "versions": reg.versions(n), "aliases": reg.aliases(n), "history": reg.history(n)[-10:],
              "routes": ab_routes(request, n, start)} for n in names]
    routes = {v["name"]: {r["name"] for r in v["routes"]} for v in views}
    watch = monitoring(request, names, routes, window, drift, end)
    for v in views:
        v |= watch[v["name"]]
    return views, monitor_config(window, drift)


def add_routes(router: APIRouter, runs_dir: Path) -> None:
    @router.get("/models")
    async def models_page(request: Request, window: str = "24h", drift: bool = False):
        key, refused = page_key(request)
        if refused:
            return refused
        if window not in WINDOWS:
            return render("error.html", 400, message=f"window is one of {', '.join(WINDOWS)} (got {window!r})")
        models, cfg = await asyncio.to_thread(model_views, request, key, WINDOWS[window], drift)
        return render("models.html", key=key, nav="models", models=models, window=window, windows=list(WINDOWS),
                      drift=drift, rules=rules(cfg))

    @router.post("/models/{name}/{action}")
    async def alias_change(request: Request, name: str, action: str):
        authenticate(request, admin=True)  # moving an alias changes what every client of it gets
        body = await read_json(request)  # not JSON / nested too deep: the API's 400
        body = body if isinstance(body, dict) else {}
        alias = str(body.get("alias", "")).strip()
        if action not in ("promote", "rollback") or not alias:
            raise ApiError(400, "POST /ui/models/NAME/promote {version, alias, force} "
                                "or /ui/models/NAME/rollback {alias}")
        reg = request.app.state.registry
        try:
            if action == "rollback":
                return {"result": await asyncio.to_thread(reg.rollback, name, alias)}
            ref = f"{name}:v{str(body.get('version', '')).lstrip('v')}"
            return {"result": await asyncio.to_thread(reg.promote, ref, alias, bool(body.get("force")))}
        except PromotionRefused as e:  # the gate's verdict, shown as is; force overrides it
            raise ApiError(409, str(e), "conflict_error") from None
        except RegistryError as e:
            raise ApiError(400, str(e)) from None

    @router.post("/routes/{route}/{action}")
    async def route_change(request: Request, route: str, action: str):
        key = authenticate(request, admin=True)  # a split decides which model every user of the route gets
        body = await read_json(request)
        body = body if isinstance(body, dict) else {}
        if action not in ("split", "end"):
            raise ApiError(404, f"no action '{action}' (split, end)", "not_found_error")
        arms, override = route_arms(request, route)
        if not arms:
            raise ApiError(404, f"no A/B route '{route}' (serve.yaml routes or a route override)", "not_found_error")
        who = key.name if key else "ui"
        reg = request.app.state.registry
        if action == "end":
            return {"result": await asyncio.to_thread(end_test, reg, route, arms, override, body, who)}
        weights = body.get("weights")
        names = [a["name"] for a in arms]
        if not isinstance(weights, dict) or sorted(weights) != sorted(names):
            raise ApiError(400, f"'weights' gives one weight per arm of {route}: {', '.join(names)} "
                                f"(got {sorted(weights) if isinstance(weights, dict) else weights!r})")
        new = [{**a, "weight": weights[a["name"]]} for a in arms]
        problems = []
        for arm in new:  # Arm's rules, as in serve.yaml and set_route_arms: each arm named in the answer
            try:
                Arm.model_validate(arm)
            except ValidationError as e:
                problems += [f"arm {arm['name']} {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        if problems:
            raise ApiError(400, f"route {route}: {'; '.join(problems)} (to stop an arm, end the test keeping another)")
        try:
            await asyncio.to_thread(reg.set_route_arms, route, new, f"ui: split set by {who}")
        except RegistryError as e:
            raise ApiError(400, str(e)) from None
        shares = {a["name"]: a["weight"] / sum(b["weight"] for b in new) for a in new}
        return {"result": f"route {route}: " + ", ".join(f"{n} {s:.0%}" for n, s in shares.items())}


def end_test(reg, route: str, arms: list[dict], override: dict | None, body: dict, who: str) -> str:
    """{"keep": ARM}: all of the route's traffic to that arm (an override with one arm);
    {"clear": true}: remove the override (serve.yaml's arms again, or the model name itself)."""
    if body.get("clear"):
        if override is None:
            raise ApiError(400, f"route {route} has no override to clear (its arms are serve.yaml's; "
                                "keep one arm to end the test)")
        reg.clear_route_arms(route)
        return f"route {route}: override cleared"
    keep = next((a for a in arms if a["name"] == body.get("keep")), None)
    if keep is None:
        raise ApiError(400, f"'keep' names an arm of {route}: {', '.join(a['name'] for a in arms)} "
                            f"(got {body.get('keep')!r}), or send {{\"clear\": true}}")
    reg.set_route_arms(route, [{**keep, "weight": 1.0}], f"ui: test ended by {who}, all traffic to {keep['name']}")
    return f"route {route}: all traffic to {keep['name']} ({keep['target']})"
