"""Command line: one sub-command per stage, each a thin call into the stage's package.

The commands live beside their stage (cli/train.py, cli/evaluate.py, cli/deploy.py; data and
production commands in cli/data.py and cli/production.py). Each command imports its stage's
modules when it runs, not at start-up: they pull in torch and transformers (seconds), and
`tuneforge --help` or a mistyped command should answer at once.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import warnings

import tuneforge
from tuneforge.allocator import reexec_with_allocator
from tuneforge.cli.data import add_data_parser
from tuneforge.cli.deploy import add_deploy_parsers
from tuneforge.cli.evaluate import add_evaluate_parsers
from tuneforge.cli.production import add_production_parsers
from tuneforge.cli.train import add_train_parsers
from tuneforge.io import DiskFullError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# peft calls a transformers method that transformers 5 marks deprecated; the warning is not
# actionable for users.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
# bitsandbytes, imported by peft at start-up, tries on CPUs with AVX512-BF16 to fetch a 4-bit
# kernel from the hub and warns "Failed to load CPU gemm_4bit_forward" when it cannot: printed
# by every command on such a host, 4-bit or not, looking like an error. Its own kernels serve.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward" not in record.getMessage())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuneforge", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"tuneforge {tuneforge.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    add_train_parsers(sub)
    add_evaluate_parsers(sub)
    add_data_parser(sub)
    add_deploy_parsers(sub)
    add_production_parsers(sub)
    return p


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """argparse, with key=value overrides allowed anywhere on the line (`tuneforge sweep CFG
    --space S --trials 4 run_name=x`): argparse stops filling a positional list at the first
    option, so overrides after options come back as extras and join the command's own."""
    args, extra = parser.parse_known_args(argv)
    overrides = [x for x in extra if "=" in x and not x.startswith("-")]
    if overrides and isinstance(getattr(args, "overrides", None), list):
        args.overrides += overrides
        extra = [x for x in extra if x not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    # The errors users cause, reported as one line; their modules import torch (see above).
    from tuneforge.config import ConfigError
    from tuneforge.data.load import DataError
    from tuneforge.data.render import RenderError
    from tuneforge.models.load import ModelLoadError
    from tuneforge.runs import RunError
    from tuneforge.train.callbacks import TrainingDiverged

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(build_parser(), argv)
    # serve too: its engine and the fine-tuning jobs it runs are the same kind of CPU work
    if args.command in ("train", "sequence", "sweep", "rlhf", "serve"):
        reexec_with_allocator(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError, RenderError, ModelLoadError, RunError, FileExistsError, FileNotFoundError,
            TrainingDiverged, DiskFullError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only output folder or file system; other OS errors stay tracebacks
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}: tuneforge cannot write there; pick a folder you can write "
              f"(or fix its permissions)", file=sys.stderr)
        return 2
