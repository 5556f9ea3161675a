"""The one train entry: ``train(cfg)`` runs the objective's recipe (tuneforge.train.recipes),
which reads top to bottom: setup -> data -> model -> train (tuneforge.train.loop) -> save ->
evaluate.

Every run is a folder: config.yaml (resolved), environment.json, data_report.json,
metrics.jsonl, loss.png, checkpoints/, adapter/ (standard peft), eval.json, summary.json.
With ``train.report_to`` the same metrics, results and adapter go to the trackers too
(tuneforge.train.tracking).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from rich.console import Console

from tuneforge.config import RunConfig
from tuneforge.plugins import objective_of
from tuneforge.train import auto
from tuneforge.train.recipes import recipe_for
from tuneforge.train.tracking import Tracking


def train(cfg: RunConfig, resume: Path | None = None, console: Console | None = None,
          on_eval: Callable[[int, float], None] | None = None, force: bool = False) -> Path:
    """Train ``cfg`` (or continue ``resume``, a run folder) and return the run folder.
    ``on_eval(step, val_loss)`` is called after every validation (a sweep prunes from it);
    ``force`` skips the memory estimate's refusal of a run that cannot fit. Settings left to
    ``auto`` are decided from the data first (train/auto.py)."""
    if cfg.auto and resume is None:
        cfg = auto.apply(cfg, console or Console())
    if cfg.model.kind == "vision":  # rows with images, an image-text-to-text model (recipes/vision.py)
        from tuneforge.train.recipes import vision as recipe
    else:
        recipe = recipe_for(objective_of(cfg))
    tracker = Tracking(cfg)  # started by the loop once the run folder exists (main process only)
    try:
        run_dir = recipe.train(cfg, resume, console, on_eval, force, tracker)
    except BaseException:  # also Ctrl-C and a diverged run: the trackers' runs end as failed
        tracker.finish(Path(), ok=False)
        raise
    tracker.finish(run_dir)
    return run_dir
