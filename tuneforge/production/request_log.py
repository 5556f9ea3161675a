"""Request logging: the server's ``on_request`` hook -> a bounded queue -> one background
thread that writes batches to the registry database.

A request never waits for the database and never fails because of it: the hook only
enqueues (``put_nowait``); redaction and the write happen on the writer thread. What
cannot be stored is counted by reason, never hidden: ``overflow`` (the queue was full),
``locked`` (the database stayed locked through every retry), ``error`` (any other failure). The counts are in ``stats()`` and in
the Prometheus counter ``tuneforge_request_log_dropped_total{reason}``.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import Counter
from datetime import timedelta

from prometheus_client import Counter as PromCounter
from sqlalchemy import delete, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from tuneforge.data.pii import redact
from tuneforge.production.config import LoggingConfig
from tuneforge.production.http import RequestRecord
from tuneforge.registry.tables import ApiKey, Feedback, RequestLog, ReviewItem, utc_now

log = logging.getLogger("tuneforge.requests")

# Module level: the default registry rejects a second metric of the same name.
LOGGED = PromCounter("tuneforge_request_log_written", "requests written to the request log")
DROPPED = PromCounter("tuneforge_request_log_dropped", "requests the log could not store", ["reason"])


def is_locked(e: Exception) -> bool:
    return isinstance(e, OperationalError) and "locked" in str(e).lower()


def with_lock_retries(fn, retries: int, base_delay_s: float = 0.05):
    """Run a DB transaction ``fn()``; on 'database is locked' retry with jittered backoff
    (capped at ~1 s a wait: another writer's transaction is short, a stuck one is an outage)."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except OperationalError as e:
            if not is_locked(e) or attempt == retries:
                raise
            time.sleep(min(1.0, base_delay_s * 2 ** attempt) * (0.5 + random.random()))


def _key_matches(key_id: int | None, key_name: str | None, names: list[str]) -> bool:
    return key_id is not None and (str(key_id) in names or (key_name is not None and key_name in names))


class RequestLogger:
    """Call it with a RequestRecord (it is the server's ``on_request`` hook)."""

    PURGE_EVERY_S = 3600.0

    def __init__(self, db_engine, cfg: LoggingConfig):
        self.db, self.cfg = db_engine, cfg
        self._key_names: dict[int, str | None] = {}  # opt-out lists may name keys; looked up once each
        self.queue: queue.Queue = queue.Queue(maxsize=cfg.queue_size)
        self.dropped: Counter = Counter()
        self.written = 0
        self.purged = 0
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._pending = 0  # records enqueued and not yet committed or dropped
        self._last_purge = float("-inf")  # purge once at start, then hourly
        self._thread = threading.Thread(target=self._run, name="tuneforge-request-log", daemon=True)
        self._thread.start()

    # --- the request path: enqueue, nothing else --------------------------------------------------
    def __call__(self, record: RequestRecord) -> None:
        with self._idle:
            self._pending += 1  # counted before the put, so flush() never misses a record in flight
        try:
            self.queue.put_nowait((record, utc_now()))  # stamped now: the writer may run later
        except queue.Full:
            self._done(1)
            self._drop("overflow", 1)

    # --- the writer thread -----------------------------------------------------------------------
    def to_row(self, r: RequestRecord, at) -> dict:
        """The stored form of a record: text redacted, or left out for opted-out keys."""
        keep_text = self.cfg.store_text and not _key_matches(r.key_id, self._key_name(r.key_id),
                                                              self.cfg.opt_out_keys)
        redactions = 0

        def clean(text):
            nonlocal redactions
            if not isinstance(text, str) or not self.cfg.redact_pii:
                return text
            new, counts = redact(text)
            redactions += sum(counts.values())
            return new

        messages = prompt = response = None
        if keep_text:
            if isinstance(r.messages, list):
                messages = [{**m, "content": _map_content(m.get("content"), clean)} if isinstance(m, dict) else m
                            for m in r.messages]
            prompt, response = clean(r.prompt), clean(r.response)
        return dict(id=r.request_id, at=at, endpoint=r.endpoint, model=r.model[:200], route=r.route,
                    version=r.version, arm=r.arm, key_id=r.key_id, user=(r.user or None) and r.user[:200],
                    status=r.status, latency_s=r.latency_s, prompt_tokens=r.prompt_tokens,
                    completion_tokens=r.completion_tokens, finish_reason=r.finish_reason,
                    fallback_reason=r.fallback_reason, error=r.error, json_requested=r.json_requested,
                    messages=messages, prompt=prompt, response=response, redactions=redactions)

    def _key_name(self, key_id: int | None) -> str | None:
        if key_id is not None and key_id not in self._key_names:
            with Session(self.db) as s:
                self._key_names[key_id] = s.scalar(select(ApiKey.name).where(ApiKey.id == key_id))
        return self._key_names.get(key_id)

    def _run(self) -> None:
        while True:
            if self.cfg.retention_days and time.monotonic() - self._last_purge > self.PURGE_EVERY_S:
                self._last_purge = time.monotonic()
                try:
                    self.purged += purge(self.db, self.cfg.retention_days, self.cfg.lock_retries)
                except Exception:  # noqa: BLE001 - retention is retried next hour; logging goes on
                    log.exception("request log retention purge failed")
            batch = self._take(timeout=0.2)
            if batch:
                self._write(batch)
            elif self._stop.is_set():
                return  # stopped and drained

    def _take(self, timeout: float) -> list:
        try:
            first = self.queue.get(timeout=timeout)
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < self.cfg.batch_size:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _write(self, records: list) -> None:
        batch = []
        for r, at in records:
            try:
                batch.append(self.to_row(r, at))
            except Exception:  # noqa: BLE001 - one malformed record must not cost the batch
                log.exception("request %s could not be turned into a log row", getattr(r, "request_id", "?"))
                self._drop("error", 1)
        dropped = len(records) - len(batch)

        def tx():
            with Session(self.db) as s, s.begin():
                s.add_all(RequestLog(**row) for row in batch)

        try:
            with_lock_retries(tx, self.cfg.lock_retries)
            self.written += len(batch)
            LOGGED.inc(len(batch))
        except Exception as e:  # noqa: BLE001 - counted and reported; the server keeps serving
            reason = "locked" if is_locked(e) else "error"
            log.error("request log: dropped %d record(s) (%s): %s", len(batch), reason, str(e).splitlines()[0])
            self._drop(reason, len(batch))
        finally:
            self._done(len(batch) + dropped)

    def _done(self, n: int) -> None:
        with self._idle:
            self._pending -= n
            self._idle.notify_all()

    def _drop(self, reason: str, n: int) -> None:
        if not self.dropped[reason]:
            log.warning("request log: first drop (%s); see stats() or tuneforge_request_log_dropped_total", reason)
        self.dropped[reason] += n
        DROPPED.labels(reason).inc(n)

    # --- control -------------------------------------------------------------------------------------
    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything enqueued so far is committed or dropped; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Stop after writing what is queued (server shutdown)."""
        self._stop.set()
        self._thread.join(timeout)

    def stats(self) -> dict:
        return {"written": self.written, "queued": self.queue.qsize(), "dropped": dict(self.dropped),
                "purged": self.purged}


def _map_content(content, fn):
    """OpenAI message content is a string or a list of parts ({type: text, text})."""
    if isinstance(content, list):
        return [{**p, "text": fn(p["text"])} if isinstance(p, dict) and isinstance(p.get("text"), str) else p
                for p in content]
    return fn(content)


def purge(db_engine, retention_days: float, lock_retries: int = 5) -> int:
    """Delete logged requests older than the retention limit, with their feedback and any
    review item still waiting for a decision. Requests a reviewer decided on are kept: they
    are training data now, and `tuneforge improve` traces versions back to them."""
    cutoff = utc_now() - timedelta(days=retention_days)

    def tx() -> int:
        with Session(db_engine) as s, s.begin():
            decided = select(ReviewItem.request_id).where(ReviewItem.decision.is_not(None))
            expired = (RequestLog.at < cutoff, RequestLog.id.not_in(decided))
            old = select(RequestLog.id).where(*expired)
            s.execute(delete(Feedback).where(Feedback.request_id.in_(old)))
            s.execute(delete(ReviewItem).where(ReviewItem.request_id.in_(old)))
            return s.execute(delete(RequestLog).where(*expired)).rowcount

    return with_lock_retries(tx, lock_retries)
