"""Rows with images (vision-language SFT): the two shapes people bring, validated per row.

- ShareGPT / LLaVA: ``conversations=[{from, value}]`` with ``<image>`` markers in the turns, and
  the images in ``image`` (one, LLaVA) or ``images`` (a list, LLaMA-Factory); the markers and
  the images must match one for one, in order.
- OpenAI chat: ``messages=[{role, content}]`` where a content may be a list of parts:
  ``{"type": "text", "text"}`` and ``{"type": "image_url", "image_url": {"url"}}`` (also
  ``{"type": "image", "image": ...}``, transformers' spelling).

An image is a file path (relative paths are read relative to the data file), a ``data:`` URI or
bare base64. Every image is opened with Pillow while the row is validated, so a missing or
unreadable image drops its row with a ``RowError`` naming the field and the path; the load
report prints it as ``data-file:line field 'images[0]': ...``, counts it, and ``--strict`` stops
on it. Remote URLs are refused (nothing is fetched).

Canonical vision row (kind ``vision``): ``{"messages": [{"role", "content": [parts]}]}``, every
content a list of ``{"type": "text", "text"}`` and ``{"type": "image", "image": ref}`` parts
(``ref``: an absolute path or a ``data:`` URI), so a chat template of any VLM family renders
it and the held-out split keeps rows with different images apart.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path

from tuneforge.data.errors import RowError
from tuneforge.data.formats import Format, register_format

IMAGE_MARKER = "<image>"
ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user", "assistant": "assistant",
         "gpt": "assistant", "bot": "assistant", "model": "assistant"}
_B64 = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}$")


# --- one image reference -> a checked reference ---------------------------------------------


def _base_dir(row: dict) -> Path:
    """The folder relative image paths are read from: the data file's (``_source``, set by the
    loader for formats that ask for it), else the working directory."""
    source = row.get("_source") or ""
    p = Path(re.sub(r"\[[^\]]*\]$", "", source))  # a saved datasets folder's "path[split]"
    if source and not source.startswith("builtin:"):
        return (p.parent if p.suffix else p).resolve()
    return Path.cwd()


def _decode(ref: str, field: str) -> tuple[bytes, str]:
    """(bytes, how to name it in errors) of a data: URI or bare base64."""
    payload = ref.split(",", 1)[1] if ref.startswith("data:") else ref
    if ref.startswith("data:") and ";base64" not in ref.split(",", 1)[0]:
        raise RowError(field, f"data URI {ref[:40]!r}... is not base64 (use data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=False), f"base64 image of {len(payload)} characters"
    except (binascii.Error, ValueError) as e:
        raise RowError(field, f"base64 image ({len(payload)} characters) does not decode: {e}") from None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system: base64 text
        return False


def check_image(ref, field: str, base: Path) -> str:
    """The canonical reference of one image (absolute path or data: URI), after Pillow has
    opened it; a RowError naming the path otherwise."""
    from PIL import Image, UnidentifiedImageError  # deferred: only image rows need Pillow

    if isinstance(ref, dict):  # {"url": ...} / {"path": ...} / {"bytes": b"..."} (datasets' Image feature)
        ref = ref.get("url") or ref.get("path") or ref.get("bytes")
    if isinstance(ref, (bytes, bytearray)):
        ref = "data:image;base64," + base64.b64encode(ref).decode()
    if not isinstance(ref, str) or not ref.strip():
        raise RowError(field, f"expected an image path, data: URI or base64 text, got {type(ref).__name__}")
    ref = ref.strip()
    if ref.startswith(("http://", "https://")):
        raise RowError(field, f"remote image {ref} is not fetched: download it and give its path")
    path = None
    if not ref.startswith("data:"):
        path = Path(ref[len("file://"):] if ref.startswith("file://") else ref).expanduser()
        path = path if path.is_absolute() else base / path
        # Bare base64 (no data: prefix) is told from a path by its shape, when no such file exists.
        if not _is_file(path) and len(ref) >= 64 and len("".join(ref.split())) % 4 == 0 and _B64.match(ref):
            path = None
    inline = path is None
    if inline:
        data, name = _decode(ref, field)
    else:
        name = str(path)
        if not _is_file(path):
            raise RowError(field, f"missing image file '{path}' (relative paths are read from the data file's "
                                  f"folder, {base})")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise RowError(field, f"unreadable image file '{path}' ({e.strerror or e})") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()  # reads the whole file: a truncated image fails here, not in the middle of training
            fmt = (img.format or "png").lower()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise RowError(field, f"unreadable image '{name}': Pillow cannot open it ({type(e).__name__})") from None
    if inline:
        payload = ref.split(",", 1)[1] if ref.startswith("data:") else ref
        return f"data:image/{fmt};base64,{''.join(payload.split())}"
    return str(path.resolve())


def open_image(ref: str):
    """A checked reference (``check_image``) -> an RGB PIL image."""
    from PIL import Image  # deferred: only image rows need Pillow

    if ref.startswith("data:"):
        img = Image.open(io.BytesIO(base64.b64decode(ref.split(",", 1)[1])))
    else:
        img = Image.open(ref)
    return img.convert("RGB")


def row_images(row: dict) -> list[str]:
    """The image references of a canonical vision row, in the order they appear."""
    return [p["image"] for m in row["messages"] if isinstance(m["content"], list)
            for p in m["content"] if p.get("type") == "image"]


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """data.system_prompt as the first turn of a vision conversation that has none."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}, *messages]
    return messages


def n_images(messages: list[dict]) -> int:
    return sum(1 for m in messages if isinstance(m["content"], list) for p in m["content"] if p.get("type") == "image")


