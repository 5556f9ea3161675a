"""Operations endpoints: /health and /healthz (liveness), /readyz (readiness), /metrics
(Prometheus). No key: balancers and scrapers call them."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from tuneforge.deploy import prometheus as metrics
from tuneforge.deploy.gateway import Gateway


def ops_router(gateway: Gateway) -> APIRouter:
    router = APIRouter()
    engine = gateway.engine

    @router.get("/health")
    @router.get("/healthz")
    async def health():
        """The process is up (liveness)."""
        return {"status": "ok"}

    @router.get("/readyz")
    async def ready():
        """The base model(s) and adapters are loaded (readiness); 503 until then."""
        if not gateway.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready", "resident_adapters": gateway.resident()}

    @router.get("/metrics")
    async def metrics_page():
        if hasattr(engine, "resident"):
            metrics.RESIDENT_ADAPTERS.set(len(engine.resident()))
        if getattr(engine, "prefix", None) is not None:
            metrics.PREFIX_REUSED.set(engine.prefix.reused_tokens)
            metrics.PREFIX_BYTES.set(engine.prefix.bytes)
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return router
