"""`tuneforge data` through the real CLI: generate, prepare, inspect, bad input, and a
training run that reads the prepared folder."""

import hashlib
import json
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.integration


def tf(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tuneforge", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.fixture
def bad_folder(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "a.jsonl").write_text('{"prompt": "first prompt here", "completion": "one"}\n'
                               '{"prompt": "second prompt here", "completion": "two"}\n{"prompt": "tru')
    (d / "b.csv").write_text("prompt,completion\nthird prompt,three\nragged,row,here\n")
    (d / "latin.jsonl").write_bytes(b'{"prompt": "caf\xe9", "completion": "x"}\n')
    (d / "empty.jsonl").write_text("")
    (d / "image.png").write_bytes(b"\x89PNG")
    return d


def test_generate_prepare_inspect_and_bad_input(tmp_path, bad_folder, tiny_model_dir):
    gen = tf("data", "generate", "orders", "-n", "200", "--seed", "1", "-o", tmp_path / "orders.jsonl")
    assert gen.returncode == 0, gen.stderr
    assert len((tmp_path / "orders.jsonl").read_text().splitlines()) == 200

    out = tmp_path / "prepared"
    r = tf("data", "prepare", tmp_path / "orders.jsonl", bad_folder, "--task", "sft", "-o", out,
           "--tokenizer", tiny_model_dir, "--max-length", "256", "--val", "20", "--test", "20", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    m = json.loads((out / "manifest.json").read_text())
    acc = m["accounting"]["inputs"]
    assert acc["read"] == 205 and acc["read"] == acc["written"] + sum(acc["dropped"].values())
    assert acc["dropped"]["load: row: truncated last line"] == 1 and acc["dropped"]["load: row: ragged row"] == 1
    assert set(m["skipped_files"]) == {str(bad_folder / f) for f in ("latin.jsonl", "empty.jsonl", "image.png")}
    assert "not UTF-8" in m["skipped_files"][str(bad_folder / "latin.jsonl")]
    assert "skipped" in r.stdout and "image.png" in r.stdout
    assert (m["splits"]["validation"]["rows"], m["splits"]["test"]["rows"]) == (20, 20)

    i = tf("data", "inspect", out)
    assert i.returncode == 0 and f"{acc['read']} read = {acc['written']} written" in i.stdout, i.stderr
    strict = tf("data", "prepare", bad_folder / "a.jsonl", "--strict", "-o", tmp_path / "never")
    assert strict.returncode == 2 and "a.jsonl:3: truncated last line" in strict.stderr
    assert not (tmp_path / "never").exists()


def test_train_reads_prepared_folder_and_records_its_manifest(tmp_path, tiny_raw_cfg):
    out = tmp_path / "prepared"
    r = tf("data", "prepare", "builtin:orders?n=80&seed=2", "-o", out, "--val", "8", "--test", "8")
    assert r.returncode == 0, r.stderr
    cfg = {**tiny_raw_cfg, "data": {"train": [str(out)], "max_length": 160}}
    cfg["train"] = {**cfg["train"], "max_steps": 2, "eval_every": 0, "save_every": 0}
    cfg["eval"] = {**cfg["eval"], "baseline": False, "limit": 2}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    t = tf("train", tmp_path / "run.yaml")
    assert t.returncode == 0, t.stderr
    report = json.loads((tmp_path / "runs" / "tiny" / "data_report.json").read_text())
    assert report["prepared"]["manifest_sha256"] == hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    assert report["rows"]["validation"] == 8 and report["rows"]["test"] == 8
