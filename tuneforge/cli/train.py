"""`tuneforge train`, `sequence`, `sweep`, `rlhf`, `check`, `plan`, `compare`: thin calls into
the Python API (tuneforge.api: train, check, plan) and tuneforge.train's regimes (imported when
the command runs: see cli/__init__.py)."""

from __future__ import annotations

from pathlib import Path

from tuneforge.cli.output import api_overrides, rich_console


def cmd_train(args) -> int:
    from tuneforge import api

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise SystemExit(f"--resume {run_dir}: not a run folder (no config.yaml)")
        overrides = ([args.config] if args.config and "=" in args.config else []) + args.overrides
        api.train(resume=run_dir, console=rich_console(), force=args.force, **api_overrides(overrides))
        return 0
    if not args.config:
        raise SystemExit("tuneforge train: give a CONFIG file (see examples/), or --resume RUN_DIR")
    if args.nproc > 1:
        cfg = api.load_config(args.config, **api_overrides(args.overrides))
        from tuneforge.objectives import OBJECTIVES
        from tuneforge.train.distributed import launch
        from tuneforge.train.run_folder import new_run_dir

        if cfg.model.kind == "vision":
            raise SystemExit(f"--nproc {args.nproc}: vision-language runs (model.kind=vision) train on one process "
                             "(drop --nproc)")
        if OBJECTIVES[cfg.objective.name].recipe:
            # Their loops (pairs, heads, trl's policy trainer) do not split batches across
            # ranks: N processes would each train the whole run and write the same folder.
            raise SystemExit(f"--nproc {args.nproc}: data-parallel training covers the token-loss objectives "
                             f"(sft, cpt, distill); objective '{cfg.objective.name}' trains on one process "
                             f"(drop --nproc)")

        return launch([*(["--force"] if args.force else []), args.config, *args.overrides], args.nproc,
                      new_run_dir(cfg, create=False).name)
    api.train(args.config, console=rich_console(), force=args.force, **api_overrides(args.overrides))
    return 0


def cmd_sequence(args) -> int:
    from tuneforge.train.sequence import load_sequence, run_sequence

    run_sequence(load_sequence(args.config, args.overrides), console=rich_console())
    return 0


def cmd_sweep(args) -> int:
    from tuneforge.train.sweep import load_space, run_sweep

    run_sweep(args.config, args.overrides, load_space(args.space), args.trials, console=rich_console(), seed=args.seed,
              sampler=args.sampler)
    return 0


def cmd_rlhf(args) -> int:
    from tuneforge.train.rlhf import run_chain

    run_chain(args.config, args.overrides, console=rich_console())
    return 0


def cmd_check(args) -> int:
    from tuneforge import api
    from tuneforge.config import to_yaml

    cfg = api.check(args.config, **api_overrides(args.overrides))
    print(to_yaml(cfg), end="")
    if cfg.auto:
        rich_console().print(f"auto: {', '.join(cfg.auto)} are decided from the data when training starts "
                             "(`tuneforge plan` shows the decisions and their reasons)")
    rich_console().print("[green]config OK[/]")
    return 0


def cmd_plan(args) -> int:
    from tuneforge import api

    api.plan(args.config, console=rich_console(), **api_overrides(args.overrides))
    return 0


def cmd_compare(args) -> int:
    from tuneforge.train.compare import CompareOptions, Prices, run_compare

    prices = Prices(input_per_1m=args.price_input, output_per_1m=args.price_output,
                    compute_per_hour=args.price_hour)
    opts = {k: v for k, v in vars(args).items() if k in CompareOptions.model_fields and v is not None}
    run_compare(CompareOptions(**opts, prices=prices), console=rich_console())
    return 0


def add_train_parsers(sub) -> None:
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

    pl = sub.add_parser("plan", help="estimate memory and step time per method before loading any weights "
                                     "(with auto: plans the values decided from the data, printed with why)")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*")
    pl.set_defaults(fn=cmd_plan)

    cp = sub.add_parser("compare", help="zero-shot vs few-shot vs RAG vs fine-tuning (+RAG) on one task; recommends "
                        "only on a significant difference")
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
    cp.add_argument("--docs", metavar="DIR", help="a folder of .txt/.md files: RAG retrieves their chunks "
                    "(default: the training rows)")
    cp.add_argument("--tolerance", type=float, help="a strategy is worse than the best only when the paired interval "
                    "of the difference lies above this (0: excludes 0); the cheapest of the rest is recommended")
    cp.add_argument("--confidence", type=float, help="of the bootstrap intervals (0.95)")
    cp.add_argument("--out", metavar="DIR")
    cp.set_defaults(fn=cmd_compare)
