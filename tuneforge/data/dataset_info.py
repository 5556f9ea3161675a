"""LLaMA-Factory's ``dataset_info.json``: a data spec ``path/to/dataset_info.json#NAME`` reads
the named dataset as LLaMA-Factory would.

An entry names its data (``file_name`` relative to the json's folder, a file or a folder;
or ``hf_hub_url`` with ``subset``/``split``), its ``formatting`` (alpaca | sharegpt),
``ranking`` (preference pairs), ``columns`` (LLaMA-Factory's field names -> the file's
columns) and, for sharegpt, ``tags`` (message keys and role names). These map onto
tuneforge's format, ``data.columns`` and ``data.messages`` (MessagesOptions), so the usual
converters read the rows: nothing here knows a row shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.config import MessagesOptions

NAME = "dataset_info.json"
# LLaMA-Factory column name -> tuneforge format field, per formatting.
ALPACA_FIELDS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                 "history": "history"}
SHAREGPT_FIELDS = {"system": "system", "tools": "tools", "chosen": "chosen", "rejected": "rejected",
                   "kto_tag": "kto_tag"}
MEDIA = ("images", "videos", "audios")
ONLY_OTHER_HUBS = ("ms_hub_url", "script_url", "om_hub_url")
# LLaMA-Factory's tag defaults for sharegpt (its DatasetAttr).
TAG_DEFAULTS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
TAG_ROLES = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "tool",
             "function_tag": "tool_call", "system_tag": "system"}


class DatasetInfoError(ValueError):
    pass


@dataclass
class Resolved:
    """What ``file#NAME`` reads: files (or hub rows) and how to read them."""
    name: str
    paths: list[str]
    format: str
    columns: dict[str, str]
    messages: MessagesOptions | None
    rows: list[dict] | None = None  # rows from the hub (hf_hub_url)
    # The conversation alone, as plain sharegpt rows: what an sft objective reads of a KTO or
    # ranking entry (its kto_tag/chosen/rejected columns are then refused, or ignored if asked).
    plain_columns: dict[str, str] = field(default_factory=dict)


def is_dataset_info(path: Path) -> bool:
    return path.name == NAME and path.is_file()


def _entries(path: Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DatasetInfoError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise DatasetInfoError(f"{path}: expected LLaMA-Factory's {{NAME: {{file_name, formatting, ...}}}} object")
    return info


def names_error(path: Path) -> str:
    names = ", ".join(sorted(_entries(path))) or "(none)"
    return (f"{path}: this is a LLaMA-Factory dataset_info.json: pick a dataset with path#NAME "
            f"(names: {names})")


def split_spec(spec: str) -> tuple[Path, str] | None:
    """``(json path, NAME)`` for ``.../dataset_info.json#NAME``; None for any other spec."""
    path, sep, name = spec.partition("#")
    if not sep or Path(path).name != NAME:
        return None
    return Path(path), name


def _format(entry: dict, where: str) -> tuple[str, dict]:
    """The tuneforge format and columns of an entry."""
    formatting = entry.get("formatting", "alpaca")
    cols = entry.get("columns") or {}
    media = [m for m in MEDIA if m in cols]
    if media:
        raise DatasetInfoError(f"{where}: columns.{media[0]} holds {media[0]}: tuneforge does not train vision "
                               "or audio yet (pick a text-only dataset)")
    ranking, kto = bool(entry.get("ranking")), "kto_tag" in cols
    if formatting == "alpaca":
        if ranking or kto:
            raise DatasetInfoError(f"{where}: alpaca rows with {'ranking' if ranking else 'kto_tag'} are not "
                                   "supported yet; use the sharegpt formatting")
        return "instruction", {ALPACA_FIELDS[k]: v for k, v in cols.items() if k in ALPACA_FIELDS}
    if formatting != "sharegpt":
        raise DatasetInfoError(f"{where}: formatting {formatting!r} is not alpaca or sharegpt")
    unknown = sorted(set(cols) - set(SHAREGPT_FIELDS) - {"messages"})
    if unknown:
        raise DatasetInfoError(f"{where}: columns {unknown} are not LLaMA-Factory sharegpt columns tuneforge reads")
    messages = cols.get("messages", "conversations")
    out = {SHAREGPT_FIELDS[k]: v for k, v in cols.items() if k in SHAREGPT_FIELDS}
    if kto:
        return "kto", {**out, "messages": messages}
    if ranking:
        return "sharegpt_preference", {**out, "conversations": messages}
    return "sharegpt", {**out, "conversations": messages}


def _messages(entry: dict) -> MessagesOptions | None:
    if entry.get("formatting", "alpaca") != "sharegpt":
        return None
    tags = {**TAG_DEFAULTS, **(entry.get("tags") or {})}
    roles: dict[str, list[str]] = {}
    for tag, role in TAG_ROLES.items():
        roles.setdefault(role, []).append(tags[tag])
    return MessagesOptions(role_key=tags["role_tag"], content_key=tags["content_tag"], roles=roles)


def _hub_rows(entry: dict, where: str) -> list[dict]:
    from datasets import load_dataset  # deferred: heavy, and only hub entries need it

    url = entry["hf_hub_url"]
    try:
        ds = load_dataset(url, name=entry.get("subset"), split=entry.get("split") or "train")
    except Exception as e:  # noqa: BLE001 - the hub raises many types; the message is what matters
        raise DatasetInfoError(f"{where}: could not load {url} from the Hugging Face hub ({type(e).__name__}: "
                               f"{e}); download it and point file_name at the files instead") from None
    return list(ds)


def resolve(spec: str) -> Resolved | None:
    """The dataset ``file#NAME`` names, or None when ``spec`` is not such a spec."""
    parts = split_spec(spec)
    if parts is None:
        return None
    path, name = parts
    if not path.is_file():
        raise DatasetInfoError(f"{path} does not exist (working directory: {Path.cwd()})")
    entries = _entries(path)
    if name not in entries:
        raise DatasetInfoError(f"{path}: no dataset named {name!r} (names: {', '.join(sorted(entries))})")
    entry, where = entries[name], f"{path}#{name}"
    fmt, columns = _format(entry, where)
    plain = {k: v for k, v in columns.items() if k in ("system", "tools")}
    plain["conversations"] = columns.get("conversations", columns.get("messages", "conversations"))
    if entry.get("file_name"):
        target = path.parent / entry["file_name"]
        if not target.exists():
            raise DatasetInfoError(f"{where}: file_name {entry['file_name']!r} -> {target} does not exist")
        return Resolved(name, [str(target)], fmt, columns, _messages(entry), plain_columns=plain)
    if entry.get("hf_hub_url"):
        return Resolved(name, [], fmt, columns, _messages(entry), rows=_hub_rows(entry, where), plain_columns=plain)
    other = [k for k in ONLY_OTHER_HUBS if entry.get(k)]
    if other:
        raise DatasetInfoError(f"{where}: only {other[0]} is given; tuneforge reads file_name or hf_hub_url "
                               f"(download the data and set file_name)")
    raise DatasetInfoError(f"{where}: the entry names no data (file_name or hf_hub_url)")
