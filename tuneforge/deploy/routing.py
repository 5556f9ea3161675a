"""Gateway decisions that need no model: which A/B arm a user gets, the chain of targets to
try, and per-key rate limits. Pure functions where possible, so they are tested alone."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import deque
from dataclasses import dataclass

from tuneforge.deploy.config import Guards, Route
from tuneforge.registry.store import Arm


def bucket(route: str, user: str) -> float:
    """A stable number in [0, 1) per (route, user): the same user keeps the same arm."""
    digest = hashlib.sha256(f"{route}\x00{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick_arm(route_name: str, route: Route, user: str) -> Arm:
    x = bucket(route_name, user) * sum(a.weight for a in route.arms)
    for arm in route.arms:
        if x < arm.weight:
            return arm
        x -= arm.weight
    return route.arms[-1]  # float rounding at the top edge


@dataclass(frozen=True)
class Plan:
    route: str | None
    arm: str | None
    targets: list  # tried in order: the arm's (or requested) target, then the fallbacks (str | FixedReply)
    guards: Guards | None = None


def plan(model: str, routes: dict[str, Route], user: str, override: list[dict] | None = None) -> Plan:
    """``override``: arms from the registry (Registry.route_arms) that replace the route's
    serve.yaml arms; for a name with no route, the name itself stays the fallback."""
    route = routes.get(model)
    if override:
        route = Route(arms=override, fallback=route.fallback if route else [model],
                      guards=route.guards if route else Guards())
    if route is None:
        return Plan(None, None, [model])
    arm = pick_arm(model, route, user)
    return Plan(model, arm.name, [arm.target, *(t for t in route.fallback if t != arm.target)],
                route.guards if route.guards.active else None)


class RateLimiter:
    """Sliding one-minute window of request times per key (in memory, per server process)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.seen: dict[int, deque] = {}

    def allow(self, key_id: int, per_minute: int | None) -> bool:
        if per_minute is None:
            return True
        now = self.clock()
        q = self.seen.setdefault(key_id, deque())
        while q and now - q[0] >= 60:
            q.popleft()
        if len(q) >= per_minute:
            return False
        q.append(now)
        return True


def guard_failure(guards: Guards, text: str, json_requested: bool) -> str | None:
    """Which guard ``text`` fails ("empty", "json_object", "blocklist"), with why; None if it passes."""
    if guards.empty and not text.strip():
        return "empty: the output is empty"
    if guards.json_object and json_requested:
        try:
            ok = isinstance(json.loads(text), dict)
        except ValueError:
            ok = False
        if not ok:
            return "json_object: JSON was asked for and the output is not a JSON object"
    for pattern in guards.blocklist:
        if re.search(pattern, text):
            return f"blocklist: the output matches {pattern!r}"
    return None
