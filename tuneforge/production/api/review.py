"""/v1/review: the human review queue over HTTP (the web UI works it here; `tuneforge review`
in the terminal). The queue itself is tuneforge/production/loop/review_queue.py."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from tuneforge.config import Strict
from tuneforge.production.http import ApiError, Authenticate, may_review, read_json, reviews, whole_number
from tuneforge.production.loop.review_queue import ReviewError, UnknownItem, decide, get_item, list_items
from tuneforge.registry.store import KeyInfo, Registry, RegistryError, parse_ref


class DecisionBody(Strict):
    decision: str
    corrected: str | None = None
    reviewer: str


def _error(status: int, message: str, type_: str = "invalid_request_error") -> JSONResponse:
    # The OpenAI error shape, as the rest of the server answers.
    return JSONResponse({"error": {"message": message, "type": type_, "code": status}}, status_code=status)


def _item_id(text: str) -> int:
    if (number := whole_number(text)) is None:
        raise UnknownItem(f"no review item with id {text!r} (ids are whole numbers)")
    return number


def in_scope(key: KeyInfo | None, item: dict) -> bool:
    """(Public: the dashboard's review page, tuneforge/ui/app.py, checks with it too.) The name the request's key was checked against (its route, else the registry name)."""
    try:
        name = item["route"] or parse_ref(item["model"])[0]
    except RegistryError:
        name = item["model"]
    return reviews(key, name)


def scoped_item(reg: Registry, key: KeyInfo | None, item_id: int) -> dict:
    """The item, or UnknownItem when it is not the key's to review (not 403: no existence leak)."""
    item = get_item(reg, item_id)
    if not in_scope(key, item):
        raise UnknownItem(f"no review item with id {item_id}")
    return item


def review_router(reg: Registry, authenticate: Authenticate) -> APIRouter:
    """``authenticate(request)`` is the server's key check (raises its API error, returns the
    key or None while the server runs without keys). Review items hold every tenant's prompts,
    answers and feedback, and a decision becomes training data: when keys exist only an admin
    key (every item) or a reviewer key (the items of the models it may call) may read or
    decide them (http.may_review, http.reviews)."""
    router = APIRouter(prefix="/v1/review")

    def reviewer(request: Request) -> tuple[KeyInfo | None, JSONResponse | None]:
        key = authenticate(request)
        if not may_review(key):
            return key, _error(403, f"key {key.name} may not use the review queue: it needs an admin or reviewer "
                                    "key (tuneforge keys create --admin | --reviewer)", "permission_error")
        return key, None

    # Parameters are read as text and checked here: FastAPI's own 422 answer is not the
    # OpenAI error shape clients expect.
    @router.get("/items")
    async def items(request: Request, status: str = "pending", reason: str | None = None, limit: str = "100"):
        key, denied = reviewer(request)
        if denied is not None:
            return denied
        if status not in ("pending", "decided", "all"):
            return _error(400, f"status must be pending, decided or all (got {status!r})")
        n = whole_number(limit)
        if n is None or not 0 < n <= 1000:
            return _error(400, f"limit must be a whole number in 1..1000 (got {limit!r})")
        reasons = reason.split(",") if reason else None
        if key is None or key.admin:
            data = list_items(reg, status, reasons, n)
        else:  # a reviewer: the items of its models, filtered before the limit
            data = [i for i in list_items(reg, status, reasons) if in_scope(key, i)][:n]
        return {"object": "list", "data": data}

    @router.get("/items/{item_id}")
    async def one(request: Request, item_id: str):
        key, denied = reviewer(request)
        if denied is not None:
            return denied
        try:
            return scoped_item(reg, key, _item_id(item_id))
        except ReviewError as e:
            return _error(e.status, str(e), "not_found_error")

    @router.post("/items/{item_id}")
    async def decide_item(request: Request, item_id: str):
        key, denied = reviewer(request)
        if denied is not None:
            return denied
        try:
            item = _item_id(item_id)
        except ReviewError as e:
            return _error(e.status, str(e), "not_found_error")
        try:
            body = DecisionBody.model_validate(await read_json(request))
        except ApiError as e:  # not JSON, or nested too deep
            return _error(400, f"expected {{decision, corrected?, reviewer}}: {e.message}")
        except ValidationError as e:
            detail = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
            return _error(400, f"expected {{decision, corrected?, reviewer}}: {detail}")
        try:
            scoped_item(reg, key, item)  # 404 for an item that is not this reviewer's
            return decide(reg, item, body.decision, body.reviewer, body.corrected)
        except ReviewError as e:
            type_ = {404: "not_found_error", 409: "conflict_error"}.get(e.status, "invalid_request_error")
            return _error(e.status, str(e), type_)

    return router
