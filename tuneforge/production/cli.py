"""``tuneforge monitor``: a thin call into tuneforge.production.monitor."""

from __future__ import annotations

import sys


def cmd_monitor(args) -> int:
    from rich.console import Console

    from tuneforge.production.config import load_monitor_config
    from tuneforge.production.monitor import MonitorError, monitor
    from tuneforge.production.report import print_summary, write_html
    from tuneforge.registry.store import Registry

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
        from prometheus_client import REGISTRY, write_to_textfile

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

