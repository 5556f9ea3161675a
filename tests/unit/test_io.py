"""Atomic folders: tuneforge replaces only what it made, and a full disk is one clear error."""

import errno

import pytest
import torch

from tuneforge.io import DiskFullError, OutputRefused, atomic_dir, check_output


def _mine(p):
    return (p / "made.json").is_file()


def test_atomic_dir_never_replaces_a_folder_it_did_not_make(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(OutputRefused, match="holds files tuneforge did not write"):
        with atomic_dir(target, _mine) as tmp:
            (tmp / "made.json").write_text("{}")
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder left


def test_atomic_dir_replaces_its_own_folder_and_keeps_sibling_folders(tmp_path):
    target = tmp_path / "out"
    sibling = tmp_path / ".out.old"  # the name the old code deleted without asking
    sibling.mkdir()
    (sibling / "x").write_text("someone's")
    for n in (1, 2):
        with atomic_dir(target, _mine) as tmp:
            (tmp / "made.json").write_text(str(n))
    assert (target / "made.json").read_text() == "2" and (sibling / "x").read_text() == "someone's"
    with pytest.raises(OutputRefused, match="pass --overwrite"):
        check_output(target, _mine, overwrite=False)


def test_output_may_not_be_contain_or_lie_inside_an_input(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    for out, word in ((src, "is"), (tmp_path, "contains"), (src / "sub", "lies inside")):
        with pytest.raises(OutputRefused, match=f"{word} the input"):
            check_output(out, lambda p: True, inputs=[src])


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"),
    __import__("safetensors").SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                              'message: "No space left on device" })')])
def test_full_disk_is_one_clear_error_and_nothing_half_written(tmp_path, failure):
    target = tmp_path / "out"
    with pytest.raises(DiskFullError) as info:
        with atomic_dir(target, _mine, needed=5 * 2**20) as tmp:
            (tmp / "part").write_bytes(b"x" * 10)
            raise failure
    assert str(info.value).startswith("no space left on device ")
    assert f"({target}): 5 MB needed" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_on_a_full_disk_says_how_much_space_it_needs(tmp_path, monkeypatch):
    from tuneforge.train import checkpoint as ckpt

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    model = torch.nn.Linear(512, 1024)  # 2 MiB of fp32 weights + as much of Adam moments each
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 512)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(DiskFullError, match=r"no space left on device .*step-000001\): 6 MB needed"):
        ckpt.save_checkpoint(tmp_path / "checkpoints", ckpt.Position(step=1), model, opt, sched, {}, keep=2)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_main_reports_a_full_disk_as_one_line(tmp_path, monkeypatch, capsys):
    from tuneforge.cli import main
    from tuneforge.data import prepare as prep

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prep, "plot_lengths", full)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"prompt": "question {i} here?", "completion": "answer {i}"}}\n' for i in range(30)))
    assert main(["data", "prepare", str(rows), "-o", str(tmp_path / "out"), "--no-near-dedup"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no space left on device") and "Traceback" not in err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]
