"""The real CLI, end to end, on a tiny Llama built from config."""

import json
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.integration


def tf_in_process(capsys, monkeypatch, *args):
    """The CLI's main() in this process (no interpreter start-up): for commands that stop early."""
    from tuneforge.cli import main

    monkeypatch.setenv("TUNEFORGE_ALLOCATOR", "off")  # never re-exec the test process
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def tf(*args, stdin=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "tuneforge", *map(str, args)], capture_output=True, text=True,
                          input=stdin, cwd=cwd, timeout=600)


@pytest.fixture
def cfg_file(tiny_raw_cfg, tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(tiny_raw_cfg))
    return p


def test_train_then_generate_and_chat(cfg_file, tmp_path):
    r = tf("train", cfg_file, "train.max_steps=3", "data.packing=true")
    assert r.returncode == 0, r.stderr
    assert "held-out test set" in r.stdout and "trainable of" in r.stdout
    run_dir = tmp_path / "runs" / "tiny"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
    g = tf("generate", run_dir, "hello", "--max-new-tokens", "5")
    assert g.returncode == 0, g.stderr
    c = tf("chat", run_dir, "--max-new-tokens", "5", stdin="hello\n\n")
    assert c.returncode == 0 and "model>" in c.stdout, c.stderr
    again = tf("train", cfg_file)
    assert again.returncode == 2 and "already holds a run" in again.stderr


def test_bad_config_and_missing_data_get_clear_errors(cfg_file, tmp_path, capsys, monkeypatch):
    r = tf_in_process(capsys, monkeypatch, "train", cfg_file, "train.lrr=1", "method.rank=2")
    assert r.returncode == 2
    assert "did you mean 'train.lr'?" in r.stderr and "did you mean 'method.r'?" in r.stderr
    r = tf_in_process(capsys, monkeypatch, "train", cfg_file, f"data.train=[{tmp_path / 'missing.jsonl'}]")
    assert r.returncode == 2 and "missing.jsonl" in r.stderr and "does not exist" in r.stderr
    r = tf_in_process(capsys, monkeypatch, "check", cfg_file)
    assert r.returncode == 0 and "config OK" in r.stdout


def test_bad_rows_are_reported_and_over_length_rows_counted(tiny_raw_cfg, tmp_path, capsys, monkeypatch):
    def write(name, n):
        path = tmp_path / name
        rows = [{"instruction": "extract", "input": f"order {i}", "output": f"answer {i}"} for i in range(n)]
        if name == "train.jsonl":
            rows[3] = {"instruction": "no output here"}
            rows[5] = {"instruction": "long " * 400, "output": "x"}
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return str(path)

    data = {"train": [write("train.jsonl", 40)], "validation": [write("val.jsonl", 4)],
            "test": [write("test.jsonl", 4)], "max_length": 64}
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(tiny_raw_cfg | {"data": data}))
    r = tf_in_process(capsys, monkeypatch, "train", p, "train.max_steps=1", "eval.metric=none")
    assert r.returncode == 0, r.stderr
    out = r.stdout.replace("\n", "")
    assert "train.jsonl:4: field 'output': missing" in out
    assert "dropped 1 (longer than max_length)" in out and "train.jsonl:6" in out
    report = json.loads((tmp_path / "runs" / "tiny" / "data_report.json").read_text())
    assert report["load"]["train"]["dropped"] == {"output: missing": 1}
    assert report["render"]["train"]["dropped"] == {"longer than max_length": 1}
    assert report["render"]["train"]["kept"] == 38  # 40 read = 38 kept + 1 missing field + 1 too long
    r = tf_in_process(capsys, monkeypatch, "train", p, "run_name=strict", "data.overlength=error")
    assert r.returncode == 2
    assert "train.jsonl:6" in r.stderr and "tokens > data.max_length=64" in r.stderr


def test_models_lists_embedded_defaults():
    r = tf("models")
    assert r.returncode == 0 and "smollm2-135m-instruct" in r.stdout and "all-minilm-l6-v2" in r.stdout
