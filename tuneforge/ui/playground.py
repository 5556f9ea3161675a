"""The Playground: one prompt sent to several models side by side (the base model, adapters,
aliases), each answer streamed into its own column.

The browser's key is a cookie scoped to /ui, so the page cannot call /v1/chat/completions
itself; it posts to /ui/api/chat, which is that endpoint with the cookie as the key: the same
body model (api.ChatRequest: unknown fields and fields that cannot be honoured are refused by
name), then deploy.chat.complete, the /v1 handler's own body (Gateway.authenticate, the key's
scope, routing, the engine's admission queue, the SSE encoder and the request log). Nothing of
it is copied here.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Request

from tuneforge.deploy.api import ChatRequest
from tuneforge.deploy.chat import complete
from tuneforge.ui.web import keyed, page_key, render


def add_routes(router: APIRouter, runs_dir: Path) -> None:
    @router.get("/playground")
    async def playground_page(request: Request):
        key, refused = page_key(request)
        if refused:
            return refused
        gateway = request.app.state.gateway
        models = await asyncio.to_thread(gateway.model_ids, key)  # what GET /v1/models lists for this key
        base = gateway.cfg.base_name if gateway.cfg.base_name in models else None
        others = [m for m in models if m != base]
        picks = ([base] if base else []) + others[:2 - bool(base)]
        return render("playground.html", key=key, nav="playground", models=models, base=base,
                      picks=picks or models[:1], max_tokens=gateway.cfg.max_tokens)

    @router.post("/api/chat")
    async def playground_chat(request: Request, body: ChatRequest):
        # FastAPI validated ``body`` as on /v1 (a bad or unknown field: the app's 400 naming it);
        # complete() authenticates the cookie's key itself: checked, and counted against the
        # key's rate, once per request, as on /v1.
        return await complete(request.app.state.gateway, keyed(request), body, "chat")
