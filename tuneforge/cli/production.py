"""``tuneforge review``, ``tuneforge improve`` and ``tuneforge monitor``: arguments -> options ->
calls into production.loop (review, improve, monitor); nothing here decides what happens to an item.

improve and monitor are imported when their command runs: improve pulls in the training
stack and monitor its Prometheus gauges, and building the parser must stay quick and clean.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import sys

from prometheus_client import REGISTRY, write_to_textfile
from pydantic import ValidationError
from rich.console import Console

from tuneforge.production.config import load_monitor_config
from tuneforge.production.loop.review_queue import QueueRules, ReviewError, fill_queue, review_loop
from tuneforge.registry.store import Registry, RegistryError
from tuneforge.runs import RunError

REGISTRY_HELP = "SQLAlchemy URL (default $TUNEFORGE_REGISTRY or sqlite:///~/.cache/tuneforge/registry.db)"
REASONS = ("correction", "low_feedback", "guard", "fallback", "drift", "sample")


def _user_errors(fn):
    """Registry, review and improve problems are one line on stderr (exit 2), not a traceback."""

    @functools.wraps(fn)
    def wrapper(args):
        from tuneforge.production.loop.improve import ImproveError  # deferred: the training stack (see above)

        try:
            return fn(args)
        except (RegistryError, RunError, ReviewError, ImproveError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except ValidationError as e:  # an option out of range (e.g. --low-score 2)
            print("error: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()),
                  file=sys.stderr)
            return 2
    return wrapper


@_user_errors
def cmd_review(args) -> int:
    reg, console = Registry(args.registry), Console()
    if not args.no_fill:
        added = fill_queue(reg, QueueRules(low_score=args.low_score, sample_rate=args.sample_rate, seed=args.seed))
        console.print("queued " + (", ".join(f"{n} {r}" for r, n in added.items()) if added else "nothing new"))
    review_loop(reg, args.reviewer, args.reason or None, console=console, model=args.model)
    return 0


@_user_errors
def cmd_improve(args) -> int:
    from tuneforge.production.loop.improve import improve, load_improve_config, promote_after  # deferred (see above)

    reg, console, cfg = Registry(args.registry), Console(), load_improve_config(args.config)
    if args.promote_after:
        if args.force:  # never accept and drop an option
            print("error: --force overrides the improve gate; --promote-after has no gate to force", file=sys.stderr)
            return 2
        promote_after(reg, args.name, cfg, console)
        return 0
    try:
        lineage = improve(reg, args.name, cfg, console, force=args.force)
    except KeyboardInterrupt:
        print("interrupted: nothing was registered or routed; run it again (with another run_name)",
              file=sys.stderr)
        return 130
    console.print(f"lineage: {lineage['run_dir']}/improve.json")
    return 0 if lineage["verdict"]["canary"] else 3


def add_production_parsers(sub) -> None:
    r = sub.add_parser("review", help="work the human review queue in the terminal (accept, correct, reject)",
                       description="Queues logged requests that need a human (user corrections, low scores and "
                       "thumbs down, invalid JSON where JSON was asked for, fallbacks, a seeded random sample), "
                       "then shows each pending item: a=accept the answer, c=correct it (type the right answer, "
                       "end with an empty line), r=reject, s=skip, q=quit. Each decision is saved at once with "
                       "the reviewer and time; a later run resumes with the items still pending.")
    r.add_argument("--reviewer", default=getpass.getuser(), help="name recorded with each decision (default: $USER)")
    r.add_argument("--reason", action="append", choices=REASONS,
                   help="only items queued for this reason (repeatable; default: all)")
    r.add_argument("--model", metavar="NAME", help="only items a version of this registry model answered "
                   "(what `tuneforge improve NAME` trains on; default: all)")
    r.add_argument("--no-fill", action="store_true", help="do not queue new requests first; work what is queued")
    r.add_argument("--low-score", type=float, default=0.5, help="queue feedback scores below this (default 0.5)")
    r.add_argument("--sample-rate", type=float, default=0.0,
                   help="also queue this share of other answered requests, seeded (default 0)")
    r.add_argument("--seed", type=int, default=0, help="seed of the random sample (default 0)")
    r.add_argument("--registry", help=REGISTRY_HELP)
    r.set_defaults(fn=cmd_review)

    i = sub.add_parser("improve", help="reviewed feedback -> dataset -> retrain -> gate -> canary",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Exports accepted and corrected review items (plus replayed rows of the current "
                       "version's train split) through the data stage,\ncontinues training from NAME@prod (from_alias), "
                       "scores both versions on the held-out test split and held-out feedback,\nregisters the new "
                       "version and, if the gate passes, points NAME@canary at it with a small route weight.\n"
                       "The gate is paired (both versions on the same rows, bootstrap intervals) and refuses below gate.min_rows rows.\n"
                       "Exit 3 when the gate refuses (the reasons are printed; --force overrides, recorded).\n\n"
                       "--promote-after, run later: compares the canary arm's feedback with prod's and widens the "
                       "canary,\npromotes it or rolls it back (or waits for more feedback).")
    i.add_argument("name", help="registered model name")
    i.add_argument("--config", help="improve.yaml (see examples/improve.yaml); default: built-in defaults")
    i.add_argument("--promote-after", action="store_true",
                   help="only judge the running canary on its arm's feedback (no training)")
    i.add_argument("--force", action="store_true",
                   help="send the new version to canary even if the gate refuses (the refusal is kept in improve.json)")
    i.add_argument("--registry", help=REGISTRY_HELP)
    i.set_defaults(fn=cmd_improve)
    add_monitor_parser(sub)


def cmd_monitor(args) -> int:
    # deferred (see above)
    from tuneforge.production.loop.monitor import MonitorError, monitor
    from tuneforge.production.loop.monitor_report import print_summary, write_html

    cfg = load_monitor_config(args.config, {"since": args.since, "webhook": args.webhook})
    if args.no_drift:
        cfg.drift.enabled = False
    console = Console(stderr=True)
    try:
        with console.status("monitor") as status:
            res = monitor(Registry(args.registry), cfg, route=args.route,
                          progress=lambda msg: status.update(f"monitor: {msg}"))
    except KeyboardInterrupt:
        console.print("monitor interrupted (no report written)")
        return 130
    except MonitorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(res, Console())
    if args.html:
        console.print(f"report: {write_html(res, args.html)}")
    if args.metrics_file:
        write_to_textfile(args.metrics_file, REGISTRY)
        console.print(f"Prometheus metrics: {args.metrics_file}")
    return 1 if res.alerts and args.fail_on_alert else 0


def add_monitor_parser(sub) -> None:
    m = sub.add_parser("monitor", help="health, quality signals, prompt drift and alerts from the request log",
                       description="Reads the request log in the registry database: per route and version, "
                                   "error rate, latency p50/p95/p99, fallback rate, tokens; empty/truncated/"
                                   "refusal/repetition rates, answer length shift vs the window before, JSON "
                                   "validity, feedback; prompt drift against the version's training prompts "
                                   "(MiniLM embeddings, MMD permutation test). Alerts go to the log and the "
                                   "webhook of monitor.yaml; drifted prompts go on the review queue.")
    m.add_argument("--route", metavar="NAME", help="only this route (or model name, for direct calls)")
    m.add_argument("--since", metavar="WINDOW", help="the recent window, e.g. 30m, 12h, 7d (default 7d)")
    m.add_argument("--html", metavar="FILE", help="write a self-contained HTML report with plots")
    m.add_argument("--config", metavar="YAML", help="monitor.yaml: thresholds, drift, judge, webhook "
                                                    "(see examples/monitor.yaml)")
    m.add_argument("--webhook", metavar="URL", help="POST alerts here as JSON (overrides monitor.yaml)")
    m.add_argument("--metrics-file", metavar="FILE",
                   help="write the figures as Prometheus text (node_exporter textfile collector)")
    m.add_argument("--no-drift", action="store_true", help="skip the drift test (no encoder is loaded)")
    m.add_argument("--fail-on-alert", action="store_true", help="exit with status 1 when an alert fired (cron/CI)")
    m.add_argument("--registry", help="SQLAlchemy URL (default $TUNEFORGE_REGISTRY or "
                                      "sqlite:///~/.cache/tuneforge/registry.db)")
    m.set_defaults(fn=cmd_monitor)

