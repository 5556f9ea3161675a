"""Checkpoints that resume exactly: trained weights, optimizer, scheduler, RNG, data position.

Trainable weights go to safetensors; optimizer/scheduler/RNG state to a torch file read
back with ``weights_only=True`` (plain tensors and containers, never arbitrary pickles).
Each checkpoint is written to a temp folder and renamed into place. Under FSDP the files are
the same: the shards are gathered into whole tensors to write, and cut again when read.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tuneforge.io import atomic_dir, atomic_write_text
from tuneforge.train import distributed

log = logging.getLogger("tuneforge.train")


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro: int = 0  # index of the next micro-batch within the epoch


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model, keep: bool = True) -> dict[str, torch.Tensor]:
    """Trained weights by name, whole, on the CPU. Under FSDP every rank must call this (it
    gathers the shards); ranks with ``keep=False`` drop each tensor once gathered."""
    state = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            t = distributed.whole(p.detach())
            if keep:
                state[n] = t.contiguous().cpu()
    return state


def optimizer_state(optimizer, keep: bool = True) -> dict:
    """``optimizer.state_dict()`` with whole tensors (gathered like ``trainable_state``)."""
    state = optimizer.state_dict()
    per_param = {}
    for i, s in state["state"].items():
        whole = {k: distributed.whole(v) for k, v in s.items()}
        if keep:
            per_param[i] = whole
    return state | {"state": per_param} if keep else {}


def save_checkpoint(ckpt_root: Path, pos: Position, model, optimizer, scheduler, rng: dict, keep: int,
                    write: bool = True) -> Path | None:
    """``write=False``: only take part in gathering FSDP shards (the ranks other than 0)."""
    weights, optim = trainable_state(model, keep=write), optimizer_state(optimizer, keep=write)
    if not write:
        return None
    target = ckpt_root / f"step-{pos.step:06d}"
    needed = sum(t.nbytes for t in weights.values()) + sum(
        v.nbytes for s in optim["state"].values() for v in s.values() if isinstance(v, torch.Tensor))
    with atomic_dir(target, lambda p: (p / "position.json").is_file(), what="checkpoint", needed=needed) as tmp:
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rng}, tmp / "state.pt")
        (tmp / "position.json").write_text(json.dumps(asdict(pos)))
    for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def exit_interrupted(path: Path | None, run_dir: Path, console) -> None:
    """After Ctrl-C saved ``path``: say how to continue, and exit with the shell's 130."""
    console.print(f"[yellow]interrupted[/]: checkpoint {path}. Continue with: tuneforge train --resume {run_dir}")
    raise SystemExit(130) from None


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> tuple[Position, dict]:
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing or set(weights) - set(params):
        raise RuntimeError(f"checkpoint {path} does not match the model (missing {missing[:3]}...)")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(distributed.like(t, params[n]))
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(_cut_like_params(state["optimizer"], optimizer))
    scheduler.load_state_dict(state["scheduler"])
    return Position(**json.loads((path / "position.json").read_text())), state["rng"]


def restore_latest(run_dir: Path, model, optimizer, scheduler, metrics: Path | None) -> tuple[Position, Path] | None:
    """Load the latest checkpoint of ``run_dir`` (weights, optimizer, scheduler, RNG) and drop
    the rows of ``metrics`` logged after it; None when the run has no checkpoint yet."""
    last = latest_checkpoint(run_dir)
    if last is None:
        return None
    pos, rng = load_checkpoint(last, model, optimizer, scheduler)
    set_rng_state(rng)
    if metrics is not None:
        truncate_metrics(metrics, pos.step)
    return pos, last


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows logged after the checkpoint we resume from (they will be redone).
    A line that is not a metrics row (a last line cut short when the run was killed mid-write)
    is dropped with a warning: the resumed run logs those steps again."""
    if not path.exists():
        return
    keep = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row_step = json.loads(line)["step"]
            if row_step <= step:
                keep.append(line)
        except (ValueError, TypeError, KeyError):
            log.warning("warning: %s:%d is not a metrics row (cut short when the run stopped?); skipped: %.60s",
                        path, n, line)
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))


def _cut_like_params(optim_state: dict, optimizer) -> dict:
    """Whole per-parameter tensors (moments) cut to this rank's shard of their parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return optim_state | {"state": {
        i: {k: distributed.like(v, params[i]) if v.shape == params[i].shape else v for k, v in s.items()}
        for i, s in optim_state["state"].items()}}
