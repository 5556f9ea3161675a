"""The Python API: docs/python-api.md's walk-through run from the doc itself on the tiny model,
`import tuneforge` without torch, the stage modules that are also functions, and the CLI
calling the API."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tuneforge
from tuneforge import api

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "python-api.md"


def doc_cells() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def shrunk(code: str, tiny_model_dir: str) -> str:
    """The walk-through sized for the tiny model: each swap must still find its text, so an
    edit to the doc that drops one fails here instead of running the doc's full size."""
    swaps = [('"smollm2-135m-instruct"', repr(tiny_model_dir)), ('"max_steps": 30', '"max_steps": 2'),
             ('"eval_every": 10', '"eval_every": 1'), ('"max_length": 256', '"max_length": 160'),
             ('"limit": 20', '"limit": 2'), ("limit=20", "limit=2"), ('"max_new_tokens": 64', '"max_new_tokens": 4'),
             ("max_new_tokens=64", "max_new_tokens=4"), ("n=200", "n=80"),
             ("split__validation=20, split__test=20", "split__validation=8, split__test=8")]
    for old, new in swaps:
        assert old in code, f"docs/python-api.md no longer has {old!r}: update the swaps in {__file__}"
        code = code.replace(old, new)
    return code


def test_the_walk_through_runs_as_documented(tiny_model_dir, tmp_path, monkeypatch):
    cells = doc_cells()
    assert len(cells) >= 5
    monkeypatch.chdir(tmp_path)  # the doc's relative nb/ folders
    monkeypatch.setenv("TUNEFORGE_PLAN_PROBE", "off")  # plan's measured CPU overhead: minutes under load
    ns: dict = {}
    exec(compile(shrunk("\n".join(cells), tiny_model_dir), str(DOC), "exec"), ns)

    assert ns["manifest"]["splits"]["test"]["rows"] == 8
    assert ns["cfg"].train.lr == 5e-4 and ns["cfg"].method.r == 8  # check: the config as given
    run = ns["run"]
    assert run.resolve() == tmp_path / "nb" / "runs" / "orders" and (run / "adapter" / "adapter_config.json").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["lr"] == 1e-3 and saved["train"]["max_steps"] == 2  # train__lr=1e-3 applied
    assert set(ns["report"].results["systems"]) == {"base zero-shot", "tuned"}
    assert (ns["report"].folder / "eval_results.json").is_file()
    assert isinstance(ns["model"].generate("hi", max_new_tokens=2), str)
    assert (ns["merged"] / "config.json").is_file()
    assert any(label.startswith("lora") for label in ns["estimates"]["rows"]), ns["estimates"]["rows"]


def test_import_tuneforge_loads_no_torch_and_stage_modules_stay_modules():
    code = ("import sys, tuneforge; assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "print(sorted(tuneforge.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "train" in out.stdout and "load_run" in out.stdout
    import tuneforge.train.sweep as sweep  # the package is still a package

    assert sweep.__name__ == "tuneforge.train.sweep" and tuneforge.train.run.__name__ == "tuneforge.train.run"
    assert callable(tuneforge.train) and callable(tuneforge.evaluate) and callable(tuneforge.plan)
    assert tuneforge.load_run is api.load_run and tuneforge.prepare is api.prepare
    with pytest.raises(AttributeError):
        tuneforge.trian  # noqa: B018


def test_keyword_overrides_use_double_underscores_for_dots(tiny_raw_cfg):
    cfg = api.load_config(tiny_raw_cfg, train__lr=1e-3, method__r=16, run_name="x")
    assert (cfg.train.lr, cfg.method.r, cfg.run_name) == (1e-3, 16, "x")
    with pytest.raises(tuneforge.config.ConfigError, match="train.lrr"):
        api.load_config(tiny_raw_cfg, train__lrr=1e-3)


def test_a_misspelt_option_is_refused_not_dropped(tmp_path):
    with pytest.raises(TypeError, match="unknown option.* limt; it takes .*limit"):
        api.evaluate(tmp_path, limt=2)
    with pytest.raises(tuneforge.data.load.DataError, match="split.tset"):
        api.prepare("builtin:orders?n=10", tmp_path / "out", split__tset=0.2)


def test_the_cli_calls_the_python_api(tiny_raw_cfg, tmp_path, monkeypatch):
    from tuneforge.cli import main

    monkeypatch.setenv("TUNEFORGE_ALLOCATOR", "off")  # in process: no re-exec with tcmalloc
    seen = {}
    monkeypatch.setattr(api, "train", lambda config=None, **kw: seen.update(kw, config=config))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_raw_cfg))
    assert main(["train", str(path), "train.lr=1e-3", "data.packing=true"]) == 0
    assert seen["config"] == str(path) and seen["train__lr"] == 1e-3 and seen["data__packing"] is True
