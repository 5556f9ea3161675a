"""Other tools' formats through `tuneforge data prepare` and training input: KTO pairs split
and accounted, ignored fields counted, dataset_info specs in data.train, segments rendered."""

import json
from pathlib import Path

import pytest

from tuneforge.config import DataConfig
from tuneforge.data.load import UnreadFieldError
from tuneforge.data.prepare import PrepareOptions, build_splits, prepare
from tuneforge.data.render import IGNORE, encode_rows, render_segments

FX = Path(__file__).resolve().parents[2] / "fixtures" / "formats"
NO_SPLIT = {"validation": 0, "test": 0}


def test_prepare_splits_pairs_for_kto_and_accounts_for_them(tmp_path):
    m = prepare(PrepareOptions(inputs=[str(FX / "llamafactory/dpo_demo.json")], task="unpaired", split=NO_SPLIT,
                               dedup={"near": False}), tmp_path / "o")
    assert m["kind"] == "unpaired" and m["splits"]["train"]["rows"] == 10
    assert m["accounting"]["inputs"] == {"read": 5, "written": 10, "dropped": {}, "added": 5}
    report = (tmp_path / "o" / "report.md").read_text()
    assert "5 pairs split into 10 unpaired rows" in report and "+ 5 added by splitting pairs" in report
    # the prepared folder reads back as unpaired rows
    back = build_splits(DataConfig(train=[str(tmp_path / "o")], val_size=0, test_size=0), 0, "unpaired")
    assert len(back.train) == 10 and {r["label"] for r in back.train} == {True, False}


def test_prepare_task_sft_refuses_kto_rows_then_ignore_field_trains_them(tmp_path):
    kto = str(FX / "llamafactory/kto_demo.json")
    with pytest.raises(UnreadFieldError, match=r"objective.name=kto.*--ignore-field label"):
        prepare(PrepareOptions(inputs=[kto], task="sft", split=NO_SPLIT), tmp_path / "o")
    m = prepare(PrepareOptions(inputs=[kto], task="sft", ignore_fields=["label"], split=NO_SPLIT,
                               dedup={"near": False}), tmp_path / "o")
    load = next(s for s in m["stages"] if s["name"] == "load")
    assert m["kind"] == "sft" and load["info"]["ignored_fields"] == {"label": 5}
    assert "ignored fields (data.ignore_fields): label (5 rows)" in (tmp_path / "o" / "report.md").read_text()


def test_dataset_info_spec_in_data_train_and_tools_kept_through_prepare(tmp_path):
    spec = f"{FX / 'llamafactory' / 'dataset_info.json'}#glaive_toolcall_en_demo"
    splits = build_splits(DataConfig(train=[spec], val_size=0, test_size=0), 0, "sft")
    assert len(splits.train) == 6 and sum("tools" in r for r in splits.train) == 4
    m = prepare(PrepareOptions(inputs=[spec], split=NO_SPLIT, dedup={"near": False}), tmp_path / "o")
    rows = [json.loads(line) for line in (tmp_path / "o" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows[1]["messages"][1]["tool_calls"][1]["function"]["arguments"]["location"] == "Rome"
    assert m["format"]["inputs"]["format"] == "sharegpt"


def test_rows_differing_only_in_tools_are_not_duplicates(tmp_path):
    conv = [{"role": "user", "content": "What can you do for me today?"},
            {"role": "assistant", "content": "I can help with many things."}]
    tool = {"type": "function", "function": {"name": "f", "description": "does f", "parameters": {}}}
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"messages": conv}) + "\n" + json.dumps({"messages": conv, "tools": [tool]}) + "\n")
    m = prepare(PrepareOptions(inputs=[str(src)], split=NO_SPLIT), tmp_path / "o")
    assert m["splits"]["train"]["rows"] == 2


def test_segments_render_with_per_segment_labels(tiny_tok):
    segs = [{"text": "Question: 2+2? Answer: ", "label": False}, {"text": "4", "label": True}]
    ids, labels = render_segments(tiny_tok, segs)
    first = tiny_tok("Question: 2+2? Answer: ", add_special_tokens=False)["input_ids"]
    second = tiny_tok("4", add_special_tokens=False)["input_ids"]
    bos = [tiny_tok.bos_token_id] if tiny_tok.bos_token_id is not None else []
    assert ids == bos + first + second
    assert labels == [IGNORE] * (len(bos) + len(first)) + second
    enc = encode_rows(tiny_tok, [{"segments": segs, "_where": "f:1"}], 512, "drop")
    assert enc.rows == [{"input_ids": ids, "labels": labels}]


def test_sft_objective_loads_segments_rows():
    splits = build_splits(DataConfig(train=[str(FX / "axolotl/input_output.jsonl")], val_size=0, test_size=0), 0,
                          "sft")
    assert len(splits.train) == 5 and all("segments" in r for r in splits.train)


def test_prepared_segments_folder_reads_back_for_the_sft_objective(tmp_path, tiny_model_dir):
    m = prepare(PrepareOptions(inputs=[str(FX / "axolotl/input_output.jsonl")], split=NO_SPLIT, tokenizer=tiny_model_dir,
                               dedup={"near": False}), tmp_path / "o")
    assert m["kind"] == "segments" and m["splits"]["train"]["rows"] == 5
    back = build_splits(DataConfig(train=[str(tmp_path / "o")], val_size=0, test_size=0), 0, "sft")
    assert [r["segments"] for r in back.train][1][1] == {"text": "4", "label": True}
