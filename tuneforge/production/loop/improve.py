"""`tuneforge improve`: reviewed feedback -> data -> continued training -> evaluation -> gate -> canary.

One cycle (``improve``), top to bottom:
  setup     the current version (NAME@prod) and its run config
  data      reviewed rows (accepted answers, corrections; nothing undecided), a held-out share
            of them, replayed rows of the current version's train split (against forgetting)
            -> the data stage (`prepare`: clean, PII, dedup, leakage check against the
            current version's test split) -> a prepared folder in the new run dir
  train     the current run's config with train.init_from = its folder (the sequential
            regime's way of continuing) -> a normal run folder
  evaluate  current and new on the held-out test split and on the held-out feedback rows
  register  Registry.add -> NAME:vN
  gate      not worse on held-out (within a tolerance) and better on feedback -> the canary
            alias points at vN and a registry route override sends it a small share of
            traffic (a running server reads it per request); otherwise stop and say why
  lineage   improve.json in the run dir (review item ids, data, scores, verdict);
            ReviewItem.used_in = NAME:vN for the rows that trained a canaried version

``promote_after`` is the later step: it compares the canary arm's feedback with the prod
arm's (Fisher's exact test on the share of good feedback) and widens the canary, promotes it,
or rolls it back, appending each step to the canary's improve.json.
"""

from __future__ import annotations

import gc
import json
import random
from datetime import datetime
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import Field, ValidationError
from rich.console import Console
from rich.table import Table
from scipy.stats import fisher_exact
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tuneforge.config import ConfigError, EvalConfig, RunConfig, Strict, deep_merge, format_errors, read_yaml
from tuneforge.data.clean import CleanOptions
from tuneforge.data.dedup import DedupOptions
from tuneforge.data.manifest import MANIFEST
from tuneforge.data.pii import PIIOptions
from tuneforge.data.prepare import PrepareOptions, build_splits, load_prepared, prepare, split_by_prompt
from tuneforge.data.render import with_system
from tuneforge.data.split import SplitOptions
from tuneforge.evaluate.perplexity import answer_rows, nll_per_row, summarize
from tuneforge.evaluate.stats import paired_bootstrap
from tuneforge.evaluate.task import evaluate_rows
from tuneforge.io import sha256_file, write_json
from tuneforge.plugins import validate_config
from tuneforge.registry.store import Registry, VersionInfo
from tuneforge.registry.tables import Feedback, RequestLog, ReviewItem
from tuneforge.runs import load_for_inference, load_run_config
from tuneforge.train.run import train
from tuneforge.train.run_folder import claim_run_dir

LINEAGE = "improve.json"


class ImproveError(ValueError):
    pass


class DataOptions(Strict):
    """The data stage's filters for the exported rows (see `tuneforge data prepare`)."""

    clean: CleanOptions = CleanOptions()
    pii: PIIOptions = PIIOptions()
    dedup: DedupOptions = DedupOptions()
    leakage_threshold: float = Field(0.8, gt=0, le=1, description="test prompts this similar to a train prompt are "
                                     "removed from the held-out test split (both versions are scored without them)")


class GateConfig(Strict):
    metric: Literal["task", "loss"] = Field(
        "task", description="task: the run's eval metric on generated answers (higher is better); "
        "loss: teacher-forced loss of the reference answers (lower is better)")
    tolerance: float = Field(0.01, ge=0, description="held-out test may be worse by at most this: the lower end "
                             "of the paired interval of the change must be at or above -tolerance")
    min_gain: float = Field(0.0, ge=0, description="feedback set must be better by more than this: the lower end "
                            "of the paired interval of the gain must be above it")
    min_rows: int = Field(20, ge=1, description="rows each set (test, held-out feedback) needs before the gate "
                          "decides; fewer: refused, saying how many are needed")
    confidence: float = Field(0.95, gt=0, lt=1, description="of the paired bootstrap intervals")


class CanaryConfig(Strict):
    alias: str = "canary"
    route: str | None = Field(None, description="the public model name whose traffic is split (default: NAME)")
    weight: float = Field(0.1, gt=0, lt=1, description="share of the route's traffic the canary gets at first")


class PromoteConfig(Strict):
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of the arm comparison")
    min_per_arm: int = Field(30, gt=0, description="feedback rows each arm needs before deciding")
    good_score: float = Field(0.5, ge=0, le=1, description="a score at or above this (or thumbs up) is good")
    widen_factor: float = Field(2.0, gt=1, description="a significant win multiplies the canary's weight by this")
    max_weight: float = Field(0.5, gt=0, le=1, description="a significant win at this weight promotes the canary")


