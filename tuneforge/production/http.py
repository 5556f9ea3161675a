"""What the gateway (tuneforge.deploy) and production's routers (tuneforge.production.api)
share about one HTTP request: the OpenAI-shaped error, the record the request hook
receives, and the checks that a key may touch a model or a tenant's rows.

The key itself is checked by the gateway (tuneforge.deploy.gateway.Gateway.authenticate);
routers receive that check as ``authenticate(request) -> KeyInfo | None`` (None: the server
runs without keys, everything is shared).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse

from tuneforge.registry.store import KeyInfo

Authenticate = Callable[[Request], KeyInfo | None]


class ApiError(Exception):
    """Answered in OpenAI's error shape with ``status`` (the server's exception handler)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.request_id: str | None = None


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   request_id: str | None = None) -> JSONResponse:
    headers = {"X-Request-Id": request_id} if request_id else None
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}},
                        status_code=status, headers=headers)


@dataclass
class RequestRecord:
    """What the request hook receives once per request (request logging plugs in here)."""

    endpoint: str
    model: str  # as requested
    request_id: str = ""  # the response id (chatcmpl-... / cmpl-...); POST /v1/feedback refers to it
    user: str | None = None
    route: str | None = None
    version: str | None = None  # the version that served it, e.g. support-bot:v2
    arm: str | None = None
    key_id: int | None = None
    status: int = 200
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    fallback_reason: str | None = None  # why earlier targets were skipped, if any were
    stream: bool = False
    error: str | None = None
    finish_reason: str | None = None
    json_requested: bool = False  # response_format {"type": "json_object"}
    messages: list | None = None  # chat input as received (the logger redacts before storing)
    prompt: str | None = None  # completion input
    response: str | None = None  # generated text
    extra: dict = field(default_factory=dict)


# --- may this key touch it? ----------------------------------------------------------------
def visible(row, key: KeyInfo | None) -> bool:
    """Files and jobs belong to the API key that made them; without keys everything is shared."""
    return key is None or row.key_id == key.id


def may_call(key: KeyInfo | None, name: str) -> bool:
    """A key calls only the model (or route) names it was created for; ["*"]: every one."""
    return key is None or "*" in key.models or name in key.models


def sees_all_models(key: KeyInfo | None) -> bool:
    """Review data holds every model's prompts: only a key for all models may read it."""
    return key is None or "*" in key.models


def page(rows: list, after: str | None, limit: int, reverse: bool = True,
         key=lambda r: r.id) -> tuple[list, bool]:
    """OpenAI cursor pagination: the ``limit`` rows after the one whose id is ``after``
    (newest first when ``reverse``; the rows come oldest first)."""
    if reverse:
        rows = rows[::-1]
    if after is not None:
        ids = [key(r) for r in rows]
        rows = rows[ids.index(after) + 1:] if after in ids else []
    limit = max(1, min(limit, 10000))
    return rows[:limit], len(rows) > limit
