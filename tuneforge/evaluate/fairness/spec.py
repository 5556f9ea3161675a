"""``--fairness SPEC``: comma-separated ``key=value`` items, several values joined by ``+``.

    group=dialect              slice by a column of the test rows (repeat, or dialect+region)
    group=terms:names          slice by the group of a term list the prompt mentions
    swap=names+pronouns        counterfactual probes with these term lists
    probes=bbq+crows           built-in probe sets (probes=none: none)
    terms=my_terms.yaml        your term lists (LIST: {group: [terms]}), added to eval.fairness.terms
    rows=32                    counterfactual rows per list (eval.fairness.counterfactual_rows)
    default                    the quick-start set: group=terms:names, swap=names, probes=bbq+crows
    none                       no fairness evaluation (even if the run's config has one)

The SPEC replaces the run's eval.fairness groups, swap and probes that it names; its term
lists are added to the config's."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from tuneforge.config import ConfigError, FairnessConfig

KEYS = {"group": "groups", "swap": "swap", "probes": "probes", "terms": "terms", "rows": "counterfactual_rows"}
DEFAULT = FairnessConfig(groups=["terms:names"], swap=["names"], probes=["bbq", "crows"])


class SpecError(ConfigError):
    """A SPEC the eval cannot run (the CLI reports it in one line, as a config problem)."""

    def __init__(self, problem: str):
        super().__init__([problem], "--fairness")


def _read_terms(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"--fairness terms={path}: no such file (a YAML file of LIST: {{group: [terms]}})")
    data = yaml.safe_load(p.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise SpecError(f"--fairness terms={path}: expected a mapping LIST: {{group: [terms]}}")
    return data


def parse_spec(spec: str, base: FairnessConfig | None) -> FairnessConfig | None:
    """The fairness settings of one eval: ``spec`` applied over the run's config (``base``)."""
    spec = spec.strip()
    if spec == "none":
        return None
    update: dict = {}
    terms = dict(base.terms) if base else {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item == "default":
            update |= {k: getattr(DEFAULT, k) for k in ("groups", "swap", "probes")}
            continue
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS or not value:
            raise SpecError(f"--fairness: cannot read '{item}': items are KEY=VALUE with KEY one of "
                            f"{', '.join(KEYS)} (or 'default', 'none'); e.g. group=dialect,swap=pronouns,probes=bbq")
        field = KEYS[key]
        if key == "terms":
            terms |= _read_terms(value)
        elif key == "rows":
            update[field] = value
        elif key == "probes" and value == "none":
            update[field] = []
        else:
            update[field] = [*update.get(field, []), *(v for v in value.split("+") if v)]
    fields = (base.model_dump() if base else {}) | update | {"terms": terms}
    try:
        return FairnessConfig(**fields)
    except ValidationError as e:
        raise SpecError("--fairness " + spec + ": " + "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from e
