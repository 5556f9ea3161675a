"""Fuzz the production endpoints (/v1/files, /v1/fine_tuning/jobs, /v1/feedback, /v1/review)
from their request models (schemathesis over the app's OpenAPI schema, with the bodies these
routers read themselves filled in from their pydantic models), as two tenants' keys: no
answer is a 5xx, and no answer to one tenant shows the other's files, jobs, feedback or
review items. Path ids and request ids are drawn from both tenants' real ids as well as at
random, so the fuzz asks for the other tenant's rows on purpose."""

import json

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from sqlalchemy.orm import Session
from test_jobs import chat_rows, jsonl, make_app

from tuneforge.production.api.feedback import FeedbackBody
from tuneforge.production.api.jobs import CreateJob
from tuneforge.production.api.review import DecisionBody
from tuneforge.production.loop.review_queue import fill_queue
from tuneforge.registry.tables import Feedback, RequestLog

BODIES = {("/v1/fine_tuning/jobs", "post"): CreateJob, ("/v1/feedback", "post"): FeedbackBody,
          ("/v1/review/items/{item_id}", "post"): DecisionBody}
PRODUCTION = ("/v1/files", "/v1/fine_tuning", "/v1/feedback", "/v1/review")


def _tenant(c, reg, name: str, secret: str) -> dict:
    """A key with a file, a queued job, a logged request with feedback (its text: ``secret``)."""
    key_id, key = reg.create_key(name, [])
    headers = {"Authorization": f"Bearer {key}"}
    fid = c.post("/v1/files", files={"file": ("t.jsonl", jsonl(chat_rows(8)))}, data={"purpose": "fine-tune"},
                 headers=headers).json()["id"]
    job = c.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": fid}, headers=headers).json()["id"]
    rid = f"chatcmpl-{name}"
    with Session(reg.engine) as s, s.begin():
        s.add(RequestLog(id=rid, endpoint="chat", model="bot", version="bot:v1", key_id=key_id, response=secret,
                         messages=[{"role": "user", "content": secret}]))
        s.add(Feedback(request_id=rid, thumbs="down", correction=secret, key_id=key_id))
    return {"name": name, "headers": headers, "ids": {fid, job, rid}, "secret": secret, "rid": rid}


def _schema(app, ids: list[str]) -> dict:
    """The app's OpenAPI schema, production paths only, with request bodies and with path ids
    that are sometimes the tenants' real ones."""
    raw = json.loads(json.dumps(app.openapi()))
    raw["paths"] = {p: ops for p, ops in raw["paths"].items() if p.startswith(PRODUCTION)}
    components = raw.setdefault("components", {}).setdefault("schemas", {})
    for (path, method), model in BODIES.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        if "request_id" in body["properties"]:
            body["properties"]["request_id"] = {"anyOf": [{"enum": ids}, body["properties"]["request_id"]]}
        raw["paths"][path][method]["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": body}}}
    for ops in raw["paths"].values():
        for op in ops.values():
            for param in op.get("parameters", []):
                if param["in"] == "path":
                    param["schema"] = {"anyOf": [{"enum": ids}, {"type": "string", "minLength": 1}]}
    return raw


@pytest.fixture
def world(tmp_path, tiny_model_dir):
    app, reg = make_app(tmp_path, tiny_model_dir, max_file_mb=0.05)
    c = TestClient(app)  # no `with`: the worker does not start; nothing trains
    a = _tenant(c, reg, "tenant-a", "SECRET-OF-A")
    b = _tenant(c, reg, "tenant-b", "SECRET-OF-B")
    fill_queue(reg)  # both tenants' thumbs-down requests go on the review queue
    return app, a, b


def _check(response, me: dict, other: dict, seen: dict, case) -> None:
    where = (me["name"], case.method, case.formatted_path, case.body)
    assert response.status_code < 500, (*where, response.text[:300])
    text = response.text
    assert other["secret"] not in text, where
    assert not any(i in text for i in other["ids"]), (*where, text[:300])
    if response.status_code >= 400:
        assert set(response.json()["error"]) >= {"message", "type", "code"}, (*where, text[:300])
    seen[case.path, response.status_code] = seen.get((case.path, response.status_code), 0) + 1


def test_no_5xx_and_no_tenant_sees_another(world):
    app, a, b = world
    schema = schemathesis.openapi.from_dict(_schema(app, sorted(a["ids"] | b["ids"]) + ["1", "2"]))
    schema.app = app
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {"/v1/files", "/v1/fine_tuning/jobs", "/v1/feedback", "/v1/review/items/{item_id}"} <= {
        o.path for o in operations}
    seen: dict = {}
    for operation in operations:
        strategy = st.tuples(st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                                       operation.as_strategy(GenerationMode.NEGATIVE)), st.booleans())

        @given(drawn=strategy)
        @settings(max_examples=12, deadline=None, database=None, derandomize=True,  # same cases every run
                  suppress_health_check=list(HealthCheck))
        def call(drawn):
            case, as_a = drawn
            me, other = (a, b) if as_a else (b, a)
            _check(case.call(headers=me["headers"]), me, other, seen, case)

        call()
    # the fuzz reached refusals of bad bodies and of the review queue (tenant keys are not admins)
    assert ("/v1/fine_tuning/jobs", 400) in seen and ("/v1/feedback", 400) in seen, seen
    assert ("/v1/review/items", 403) in seen, seen

    # and the explicit cross-tenant requests, each way
    c = TestClient(app)
    for me, other in ((a, b), (b, a)):
        fid, job = sorted(i for i in other["ids"] if i.startswith(("file-", "ftjob-")))
        for method, path in (("GET", f"/v1/files/{fid}"), ("GET", f"/v1/files/{fid}/content"),
                             ("DELETE", f"/v1/files/{fid}"), ("GET", f"/v1/fine_tuning/jobs/{job}"),
                             ("POST", f"/v1/fine_tuning/jobs/{job}/cancel"),
                             ("GET", f"/v1/fine_tuning/jobs/{job}/events"),
                             ("GET", f"/v1/fine_tuning/jobs/{job}/checkpoints")):
            assert c.request(method, path, headers=me["headers"]).status_code == 404, (me["name"], method, path)
        r = c.post("/v1/feedback", json={"request_id": other["rid"], "score": 1}, headers=me["headers"])
        assert r.status_code == 403
        assert c.get("/v1/review/items", headers=me["headers"]).status_code == 403
        for listing in ("/v1/files", "/v1/fine_tuning/jobs"):
            text = c.get(listing, headers=me["headers"]).text
            assert not any(i in text for i in other["ids"]) and any(i in text for i in me["ids"])
