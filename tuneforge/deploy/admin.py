"""Admin endpoints (an admin key: `tuneforge keys create --name ops --admin`): load and unload
adapters and move aliases while the server runs, without failing in-flight requests.

The engine does the safe part: the local engine changes its adapters only between batches
(see LocalEngine.unload), so a request being generated finishes on the weights it started with.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from tuneforge.deploy.api import AdapterRef, AliasChange
from tuneforge.deploy.gateway import Gateway, gen_request
from tuneforge.production.http import ApiError
from tuneforge.registry.store import PromotionRefused, RegistryError, parse_ref


def admin_router(gateway: Gateway) -> APIRouter:
    registry, engine = gateway.registry, gateway.engine

    def admin_only(request: Request) -> None:
        gateway.authenticate_admin(request)

    # As a router dependency the key is checked before the body is parsed: without an admin
    # key every /admin request is a 401/403, whatever it sends.
    router = APIRouter(prefix="/admin", dependencies=[Depends(admin_only)])

    def resolve(ref: str):
        try:
            return registry.resolve(ref)
        except RegistryError as e:
            raise ApiError(404, str(e), "not_found_error") from None

    def needs(method: str) -> None:
        if not hasattr(engine, method):
            raise ApiError(400, f"the {type(engine).__name__} cannot {method} adapters at run time")

    @router.get("/adapters")
    async def resident():
        """Adapters loaded in the engine, least recently used first, and how each is served
        ("gathered": plain LoRA batched by multilora.py; "peft": any other adapter type)."""
        needs("resident")
        return {"resident": engine.resident(), "paths": engine.paths()}

    @router.post("/adapters/load")
    async def load(body: AdapterRef):
        """Load a version's adapter now (the next requests for it need no loading)."""
        needs("load")
        v = resolve(body.model)
        try:
            await engine.load(gen_request(v, {}))
        except Exception as e:  # noqa: BLE001 - a broken adapter folder is the caller's to fix
            raise ApiError(400, f"could not load {v.ref}: {type(e).__name__}: {e}") from None
        return {"loaded": v.ref, "resident": engine.resident()}

    @router.post("/adapters/unload")
    async def unload(body: AdapterRef):
        """Unload a version's adapter once no running batch uses it (a later request reloads it)."""
        needs("unload")
        v = resolve(body.model)
        return {"unloaded": v.ref if await engine.unload(v.ref) else None, "resident": engine.resident()}

    @router.post("/aliases")
    async def set_alias(body: AliasChange):
        """Point NAME@ALIAS at a version (the promotion gate applies unless force); the next
        request for the alias follows it."""
        try:
            _, alias, number = parse_ref(body.version)
        except RegistryError as e:
            raise ApiError(400, str(e)) from None
        if alias is not None or number is None:
            raise ApiError(400, f"'version' is a version reference name:vN, not '{body.version}'")
        try:
            message = registry.promote(body.version, body.alias, force=body.force)
        except PromotionRefused as e:
            raise ApiError(409, str(e), "conflict_error") from None
        except RegistryError as e:
            raise ApiError(404, str(e), "not_found_error") from None
        return {"result": message}

    return router
