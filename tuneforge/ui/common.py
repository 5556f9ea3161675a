"""The dashboard's shared page pieces: templates, the key check, and the runs a key may see.

Every page module (app.py's own routes and each feature module's ``add_routes``) imports
them from here, below app.py, so a feature module never imports app.py (which imports it
to mount its routes): no import circle.
"""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import select

from tuneforge.production.http import ApiError, visible
from tuneforge.registry.tables import JobRow
from tuneforge.ui import runview

HERE = Path(__file__).parent
COOKIE = "tuneforge_key"
ENV = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
ENV.filters["datetime"] = lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def render(name: str, status: int = 200, **ctx) -> HTMLResponse:
    return HTMLResponse(ENV.get_template(name).render(**ctx), status_code=status)


def authenticate(request: Request, admin: bool = False):
    """The request's key: the Authorization header, else the dashboard's cookie."""
    token = request.cookies.get(COOKIE)
    if token and "authorization" not in request.headers:
        scope = dict(request.scope)
        scope["headers"] = [*request.scope["headers"], (b"authorization", f"Bearer {token}".encode())]
        request = Request(scope)
    return request.app.state.gateway.authenticate(request, admin=admin)


def page_key(request: Request):
    """authenticate for HTML pages: a missing key is a redirect to the login page."""
    try:
        return authenticate(request), None
    except ApiError as e:
        if e.status == 401:
            return None, RedirectResponse(f"/ui/login?next={request.url.path}", status_code=303)
        return None, render("error.html", e.status, message=e.message)


def worker_db(request: Request):
    worker = getattr(request.app.state, "jobs_worker", None)
    return worker.db if worker is not None else None


def all_runs(request: Request, runs_dir: Path, key) -> list[runview.RunRow]:
    """Local run folders (an open server or an admin key) and the key's queued/trained jobs."""
    runs = runview.local_runs(runs_dir) if key is None or key.admin else []
    db = worker_db(request)
    if db is not None:
        jobs = db.run(lambda s: list(s.scalars(select(JobRow).order_by(JobRow.seq))))
        runs += [runview.job_run(j) for j in jobs if visible(j, key)]
    return sorted(runs, key=lambda r: r.created, reverse=True)


def find_run(request: Request, runs_dir: Path, key, run_id: str) -> runview.RunRow:
    for r in all_runs(request, runs_dir, key):  # only ids the key may see; never a path from the URL
        if r.id == run_id:
            return r
    raise ApiError(404, f"no run '{run_id}'", "not_found_error")
