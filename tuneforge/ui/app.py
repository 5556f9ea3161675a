"""The dashboard's routes, mounted on the server's FastAPI app under /ui.

create_ui_app builds the server app (deploy.server.create_app: gateway, keys, the
fine-tuning job worker) and adds ui_router, so `tuneforge ui` and `tuneforge serve --ui`
serve the same pages beside the API. Auth is the server's own: the API key given once at
/ui/login is kept in an HttpOnly cookie and checked by Gateway.authenticate on every page
and call. Runs started from the New run form are queued on the job worker
(production.api.jobs.queue_run_config), the one that trains /v1/fine_tuning/jobs.
The helpers every page module shares (render, authenticate, page_key, find_run, ...) are in
web.py, so page modules mounted here (playground.py) need not import this module back.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import ValidationError

from tuneforge.config import ConfigError
from tuneforge.deploy.server import create_app
from tuneforge.production.api.jobs import cancel_job, queue_run_config, requeue_job
from tuneforge.production.api.review import in_scope, scoped_item
from tuneforge.production.http import ApiError, may_review, read_json
from tuneforge.production.loop.review_queue import QueueRules, ReviewError, decide, fill_queue, list_items
from tuneforge.ui import compare, newrun, playground, reports, runview
from tuneforge.ui import models as models_page
from tuneforge.ui.charts import line_chart
from tuneforge.ui.web import COOKIE, HERE, all_runs, authenticate, find_run, page_key, render, worker_db

STATIC = {"ui.css": "text/css", "ui.js": "text/javascript", "playground.js": "text/javascript"}


def create_ui_app(cfg, registry, engine, on_request=None, runs_dir: str | Path = "runs") -> FastAPI:
    """The server app (create_app's arguments, so deploy.server.serve can take it as its
    app_factory) with the dashboard at /ui, listing the run folders under ``runs_dir``."""
    app = create_app(cfg, registry, engine, on_request)
    app.include_router(ui_router(Path(runs_dir)))
    return app


def ui_router(runs_dir: Path) -> APIRouter:
    router = APIRouter(prefix="/ui")
    _session_routes(router)
    _run_routes(router, runs_dir)
    _new_run_routes(router)
    _review_routes(router)
    models_page.add_routes(router, runs_dir)
    compare.add_routes(router, runs_dir)
    playground.add_routes(router, runs_dir)
    reports.add_routes(router, runs_dir)
    return router


def _session_routes(router: APIRouter) -> None:
    @router.get("", include_in_schema=False)
    async def home():
        return RedirectResponse("/ui/runs", status_code=303)

    @router.get("/static/{name}")
    async def static(name: str):
        if name not in STATIC:
            raise ApiError(404, f"no static file '{name}'", "not_found_error")
        return Response((HERE / "static" / name).read_bytes(), media_type=STATIC[name],
                        headers={"Cache-Control": "no-cache"})

    @router.get("/login")
    async def login_page(next: str = "/ui/runs", error: str = ""):
        return render("login.html", next=next if next.startswith("/ui") else "/ui/runs", error=error)

    @router.post("/login")
    async def login(request: Request):
        form = await request.form()
        token, nxt = str(form.get("key", "")).strip(), str(form.get("next", "/ui/runs"))
        nxt = nxt if nxt.startswith("/ui") else "/ui/runs"
        scope = dict(request.scope)
        scope["headers"] = [(b"authorization", f"Bearer {token}".encode())]
        try:
            request.app.state.gateway.authenticate(Request(scope))
        except ApiError as e:
            return render("login.html", 401, next=nxt, error=e.message)
        response = RedirectResponse(nxt, status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/ui")
        return response

    @router.post("/logout")
    async def logout():
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(COOKIE, path="/ui")
        return response


def _run_routes(router: APIRouter, runs_dir: Path) -> None:
    @router.get("/runs")
    async def runs_page(request: Request):
        key, refused = page_key(request)
        if refused:
            return refused
        runs = await asyncio.to_thread(all_runs, request, runs_dir, key)
        return render("runs.html", runs=runs, runs_dir=runs_dir, key=key, nav="runs")

    @router.get("/runs/{run_id}")
    async def run_page(request: Request, run_id: str):
        key, refused = page_key(request)
        if refused:
            return refused
        try:
            run = find_run(request, runs_dir, key, run_id)
        except ApiError as e:
            return render("error.html", e.status, message=e.message)
        return render("run.html", run=run, key=key, nav="runs", config_yaml=newrun.equivalents(run.config)["yaml"],
                      **live_context(run))

    @router.get("/runs/{run_id}/live")
    async def run_live(request: Request, run_id: str):
        run = find_run(request, runs_dir, authenticate(request), run_id)
        return render("run_live.html", run=run, **live_context(run))

    @router.post("/runs/{run_id}/{action}")
    async def stop_or_resume(request: Request, run_id: str, action: str):
        key = authenticate(request)
        db = worker_db(request)
        if action not in ("stop", "resume"):
            raise ApiError(404, f"no action '{action}' (stop, resume)", "not_found_error")
        if db is None or not run_id.startswith("ftjob-"):
            raise ApiError(400, f"only runs the job queue trains can {action} here (a local run: Ctrl-C "
                                "in its terminal; resume with `tuneforge train --resume RUN`)")
        change = cancel_job if action == "stop" else requeue_job
        job = db.run_or_503(lambda s: change(s, run_id, key))
        request.app.state.jobs_worker.wake.set()
        return {"id": job.id, "status": job.status}


def live_context(run: runview.RunRow) -> dict:
    return {"chart": line_chart(runview.curves(run.run_dir), "loss"), "progress": runview.progress(run),
            "throughput": line_chart(runview.throughput(run.run_dir), "throughput (tokens/s)", width=480),
            "figures": runview.figures(run.run_dir), "log": runview.log_tail(run),
            "auto": runview.auto_decisions(run.run_dir),
            "metrics": [r for r in runview.metrics_rows(run.run_dir / "metrics.jsonl")
                        if r.get("kind") in ("train", "eval")][-15:],
            "active": run.status in ("queued", "running"), "now": time.time()}


def _new_run_routes(router: APIRouter) -> None:
    @router.get("/new")
    async def new_page(request: Request):
        key, refused = page_key(request)
        if refused:
            return refused
        return render("new.html", fields=newrun.FIELDS, auto_fields=newrun.AUTO_FIELDS, choices=newrun.suggestions(),
                      key=key, nav="new", jobs=worker_db(request) is not None)

    @router.post("/api/validate")
    async def validate(request: Request):
        authenticate(request)
        form = await request.json()
        checked = newrun.check(form if isinstance(form, dict) else {})
        out = {"ok": checked.ok, "problems": checked.problems, **newrun.equivalents(checked.raw), "plan": None}
        if checked.ok and form.get("plan", True):
            try:
                out["plan"] = await asyncio.to_thread(newrun.plan_summary, checked.config)
            except Exception as e:  # noqa: BLE001 - a model that cannot be read: the plan says why, the form stays
                out["plan_error"] = f"{type(e).__name__}: {e}"
        return out

    @router.post("/api/runs")
    async def start(request: Request):
        key = authenticate(request)
        db = worker_db(request)
        if db is None:
            raise ApiError(503, "this server runs no job worker (serve.yaml jobs.enabled: false)", "server_error")
        checked = newrun.check(await request.json())
        if not checked.ok:
            return JSONResponse({"ok": False, "problems": checked.problems}, status_code=400)
        label = str(checked.raw.get("run_name") or "run")
        try:
            job = await asyncio.to_thread(queue_run_config, db, checked.raw, key, request.app.state.jobs_worker.cfg, label)
        except ConfigError as e:
            return JSONResponse({"ok": False, "problems": [{"field": newrun.field_of(p), "message": p}
                                                           for p in e.problems]}, status_code=400)
        request.app.state.jobs_worker.wake.set()
        return {"ok": True, "id": job.id, "url": f"/ui/runs/{job.id}"}


# --- review queue: the same functions and access rule as /v1/review (production/api/review.py) ---

def reviewer_key(request: Request):
    """The key, if it may use the review queue: admin (every item) or --reviewer (its models'
    items); a tenant's key is refused with the review API's own 403 message."""
    key = authenticate(request)
    if not may_review(key):
        raise ApiError(403, f"key {key.name} may not use the review queue: it needs an admin or reviewer "
                            "key (tuneforge keys create --admin | --reviewer)", "permission_error")
    return key


def review_items(request: Request, key, status: str) -> list[dict]:
    items = list_items(request.app.state.registry, status)
    return [i for i in items if in_scope(key, i)]  # scope filtered before any cut, as the API does


def _review_routes(router: APIRouter) -> None:
    @router.get("/review")
    async def review_page(request: Request, status: str = "pending", item: str = "", reason: str = ""):
        _, refused = page_key(request)
        if refused:
            return refused
        try:
            key = reviewer_key(request)
        except ApiError as e:
            return render("error.html", e.status, message=e.message)
        status = status if status in ("pending", "decided", "all") else "pending"
        scoped = await asyncio.to_thread(review_items, request, key, status)
        reasons = Counter(i["reason"] for i in scoped)  # the filter links show every reason's count
        items = [i for i in scoped if not reason or i["reason"] == reason][:500]
        current = next((i for i in items if str(i["id"]) == item), items[0] if items else None)
        index = items.index(current) if current else -1
        here = f"/ui/review?status={status}" + (f"&reason={quote(reason)}" if reason else "")
        return render("review.html", key=key, nav="review", items=items, item=current, shown=status,
                      reason=reason, reasons=sorted(reasons.items()), here=here,
                      prev=items[index - 1]["id"] if index > 0 else None,
                      next=items[index + 1]["id"] if 0 <= index < len(items) - 1 else None)

    @router.post("/review/fill")
    async def review_fill(request: Request):
        # Filling reads every tenant's logged requests: an operator's action, as `tuneforge review` is.
        authenticate(request, admin=True)
        body = await read_json(request)
        try:
            rules = QueueRules.model_validate(body if isinstance(body, dict) else {})
        except ValidationError as e:
            raise ApiError(400, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None
        added = await asyncio.to_thread(fill_queue, request.app.state.registry, rules)
        return {"added": dict(added)}

    @router.post("/review/{item_id}")
    async def review_decide(request: Request, item_id: int):
        key = reviewer_key(request)
        body = await read_json(request)  # not JSON / nested too deep: the API's 400
        body = body if isinstance(body, dict) else {}
        reg = request.app.state.registry
        try:
            scoped_item(reg, key, item_id)  # 404 for an item that is not this reviewer's (no existence leak)
            # The reviewer's name is the key's: a browser cannot claim to be someone else.
            return decide(reg, item_id, str(body.get("decision", "")), key.name if key else "ui",
                          body.get("corrected") or None)
        except ReviewError as e:
            raise ApiError(e.status, str(e), {404: "not_found_error", 409: "conflict_error"}
                           .get(e.status, "invalid_request_error")) from None
