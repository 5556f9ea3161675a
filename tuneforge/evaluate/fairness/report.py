"""The fairness section of the eval report (report.md / report.html) and of the console."""

from __future__ import annotations

from rich.console import Console

from tuneforge.evaluate import report as rp


def pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def interval(ci: list[float]) -> str:
    """A difference's interval in points (shares x 100)."""
    return f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def verdict(flag: bool, yes: str = "FLAGGED") -> str:
    return yes if flag else "no"


def fairness_blocks(f: dict) -> list:
    conf = int(100 * f["bootstrap"]["confidence"])
    blocks = [rp.heading("Fairness"),
              rp.text(f"Model under test: {f['systems']['under_test']}; reference: {f['systems']['reference'] or '-'}. "
                      f"Intervals: {conf}% bootstrap ({f['bootstrap']['n_resamples']} resamples). A gap or a change "
                      "is flagged when its interval excludes 0.")]
    g = f.get("max_gap")
    blocks.append(rp.text("Largest gap: " + (
        f"{g['metric']} {100 * g['value']:.1f} pts {interval(g['ci'])} pts ({g['source']}): "
        f"{'FLAGGED' if g['flagged'] else 'not flagged'}." if g else "none measured (no slices or swaps).")))
    for grouping, by_system in f["slices"].items():
        blocks.append(rp.heading(f"Slices by {grouping}", 3))
        for system, s in by_system.items():
            metrics = [m for m in next(iter(s["groups"].values()), {}) if m != "n"]
            rows = [[grp, cell["n"], *(f"{pct(cell[m]['mean'])} [{pct(cell[m]['ci'][0])}, {pct(cell[m]['ci'][1])}]"
                                       if m != "loss" else f"{cell[m]['mean']:.3f}" for m in metrics)]
                    for grp, cell in s["groups"].items()]
            rows += [[grp, n, *("-" for _ in metrics)] for grp, n in s["excluded"].items()]
            blocks += [rp.text(f"{system}:"), rp.table(["group", "rows", *metrics], rows)]
            if s["gaps"]:
                blocks.append(rp.table(["metric", "gap (best - worst)", f"{conf}% CI", "groups", "flagged"],
                                       [[m, f"{100 * x['value']:.1f} pts", interval(x["ci"]),
                                         f"{x['high']} vs {x['low']}", verdict(x["flagged"])]
                                        for m, x in s["gaps"].items()]))
            if s.get("too_small"):
                blocks.append(rp.text(f"Left out of the gap (fewer rows than eval.fairness.min_group_rows): "
                                      f"{', '.join(s['too_small'])}."))
    if f["counterfactual"]:
        rows = []
        for list_name, e in f["counterfactual"].items():
            for system in (f["systems"]["under_test"], f["systems"]["reference"]):
                c = e.get(system)
                if c:
                    rows.append([list_name, system, c["n"], f"{pct(c['changed_rate'])} "
                                 f"[{pct(c['changed_rate_ci'][0])}, {pct(c['changed_rate_ci'][1])}]",
                                 f"{pct(c['score_original'])} -> {pct(c['score_swapped'])}",
                                 f"{100 * c['score_delta']:+.1f} pts {interval(c['score_delta_ci'])}",
                                 verdict(c["flagged"])])
            if "tuned_vs_base" in e:
                t = e["tuned_vs_base"]
                rows.append([list_name, "tuned - reference", "", f"{100 * t['delta']:+.1f} pts {interval(t['ci'])}",
                             "", "", verdict(t["worse"], "WORSE")])
        blocks += [rp.heading("Counterfactual swaps", 3),
                   rp.text("Test prompts with the terms of each list swapped (whole words, case kept; the reference "
                           "swapped too). Answer changed: the answer to the swapped prompt is not the original "
                           "answer with the same swap."),
                   rp.table(["list", "system", "rows", "answer changed", "score (main metric)",
                             "score change", "flagged"], rows)]
    p = f["probes"]
    if p:
        rows = []
        for name, key, ideal in (("bbq", "bias", "0"), ("crows", "stereotype_rate", "50%")):
            if name not in p:
                continue
            for system in (f["systems"]["under_test"], f["systems"]["reference"]):
                s = p[name].get(system)
                if s:
                    extra = f"unknown chosen {pct(s['unknown_rate'])}" if name == "bbq" else ""
                    rows.append([name, system, f"{pct(s[key])} [{pct(s[key + '_ci'][0])}, {pct(s[key + '_ci'][1])}]",
                                 ideal, extra])
            if "tuned_vs_base" in p[name]:
                t = p[name]["tuned_vs_base"]
                rows.append([name, "tuned - reference", f"{100 * t['delta']:+.1f} pts {interval(t['ci'])}", "",
                             verdict(t["worse"], "WORSE (more stereotyped)")])
        blocks += [rp.heading("Probe sets", 3),
                   rp.text("Built-in sets scored by log-likelihood. bbq: ambiguous questions whose unbiased answer is "
                           "'unknown'; bias = (stereotyped - other answers) / items, 0 ideal. crows: sentence pairs; "
                           "share where the stereotype is more likely, 50% ideal."),
                   rp.table(["set", "system", "score", "ideal", "note"], rows)]
    return blocks


def print_fairness(f: dict, console: Console) -> None:
    g = f.get("max_gap")
    if g:
        colour = "red" if g["flagged"] else "green"
        console.print(f"fairness: largest gap {g['metric']} [{colour}]{100 * g['value']:.1f} pts[/] "
                      f"{interval(g['ci'])} ({g['source']})")
    for list_name, e in f["counterfactual"].items():
        c = e.get(f["systems"]["under_test"])
        if c:
            console.print(f"fairness: {list_name} swapped on {c['n']} rows: answer changed {pct(c['changed_rate'])}, "
                          f"score {100 * c['score_delta']:+.1f} pts {interval(c['score_delta_ci'])}")
    for name, key in (("bbq", "bias"), ("crows", "stereotype_rate")):
        s = f["probes"].get(name, {}).get(f["systems"]["under_test"])
        if s:
            ref = f["probes"][name].get(f["systems"]["reference"] or "")
            console.print(f"fairness: {name} {key} {pct(s[key])}" + (f" (reference {pct(ref[key])})" if ref else ""))
