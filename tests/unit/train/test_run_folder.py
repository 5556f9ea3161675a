"""The run folder: never one tuneforge did not make, and an unwritable output_dir is a config error."""

import errno
from pathlib import Path

import pytest

from tuneforge.config import ConfigError
from tuneforge.io import OutputRefused
from tuneforge.plugins import validate_config
from tuneforge.train.run_folder import new_run_dir


def test_run_folder_is_never_one_holding_other_files(tiny_raw_cfg, tmp_path):
    cfg = validate_config(tiny_raw_cfg)
    foreign = tmp_path / "runs" / "tiny"
    foreign.mkdir(parents=True)
    (foreign / "metrics.jsonl").write_text("mine\n")
    with pytest.raises(OutputRefused, match="holds files tuneforge did not write"):
        new_run_dir(cfg)
    assert [p.name for p in foreign.iterdir()] == ["metrics.jsonl"]


def test_unwritable_output_dir_is_a_config_error_naming_the_fix(tiny_raw_cfg, monkeypatch):
    cfg = validate_config(tiny_raw_cfg)
    real_mkdir = Path.mkdir

    def read_only(self, *a, **k):
        if "runs" in self.parts:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(ConfigError, match=r"output_dir: cannot write the run folder .*Permission denied.*writable"):
        new_run_dir(cfg)


def test_full_disk_during_training_is_one_line_and_no_half_checkpoint(tiny_raw_cfg, tmp_path, monkeypatch, capsys):
    import yaml

    from tuneforge.cli import main
    from tuneforge.train import checkpoint as ckpt

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setenv("TUNEFORGE_ALLOCATOR", "off")  # in process: no re-exec
    monkeypatch.setattr(ckpt, "save_file", full)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_raw_cfg | {"train": tiny_raw_cfg["train"] | {"max_steps": 3}}))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error: no space left on device" in err and "checkpoints/step-000000): " in err and " MB needed" in err
    assert "Traceback" not in err
    run = tmp_path / "runs" / "tiny"
    assert list((run / "checkpoints").iterdir()) == []


def test_a_claimed_run_folder_may_hold_the_callers_files_first(tiny_raw_cfg, tmp_path):
    from tuneforge.train.run_folder import claim_run_dir

    cfg = validate_config(tiny_raw_cfg)
    run_dir = tmp_path / "runs" / "tiny"
    claim_run_dir(run_dir)
    (run_dir / "improve-data").mkdir()
    assert new_run_dir(cfg) == run_dir
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("x")
    with pytest.raises(OutputRefused):
        claim_run_dir(other)