class ImproveConfig(Strict):
    from_alias: str = Field("prod", description="the current version: NAME@from_alias")
    output_dir: str = "runs"
    run_name: str | None = Field(None, description="default: NAME-improve-<time stamp>")
    holdout: float = Field(0.3, gt=0, lt=1, description="share of reviewed rows held out to score both versions on")
    min_items: int = Field(4, ge=2, description="reviewed (accepted or corrected) items needed to run")
    replay_share: float = Field(0.5, ge=0, lt=1, description="share of the training rows replayed from the current "
                                "version's train split")
    seed: int = 0
    data: DataOptions = DataOptions()
    train: dict = Field({}, description="overrides of the current run's train section, e.g. {max_steps: 50, lr: 1e-4}")
    eval: dict = Field({}, description="overrides of its eval section (used for both versions)")
    gate: GateConfig = GateConfig()
    canary: CanaryConfig = CanaryConfig()
    promote: PromoteConfig = PromoteConfig()


def load_improve_config(path: str | Path | None) -> ImproveConfig:
    if path is not None and not Path(path).is_file():
        raise ConfigError([f"config file {path} does not exist"])
    raw = read_yaml(Path(path)) if path else {}
    try:
        return ImproveConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, ImproveConfig), str(path)) from None


# --- data --------------------------------------------------------------------------------------


def reviewed_rows(reg: Registry, name: str) -> tuple[list[tuple[int, dict]], dict[str, list[int]]]:
    """(item id, chat row) for every accepted or corrected item that a version of model ``name``
    answered and that is not yet in a canaried version; and the ready items left out because
    another model (or a bare base) answered them, by the version that did.

    Undecided and rejected items never come out of here: the decision is the gate into training.
    Another model's answers are not this model's to learn from, even when an A/B route put both
    behind one name. The row is the logged conversation with the reviewed answer as the last
    assistant turn."""
    out, others = [], {}
    with Session(reg.engine) as s:
        rows = s.execute(select(ReviewItem, RequestLog).join(RequestLog, RequestLog.id == ReviewItem.request_id)
                         .where(ReviewItem.decision.in_(("accept", "correct")), ReviewItem.used_in.is_(None))
                         .order_by(ReviewItem.id)).all()
        for item, log in rows:
            if not (log.version or "").startswith(f"{name}:v"):
                others.setdefault(log.version or log.model, []).append(item.id)
                continue
            answer = item.corrected if item.decision == "correct" else log.response
            if log.messages:
                messages = [{"role": m.get("role"), "content": _text(m.get("content"))} for m in log.messages]
            else:
                messages = [{"role": "user", "content": log.prompt or ""}]
            out.append((item.id, {"messages": messages + [{"role": "assistant", "content": answer or ""}]}))
    return out, others


def _text(content) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"messages": r["messages"]}, ensure_ascii=False) + "\n")


