"""The human review queue: which logged answers a person should look at, and what they decided.

Recipe: fill (rules pick logged requests: a correction from the user, a low score or a thumbs
down, a guard failure, a fallback, a seeded random sample) -> list the pending items ->
decide (accept / correct with the right answer / reject, with the reviewer and the time).
Only accepted and corrected items ever become training rows (`tuneforge improve` reads
them), so nothing enters training data without a decision.

The same queue is worked in the terminal (`review_loop`, behind `tuneforge review`) and over
HTTP (tuneforge/production/api/review.py, mounted on the server for the web UI).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Literal, TextIO

from pydantic import Field
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tuneforge.config import Strict
from tuneforge.registry.store import Registry
from tuneforge.registry.tables import Feedback, RequestLog, ReviewItem, utc_now

DECISIONS = ("accept", "correct", "reject")


class ReviewError(ValueError):
    status = 400


class UnknownItem(ReviewError):
    status = 404


class AlreadyDecided(ReviewError):
    status = 409


class QueueRules(Strict):
    """Which logged requests go to a human (each request at most once)."""

    low_score: float = Field(0.5, ge=0, le=1, description="feedback scores below this (scores are in [0, 1])")
    thumbs_down: bool = True
    corrections: bool = Field(True, description="requests whose feedback carries the user's own correction")
    guard: bool = Field(True, description="JSON was asked for and the answer is not valid JSON")
    fallbacks: bool = Field(True, description="an earlier target failed and a fallback answered")
    sample_rate: float = Field(0.0, ge=0, le=1, description="share of all other answered requests, seeded")
    seed: int = 0
    since: datetime | None = Field(None, description="only requests logged at or after this time")


def _sampled(request_id: str, rate: float, seed: int) -> bool:
    """A stable coin per request: filling twice (or on two machines) samples the same requests."""
    digest = hashlib.sha256(f"{seed}\x00{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def _not_json(text: str | None) -> bool:
    try:
        json.loads(text or "")
    except ValueError:
        return True
    return False


def queue_reason(log: RequestLog, feedback: list[Feedback], rules: QueueRules) -> tuple[str, str] | None:
    """(reason, detail) for the strongest signal on one request, or None. A user's correction
    comes first: it is the nearest thing to a training row already."""
    for f in feedback:
        if rules.corrections and f.correction:
            return "correction", f"user correction: {f.correction[:200]}"
    for f in feedback:
        if f.score is not None and f.score < rules.low_score:
            return "low_feedback", f"score {f.score:.2f} < {rules.low_score:g}" + (f"; {f.comment}" if f.comment else "")
        if rules.thumbs_down and f.thumbs == "down":
            return "low_feedback", "thumbs down" + (f"; {f.comment}" if f.comment else "")
    if rules.guard and log.json_requested and _not_json(log.response):
        return "guard", "JSON was requested and the answer is not valid JSON"
    if rules.fallbacks and log.fallback_reason:
        return "fallback", log.fallback_reason[:500]
    if rules.sample_rate and _sampled(log.id, rules.sample_rate, rules.seed):
        return "sample", f"random sample (rate {rules.sample_rate:g}, seed {rules.seed})"
    return None


def fill_queue(reg: Registry, rules: QueueRules = QueueRules()) -> Counter:
    """Queue every matching answered request that is not queued yet; returns counts per reason.

    Idempotent: ``review_items.request_id`` is unique and queued requests are skipped, so
    running it again (or while the monitor queues drifted prompts) adds only new ones."""
    for attempt in range(2):
        try:
            return _fill_once(reg, rules)
        except IntegrityError:
            # Another writer queued one of these requests between our read and our insert:
            # read again (its item now exists and is skipped).
            if attempt:
                raise
    raise AssertionError("unreachable")


def _fill_once(reg: Registry, rules: QueueRules) -> Counter:
    added: Counter = Counter()
    with Session(reg.engine) as s, s.begin():
        q = (select(RequestLog).outerjoin(ReviewItem, ReviewItem.request_id == RequestLog.id)
             .where(ReviewItem.id.is_(None), RequestLog.status == 200, RequestLog.response.is_not(None)))
        if rules.since is not None:
            q = q.where(RequestLog.at >= rules.since)
        logs = list(s.scalars(q.order_by(RequestLog.at)))
        feedback: dict[str, list[Feedback]] = {}
        ids = [log.id for log in logs]
        for k in range(0, len(ids), 500):  # bounded IN lists
            for f in s.scalars(select(Feedback).where(Feedback.request_id.in_(ids[k:k + 500])).order_by(Feedback.id)):
                feedback.setdefault(f.request_id, []).append(f)
        for log in logs:
            why = queue_reason(log, feedback.get(log.id, []), rules)
            if why:
                s.add(ReviewItem(request_id=log.id, reason=why[0], detail=why[1]))
                added[why[0]] += 1
    return added


def item_view(item: ReviewItem, log: RequestLog, feedback: list[Feedback]) -> dict:
    """One item as the terminal and the HTTP API show it."""
    return {"id": item.id, "request_id": item.request_id, "reason": item.reason, "detail": item.detail,
            "queued_at": item.queued_at.isoformat(), "model": log.model, "route": log.route,
            "version": log.version, "arm": log.arm,
            "messages": log.messages, "prompt": log.prompt, "response": log.response,
            "feedback": [{"score": f.score, "thumbs": f.thumbs, "correction": f.correction, "comment": f.comment}
                         for f in feedback],
            "decision": item.decision, "corrected": item.corrected, "reviewer": item.reviewer,
            "decided_at": item.decided_at.isoformat() if item.decided_at else None, "used_in": item.used_in}


def answered_by(name: str):
    """SQL condition: the logged request was answered by a registry version of model ``name``
    (bot:v1, bot:v2, ...), whatever route or A/B arm sent it there."""
    return RequestLog.version.startswith(f"{name}:v", autoescape=True)


def list_items(reg: Registry, status: Literal["pending", "decided", "all"] = "pending",
               reasons: list[str] | None = None, limit: int | None = None, model: str | None = None) -> list[dict]:
    """Items oldest first (a reviewer works the queue in order); ``model``: only items a version
    of that registry model answered."""
    with Session(reg.engine) as s:
        q = select(ReviewItem, RequestLog).join(RequestLog, RequestLog.id == ReviewItem.request_id)
        if model:
            q = q.where(answered_by(model))
        if status == "pending":
            q = q.where(ReviewItem.decision.is_(None))
        elif status == "decided":
            q = q.where(ReviewItem.decision.is_not(None))
        if reasons:
            q = q.where(ReviewItem.reason.in_(reasons))
        rows = s.execute(q.order_by(ReviewItem.id).limit(limit)).all()
        fb: dict[str, list[Feedback]] = {}
        for f in s.scalars(select(Feedback).where(Feedback.request_id.in_([r.id for _, r in rows]))
                           .order_by(Feedback.id)):
            fb.setdefault(f.request_id, []).append(f)
        return [item_view(item, log, fb.get(log.id, [])) for item, log in rows]


def decide(reg: Registry, item_id: int, decision: str, reviewer: str, corrected: str | None = None) -> dict:
    """Record one decision; an item is decided once (a second decision is refused, not merged)."""
    if decision not in DECISIONS:
        raise ReviewError(f"decision must be one of {', '.join(DECISIONS)} (got {decision!r})")
    if not reviewer or not reviewer.strip():
        raise ReviewError("a decision needs the reviewer's name")
    corrected = corrected.strip() if corrected else None
    if decision == "correct" and not corrected:
        raise ReviewError("decision 'correct' needs the corrected answer")
    if decision != "correct" and corrected:
        raise ReviewError(f"a corrected answer goes with decision 'correct', not '{decision}'")
    with Session(reg.engine) as s, s.begin():
        # One conditional UPDATE: two reviewers deciding at once cannot both win.
        done = s.execute(update(ReviewItem).where(ReviewItem.id == item_id, ReviewItem.decision.is_(None))
                         .values(decision=decision, corrected=corrected, reviewer=reviewer.strip(),
                                 decided_at=utc_now()))
        if done.rowcount == 0:
            item = s.get(ReviewItem, item_id)
            if item is None:
                raise UnknownItem(f"no review item with id {item_id}")
            raise AlreadyDecided(f"review item {item_id} was already decided ({item.decision} by {item.reviewer} "
                                 f"at {item.decided_at:%Y-%m-%d %H:%M:%S})")
    return get_item(reg, item_id)


def get_item(reg: Registry, item_id: int) -> dict:
    with Session(reg.engine) as s:
        row = s.execute(select(ReviewItem, RequestLog).join(RequestLog, RequestLog.id == ReviewItem.request_id)
                        .where(ReviewItem.id == item_id)).first()
        if row is None:
            raise UnknownItem(f"no review item with id {item_id}")
        fb = list(s.scalars(select(Feedback).where(Feedback.request_id == row[1].id).order_by(Feedback.id)))
        return item_view(row[0], row[1], fb)


# --- the terminal loop (`tuneforge review`) ---------------------------------------------------

# Escaped: rich reads "[a]" as a markup tag and would print "ccept orrect eject".
KEYS = escape("[a]ccept  [c]orrect  [r]eject  [s]kip  [q]uit")


def review_loop(reg: Registry, reviewer: str, reasons: list[str] | None = None, *, console=None,
                stdin: TextIO | None = None, model: str | None = None) -> Counter:
    """Show each pending item and read a key per line from ``stdin``; decisions are saved one
    by one, so quitting (q, end of input, Ctrl-C) loses nothing and the next run resumes with
    the items still pending. Returns counts per action."""
    console = console or Console()
    stdin = stdin or sys.stdin
    done: Counter = Counter()
    items = list_items(reg, "pending", reasons, model=model)
    if not items:
        console.print("review queue: nothing pending" + (f" for {', '.join(reasons)}" if reasons else "")
                      + (f" answered by {model}" if model else ""))
        return done

    def ask(prompt: str) -> str | None:
        console.print(prompt, end="")
        line = stdin.readline()
        return None if line == "" else line.rstrip("\n")

    try:
        for k, item in enumerate(items, 1):
            console.print(Panel(_render(item), title=f"item {item['id']} ({k} of {len(items)}) - {item['reason']}",
                                subtitle=item["detail"][:100]))
            while True:
                key = ask(f"{KEYS} > ")
                if key is None or key.strip().lower() == "q":
                    console.print(f"stopped: {_summary(done)}; {len(items) - k + 1} left pending")
                    return done
                key = key.strip().lower()
                if key == "s":
                    done["skip"] += 1
                    break
                if key not in ("a", "c", "r"):
                    console.print(f"[yellow]unknown key {key!r}[/]")
                    continue
                corrected = None
                if key == "c":
                    suggestion = next((f["correction"] for f in item["feedback"] if f["correction"]), None)
                    hint = " (empty line: take the user's correction)" if suggestion else " (empty line: back)"
                    corrected = _read_answer(ask, console, hint) or suggestion
                    if not corrected:
                        continue
                decision = {"a": "accept", "c": "correct", "r": "reject"}[key]
                try:
                    decide(reg, item["id"], decision, reviewer, corrected)
                except AlreadyDecided as e:
                    console.print(f"[yellow]{e}[/]")
                    done["taken"] += 1
                    break
                done[decision] += 1
                console.print(f"[green]{decision}[/] item {item['id']}")
                break
    except KeyboardInterrupt:
        console.print(f"\ninterrupted: {_summary(done)}; the rest stays pending")
        return done
    console.print(f"queue worked through: {_summary(done)}")
    return done


def _read_answer(ask: Callable[[str], str | None], console, hint: str) -> str:
    """Lines up to an empty one (answers may span lines)."""
    console.print(f"corrected answer, end with an empty line{hint}:")
    lines = []
    while (line := ask("| ")) not in (None, ""):
        lines.append(line)
    return "\n".join(lines).strip()


def _render(item: dict) -> str:
    parts = []
    for m in item["messages"] or [{"role": "user", "content": item["prompt"] or ""}]:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"[bold]{m.get('role')}[/]: {escape(str(content))}")
    parts.append(f"[bold cyan]answer[/] ({escape(item['version'] or '?')}): {escape(item['response'] or '')}")
    for f in item["feedback"]:
        said = ", ".join(f"{k} {v}" for k, v in f.items() if v is not None)
        parts.append(f"[bold magenta]feedback[/]: {escape(said)}")
    return "\n".join(parts)


def _summary(done: Counter) -> str:
    return ", ".join(f"{n} {k}" for k, n in done.items()) or "no decisions"
