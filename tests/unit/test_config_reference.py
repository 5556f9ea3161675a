"""docs/config.md is generated from the config models: it must be current and carry real fields."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "config_reference.py"


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_up_to_date():
    r = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr + "\ndocs/config.md is out of date: run python scripts/config_reference.py"


def test_config_reference_documents_real_fields():
    text = _script().render()
    for row in [
        "| `train.lr` | `float` | `0.0002` | when not set: the method's own default if it has one",
        "| `data.max_length` | `int` | `512` |",
        "| `train.scheduler` | `\"linear\" \\| \"cosine\" \\| \"constant\" \\| \"constant_with_warmup\"` | `\"cosine\"` |",
        "| `data.train` | `list[str]` |",
        "| `model.name` | `str` | `\"smollm2-135m-instruct\"` |",
        "| `eval.limit` | `int \\| None` | `null` |",
        "| `data.tasks[].name` | `str` | required |",
        "| `engine.max_batch` | `int` | `16` |",
        "| `jobs.max_file_mb` |",
    ]:
        assert row in text, row
    lora = text.split("### `method.name: lora`")[1].split("###")[0]
    assert "| `method.r` | `int` | `8` | > 0 |" in lora
    assert "| `method.target_modules` |" in lora
    dpo = text.split("### `objective.name: dpo`")[1].split("###")[0]
    assert "| `objective.beta` |" in dpo


def test_check_fails_when_the_file_differs(tmp_path, monkeypatch):
    module = _script()
    stale = tmp_path / "config.md"
    stale.write_text(module.render().replace("train.lr", "train.learning_rate"))
    monkeypatch.setattr(module, "OUT", stale)
    monkeypatch.setattr(module, "ROOT", tmp_path)
    assert module.main(["--check"]) == 1
    stale.unlink()
    assert module.main(["--check"]) == 1
