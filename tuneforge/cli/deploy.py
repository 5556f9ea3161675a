"""`tuneforge export`, `merge-adapters`, `registry`, `keys`, `serve`, `ab`: thin calls into tuneforge.deploy
and tuneforge.registry (imported when the command runs: see cli/__init__.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from tuneforge.cli.output import rich_console, user_errors


@user_errors
def cmd_export(args) -> int:
    import json

    from tuneforge import api

    given = [o for o, v in (("--sparsity", args.sparsity), ("--structured", args.structured),
                            ("--recover", args.recover)) if v is not None]
    if given and args.format != "pruned":
        print(f"error: {' and '.join(given)}: options of --format pruned, not of --format {args.format}",
              file=sys.stderr)
        return 2
    if args.format == "pruned" and args.sparsity is None:
        print("error: --format pruned needs --sparsity S (the share of channels/heads/layers removed)",
              file=sys.stderr)
        return 2
    console = rich_console()
    out = api.export(args.run_dir, args.format, args.out, args.dtype, sparsity=args.sparsity,
                     structured=args.structured or "mlp,heads", recover=args.recover, console=console)
    manifest = json.loads((out / "manifest.json").read_text())
    for name, size in manifest["files"].items():
        console.print(f"  {name}  {size / 2**20:.1f} MiB")
    if "vs_bf16" in manifest:
        console.print(f"int8 vs bf16: {json.dumps(manifest['vs_bf16'])}")
    if "pruning" in manifest:
        console.print(pruning_table(manifest["pruning"]))
    console.print(f"[bold green]exported[/] {args.format}: {out}")
    return 0


def pruning_table(p: dict):
    from rich.table import Table

    load = (p["machine"]["load_average"] or ["?"])[0]
    table = Table(title=f"pruning (sparsity {p['sparsity']}, {'+'.join(p['structures'])}); "
                        f"{p['machine']['cpu']}, load {load}; metric on {p['metric_rows']} test rows")
    for col in ("model", "size MiB", "parameters", "CPU tokens/s", "metric"):
        table.add_column(col)
    for r in p["table"]:
        score = f"{r['metric']} {r['score']:.4f}" if r["score"] is not None else "-"
        table.add_row(r["model"], f"{r['size_bytes'] / 2**20:.1f}", f"{r['parameters']:,}", f"{r['cpu_tokens_per_s']:.1f}", score)
    return table


@user_errors
def cmd_merge_adapters(args) -> int:
    import json

    from tuneforge.deploy.merge import MERGE_FILE, merge_adapters

    # key=value items configure the fusion run (they may come anywhere among the run folders)
    among = [r for r in args.runs if "=" in r and not Path(r).exists()]
    runs = [Path(r) for r in args.runs if r not in among]
    args.overrides = among + args.overrides
    weights = [float(w) for w in args.weights.split(",")] if args.weights else [1 / len(runs)] * len(runs)
    console = rich_console()
    if args.how == "fusion":
        from tuneforge.deploy.fusion import fuse_adapters

        given = [o for o, v in (("--weights", args.weights), ("--rank", args.rank), ("--density", args.density))
                 if v is not None]
        if given:
            print(f"error: {' and '.join(given)}: --how fusion learns its weights and keeps every adapter's rank "
                  f"(they are options of the static merges)", file=sys.stderr)
            return 2

        out = fuse_adapters(runs, Path(args.out), args.overrides, console=console)
        console.print(f"[green]fused[/] {len(runs)} adapters (learned per-layer mixing) into the run folder {out}")
        return 0
    if args.overrides:
        print(f"error: key=value overrides ({' '.join(args.overrides)}) only configure --how fusion's training",
              file=sys.stderr)
        return 2
    if args.density is not None and args.how == "linear":
        print("error: --density: linear sums every weight update whole; density is an option of ties and dare_*",
              file=sys.stderr)
        return 2
    density = 0.5 if args.density is None else args.density
    out = merge_adapters(runs, weights, args.how, Path(args.out), density, args.seed, args.rank)
    t = json.loads((out / MERGE_FILE).read_text())["truncation"]
    console.print(f"rank {t['rank']}: truncation error (relative Frobenius, ||dW - dW_r|| / ||dW||) "
                  f"{t['relative_frobenius_error']:.2e} overall, worst {t['worst_module_error']:.2e} "
                  f"({t['worst_module']}); per module in {out / MERGE_FILE}")
    console.print(f"[green]merged[/] {len(runs)} adapters ({args.how}) into the run folder {out}")
    return 0


def _registry(args):
    from tuneforge.registry.store import Registry

    return Registry(args.registry)


@user_errors
def cmd_registry(args) -> int:
    from rich.table import Table

    from tuneforge.registry.store import PromotionRefused

    reg, console = _registry(args), rich_console()
    if args.action == "add":
        v = reg.add(args.run_dir, args.name)
        score = f" ({v.main_metric} {v.main_score:.4f})" if v.main_score is not None else " (no eval score)"
        console.print(f"registered [bold]{v.ref}[/]{score} -> {v.run_dir}")
        console.print(f"model card: {v.card}" if v.card else
                      f"[yellow]model card not written[/]: {v.run_dir}/README.md is not one tuneforge wrote (kept)")
    elif args.action == "promote":
        from tuneforge.registry.gate import GateOptions, gated_promote

        from pydantic import ValidationError

        given = {k: getattr(args, k) for k in ("min_rows", "margin", "confidence")}
        try:
            opts = GateOptions(**{k: v for k, v in given.items() if v is not None})
        except ValidationError as e:
            print("error: " + "; ".join(f"--{str(x['loc'][0]).replace('_', '-')}: {x['msg']}" for x in e.errors()),
                  file=sys.stderr)
            return 2
        try:
            console.print(gated_promote(reg, args.ref, args.alias, opts, force=args.force, console=console,
                                          max_fairness_gap=args.max_fairness_gap))
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


@user_errors
def cmd_keys(args) -> int:
    reg = _registry(args)
    if args.action == "create":
        kid, key = reg.create_key(args.name, args.models, args.rpm, admin=args.admin, reviewer=args.reviewer)
        roles = (", admin" if args.admin else "") + (", reviewer" if args.reviewer else "")
        print(f"key id {kid} for {args.name} (models: {', '.join(args.models) or '*'}{roles}). "
              f"Shown once; store it now:\n{key}")
    elif args.action == "revoke":
        reg.revoke_key(args.id)
        print(f"revoked key {args.id}")
    else:
        for k in reg.keys():
            state = f"revoked {k['revoked']:%Y-%m-%d}" if k["revoked"] else "active"
            print(f"{k['id']:>4}  {k['name']:<20} {k['prefix']}...  models={','.join(k['models'])}  "
                  f"rpm={k['requests_per_minute'] or '-'}  {'admin  ' if k['admin'] else ''}"
                  f"{'reviewer  ' if k['reviewer'] else ''}{state}")
    return 0


def cmd_serve(args) -> int:
    from tuneforge.deploy.config import load_serve_config
    from tuneforge.deploy.server import create_app, serve
    from tuneforge.deploy.vllm_launch import VLLMLaunchError

    cfg = load_serve_config(args.config)
    for field, value in (("host", args.host), ("port", args.port), ("registry", args.registry)):
        if value is not None:
            setattr(cfg, field, value)
    factory = create_app
    if args.ui:
        # deferred: the dashboard (jinja2, its pages) only when asked for; cli/__init__.py says why
        from tuneforge.ui.app import create_ui_app

        def factory(*a, **kw):
            return create_ui_app(*a, runs_dir=args.runs, **kw)

        print(f"dashboard: http://{cfg.host}:{cfg.port}/ui (run folders from {args.runs})", file=sys.stderr)
    try:
        serve(cfg, app_factory=factory)
    except VLLMLaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


@user_errors
def cmd_ab(args) -> int:
    from datetime import timedelta

    from rich.table import Table

    from tuneforge.deploy.abreport import report
    from tuneforge.registry.tables import utc_now

    since = utc_now() - timedelta(hours=args.hours) if args.hours else None
    try:
        r = report(_registry(args), args.route, args.control, since)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    console = rich_console()
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
    ma = sub.add_parser("merge-adapters", help="merge LoRA runs on one base into one run folder (static merges "
                                               "on the weight updates, or a learned per-layer fusion)")
    ma.add_argument("runs", nargs="+", metavar="RUN_DIR",
                    help="LoRA run folders; with --how fusion, key=value items among them override the fusion "
                         "run's config (train.max_steps=200)")
    ma.add_argument("--weights", help="comma-separated, one per run (default: equal); static merges only")
    ma.add_argument("--how", default="linear", choices=["linear", "ties", "dare_linear", "dare_ties", "fusion"],
                    help="linear/ties/dare_*: combine the weight updates dW = B A, then SVD to rank --rank; "
                         "fusion: train a softmax mixing weight per layer over the frozen adapters")
    ma.add_argument("--density", type=float, help="share of each dW kept (ties/dare; default 0.5)")
    ma.add_argument("--rank", type=int, help="rank of the merged adapter (default: the sum of the runs' ranks for "
                                             "linear, which is exact; the largest rank for ties/dare)")
    ma.add_argument("--seed", type=int, default=0, help="DARE's random drops")
    ma.add_argument("--out", required=True)
    ma.set_defaults(fn=cmd_merge_adapters, overrides=[])  # key=value items after the options land here

    from tuneforge.deploy.export import FORMATS

    e = sub.add_parser("export", help="export a run: merged HF folder, GGUF (f16, q8_0), int8 for CPU, or a "
                                      "pruned smaller HF folder")
    e.add_argument("run_dir")
    fmt = e.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--format", choices=FORMATS)
    fmt.add_argument("--merge", dest="format", action="store_const", const="merged",
                     help="same as --format merged: fold the adapter into the base weights")
    e.add_argument("--out", help="output folder (default RUN_DIR/export/FORMAT)")
    e.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="merged/pruned: weight dtype (fp32 keeps base+adapter's outputs exactly)")
    e.add_argument("--sparsity", type=float,
                   help="pruned: share removed, per layer, of each --structured kind (MLP channels, key/value "
                        "head groups) or of the layers; e.g. 0.25")
    e.add_argument("--structured", metavar="heads,mlp,layers",
                   help="pruned: what to remove, comma-separated from heads, mlp, layers (default mlp,heads); "
                        "ranked on calibration rows of the run's train split")
    e.add_argument("--recover", type=int, metavar="STEPS",
                   help="pruned: then a LoRA recovery fine-tune of STEPS steps on the run's own data (the normal "
                        "train recipe), merged back")
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
    p = with_registry(ra.add_parser("promote", help="point an alias at a version (a paired comparison with the "
                                    "alias's version on the same test rows; refuses one not shown to be no worse)"))
    p.add_argument("ref", help="NAME:vN")
    p.add_argument("--alias", default="prod")
    p.add_argument("--min-rows", type=int, help="rows both versions must be scored on before deciding (30)")
    p.add_argument("--margin", type=float, help="the lower end of the interval of new - old may reach -MARGIN (0)")
    p.add_argument("--confidence", type=float, help="of the paired bootstrap interval (0.95)")
    p.add_argument("--force", action="store_true", help="promote even if the gate refuses (recorded in the history)")
    p.add_argument("--max-fairness-gap", type=float, metavar="X",
                   help="also refuse when the version's eval (RUN/eval/eval_results.json, from `tuneforge eval "
                        "--fairness`) has a fairness gap above X (a share: 0.05 = 5 points), or none")
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
    p.add_argument("--rpm", type=int, help="requests per minute for this key (at least 1; default: serve.yaml's)")
    p.add_argument("--admin", action="store_true",
                   help="may also call the server's /admin endpoints (adapter load/unload, aliases) and "
                        "read and decide every review item (/v1/review)")
    p.add_argument("--reviewer", action="store_true",
                   help="may read and decide the review items (/v1/review) of requests to the models it "
                        "may call (--models; without --models: every model's)")
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

    add_serve_parsers(sub, with_registry)


def add_serve_parsers(sub, with_registry) -> None:
    """`serve` (the API, with `--ui` the dashboard too) and `ui` (the same server, dashboard on)."""
    s = with_registry(sub.add_parser(
        "serve", help="OpenAI-compatible API over the registry (127.0.0.1:8000)",
        description="OpenAI-compatible API over the registry (/v1/chat/completions, /v1/completions, /v1/models), "
                    "with /healthz, /readyz, /metrics and admin endpoints; SIGTERM or Ctrl-C lets in-flight "
                    "requests finish (shutdown_grace_s) before exiting."))
    s.add_argument("--config", help="serve.yaml (see examples/serve.yaml)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--ui", action="store_true", help="also serve the web dashboard at /ui")
    s.add_argument("--runs", default="runs", help="with --ui: the folder of local run folders the dashboard lists")
    s.set_defaults(fn=cmd_serve)

    u = with_registry(sub.add_parser(
        "ui", help="web dashboard: runs, curves, new runs from a form (the server with /ui; 127.0.0.1:8000/ui)",
        description="The server (same serve.yaml, keys and job worker) with the dashboard at /ui: run folders "
                    "and queued runs, live loss curves, and a New run form checked by the config validator."))
    u.add_argument("--config", help="serve.yaml (see examples/serve.yaml)")
    u.add_argument("--runs", default="runs", help="the folder of local run folders to list (default: runs)")
    u.add_argument("--host")
    u.add_argument("--port", type=int)
    u.set_defaults(fn=cmd_serve, ui=True)