def _lines_kept(prepared: Path, split: str, source: Path) -> list[int]:
    """1-based lines of ``source`` whose rows the data stage kept in ``split`` (by their _where)."""
    kept = []
    prefix = f"{source}:"
    for line in (prepared / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
        where = json.loads(line).get("_where", "")
        if where.startswith(prefix):
            kept.append(int(where[len(prefix):]))
    return kept


def _recorded_manifest(run_dir: Path) -> str | None:
    report = Path(run_dir) / "data_report.json"
    return json.loads(report.read_text()).get("manifest_sha256") if report.is_file() else None


def export_dataset(reg: Registry, name: str, current_run: Path, cfg: ImproveConfig, work: Path,
                   console: Console) -> dict:
    """Write the improve dataset through the data stage; returns its lineage record.

    Prepared folder: train = reviewed rows + replay, validation = held-out reviewed rows (also
    the feedback evaluation set), test = the current version's test split minus any prompt
    that now appears in train."""
    run_cfg = load_run_config(Path(current_run))
    items, others = reviewed_rows(reg, name)
    if others:
        console.print(f"improve data: {sum(map(len, others.values()))} reviewed item(s) left out, answered by "
                      f"other models: " + ", ".join(f"{v} ({len(ids)})" for v, ids in others.items()))
    if len(items) < cfg.min_items:
        raise ImproveError(f"{len(items)} reviewed item(s) of {name} ready (accepted or corrected, not used yet); "
                           f"improve needs at least {cfg.min_items} (min_items). Work the queue first: "
                           f"tuneforge review --model {name}")
    # Rows with the same prompt stay on one side, so a held-out answer is not trained on.
    held, train = split_by_prompt([row | {"_item": item_id} for item_id, row in items], [cfg.holdout], cfg.seed)
    if not held or not train:
        raise ImproveError(f"{len(items)} reviewed rows cannot be split into train and a {cfg.holdout:.0%} held-out "
                           "share (too few distinct prompts): review more items or change holdout")
    current = build_splits(run_cfg.data, run_cfg.train.seed)
    recorded = _recorded_manifest(current_run)
    if recorded and recorded != current.manifest_hash():
        # The splits are re-derived from the config: changed data files give other rows, and
        # "held-out" rows might then have been trained on.
        raise ImproveError(f"the data behind {current_run} changed since it was trained (manifest {recorded[:12]} -> "
                           f"{current.manifest_hash()[:12]}): its test split is not the one it held out")
    if not current.test:
        raise ImproveError("the current version has no test split to hold out (its data.test_size is 0 and it "
                           "has no data.test files)")
    n_replay = min(round(cfg.replay_share / (1 - cfg.replay_share) * len(train)), len(current.train))
    replay = random.Random(cfg.seed).sample(current.train, n_replay)

    inputs = work / "inputs"
    files = {"feedback": inputs / "feedback.jsonl", "replay": inputs / "replay.jsonl",
             "feedback_holdout": inputs / "feedback_holdout.jsonl", "test": inputs / "test.jsonl"}
    for name, rows in (("feedback", train), ("replay", replay), ("feedback_holdout", held), ("test", current.test)):
        _write_jsonl(files[name], rows)
    prepared = work / "prepared"
    d = cfg.data
    manifest = prepare(PrepareOptions(
        inputs=[str(files["feedback"])] + ([str(files["replay"])] if replay else []),
        validation_inputs=[str(files["feedback_holdout"])], test_inputs=[str(files["test"])],
        task="sft", format="chat", clean=d.clean, pii=d.pii, dedup=d.dedup,
        split=SplitOptions(seed=cfg.seed, leakage="remove", leakage_threshold=d.leakage_threshold)),
        prepared, console, overwrite=True)  # the work folder is this job's own
    train_ids = [train[k - 1]["_item"] for k in _lines_kept(prepared, "train", files["feedback"])]
    held_ids = [held[k - 1]["_item"] for k in _lines_kept(prepared, "validation", files["feedback_holdout"])]
    if not train_ids or not held_ids:
        raise ImproveError(f"the data stage left {len(train_ids)} reviewed train row(s) and {len(held_ids)} held-out "
                           f"one(s) (see {prepared / 'report.md'}); both must be non-empty")
    splits = manifest["splits"]
    console.print(f"improve data: {len(train_ids)} reviewed + {splits['train']['rows'] - len(train_ids)} replayed "
                  f"rows to train, {len(held_ids)} reviewed held out, {splits['test']['rows']} of "
                  f"{len(current.test)} test rows kept")
    return {"prepared": str(prepared), "manifest_sha256": manifest_sha(prepared),
            "review_items_train": train_ids, "review_items_holdout": held_ids,
            "review_items_dropped": sorted({i for i, _ in items} - set(train_ids) - set(held_ids)),
            "review_items_other_models": others,  # ready, but another model answered them: never used here
            "replayed_rows": splits["train"]["rows"] - len(train_ids),
            "test_rows": {"current": len(current.test), "kept": splits["test"]["rows"]},
            "accounting": manifest["accounting"]}


def manifest_sha(prepared: Path) -> str:
    return sha256_file(prepared / MANIFEST)


# --- train --------------------------------------------------------------------------------------


def continue_config(current: VersionInfo, prepared: Path, cfg: ImproveConfig, run_dir: Path) -> RunConfig:
    """The current run's config, on the improve data, starting from its weights.

    As the sequential regime does it (train/sequence.py): same model and method options, so
    train.init_from can load the adapter; the earlier task's replay is already in the data."""
    raw = yaml.safe_load((Path(current.run_dir) / "config.yaml").read_text())
    raw["data"] = {**(raw.get("data") or {}), "train": [str(prepared)], "validation": [], "test": [], "tasks": []}
    raw["train"] = deep_merge(raw.get("train") or {}, cfg.train) | {"init_from": str(current.run_dir)}
    # The comparison that matters is against the current version (below), not the base model.
    raw["eval"] = deep_merge(raw.get("eval") or {}, {"baseline": False} | cfg.eval)
    raw["continual"] = {}
    raw |= {"output_dir": str(run_dir.parent), "run_name": run_dir.name, "parent_run": str(current.run_dir)}
    return validate_config(raw, f"improve config for {run_dir}")


# --- evaluate -----------------------------------------------------------------------------------


def score_version(run_dir: str, sets: dict[str, list[dict]], ev: EvalConfig, label: str) -> dict:
    """{set: {"n", "metric", "task", "loss"}}: the main task metric of greedy answers and the
    teacher-forced loss of the reference answers, on the same rows for every version."""
    model, tok, system_prompt, device, dtype = load_for_inference(run_dir)
    autocast = None if dtype == torch.float32 else dtype
    out = {}
    for name, rows in sets.items():
        rows = rows[: ev.limit] if ev.limit else rows
        r = evaluate_rows(model, tok, rows, ev, device=device, autocast_dtype=autocast, system_prompt=system_prompt,
                          label=f"{label} on {name}")
        convs = [with_system(row["messages"], system_prompt) for row in rows]
        loss = summarize(nll_per_row(model, answer_rows(tok, convs), tok.pad_token_id, batch_size=ev.batch_size,
                                     device=device, autocast_dtype=autocast))
        metric = next(iter(r["scores"]))
        out[name] = {"n": len(rows), "metric": metric, "task": r["scores"][metric], "loss": round(loss["loss"], 5),
                     # per row, in the same order for both versions: the gate pairs them
                     "per_example": {"task": r["per_example"][metric], "loss": loss["per_example_loss"]}}
    del model
    gc.collect()
    return out


def paired_change(current: dict, new: dict, g: GateConfig) -> dict:
    """new - current on one set's rows, signed so that positive is better (loss: current - new),
    with its paired bootstrap interval."""
    key = g.metric
    r = paired_bootstrap(current["per_example"][key], new["per_example"][key], confidence=g.confidence)
    if key == "loss":
        r = {"delta": -r["delta"], "low": -r["high"], "high": -r["low"]}
    return {"n": current["n"], "metric": current["metric"] if key == "task" else "loss",
            "delta": r["delta"], "low": r["low"], "high": r["high"]}


def gate(current: dict, new: dict, g: GateConfig) -> tuple[list[str], dict]:
    """(why the new version may not go to canary (empty: it may), the paired changes per set).
    Checks in order, per set: enough rows, then the interval (test: no worse than -tolerance;
    feedback: better than min_gain)."""
    problems, changes = [], {}
    for name, rule in (("test", "no worse"), ("feedback", "better")):
        what = "held-out test" if name == "test" else "feedback set"
        if current[name]["n"] < g.min_rows:
            problems.append(f"{what} has {current[name]['n']} rows; the gate needs {g.min_rows} (gate.min_rows) to "
                            "decide" + (": review more items" if name == "feedback" else ""))
            continue
        c = changes[name] = paired_change(current[name], new[name], g)
        figures = (f"{c['metric']} change {c['delta']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] on {c['n']} rows "
                   f"({100 * g.confidence:.0f}% paired bootstrap, positive is better)")
        if rule == "no worse" and c["low"] < -g.tolerance:
            problems.append(f"{what} is not shown to be no worse than -{g.tolerance:g}: {figures}")
        if rule == "better" and c["low"] <= g.min_gain:
            problems.append(f"{what} {c['metric']} is not shown to be better by more than {g.min_gain:g}: {figures}")
    return problems, changes


# --- the cycle ----------------------------------------------------------------------------------


def improve(reg: Registry, name: str, cfg: ImproveConfig, console: Console | None = None, force: bool = False) -> dict:
    """One improve cycle; returns the lineage record (also written to RUN/improve.json).
    ``force``: canary the new version even if the gate refuses (the refusal is recorded)."""
    console = console or Console()

    # --- setup -------------------------------------------------------------------------
    current = reg.resolve(f"{name}@{cfg.from_alias}")
    run_dir = Path(cfg.output_dir) / (cfg.run_name or f"{name}-improve-{datetime.now():%Y%m%d-%H%M%S}")
    if (run_dir / "config.yaml").exists() or (run_dir / LINEAGE).exists():
        raise FileExistsError(f"{run_dir} already holds a run; set run_name to another folder")
    claim_run_dir(run_dir)  # never a folder of someone else's: its data goes there before the run starts
    console.rule(f"improve {current.ref} -> {run_dir}")
    lineage = {"model": name, "from": current.ref, "from_run": current.run_dir, "run_dir": str(run_dir),
               "started": datetime.now().isoformat(timespec="seconds"), "config": cfg.model_dump(), "steps": []}

    # --- data --------------------------------------------------------------------------
    data = export_dataset(reg, name, Path(current.run_dir), cfg, run_dir / "improve-data", console)
    lineage["data"] = data

    # --- train (continue from the current version) ----------------------------------------
    new_cfg = continue_config(current, Path(data["prepared"]), cfg, run_dir)
    train(new_cfg, console=console)

    # --- evaluate both on the same held-out rows ---------------------------------------
    splits = load_prepared(data["prepared"], new_cfg.data)
    sets = {"test": splits.test, "feedback": splits.validation}
    scores = {"current": score_version(current.run_dir, sets, new_cfg.eval, current.ref),
              "new": score_version(str(run_dir), sets, new_cfg.eval, "new")}
    lineage["scores"] = scores
    _print_scores(scores, console)

    # --- register and gate ---------------------------------------------------------------
    version = reg.add(run_dir, name)
    lineage["version"] = version.ref
    problems, changes = gate(scores["current"], scores["new"], cfg.gate)
    for set_name, c in changes.items():
        console.print(f"gate {set_name}: {c['metric']} change {c['delta']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] "
                      f"on {c['n']} rows (positive is better)")
    if problems and not force:
        lineage["verdict"] = {"canary": False, "why": problems, "changes": changes}
        console.print(f"[yellow]{version.ref} registered but not sent to canary[/]:\n  - " + "\n  - ".join(problems))
    else:
        # forced: the refusal is kept beside the canary, in improve.json
        lineage["verdict"] = {"canary": True, "changes": changes, **({"forced": problems} if problems else {}),
                              **start_canary(reg, name, version, cfg)}
        with Session(reg.engine) as s, s.begin():
            s.execute(update(ReviewItem).where(ReviewItem.id.in_(data["review_items_train"]))
                      .values(used_in=version.ref))
        console.print(f"[bold green]{version.ref}[/] passed the gate: {lineage['verdict']['summary']}")
    write_json(run_dir / LINEAGE, lineage)
    return lineage


def start_canary(reg: Registry, name: str, version: VersionInfo, cfg: ImproveConfig) -> dict:
    c = cfg.canary
    route = c.route or name
    # Our gate (held-out and feedback) already decided; the registry's own check compares the
    # run's eval score with the previous canary's and is recorded in the history if it differs.
    moved = reg.promote(version.ref, c.alias, force=True)
    arms = [{"name": cfg.from_alias, "target": f"{name}@{cfg.from_alias}", "weight": round(1 - c.weight, 6)},
            {"name": c.alias, "target": f"{name}@{c.alias}", "weight": c.weight}]
    reg.set_route_arms(route, arms, note=f"improve: {version.ref} canary at {c.weight:.0%}", restart=True)
    return {"route": route, "arms": arms, "alias": moved,
            "summary": f"{moved}; route {route}: {c.weight:.0%} of traffic to the canary"}


def _print_scores(scores: dict, console: Console) -> None:
    t = Table(title="current vs new, same rows")
    for col in ("set", "rows", "metric", "current", "new", "loss current", "loss new"):
        t.add_column(col, justify="right" if col != "set" else "left")
    for s in scores["current"]:
        a, b = scores["current"][s], scores["new"][s]
        t.add_row(s, str(a["n"]), a["metric"], f"{a['task']:.4f}", f"{b['task']:.4f}", f"{a['loss']:.4f}",
                  f"{b['loss']:.4f}")
    console.print(t)


# --- promote after ----------------------------------------------------------------------------


def feedback_by_arm(reg: Registry, route: str, arms: dict[str, str | None], since: datetime,
                    good_score: float) -> dict[str, dict]:
    """{arm: {"n", "good"}} over feedback on the route's requests since ``since``.

    ``arms`` maps arm name -> the version it must have served (None: any), so answers from
    before an alias moved are not counted for the new version. A score counts as good at or
    above ``good_score``; thumbs up is good, thumbs down is not."""
    out = {a: {"n": 0, "good": 0} for a in arms}
    with Session(reg.engine) as s:
        rows = s.execute(select(RequestLog.arm, RequestLog.version, Feedback.score, Feedback.thumbs)
                         .join(Feedback, Feedback.request_id == RequestLog.id)
                         .where(RequestLog.route == route, RequestLog.arm.in_(list(arms)), RequestLog.at >= since))
        for arm, version, score, thumbs in rows:
            if arms[arm] is not None and version != arms[arm]:
                continue
            if score is not None:
                good = score >= good_score
            elif thumbs in ("up", "down"):
                good = thumbs == "up"
            else:
                continue  # a comment alone says nothing about quality
            out[arm]["n"] += 1
            out[arm]["good"] += int(good)
    return out


def compare_arms(canary: dict, prod: dict) -> float:
    """Two-sided p-value of Fisher's exact test: are the good-feedback shares different?"""
    table = [[canary["good"], canary["n"] - canary["good"]], [prod["good"], prod["n"] - prod["good"]]]
    return float(fisher_exact(table).pvalue)


def promote_after(reg: Registry, name: str, cfg: ImproveConfig, console: Console | None = None) -> dict:
    """Widen, promote or roll back the canary on its arm's feedback; returns the step recorded."""
    console = console or Console()
    c, p = cfg.canary, cfg.promote
    route = c.route or name
    override = reg.route_override(route)
    weights = {a["name"]: a["weight"] for a in (override or {}).get("arms", [])}
    if c.alias not in weights or cfg.from_alias not in weights:
        raise ImproveError(f"route {route} has no {c.alias} arm beside {cfg.from_alias} (start one with "
                           f"tuneforge improve {name} --config ...)")
    canary = reg.resolve(f"{name}@{c.alias}")
    stats = feedback_by_arm(reg, route, {c.alias: canary.ref, cfg.from_alias: None}, override["started"],
                            p.good_score)
    can, prod = stats[c.alias], stats[cfg.from_alias]
    rate = lambda a: a["good"] / a["n"] if a["n"] else float("nan")  # noqa: E731
    share = weights[c.alias] / sum(weights.values())
    step = {"at": datetime.now().isoformat(timespec="seconds"), "canary": canary.ref, "route": route,
            "since": override["started"].isoformat(), "weight": share,
            "feedback": {c.alias: can | {"good_rate": rate(can)}, cfg.from_alias: prod | {"good_rate": rate(prod)}}}
    if min(can["n"], prod["n"]) < p.min_per_arm:
        step |= {"action": "wait", "why": f"{can['n']} canary and {prod['n']} {cfg.from_alias} feedback rows; each arm "
                 f"needs {p.min_per_arm} (promote.min_per_arm)"}
    else:
        pvalue = compare_arms(can, prod)
        step["test"] = {"name": "Fisher's exact test (two-sided) on the good-feedback share", "p_value": pvalue,
                        "alpha": p.alpha}
        if pvalue >= p.alpha:
            step |= {"action": "wait", "why": f"no significant difference yet (p={pvalue:.3g} >= {p.alpha:g})"}
        elif rate(can) < rate(prod):
            reg.clear_route_arms(route)
            step |= {"action": "rollback", "why": f"canary good rate {rate(can):.1%} < {cfg.from_alias} "
                     f"{rate(prod):.1%} (p={pvalue:.3g}): all of route {route} back on {name}@{cfg.from_alias}"}
        elif share >= p.max_weight - 1e-9:
            moved = reg.promote(canary.ref, cfg.from_alias, force=True)
            reg.clear_route_arms(route)
            step |= {"action": "promote", "why": f"canary good rate {rate(can):.1%} > {rate(prod):.1%} "
                     f"(p={pvalue:.3g}) at {share:.0%} of traffic: {moved}"}
        else:
            new = min(share * p.widen_factor, p.max_weight)
            reg.set_route_arms(route, [{"name": cfg.from_alias, "target": f"{name}@{cfg.from_alias}",
                                        "weight": round(1 - new, 6)},
                                       {"name": c.alias, "target": f"{name}@{c.alias}", "weight": round(new, 6)}],
                               note=f"promote-after: {canary.ref} widened to {new:.0%}")
            step |= {"action": "widen", "weight_after": new, "why": f"canary good rate {rate(can):.1%} > "
                     f"{rate(prod):.1%} (p={pvalue:.3g}): canary share {share:.0%} -> {new:.0%}"}
    _append_step(Path(canary.run_dir), step)
    console.print(f"[bold]{step['action']}[/]: {step['why']}")
    return step


def _append_step(run_dir: Path, step: dict) -> None:
    path = run_dir / LINEAGE
    record = json.loads(path.read_text()) if path.is_file() else {"steps": []}
    record.setdefault("steps", []).append(step)
    write_json(path, record)