# --- conversations -> canonical messages -----------------------------------------------------


def _check(messages: list[dict], field: str) -> list[dict]:
    if not messages:
        raise RowError(field, "empty conversation")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and any(p["type"] == "image" for p in m["content"]):
            raise RowError(f"{field}[{i}]", "an image in an assistant turn: images are inputs (user turns), "
                                            "never targets")
    last = messages[-1]
    if last["role"] != "assistant":
        raise RowError(field, "conversation does not end with an assistant turn")
    if not "".join(p.get("text", "") for p in last["content"]).strip():
        raise RowError(f"{field}[{len(messages) - 1}]", "empty response")
    return messages


def _role(m: dict, key: str, field: str) -> str:
    role = m.get(key)
    if not isinstance(role, str) or role.lower() not in ROLES:
        raise RowError(f"{field}.{key}", f"unknown role {role!r} (known: {sorted(set(ROLES))}; tool turns are not "
                                         "trained with images)")
    return ROLES[role.lower()]


def _text_with_markers(text: str, images: list[str], used: list[int]) -> list[dict]:
    """``"<image>\\nWhat is it?"`` -> image and text parts, taking the row's images in order."""
    parts = []
    for k, chunk in enumerate(text.split(IMAGE_MARKER)):
        if k:
            parts.append({"type": "image", "image": images[used[0]]})
            used[0] += 1
        if chunk.strip():
            parts.append({"type": "text", "text": chunk.strip("\n") if k or chunk.endswith("\n") else chunk})
    return parts


def _sharegpt_vision(row: dict, columns: dict) -> dict:
    """LLaVA / LLaMA-Factory rows: conversations with <image> markers + image | images."""
    field = columns.get("conversations", "conversations")
    turns = row.get(field)
    if not isinstance(turns, list):
        raise RowError(field, "missing" if turns is None else f"expected a list, got {type(turns).__name__}")
    key = next((columns.get(k, k) for k in ("images", "image") if row.get(columns.get(k, k)) is not None),
               columns.get("images", "images"))
    raw = row.get(key)
    raw = [] if raw is None else raw if isinstance(raw, list) else [raw]
    base = _base_dir(row)
    images = [check_image(ref, f"{key}[{i}]" if isinstance(row.get(key), list) else key, base)
              for i, ref in enumerate(raw)]
    texts = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RowError(f"{field}[{i}]", f"expected a message object, got {type(t).__name__}")
        rk, ck = ("from", "value") if "from" in t else ("role", "content")
        if not isinstance(t.get(ck), str):
            raise RowError(f"{field}[{i}].{ck}", f"expected str, got {type(t.get(ck)).__name__}")
        texts.append((_role(t, rk, f"{field}[{i}]"), t[ck]))
    markers = sum(text.count(IMAGE_MARKER) for _, text in texts)
    if markers != len(images):
        raise RowError(field, f"{IMAGE_MARKER} markers do not match the images: {markers} in the turns, "
                              f"{len(images)} in '{key}' (each image needs one {IMAGE_MARKER} where it goes)")
    used = [0]
    msgs = [{"role": role, "content": _text_with_markers(text, images, used)} for role, text in texts]
    system = row.get(columns.get("system", "system"))
    if isinstance(system, str) and system.strip() and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return {"messages": _check(msgs, field)}


def _openai_vision(row: dict, columns: dict) -> dict:
    """OpenAI chat rows whose contents may hold image_url parts."""
    field = columns.get("messages", "messages")
    turns = row.get(field)
    if not isinstance(turns, list):
        raise RowError(field, "missing" if turns is None else f"expected a list, got {type(turns).__name__}")
    base = _base_dir(row)
    msgs = []
    for i, m in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise RowError(where, f"expected a message object, got {type(m).__name__}")
        role, content = _role(m, "role", where), m.get("content")
        if isinstance(content, str):
            if IMAGE_MARKER in content:
                raise RowError(f"{where}.content", f"a {IMAGE_MARKER} marker in an OpenAI-style message: give the "
                                                   "image as an image_url content part instead")
            msgs.append({"role": role, "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise RowError(f"{where}.content", f"expected str or a list of parts, got {type(content).__name__}")
        parts = []
        for j, p in enumerate(content):
            pw = f"{where}.content[{j}]"
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text" and isinstance(p.get("text"), str):
                parts.append({"type": "text", "text": p["text"]})
            elif kind == "image_url":
                url = p.get("image_url")
                ref = url.get("url") if isinstance(url, dict) else url
                parts.append({"type": "image", "image": check_image(ref, f"{pw}.image_url", base)})
            elif kind == "image":
                ref = p.get("image", p.get("url", p.get("path")))
                parts.append({"type": "image", "image": check_image(ref, f"{pw}.image", base)})
            else:
                raise RowError(pw, f"unknown content part {kind or type(p).__name__!r} (text, image_url, image)")
        msgs.append({"role": role, "content": parts})
    return {"messages": _check(msgs, field)}


register_format(Format("vision_sharegpt", ("conversations",), _sharegpt_vision,
                       "ShareGPT/LLaVA with images: conversations=[{from, value}] with <image> markers, "
                       "image | images (paths relative to the data file, data: URIs or base64), system?",
                       kind="vision", optional=("image", "images", "system", "id"), wants_source=True))
register_format(Format("vision_chat", ("messages",), _openai_vision,
                       "OpenAI chat with images: messages=[{role, content: str | [text and image_url parts]}]",
                       kind="vision", optional=("id",), wants_source=True))
