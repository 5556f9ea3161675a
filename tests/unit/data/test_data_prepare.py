"""The prepare recipe end to end (in process): accounting, outputs, manifest, training input."""

import json

import pytest

from tuneforge.config import DataConfig
from tuneforge.data.load import DataError
from tuneforge.data.manifest import read_manifest
from tuneforge.data.prepare import PrepareOptions, build_splits, prepare
from tuneforge.data.split import SplitOptions


def write_rows(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return str(path)


@pytest.fixture
def messy(tmp_path):
    rows = [{"instruction": f"Summarise note {i} about the quarterly budget review meeting",
             "input": f"Item {i}: spending rose by {i} percent in region {i % 5}", "output": f"Summary {i}."}
            for i in range(120)]
    rows[3]["input"] += " Contact me at boss@corp.example"
    rows[4] = dict(rows[5])  # exact duplicate
    rows[6] = {**rows[7], "output": rows[7]["output"] + " "}  # duplicate after whitespace cleaning
    rows[8] = {"instruction": "missing output"}
    return write_rows(tmp_path / "notes.jsonl", rows, tail='{"instruction": "trunc')


def test_prepare_accounts_for_every_row_and_writes_loadable_splits(messy, tmp_path, tiny_model_dir):
    out = tmp_path / "prepared"
    m = prepare(PrepareOptions(inputs=[messy], tokenizer=tiny_model_dir, max_length=4096), out)
    acc = m["accounting"]["inputs"]
    assert acc["read"] == 121 and acc["read"] == acc["written"] + sum(acc["dropped"].values())
    assert acc["dropped"]["load: row: truncated last line"] == 1
    assert acc["dropped"]["load: output: missing"] == 1
    assert acc["dropped"]["exact_dedup: exact duplicate"] == 2
    for s in m["stages"]:
        assert s["input"] == s["kept"] + sum(s["dropped"].values()), s
    pii = next(s for s in m["stages"] if s["name"] == "pii")
    assert pii["info"]["found"] == {"EMAIL": 1}
    assert sorted(p.name for p in out.iterdir()) == ["lengths.png", "manifest.json", "report.md", "test.jsonl",
                                                     "train.jsonl", "validation.jsonl"]
    from datasets import load_dataset

    ds = load_dataset("json", data_files={n: str(out / f"{n}.jsonl") for n in ("train", "validation", "test")})
    assert {n: len(ds[n]) for n in ds} == {n: m["splits"][n]["rows"] for n in ds}
    assert sum(len(ds[n]) for n in ds) == acc["written"]
    text = (out / "train.jsonl").read_text() + (out / "test.jsonl").read_text() + (out / "validation.jsonl").read_text()
    assert "boss@corp.example" not in text and "<EMAIL>" in text
    assert m["sources"][0]["sha256"] and m["tokenizer"] == tiny_model_dir and m["length_unit"] == "tokens"
    assert m["splits"]["train"]["lengths"]["p50"] > 10 and m["synthetic"] is False
    assert "input = kept + dropped" in (out / "report.md").read_text()
    assert (out / "lengths.png").read_bytes()[:4] == b"\x89PNG"


def test_train_recipe_reads_a_prepared_folder(messy, tmp_path):
    out = tmp_path / "prepared"
    prepare(PrepareOptions(inputs=[messy], split=SplitOptions(validation=10, test=10)), out)
    s = build_splits(DataConfig(train=[str(out)]), seed=0)
    assert (len(s.validation), len(s.test)) == (10, 10) and len(s.train) == read_manifest(out)["splits"]["train"]["rows"]
    assert s.prepared["path"] == str(out) and len(s.prepared["manifest_sha256"]) == 64
    with pytest.raises(DataError, match="own validation/test"):
        build_splits(DataConfig(train=[str(out)], test=["x.jsonl"]), seed=0)


def test_non_sft_rows_are_refused_by_the_train_recipe(tmp_path):
    out = tmp_path / "cls"
    m = prepare(PrepareOptions(inputs=["builtin:sentiment?n=300"], dedup={"near": False}), out)
    assert m["kind"] == "classification" and m["synthetic"] and "labels" in m["splits"]["test"]
    with pytest.raises(DataError, match="trains on sft rows"):
        build_splits(DataConfig(train=[str(out)]), seed=0)
    with pytest.raises(DataError, match="trains on sft rows"):
        build_splits(DataConfig(train=["builtin:sentiment?n=50"]), seed=0)


def test_overlength_drop_or_count_and_augment(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"tell me about item {i} " + ("long " * 300 if i < 5 else ""), "completion": f"item {i}"}
            for i in range(60)]
    src = write_rows(tmp_path / "d.jsonl", rows)
    m = prepare(PrepareOptions(inputs=[src], tokenizer=tiny_model_dir, max_length=200, augment=2), tmp_path / "a")
    tok = next(s for s in m["stages"] if s["name"] == "token_length")
    assert tok["dropped"] == {"longer than max_length": 5}
    aug = next(s for s in m["stages"] if s["name"] == "augment")
    train_orig = m["splits"]["train"]["rows"] - aug["info"]["added_to_train"]
    assert aug["info"]["added_to_train"] == 2 * train_orig and m["splits"]["train"]["synthetic_rows"] == 2 * train_orig
    assert m["splits"]["test"]["synthetic_rows"] == 0 and m["synthetic"]
    m = prepare(PrepareOptions(inputs=[src], tokenizer=tiny_model_dir, max_length=200, overlength="truncate"),
                tmp_path / "b")
    tok = next(s for s in m["stages"] if s["name"] == "token_length")
    assert tok["dropped"] == {} and tok["changed"] == {"longer than max_length (truncated at training)": 5}


def test_given_test_file_is_checked_for_leakage(tmp_path):
    rows = [{"prompt": f"explain the rule number {i} of the house to a new guest", "completion": f"rule {i}"}
            for i in range(50)]
    train = write_rows(tmp_path / "train.jsonl", rows)
    test = write_rows(tmp_path / "test.jsonl", [rows[0], {"prompt": "a fresh question nobody asked", "completion": "x"}])
    m = prepare(PrepareOptions(inputs=[train], test_inputs=[test]), tmp_path / "out")
    leak = next(s for s in m["stages"] if s["name"] == "leakage")
    assert leak["dropped"] == {"prompt also in train": 1} and m["splits"]["test"]["rows"] == 1
    assert m["accounting"]["test"] == {"read": 2, "written": 1, "dropped": {"leakage: prompt also in train": 1}}
    assert m["accounting"]["inputs"]["written"] == 50


def test_task_mismatch_and_strict(tmp_path):
    src = write_rows(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    with pytest.raises(DataError, match="--task sft but the rows are classification"):
        prepare(PrepareOptions(inputs=[src], task="sft"), tmp_path / "o")
    with pytest.raises(DataError, match=r"d.jsonl:2: field 'label': missing"):
        prepare(PrepareOptions(inputs=[src], strict=True), tmp_path / "o")
    assert not (tmp_path / "o").exists()
