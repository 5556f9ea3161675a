"""What every command shares: a console, key=value overrides as the Python API takes them, and
registry/run/export problems reported as one line."""

from __future__ import annotations

import functools
import sys

from tuneforge.io import DiskFullError


def rich_console():
    from rich.console import Console  # rich loads in ~0.1 s: only commands that print pay for it

    return Console()


def api_overrides(items: list[str]) -> dict:
    """Command-line ``key=value`` items as tuneforge.api's keyword overrides (``train.lr=1e-4``
    -> ``train__lr=1e-4``): the commands call the Python API like any other user of it."""
    from tuneforge.config import override_items

    return {k.replace(".", "__"): v for k, v in override_items(items).items()}


def user_errors(fn):
    """Deploy commands report registry/run/export problems as one line, not a traceback."""

    @functools.wraps(fn)
    def wrapper(args):
        # Imported when the command runs (they import torch): see cli/__init__.py.
        from tuneforge.data.load import DataError
        from tuneforge.deploy.gguf_export import GGUFExportError
        from tuneforge.deploy.prune import PruneError
        from tuneforge.registry.store import RegistryError
        from tuneforge.runs import RunError

        try:
            return fn(args)
        except (RegistryError, RunError, DataError, GGUFExportError, PruneError, DiskFullError, FileExistsError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapper
