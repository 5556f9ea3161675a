"""Atomic writes: a reader never sees a half-written checkpoint, adapter or manifest."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


class OutputRefused(FileExistsError):
    """An output folder tuneforge may not write: it holds what tuneforge did not make, or an input."""


def check_output(target: Path, owned: Callable[[Path], bool] | None, *, overwrite: bool = True,
                 what: str = "output folder", inputs: Iterable[str | Path] = ()) -> None:
    """Refuse to replace ``target`` unless it is missing, an empty folder, or a folder
    ``owned`` proves tuneforge made (and ``overwrite`` allows replacing it); refuse any
    output that is, contains or lies inside one of ``inputs`` (even with overwrite).
    Tuneforge never deletes what it did not create."""
    target = Path(target)
    out = target.resolve()
    for src in inputs:
        src = Path(src).resolve()
        if out == src or out in src.parents or src in out.parents:
            relation = "is" if out == src else "contains" if out in src.parents else "lies inside"
            raise OutputRefused(f"{target}: the {what} {relation} the input {src}; writing it would destroy "
                                f"the input. Pick an output outside the inputs")
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir() or target.is_symlink():
        raise OutputRefused(f"{target} exists and is not a folder; pick a new or empty folder for the {what}")
    if not any(target.iterdir()):
        return
    if owned is None or not owned(target):
        raise OutputRefused(f"{target} holds files tuneforge did not write (it is not a {what} tuneforge made); "
                            f"pick a new or empty folder. Nothing was deleted: --overwrite replaces only a "
                            f"folder tuneforge made")
    if not overwrite:
        raise OutputRefused(f"{target} already holds a {what}; pass --overwrite to replace it")


class DiskFullError(OSError):
    """A write ran out of space; the message names the device, the path and the space needed."""

    def __str__(self) -> str:
        return self.strerror


# What torch.save (RuntimeError) and safetensors (SafetensorError, an Exception) raise when a
# write comes up short: their writers do not pass the OSError on.
_SHORT_WRITE = ("unexpected pos", "no space left", "file write failed", "enospc", "storagefull",
                "disk quota exceeded")


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, Exception) and any(s in str(e).lower() for s in _SHORT_WRITE)


def mount_point(path: Path) -> Path:
    p = Path(path).resolve()
    while not p.exists() or not os.path.ismount(p):
        if p.parent == p:
            break
        p = p.parent
    return p


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def disk_full(path: Path, needed: int | None = None, written: Path | None = None) -> DiskFullError:
    """The one-line error for a full disk at ``path``: the device, what is free and what is
    needed (``needed`` bytes when known, else at least what ``written`` held when it failed)."""
    path = Path(path)
    mp = mount_point(path.parent if not path.exists() else path)
    at_least = "" if needed else "at least "
    needed = needed or (_size(written) if written is not None else 0)
    try:
        free = shutil.disk_usage(mp).free
    except OSError:
        free = 0
    return DiskFullError(errno.ENOSPC, f"no space left on device {mp} ({path}): {at_least}"
                         f"{max(1, round(needed / 2**20))} MB needed, {free / 2**20:.0f} MB free. "
                         f"Free some space or write to another disk; nothing was half-written", str(path))


@contextlib.contextmanager
def atomic_dir(target: Path, owned: Callable[[Path], bool] | None = None, *, overwrite: bool = True,
               what: str = "output folder", inputs: Iterable[str | Path] = (), needed: int | None = None):
    """Yield a temp folder beside ``target``; on success it replaces ``target`` in one rename.

    An existing non-empty ``target`` is replaced only when ``owned(target)`` proves tuneforge
    made it (its manifest or marker file); otherwise ``OutputRefused`` is raised before any
    writing (see ``check_output``). A full disk becomes ``DiskFullError`` (``needed``: the
    bytes the folder takes, when the caller knows), and the temp folder is removed."""
    target = Path(target)
    inputs = list(inputs)
    check_output(target, owned, overwrite=overwrite, what=what, inputs=inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            yield tmp
        except Exception as e:
            if is_disk_full(e):
                raise disk_full(target, needed, tmp) from e
            raise
        check_output(target, owned, overwrite=overwrite, what=what, inputs=inputs)  # it may have changed meanwhile
        if target.exists():
            # A fresh name of our own: never a sibling folder someone else made.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and is_disk_full(e):
            raise disk_full(path, len(text.encode())) from e
        raise


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
