"""What the gateway (tuneforge.deploy) and production's routers (tuneforge.production.api)
share about one HTTP request: the OpenAI-shaped error, the record the request hook
receives, and the checks that a key may touch a model or a tenant's rows.

The key itself is checked by the gateway (tuneforge.deploy.gateway.Gateway.authenticate);
routers receive that check as ``authenticate(request) -> KeyInfo | None`` (None: the server
runs without keys, everything is shared).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from weakref import WeakKeyDictionary

from fastapi import Request
from fastapi.responses import JSONResponse

from tuneforge.registry.store import KeyInfo

Authenticate = Callable[[Request], KeyInfo | None]


RETRY_AFTER_S = 60  # every rate window (per key, failed authentication) is one minute long
MAX_JSON_DEPTH = 64  # a chat row nests ~5 levels; 100k nested arrays overflow Python's parser


class ApiError(Exception):
    """Answered in OpenAI's error shape with ``status`` (the server's exception handler)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.request_id: str | None = None


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   request_id: str | None = None, retry_after: int = RETRY_AFTER_S) -> JSONResponse:
    """Every 429 says when to come back (``Retry-After``): the rate windows are one minute
    long, so 60 seconds always suffices."""
    headers = {"X-Request-Id": request_id} if request_id else {}
    if status == 429:
        headers["Retry-After"] = str(retry_after)
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


def may_review(key: KeyInfo | None) -> bool:
    """Review items hold every tenant's prompts, answers and feedback, and a decision becomes
    training data: only admin keys (`keys create --admin`, every item) and reviewer keys
    (`keys create --reviewer`, the items of the models they may call) may read or decide
    them. A key for all models ("*", the default of `keys create`) is a tenant's key."""
    return key is None or key.admin or key.reviewer


def reviews(key: KeyInfo | None, name: str) -> bool:
    """Whether ``key`` may review the items of requests to ``name`` (a model or route name)."""
    return key is None or key.admin or (key.reviewer and may_call(key, name))


# --- untrusted input -----------------------------------------------------------------------
_DECIMAL = re.compile(r"[0-9]{1,18}")  # longer: not an id or count (and int() refuses > 4300 digits)
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKET = re.compile(r"[\[\]{}]")


def whole_number(text: str) -> int | None:
    """``text`` as a non-negative int if it is 1-18 ASCII digits, else None. Not
    ``str.isdigit()``: it is true for '²' and '٣', which ``int()`` then refuses or reads."""
    return int(text) if _DECIMAL.fullmatch(text) else None


def too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON ``text`` nests arrays/objects deeper than ``limit`` (checked without
    parsing it: Python's parser recurses, and 100k nested arrays end in RecursionError)."""
    depth = 0
    for m in _BRACKET.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        if depth > limit:
            return True
    return False


async def read_json(request: Request):
    """The request body as JSON; 400 (never a 500) when it is not JSON or nests too deep."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 JSON") from None
    if too_deep(text):
        raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not JSON") from None


# --- failed authentication -------------------------------------------------------------------
class AuthThrottle:
    """Failed authentications per client address in a sliding window: past ``limit`` of them
    within ``window_s`` the address gets 429 (with Retry-After) for any key, right or wrong,
    until the oldest failure leaves the window; so keys cannot be guessed at line speed.
    In memory, per server process."""

    def __init__(self, limit: int = 20, window_s: float = 60.0, clock=time.monotonic):
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self.failures: dict[str, deque] = {}
        self.lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque:
        q = self.failures.get(client, deque())
        while q and now - q[0] >= self.window_s:
            q.popleft()
        if not q:
            self.failures.pop(client, None)
        return q

    def check(self, client: str) -> None:
        """429 while ``client`` is over its failures."""
        with self.lock:
            now = self.clock()
            q = self._recent(client, now)
            if len(q) >= self.limit:
                raise ApiError(429, f"too many failed authentications from {client} ({len(q)} within "
                                    f"{self.window_s:g}s); retry in a minute", "rate_limit_error")

    def failed(self, client: str) -> None:
        with self.lock:
            now = self.clock()
            q = self._recent(client, now)
            q.append(now)
            self.failures[client] = q
            if len(self.failures) > 100_000:  # a flood from many addresses must not grow memory without end
                self.failures.pop(next(iter(self.failures)))


_THROTTLES: WeakKeyDictionary = WeakKeyDictionary()
_LOCK = threading.Lock()


def auth_throttle(owner) -> AuthThrottle:
    """The failed-authentication throttle of ``owner`` (the gateway): one per server."""
    with _LOCK:
        return _THROTTLES.setdefault(owner, AuthThrottle())


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


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
