"""``POST /v1/feedback``: a user's verdict on a logged request.

Body: ``{request_id, score | thumbs, scale?, correction?, comment?}``. ``request_id`` is the
``id`` of the chat/completion response. Scores are stored normalised to [0, 1]:

- ``scale: "0-1"`` (default): ``score`` as given, 0 <= score <= 1;
- ``scale: "1-5"`` / ``"1-10"``: ``(score - 1) / (top - 1)``, so 1 -> 0.0 and 5 (or 10) -> 1.0;
- ``thumbs`` alone: up -> 1.0, down -> 0.0 (with a score too, the score wins and thumbs is kept).

An explicit scale avoids guessing whether "1" means the worst of five or the best of [0, 1].
A key may rate only the requests it made, unless it is an admin key (its admin flag, or
listed in ``logging.admin_keys``). With no keys in force (auth optional, none created), anyone
may rate any request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy.orm import Session

from tuneforge.production.http import ApiError, Authenticate, read_json
from tuneforge.production.request_log import is_locked, with_lock_retries
from tuneforge.registry.store import KeyInfo, Registry
from tuneforge.registry.tables import Feedback, RequestLog

SCALES = {"0-1": (0.0, 1.0), "1-5": (1.0, 5.0), "1-10": (1.0, 10.0)}


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    request_id: str = Field(min_length=1, max_length=64)
    score: float | None = None
    scale: Literal["0-1", "1-5", "1-10"] = "0-1"
    thumbs: Literal["up", "down"] | None = None
    correction: str | None = Field(None, max_length=100_000, description="the answer the user wanted")
    comment: str | None = Field(None, max_length=10_000)

    @model_validator(mode="after")
    def _rating(self):
        if self.score is None and self.thumbs is None:
            raise ValueError("give 'score' or 'thumbs' ('up' | 'down')")
        if self.score is not None:
            lo, hi = SCALES[self.scale]
            if not lo <= self.score <= hi:
                raise ValueError(f"score {self.score:g} is outside the scale {self.scale} "
                                 f"(set 'scale' to '1-5' or '1-10' for star ratings)")
        return self

    def normalised(self) -> float:
        if self.score is None:
            return 1.0 if self.thumbs == "up" else 0.0
        lo, hi = SCALES[self.scale]
        return (self.score - lo) / (hi - lo)


def feedback_router(registry: Registry, authenticate: Authenticate, admin_keys: list[str] = (),
                    flush: Callable[[], bool] | None = None) -> APIRouter:
    """``authenticate`` is the gateway's key check, so feedback uses the same keys as the
    completions. ``flush``: the request logger's, so feedback sent right after a response
    finds its row."""
    router = APIRouter()

    def store(body: FeedbackBody, key: KeyInfo | None) -> dict:
        def find():
            with Session(registry.engine) as s:
                return s.get(RequestLog, body.request_id)

        logged = find()
        if logged is None and flush is not None and flush():
            logged = find()
        if logged is None:
            raise ApiError(404, f"no logged request with id '{body.request_id}' (the 'id' of a "
                                "chat.completion response; logging may be off or the row past retention)",
                           "not_found_error")
        # KeyInfo.admin is the key's own flag (keys create --admin, where the registry has it).
        admin = key is None or getattr(key, "admin", False) or str(key.id) in admin_keys or key.name in admin_keys
        if not admin and logged.key_id != key.id:
            raise ApiError(403, f"key {key.name} may only send feedback on its own requests", "permission_error")

        def tx():
            with Session(registry.engine) as s, s.begin():
                row = Feedback(request_id=body.request_id, score=body.normalised(), thumbs=body.thumbs,
                               correction=body.correction, comment=body.comment, key_id=key.id if key else None)
                s.add(row)
                s.flush()
                return row.id

        try:
            fid = with_lock_retries(tx, retries=5)
        except Exception as e:
            if is_locked(e):
                raise ApiError(503, "the database is busy; nothing was stored, send the feedback again",
                               "server_error") from None
            raise
        return {"id": f"fb-{fid}", "object": "feedback", "request_id": body.request_id,
                "score": body.normalised(), "thumbs": body.thumbs}

    @router.post("/v1/feedback")
    async def post_feedback(request: Request):
        key = authenticate(request)
        raw = await read_json(request)  # 400 when not JSON or nested too deep
        try:
            body = FeedbackBody.model_validate(raw)
        except ValidationError as e:
            raise ApiError(400, "; ".join(_problem(err) for err in e.errors())) from None
        return await run_in_threadpool(store, body, key)

    return router


def _problem(err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg
