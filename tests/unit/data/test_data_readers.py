"""Readers: Parquet, plain text, saved datasets folders, mixed folders, and bad input."""

import json

import pytest

from tuneforge.data import load as load_mod
from tuneforge.data.load import DataError, load_rows


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_parquet_rows_keep_their_row_numbers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["q1", "q2", None], "completion": ["a1", "a2", "a3"]}), p)
    rows, rep = load_rows([str(p)])
    assert rep.format == "prompt_completion" and len(rows) == 2
    assert rep.dropped["prompt: missing"] == 1 and rep.examples["prompt: missing"][0].startswith(f"{p}:3")


def test_text_by_block_and_by_file(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text("First para\nstill first.\n\n\nSecond para.\n\nThird.\n")
    rows, rep = load_rows([str(p)])
    assert rep.kind == "text" and [r["text"] for r in rows] == ["First para\nstill first.", "Second para.", "Third."]
    assert [r["_where"] for r in rows] == [f"{p}:1", f"{p}:5", f"{p}:7"]
    rows, _ = load_rows([str(p)], text_unit="file")
    assert len(rows) == 1 and rows[0]["text"].startswith("First para") and rows[0]["text"].endswith("Third.")


def test_saved_datasets_folder_with_class_labels(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    feats = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    dd = DatasetDict({"train": Dataset.from_dict({"text": ["good", "bad"], "label": [1, 0]}, features=feats),
                      "extra": Dataset.from_dict({"text": ["fine"], "label": [1]}, features=feats)})
    dd.save_to_disk(str(tmp_path / "hf"))
    rows, rep = load_rows([str(tmp_path / "hf")])
    assert rep.format == "classification" and sorted(r["label"] for r in rows) == ["neg", "pos", "pos"]
    assert set(rep.sources) == {f"{tmp_path / 'hf'}[train]", f"{tmp_path / 'hf'}[extra]"}


def test_folder_of_mixed_formats_detects_each_file_and_lists_skipped(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    jsonl(d / "a.jsonl", [{"instruction": "i1", "output": "o1"}])
    (d / "b.csv").write_text("prompt,completion\np1,c1\np2,c2\n")
    (d / "c.png").write_bytes(b"\x89PNG")
    (d / "empty.jsonl").write_text("")
    rows, rep = load_rows([str(d)])
    assert len(rows) == 3 and rep.format == "instruction+prompt_completion"
    assert rep.skipped == {str(d / "c.png"): "unsupported file type '.png'", str(d / "empty.jsonl"): "empty file"}
    assert rep.sources[str(d / "b.csv")] == {"read": 2, "kept": 2, "format": "prompt_completion", "synthetic": False}
    with pytest.raises(DataError, match="c.png"):  # --strict: the first problem stops the load
        load_rows([str(d)], strict=True)


def test_mixing_row_kinds_is_refused(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o"}])
    b = jsonl(tmp_path / "b.jsonl", [{"text": "t", "label": "x"}])
    with pytest.raises(DataError, match="mix row kinds"):
        load_rows([a, b])


def test_fifty_megabyte_row_is_dropped_and_counted(tmp_path):
    p = tmp_path / "big.jsonl"
    p.write_text(json.dumps({"prompt": "p", "completion": "x" * 50_000_000}) + "\n"
                 + json.dumps({"prompt": "p2", "completion": "c"}) + "\n")
    rows, rep = load_rows([str(p)])
    assert len(rows) == 1 and rep.dropped["row: row too large"] == 1
    assert "50.0M characters" in rep.examples["row: row too large"][0]


def test_big_csv_cell_is_counted_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(load_mod, "MAX_ROW_CHARS", 1000)
    p = tmp_path / "d.csv"
    p.write_text(f"prompt,completion\np,{'x' * 200_000}\nq,c\n")
    rows, rep = load_rows([str(p)])
    assert len(rows) == 1 and rep.dropped["row: row too large"] == 1


def test_non_utf8_in_folder_is_skipped_with_reason(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    jsonl(d / "good.jsonl", [{"instruction": "i", "output": "o"}])
    (d / "latin.jsonl").write_bytes(b'{"instruction": "caf\xe9", "output": "b"}\n')
    rows, rep = load_rows([str(d)])
    assert len(rows) == 1 and "not UTF-8" in rep.skipped[str(d / "latin.jsonl")]


def test_unsupported_file_named_directly_is_a_clear_error(tmp_path):
    p = tmp_path / "photo.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(DataError, match=r"photo.png: unsupported file type '.png'"):
        load_rows([str(p)])


def test_several_inputs_are_each_a_source(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c"}] * 2)
    rows, rep = load_rows([a, "builtin:orders?n=3"])
    assert {s: v["read"] for s, v in rep.sources.items()} == {a: 2, "builtin:orders?n=3": 3}
    assert rep.sources["builtin:orders?n=3"]["synthetic"] and not rep.sources[a]["synthetic"]


def test_deeply_nested_jsonl_row_is_dropped_and_counted_with_its_line(tmp_path, capsys):
    from tuneforge.cli import main

    deep = '{"prompt": "p", "completion": ' + "[" * 100_000 + "]" * 100_000 + "}"
    rows = [json.dumps({"prompt": f"question {i} about things?", "completion": f"answer {i}"}) for i in range(30)]
    p = tmp_path / "deep.jsonl"
    p.write_text("\n".join(rows[:3] + [deep] + rows[3:]) + "\n")
    got, rep = load_rows([str(p)])
    assert len(got) == 30 and rep.dropped["row: nested too deeply"] == 1
    assert rep.examples["row: nested too deeply"][0].startswith(f"{p}:4: nested too deeply")
    assert main(["data", "prepare", str(p), "-o", str(tmp_path / "out"), "--no-near-dedup"]) == 0
    acc = json.loads((tmp_path / "out" / "manifest.json").read_text())["accounting"]["inputs"]
    assert acc["read"] == 31 and acc["dropped"]["load: row: nested too deeply"] == 1


def test_deeply_nested_json_array_file_is_a_clear_error(tmp_path, capsys):
    from tuneforge.cli import main

    p = tmp_path / "deep.json"
    p.write_text('[{"prompt": "p", "completion": "c"}, {"x": ' + "[" * 100_000 + "]" * 100_000 + "}]")
    with pytest.raises(DataError, match="nested too deeply.*one object per line"):
        load_rows([str(p)])
    assert main(["data", "prepare", str(p), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "deep.json: nested too deeply" in err and "Traceback" not in err and not (tmp_path / "out").exists()
