"""Write docs/config.md, the config reference, from the pydantic models themselves.

One table per section of the run config, per method's options, per objective's options
and per part of serve.yaml: every field with its dotted key, type, default and description.

    python scripts/config_reference.py          # rewrite docs/config.md
    python scripts/config_reference.py --check  # exit 1 when docs/config.md is out of date (a test runs this)
"""

from __future__ import annotations

import importlib
import json
import re
import sys
import types
import typing
from pathlib import Path

import annotated_types
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

# Where the documented names live: (module, attribute). Modules move during refactors;
# update this list and nothing else. No import is guarded: a moved name must fail loudly.
SOURCES = {
    "run": ("tuneforge.config", "RunConfig"),
    "methods": ("tuneforge.methods", "METHODS"),
    "objectives": ("tuneforge.objectives", "OBJECTIVES"),
    "serve": ("tuneforge.deploy.config", "ServeConfig"),
}

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "config.md"
FIX = "python scripts/config_reference.py"


def load(what: str):
    module, name = SOURCES[what]
    return getattr(importlib.import_module(module), name)


# --- types, defaults, constraints as text ---------------------------------------------


def _is_model(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def type_text(tp) -> str:
    if tp is type(None) or tp is None:
        return "None"
    if tp is typing.Any:
        return "any"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin is typing.Annotated:
        return type_text(args[0])
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_text(a) for a in args)}]" if args else name
    if _is_model(tp):
        return tp.__name__
    return getattr(tp, "__name__", str(tp))


def _plain(value):
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def default_text(field) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is PydanticUndefined:
        return "required"
    value = _plain(value)
    if isinstance(value, BaseModel) or (isinstance(value, dict) and len(json.dumps(value)) > 60):
        return "see below"
    return "`" + json.dumps(value) + "`"


_BOUNDS = [(annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="),
           (annotated_types.Lt, "lt", "<"), (annotated_types.Le, "le", "<=")]


def constraints_text(field) -> str:
    out = []
    for meta in field.metadata:
        for cls, attr, sign in _BOUNDS:
            if isinstance(meta, cls):
                out.append(f"{sign} {getattr(meta, attr)}")
        if isinstance(meta, annotated_types.MinLen):
            out.append(f"at least {meta.min_length} item(s)")
        if isinstance(meta, annotated_types.MaxLen):
            out.append(f"at most {meta.max_length} item(s)")
        pattern = getattr(meta, "pattern", None)
        if isinstance(pattern, str):
            out.append(f"matches `{pattern}`")
    return ", ".join(out)


def cell(text: str) -> str:
    return re.sub(r"\s+", " ", text).replace("|", "\\|").strip()


def doc_line(cls) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    return re.sub(r"\s+", " ", doc.strip().split("\n\n")[0]).replace("``", "`").strip()


# --- tables ----------------------------------------------------------------------------


def nested_models(tp) -> list[tuple[str, type[BaseModel]]]:
    """Models reachable in an annotation, with the key suffix that reaches them:
    ``X`` -> "", ``list[X]`` -> "[]", ``dict[str, X]`` -> ".NAME"."""
    if _is_model(tp):
        return [("", tp)]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple, set):
        return [("[]" + s, m) for a in args for s, m in nested_models(a)]
    if origin is dict and len(args) == 2:
        return [(".NAME" + s, m) for s, m in nested_models(args[1])]
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        return [x for a in args for x in nested_models(a)]
    return []


def table(prefix: str, model: type[BaseModel], fields: list[str] | None = None) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if fields is not None and name not in fields:
            continue
        description = field.description or ""
        bounds = constraints_text(field)
        if bounds:
            description = f"{description} ({bounds})" if description else bounds
        rows.append(f"| `{prefix}{name}` | `{cell(type_text(field.annotation))}` | {default_text(field)} "
                    f"| {cell(description)} |")
    return rows


def sections(prefix: str, model: type[BaseModel], level: int, optional: bool = False) -> list[str]:
    """A table for ``model``'s fields, then one section for each model nested in it."""
    out = [f"{'#' * level} `{prefix.rstrip('.')}` ({model.__name__})", ""]
    if doc_line(model):
        out += [doc_line(model), ""]
    if optional:
        out += ["Optional: absent (`null`) by default, which leaves it off.", ""]
    out += table(prefix, model) + [""]
    out += nested_sections(prefix, model, level + 1)
    return out


def nested_sections(prefix: str, model: type[BaseModel], level: int) -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        optional = not field.is_required() and field.default is None
        for suffix, sub in nested_models(field.annotation):
            out += sections(f"{prefix}{name}{suffix}.", sub, level, optional)
    return out


def render() -> str:
    run, methods, objectives, serve = (load(k) for k in ("run", "methods", "objectives", "serve"))
    out = [
        "# Config reference",
        "",
        "Generated from the pydantic models by `python scripts/config_reference.py`; do not edit by hand",
        "(`python scripts/config_reference.py --check` fails when this file is out of date).",
        "Keys are dotted as on the command line (`tuneforge train CONFIG train.lr=1e-4`);",
        "`[]` marks an item of a list, `NAME` a key of your choosing. Unknown keys are errors.",
        "",
        "## Run config (`tuneforge train CONFIG`)",
        "",
    ]
    top = [n for n, f in run.model_fields.items() if not nested_models(f.annotation)]
    out += ["### Top level", ""] + table("", run, top) + [""]
    out += ["`method` and `objective` take a `name` plus that plug-in's options (tables below).", ""]
    out += nested_sections("", run, 3)

    out += ["## Methods (`method:`)", "", "`method.name` picks one; its options are below.", ""]
    nested: dict[type, tuple] = {}  # option blocks inside method options (method.moe), each shown once
    for name in sorted(methods):
        out += [f"### `method.name: {name}`", ""] + table("method.", methods[name].options) + [""]
        for field_name, field in methods[name].options.model_fields.items():
            for suffix, sub in nested_models(field.annotation):
                nested.setdefault(sub, (f"method.{field_name}{suffix}.", field.default is None))
    for sub, (prefix, optional) in nested.items():
        out += sections(prefix, sub, 3, optional)

    out += ["## Objectives (`objective:`)", "", "`objective.name` picks one; its options are below.", ""]
    for name in sorted(objectives):
        out += [f"### `objective.name: {name}`", ""] + table("objective.", objectives[name].options) + [""]

    out += ["## Serve config (`tuneforge serve --config serve.yaml`)", ""]
    top = [n for n, f in serve.model_fields.items() if not nested_models(f.annotation)]
    out += ["### Top level", ""] + table("", serve, top) + [""]
    out += nested_sections("", serve, 3)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if OUT.exists() and OUT.read_text() == text:
            return 0
        print(f"{OUT.relative_to(ROOT)} is out of date: run {FIX}")
        return 1
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
