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


def _rows_file(path, n=40):
    path.write_text("".join(json.dumps({"prompt": f"Question number {i} about topic {i * 7}?",
                                        "completion": f"Answer {i}."}) + "\n" for i in range(n)))
    return path


def test_prepare_never_deletes_a_folder_it_did_not_write(tmp_path, capsys):
    rows = _rows_file(tmp_path / "rows.jsonl")
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    assert main(["data", "prepare", str(rows), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds files tuneforge did not write" in err and "Traceback" not in err
    assert main(["data", "prepare", str(rows), "-o", str(out), "--overwrite"]) == 2  # not even with --overwrite
    assert (out / "notes.txt").read_text() == "x" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]  # no temp folder left behind


def test_prepare_replaces_its_own_folder_only_with_overwrite(tmp_path, capsys):
    rows = _rows_file(tmp_path / "rows.jsonl")
    out = tmp_path / "prepared"
    assert main(["data", "prepare", str(rows), "-o", str(out), "--no-near-dedup"]) == 0
    before = (out / "manifest.json").read_text()
    capsys.readouterr()
    assert main(["data", "prepare", str(rows), "-o", str(out), "--no-near-dedup"]) == 2
    assert "already holds a prepared folder; pass --overwrite" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == before
    assert main(["data", "prepare", str(rows), "-o", str(out), "--no-near-dedup", "--overwrite", "--seed", "3"]) == 0
    assert json.loads((out / "manifest.json").read_text())["options"]["split"]["seed"] == 3


def test_prepare_never_writes_over_an_input(tmp_path, capsys):
    raw = tmp_path / "m"
    raw.mkdir()
    _rows_file(raw / "a.jsonl")
    for out in (raw, tmp_path, raw / "inside"):  # is, contains, lies inside the input
        assert main(["data", "prepare", str(raw), "-o", str(out), "--overwrite"]) == 2
        assert "input" in capsys.readouterr().err
    assert sorted(p.name for p in raw.iterdir()) == ["a.jsonl"]
    single = _rows_file(tmp_path / "one.jsonl")
    assert main(["data", "prepare", str(single), "-o", str(single)]) == 2
    assert "is the input" in capsys.readouterr().err and single.read_text().startswith('{"prompt"')


def test_generate_never_writes_over_a_file_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "notes.jsonl"
    mine.write_text('{"text": "my own row"}\n')
    assert main(["data", "generate", "orders", "-n", "3", "-o", str(mine), "--overwrite"]) == 2
    assert "not a file `tuneforge data generate` wrote" in capsys.readouterr().err
    assert mine.read_text() == '{"text": "my own row"}\n'
    out = tmp_path / "gen.jsonl"
    assert main(["data", "generate", "orders", "-n", "3", "-o", str(out)]) == 0
    assert main(["data", "generate", "orders", "-n", "5", "-o", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and len(out.read_text().splitlines()) == 3
    assert main(["data", "generate", "orders", "-n", "5", "-o", str(out), "--overwrite"]) == 0
    assert len(out.read_text().splitlines()) == 5


def test_read_only_output_folder_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    import errno
    import tempfile

    rows = _rows_file(tmp_path / "rows.jsonl")

    def read_only(*a, dir=None, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(dir))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    assert main(["data", "prepare", str(rows), "-o", str(tmp_path / "out"), "--no-near-dedup"]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path}: Read-only file system: tuneforge cannot write there" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
