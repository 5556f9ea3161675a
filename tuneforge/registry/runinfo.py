"""What the deploy stage needs to know about a finished run folder, read from its files."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tuneforge.io import sha256_file


class RunError(ValueError):
    pass


@dataclass(frozen=True)
class RunInfo:
    run_dir: Path
    base_model: str  # the run's model.name (embedded alias, folder or hub id)
    method: str
    system_prompt: str | None
    adapter_sha256: str
    scores: dict[str, float] = field(default_factory=dict)  # eval.json "tuned" scores
    base_scores: dict[str, float] = field(default_factory=dict)

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / "adapter"

    @property
    def main_metric(self) -> str | None:
        # evaluate.metrics.score puts the main metric first (json_exact, exact_match, token_f1).
        return next(iter(self.scores), None)

    @property
    def main_score(self) -> float | None:
        return self.scores[self.main_metric] if self.scores else None


def read_run(run_dir: str | Path) -> RunInfo:
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"{run_dir} is not a run folder (no config.yaml)")
    # Every method saves its trained weights under adapter/ (a peft adapter, a full model
    # folder, or the trained tensors of freeze/hft/adapters).
    adapter = run_dir / "adapter"
    if not adapter.is_dir() or not any(p.suffix == ".safetensors" for p in adapter.iterdir()):
        raise RunError(f"{run_dir} has no trained weights in adapter/ (did the run finish? try --resume)")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    scores = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else {}
    return RunInfo(run_dir=run_dir, base_model=cfg["model"]["name"], method=cfg["method"]["name"],
                   system_prompt=(cfg.get("data") or {}).get("system_prompt"), adapter_sha256=model_weights_sha256(adapter),
                   scores=(scores.get("tuned") or {}).get("scores", {}),
                   base_scores=(scores.get("base") or {}).get("scores", {}))


def model_weights_sha256(model_dir: str | Path) -> str:
    """One hash over a model folder's weight files (name + content), so a changed base is noticed."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    if not files:
        raise RunError(f"{model_dir} holds no weight files")
    for p in files:
        h.update(f"{p.name}:{sha256_file(p)}\n".encode())
    return h.hexdigest()
