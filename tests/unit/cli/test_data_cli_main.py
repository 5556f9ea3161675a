"""`tuneforge data` error paths, in process (fast): one clear line and exit code 2."""

import json

from tuneforge.cli import main


def test_bad_inputs_give_one_clear_error(tmp_path, capsys):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    assert main(["data", "inspect", str(latin)]) == 2
    assert "latin.jsonl:2: not UTF-8 (byte 0xe9" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["data", "prepare", str(empty), "-o", str(tmp_path / "out")]) == 2
    assert "the data is empty" in capsys.readouterr().err
    assert main(["data", "prepare", str(tmp_path / "nope.csv"), "-o", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["data", "prepare", str(latin), "--near-threshold", "1.5", "-o", str(tmp_path / "out")]) == 2
    assert "threshold: Input should be less than or equal to 1" in capsys.readouterr().err
    assert main(["data", "prepare", str(latin), "--column", "prompt", "-o", str(tmp_path / "out")]) == 2
    assert "use FIELD=COLUMN" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_generate_each_builtin_kind(tmp_path, capsys):
    for task, keys in (("orders", {"instruction", "input", "output"}), ("sentiment", {"text", "label"}),
                       ("preferences", {"prompt", "chosen", "rejected"})):
        out = tmp_path / f"{task}.jsonl"
        assert main(["data", "generate", task, "-n", "7", "-o", str(out)]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == 7 and set(rows[0]) == keys | {"_synthetic"}
    from tuneforge.data.load import load_rows

    rows, _ = load_rows([str(tmp_path / "orders.jsonl")])
    assert all(r["_synthetic"] for r in rows)  # the mark survives a round trip through a file
    assert main(["data", "generate", "nope", "-n", "1", "-o", str(tmp_path / "x")]) == 2
    assert "unknown built-in task" in capsys.readouterr().err
