"""Graceful degradation under load for the local engine: admission control and per-row
cancellation.

Admission: the engine runs batches of up to ``max_batch`` rows, one after another, each until
its longest row ends. A request's wait is estimated from what is queued ahead of it (grouped
into batches as the worker will group them) and the recently measured time of a decode step
at each batch size; work that cannot finish within the budget (the server's ``timeout_s``) is
refused at once (``Overloaded``, answered 503 with ``Retry-After``) instead of waiting in the
queue only to time out, and so are requests past ``max_queue`` waiting ones. Until a batch
has been measured nothing is refused on the estimate (only on the queue's length).

Cancellation: ``RowStop`` is a transformers stopping criterion that ends a batch's row once
its request has ended (eos, its own max_tokens) or has been cancelled (its caller timed out
or its client disconnected); ``generate`` stops when every row has, so a batch whose requests
are gone stops computing for them.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any

import torch


class Overloaded(RuntimeError):
    """The engine cannot take this request now; ``retry_after`` seconds is when it may."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))


class StepFit:
    """Seconds per decode step as a + b * rows, from recent batches (decayed least squares;
    with a single batch size seen, its mean time whatever the size)."""

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.n = self.sx = self.sxx = self.sy = self.sxy = 0.0

    def add(self, rows: int, step_s: float) -> None:
        d = self.decay
        self.n, self.sx, self.sxx = d * self.n + 1, d * self.sx + rows, d * self.sxx + rows * rows
        self.sy, self.sxy = d * self.sy + step_s, d * self.sxy + rows * step_s

    def step_s(self, rows: int) -> float | None:
        if self.n == 0:
            return None
        mx, my = self.sx / self.n, self.sy / self.n
        var = self.sxx / self.n - mx * mx
        if var < 1e-6 * max(1.0, mx * mx):
            return my
        slope = max(0.0, (self.sxy / self.n - mx * my) / var)
        return max(my + slope * (rows - mx), my * 0.1)


class Admission:
    """The engine's queue as admission sees it: waiting requests (their max_tokens, in order)
    and the running batch's expected end. Called from the event loop (check, add, forget) and
    the worker thread (started, observe, finished), hence the lock."""

    def __init__(self, max_batch: int, max_queue: int):
        self.max_batch, self.max_queue = max_batch, max_queue
        self.lock = threading.Lock()
        self.waiting: dict[int, int] = {}  # id(job) -> max_tokens, in arrival order
        self.running_until: float | None = None  # monotonic time the running batch should end
        self.fit = StepFit()  # a decode step's seconds by batch size
        self.prefill_row_s = 0.0  # a batch's prompt pass (and first token) per row, recent average
        self.steps_per_token = 1.0  # a batch's steps / its largest max_tokens (eos ends rows early)
        self.refused = 0
        self.cancelled_rows = 0
        self.rows: deque[tuple[str, int, str]] = deque(maxlen=1000)  # (adapter, tokens, end) per row, recent

    # --- event loop ---------------------------------------------------------------------------
    def check(self, max_tokens: int, budget_s: float) -> None:
        """Raise Overloaded when the queue is full or the request would not finish in ``budget_s``."""
        with self.lock:
            ahead = list(self.waiting.values())
            wait = self._estimate(ahead + [max_tokens])
            if len(ahead) >= self.max_queue:
                self.refused += 1
                raise Overloaded(f"the queue is full ({len(ahead)} requests waiting, engine.max_queue)",
                                 (wait or budget_s) - budget_s)
            if wait is not None and wait > budget_s:
                self.refused += 1
                # No sooner than the running batch's end: nothing queued starts before it.
                running = max(0.0, self.running_until - time.monotonic()) if self.running_until else 0.0
                raise Overloaded(f"the server is overloaded: this request would take ~{wait:.0f}s "
                                 f"({len(ahead)} waiting), over timeout_s={budget_s:g}",
                                 max(wait - budget_s, running))

    def add(self, job: Any) -> None:
        with self.lock:
            self.waiting[id(job)] = job.req.max_tokens

    def forget(self, job: Any) -> None:
        """The job's caller is gone (or done): it no longer waits."""
        with self.lock:
            self.waiting.pop(id(job), None)

    # --- worker thread ------------------------------------------------------------------------
    def started(self, jobs: list[Any]) -> None:
        with self.lock:
            for j in jobs:
                self.waiting.pop(id(j), None)
            t = self._batch_s(len(jobs), max((j.req.max_tokens for j in jobs), default=0))
            self.running_until = None if t is None else time.monotonic() + t

    def observe(self, rows: int, steps: int, prefill_s: float, decode_s: float, max_tokens: int,
                cancelled: int) -> None:
        """A generate call of ``rows`` rows took ``prefill_s`` to its first token, then ``decode_s``
        for its other ``steps`` - 1 steps (kept apart: a short answer's time is mostly its prompt's)."""
        if steps <= 0:
            return
        with self.lock:
            per_row = prefill_s / rows
            self.prefill_row_s = per_row if self.fit.n == 0 else 0.8 * self.prefill_row_s + 0.2 * per_row
            if steps > 1:
                self.fit.add(rows, decode_s / (steps - 1))
            elif self.fit.n == 0:
                self.fit.add(rows, prefill_s)  # only a prompt pass seen yet: a step costs at most that
            self.cancelled_rows += cancelled
            if not cancelled and max_tokens > 0:  # a cancelled row ends a batch early: not its natural length
                self.steps_per_token = 0.8 * self.steps_per_token + 0.2 * min(1.0, steps / max_tokens)

    def finished(self) -> None:
        with self.lock:
            self.running_until = None

    # --- estimate -----------------------------------------------------------------------------
    def _batch_s(self, rows: int, max_tokens: int) -> float | None:
        step = self.fit.step_s(rows)
        return None if step is None else \
            self.prefill_row_s * rows + step * max(0.0, self.steps_per_token * max_tokens - 1)

    def _estimate(self, queue: list[int]) -> float | None:
        """Seconds until the last of ``queue`` (max_tokens of each waiting request) is done."""
        if self.fit.n == 0:
            return None
        total = max(0.0, self.running_until - time.monotonic()) if self.running_until is not None else 0.0
        for i in range(0, len(queue), self.max_batch):
            chunk = queue[i:i + self.max_batch]
            total += self._batch_s(len(chunk), max(chunk))
        return total


class RowStop:
    """Stopping criterion (transformers' StoppingCriteriaList takes any such callable): a row
    is done once its streamer finished it, or its job was cancelled (the row is then finished
    as "cancelled": nothing more is sent to it)."""

    def __init__(self, streamer, jobs: list[Any]):
        self.streamer, self.jobs = streamer, jobs
        self.cut: set[int] = set()  # rows ended by cancellation

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = self.streamer.done
        for i, j in enumerate(self.jobs):
            if j.cancelled and not done[i]:
                done[i] = True
                self.cut.add(i)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
