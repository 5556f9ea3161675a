"""The New run form: form fields (+ any further YAML) -> a raw run config, checked by the
same validator as `tuneforge check` (plugins.validate_config), each problem placed at the
field it names; then the memory/time plan (tuneforge.plan, no weights loaded) and the
equivalent YAML and command line."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

import yaml

from tuneforge.config import ConfigError, deep_merge
from tuneforge.plugins import validate_config

# The form's own inputs: dotted config key -> (label, type). Every other key goes in the YAML box.
FIELDS: dict[str, tuple[str, type]] = {
    "run_name": ("run name", str),
    "model.name": ("base model", str),
    "data.train": ("training data (one per line)", list),
    "method.name": ("method", str),
    "objective.name": ("objective", str),
    "train.lr": ("learning rate", float),
    "train.max_steps": ("max steps", int),
    "train.epochs": ("epochs", float),
    "train.batch_size": ("batch size", int),
    "data.max_length": ("max length (tokens)", int),
}
EXTRA = "extra_yaml"  # the free YAML box: any key of docs/config.md
AUTO = "auto"  # the "auto: decide from the data" box: `auto: all` for every knob the form leaves empty
# Fields that take "auto" (train/auto.py decides them from the data, with its reason).
AUTO_FIELDS = ("train.lr", "train.epochs", "train.batch_size", "data.max_length")


def suggestions() -> dict[str, list[str]]:
    """Choices offered under the text fields (an HTML datalist: typing anything else stays
    possible, e.g. a hub id or a file path; the validator checks it): the registered methods
    and objectives (plug-ins included), the embedded causal LMs, the built-in datasets."""
    # deferred: the method/objective registries import torch; only the form page needs them
    from tuneforge.data.builtin import GENERATORS
    from tuneforge.methods import METHODS
    from tuneforge.models.zoo import EMBEDDED
    from tuneforge.objectives import OBJECTIVES

    return {"method.name": sorted(METHODS), "objective.name": sorted(OBJECTIVES),
            "model.name": [a for a, e in EMBEDDED.items() if e.kind == "causal-lm"],
            "data.train": [f"builtin:{g}" for g in sorted(GENERATORS)]}
_KEY = re.compile(r"'([A-Za-z_][\w]*(?:\.[\w]+)*)'")


@dataclass
class Checked:
    raw: dict
    problems: list[dict] = field(default_factory=list)  # {"field": form field or "extra_yaml" or "", "message"}
    config: object = None  # the validated RunConfig

    @property
    def ok(self) -> bool:
        return not self.problems


def _set(raw: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for p in path:
        raw = raw.setdefault(p, {})
    raw[last] = value


def _value(key: str, text: str):
    kind = FIELDS[key][1]
    if key in AUTO_FIELDS and text.strip().lower() == "auto":
        return "auto"  # config.expand_auto turns it into the knob
    if kind is list:
        return [x.strip() for x in text.splitlines() if x.strip()]
    if kind is str:
        return text.strip()
    try:
        return kind(text) if kind is float else int(text)
    except ValueError:
        return text.strip()  # the validator says what is wrong with it, at this field


def form_to_raw(form: dict[str, str]) -> tuple[dict, list[dict]]:
    """The raw config of a form (blank fields left to the defaults; with the auto box ticked,
    to auto), and the problems of the YAML box and the auto box."""
    problems, raw = [], {}
    extra = (form.get(EXTRA) or "").strip()
    if extra:
        try:
            loaded = yaml.safe_load(extra)
        except yaml.YAMLError as e:
            loaded, problems = {}, [{"field": EXTRA, "message": f"not YAML: {str(e).splitlines()[0]}"}]
        if not isinstance(loaded, dict):
            problems = problems or [{"field": EXTRA, "message": "must be a mapping of config keys (key: value)"}]
            loaded = {}
        raw = loaded
    given: dict = {}
    for key in FIELDS:
        text = str(form.get(key) or "")
        if text.strip():
            _set(given, key, _value(key, text))
    if str(form.get(AUTO) or "").lower() in ("true", "on", "1"):
        if "auto" in raw:  # two answers to one question: neither is dropped silently
            problems.append({"field": AUTO, "message": f"the YAML box sets auto: {raw['auto']!r} too: untick "
                                                       "the box or remove auto from the YAML"})
        else:
            given["auto"] = "all"
    return deep_merge(raw, given), problems


def field_of(message: str) -> str:
    """The form field a validator message is about ('' when none: shown above the form)."""
    for section in ("method", "objective"):  # plugins.name_problem: "unknown method 'lorra': ..."
        if message.startswith((f"unknown {section} ", f"'{section}.name'")):
            return f"{section}.name"
    for key in _KEY.findall(message):
        if key in FIELDS:
            return key
        if message.endswith("is required"):  # "'data' is required": its first input (data.train)
            inside = [f for f in FIELDS if f.startswith(key + ".")]
            if inside:
                return inside[0]
        for f in FIELDS:  # 'method.r' belongs to the method's options: the YAML box holds them
            if key.startswith(f + "."):
                return f
        if "." in key or key in ("model", "data", "method", "objective", "train", "eval"):
            return EXTRA
    return ""


def check(form: dict[str, str]) -> Checked:
    raw, problems = form_to_raw(form)
    out = Checked(raw=raw, problems=problems)
    try:
        out.config = validate_config(raw, "the form")
    except ConfigError as e:
        out.problems += [{"field": field_of(p), "message": p} for p in e.problems]
    return out


def equivalents(raw: dict) -> dict:
    """The YAML to save and the commands that check, plan and train it."""
    text = yaml.safe_dump(raw, sort_keys=False) if raw else "{}\n"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(raw.get("run_name") or "run"))
    path = shlex.quote(f"{name}.yaml")
    return {"yaml": text, "file": f"{name}.yaml",
            "cli": [f"tuneforge check {path}", f"tuneforge plan {path}", f"tuneforge train {path}"]}


def plan_summary(cfg) -> dict:
    """tuneforge.plan for the configured method (and its comparisons), as plain numbers; with
    ``auto``, of the values auto decides from the data, which are listed with their reasons
    (what `tuneforge plan` prints)."""
    # deferred: plan imports torch and transformers (seconds); only a valid config gets here
    from tuneforge.hardware import pick_device
    from tuneforge.plan import GB, fits, plan, run_steps, step_seconds
    from tuneforge.train import auto

    decisions = []
    if cfg.auto:
        cfg, decisions, _ = auto.resolve(cfg, list(cfg.auto), pick_device(cfg.train.device))
    p = plan(cfg)
    ckpt = cfg.train.gradient_checkpointing
    rows = []
    for label, e in p["rows"].items():
        step_s = step_seconds(e, p, cfg)
        rows.append({"method": label, "trainable": e.trainable, "total": e.total,
                     "peak_gb": round(e.peak(ckpt) / GB, 3), "step_s": step_s, "fits": fits(e, p["memory"], ckpt)})
    steps = run_steps(cfg, p["shape"].mean)
    first = rows[0] if rows else None
    return {"device": p["device"], "dtype": str(p["dtype"]).replace("torch.", ""), "batch": p["batch"],
            "seq": p["seq"], "memory": [{"name": m.name, "free_gb": round(m.free / GB, 2),
                                         "total_gb": round(m.total / GB, 2)} for m in p["memory"]],
            "rows": rows, "steps": steps,
            "auto": [{"setting": d.key, "value": d.value, "why": d.reason} for d in decisions],
            "total_s": first["step_s"] * steps if first and first["step_s"] and steps else None}
