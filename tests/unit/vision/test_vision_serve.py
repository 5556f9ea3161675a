"""Serving a vision-language run: /v1/chat/completions takes OpenAI image_url parts (data: URIs)
for a VLM base and answers from the image; a text-only base refuses them with the reason."""

from __future__ import annotations

import base64
import io
import json

import pytest
import yaml
from fastapi.testclient import TestClient
from PIL import Image

from tuneforge.deploy.config import ServeConfig
from tuneforge.deploy.engines import LocalEngine
from tuneforge.deploy.server import create_app
from tuneforge.registry.store import Registry


def _vision_run(vlm_dir: str, run_dir):
    """A run folder of a (random, non-zero) LoRA adapter on the tiny VLM's language model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(vlm_dir)
    targets = [n for n, m in base.named_modules() if ".language_model." in n and isinstance(m, torch.nn.Linear)]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, target_modules=targets, init_lora_weights=False))
    model.save_pretrained(run_dir / "adapter")
    AutoProcessor.from_pretrained(vlm_dir).save_pretrained(run_dir / "adapter")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"name": vlm_dir, "kind": "vision"},
                                                        "method": {"name": "lora"}, "data": {"train": ["x"]}}))
    (run_dir / "eval.json").write_text(json.dumps({"tuned": {"scores": {"exact_match": 0.5}}}))
    return run_dir


def _data_uri(colour=(255, 0, 0)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(model: str, url: str) -> dict:
    return {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in the picture?"}]}]}


@pytest.fixture(scope="module")
def vision_client(tiny_vlm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("vision-serve")
    reg = Registry(f"sqlite:///{root / 'reg.db'}")
    reg.add(_vision_run(tiny_vlm_dir, root / "run"), "shapes")
    app = create_app(ServeConfig(base_model=tiny_vlm_dir, base_name="tiny-vlm"), reg,
                     LocalEngine("cpu", "fp32", max_batch=4, batch_wait_ms=5))
    with TestClient(app) as client:
        yield client


def test_image_parts_are_served_for_a_vision_base(vision_client):
    for model in ("shapes:v1", "tiny-vlm"):
        r = vision_client.post("/v1/chat/completions", json=_chat(model, _data_uri()))
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body["choices"][0]["message"]["content"], str)
        assert body["usage"]["prompt_tokens"] > 16  # the image's 16 placeholder tokens are in the prompt
    r = vision_client.post("/v1/chat/completions", json=_chat("shapes:v1", "https://example.com/cat.png"))
    assert r.status_code == 400 and "data: URI" in r.json()["error"]["message"]
    r = vision_client.post("/v1/chat/completions", json=_chat("shapes:v1", "data:image/png;base64,bm90IGFuIGltYWdl"))
    assert r.status_code == 400 and "unreadable image" in r.json()["error"]["message"]


def test_a_text_only_base_refuses_image_parts_with_the_reason(tiny_model_dir, tmp_path):
    app = create_app(ServeConfig(base_model=tiny_model_dir, base_name="tiny"),
                     Registry(f"sqlite:///{tmp_path / 'r.db'}"), LocalEngine("cpu", "fp32"))
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json=_chat("tiny", _data_uri()))
        assert r.status_code == 400
        err = r.json()["error"]
        assert "text-only base" in err["message"] and "without seeing the image" in err["message"]
        assert err["param"] == "messages.0.content.0"
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]})
        assert r.status_code == 400 and "'input_audio' is not supported" in r.json()["error"]["message"]
