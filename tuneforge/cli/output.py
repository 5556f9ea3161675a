"""What every command shares: a console, and registry/run/export problems reported as one line."""

from __future__ import annotations

import functools
import sys

from tuneforge.io import DiskFullError


def rich_console():
    from rich.console import Console  # rich loads in ~0.1 s: only commands that print pay for it

    return Console()


def user_errors(fn):
    """Deploy commands report registry/run/export problems as one line, not a traceback."""

    @functools.wraps(fn)
    def wrapper(args):
        # Imported when the command runs (they import torch): see cli/__init__.py.
        from tuneforge.deploy.gguf_export import GGUFExportError
        from tuneforge.deploy.prune import PruneError
        from tuneforge.registry.store import RegistryError
        from tuneforge.runs import RunError

        try:
            return fn(args)
        except (RegistryError, RunError, GGUFExportError, PruneError, DiskFullError, FileExistsError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapper
