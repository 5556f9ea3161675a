"""Fuzz the gateway from its own OpenAPI schema (schemathesis): whatever a client sends,
the answer is never a 5xx. Bad input must be a 4xx in OpenAI's error shape."""

import pytest
import schemathesis
from deploy_helpers import fake_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tuneforge.deploy.config import Route, ServeConfig
from tuneforge.deploy.engines import Chunk
from tuneforge.deploy.server import create_app
from tuneforge.registry.store import Registry


class EchoEngine:
    async def stream(self, req):
        yield Chunk(f"{req.adapter} {len(req.messages or [])} {req.prompt or ''}"[:50], "stop", 3, 2)

    async def close(self):
        pass


@pytest.fixture(scope="module")
def app(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    reg = Registry(f"sqlite:///{root / 'reg.db'}")
    reg.add(fake_run(tiny_model_dir, root / "r1", seed=1), "bot")
    routes = {"bot-ab": Route.model_validate({"arms": [{"name": "a", "target": "bot", "weight": 1}],
                                              "fallback": [{"reply": "sorry"}],
                                              "guards": {"empty": True, "json_object": True}})}
    # jobs home: fuzzed uploads to /v1/files land in the test's folder
    cfg = ServeConfig(routes=routes, max_request_bytes=20_000, jobs={"home": str(root / "home")})
    return create_app(cfg, reg, EchoEngine())


def test_no_5xx_for_any_request(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {"/v1/chat/completions", "/v1/completions", "/admin/aliases"} <= {o.path for o in operations}
    seen = {}  # (path, status) -> count
    for operation in operations:
        # Positive cases fit the schema (random model names, sampling values, messages);
        # negative ones break it (wrong types, missing fields, out-of-range numbers).
        strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                             operation.as_strategy(GenerationMode.NEGATIVE))

        @given(case=strategy)
        @settings(max_examples=25, deadline=None, database=None, derandomize=True,  # same cases every run
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
        def call(case):
            response = case.call()
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            seen[case.path, response.status_code] = seen.get((case.path, response.status_code), 0) + 1
            if response.status_code >= 400:
                assert set(response.json()["error"]) >= {"message", "type", "code"}, response.text

        call()
    # The fuzz reached refusals of bad bodies on both completion endpoints (else it tested little).
    assert ("/v1/chat/completions", 400) in seen and ("/v1/completions", 400) in seen, seen
