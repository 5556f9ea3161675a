"""``tuneforge data``: prepare, inspect, generate. Each command turns its arguments into
options and calls into the data package; nothing here decides what happens to a row."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tuneforge.io import OutputRefused


def _console():
    from rich.console import Console

    return Console()


def _columns(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        field, sep, column = item.partition("=")
        if not sep or not field or not column:
            from tuneforge.data.load import DataError

            raise DataError(f"--column {item!r}: use FIELD=COLUMN, e.g. --column prompt=question")
        out[field] = column
    return out


def options_from_args(args) -> dict:
    """The command's options as tuneforge.api.prepare's keyword arguments (PrepareOptions fields;
    a section's fields through ``__``), validated there."""
    return dict(
        validation_inputs=args.validation_input, test_inputs=args.test_input, task=args.task,
        format=args.format, columns=_columns(args.column), text_unit=args.text_unit, strict=args.strict,
        ignore_fields=args.ignore_field,
        clean__normalize=args.normalize, clean__min_chars=args.min_chars, clean__max_chars=args.max_chars,
        clean__languages=args.language, pii__action=args.pii,
        dedup__exact=not args.no_exact_dedup, dedup__near=not args.no_near_dedup, dedup__threshold=args.near_threshold,
        dedup__seed=args.seed,
        split__validation=args.val, split__test=args.test, split__seed=args.seed, split__stratify=args.stratify,
        split__group_threshold=args.group_threshold, split__leakage=args.leakage,
        split__leakage_threshold=args.leakage_threshold,
        tokenizer=args.tokenizer, max_length=args.max_length, min_tokens=args.min_tokens,
        overlength=args.overlength, augment=args.augment)


def cmd_prepare(args) -> int:
    from tuneforge import api

    console = _console()
    m = api.prepare(args.inputs, args.output, overwrite=args.overwrite, console=console, **options_from_args(args))
    _print_summary(m, console)
    console.print(f"[bold green]prepared[/] {args.output} (report.md, manifest.json, lengths.png)")
    return 0


def _print_summary(m: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"stages ({m['kind']} rows); input = kept + dropped")
    for col in ("pool", "stage", "input", "kept", "dropped", "changed"):
        table.add_column(col)
    for s in m["stages"]:
        table.add_row(s.get("info", {}).get("pool", ""), s["name"], str(s["input"]), str(s["kept"]),
                      "; ".join(f"{k}: {v}" for k, v in s["dropped"].items()),
                      "; ".join(f"{k}: {v}" for k, v in s["changed"].items()))
    console.print(table)
    for f, why in m.get("skipped_files", {}).items():
        console.print(f"[yellow]skipped[/] {f}: {why}")
    for name, sp in m["splits"].items():
        ln = sp["lengths"]
        console.print(f"{name}: {sp['rows']} rows" + (f", {m['length_unit']} p50 {ln['p50']} p95 {ln['p95']} max "
                                                       f"{ln['max']}" if ln.get("rows") else ""))


def cmd_inspect(args) -> int:
    from tuneforge.data.lengths import shape_stats
    from tuneforge.data.load import load_rows
    from tuneforge.data.manifest import is_prepared, read_manifest

    console = _console()
    if is_prepared(args.path):
        m = read_manifest(args.path)
        _print_summary(m, console)
        for pool, a in m["accounting"].items():
            console.print(f"{pool}: {a['read']} read = {a['written']} written + {sum(a['dropped'].values())} dropped")
        return 0
    rows, rep = load_rows([args.path], args.format, _columns(args.column), text_unit=args.text_unit,
                          ignore_fields=args.ignore_field)
    console.print(f"[bold]{args.path}[/]: {rep.read} rows read, {rep.kept} usable; {rep.kind} rows, "
                  f"format {rep.format}: {rep.format_reason}")
    for note in rep.notes():
        console.print(f"  {note}")
    for f, why in rep.skipped.items():
        console.print(f"[yellow]skipped[/] {f}: {why}")
    for reason, n in rep.dropped.most_common():
        console.print(f"  [yellow]{n} bad[/] ({reason}), e.g. {rep.examples[reason][0]}")
    console.print(json.dumps(shape_stats(rows)))
    console.print("first row:", json.dumps(rows[0], ensure_ascii=False)[:1000])
    return 0


def cmd_generate(args) -> int:
    from tuneforge.data.builtin import generate
    from tuneforge.data.load import DataError
    from tuneforge.io import atomic_write_text

    try:
        rows = list(generate(args.task, n=args.n, seed=args.seed))
    except ValueError as e:
        raise DataError(str(e)) from None
    _check_generate_output(Path(args.output), args.overwrite)
    # Rows say they are synthetic, so a later `prepare` of this file counts them as such.
    atomic_write_text(Path(args.output), "".join(json.dumps({**r, "_synthetic": True}, ensure_ascii=False) + "\n"
                                                 for r in rows))
    print(f"wrote {len(rows)} synthetic {args.task} rows to {args.output}")
    return 0


def _generated_by_us(path: Path) -> bool:
    """A file ``data generate`` wrote: every row carries ``"_synthetic": true``."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        return bool(lines) and all(json.loads(line).get("_synthetic") is True for line in lines)
    except (OSError, ValueError, AttributeError):
        return False


def _check_generate_output(out: Path, overwrite: bool) -> None:
    """Never write over a file ``data generate`` did not write; over its own only with --overwrite."""
    if out.is_dir():
        raise OutputRefused(f"{out} is a folder; -o names the .jsonl file to write")
    if not out.exists():
        return
    if not _generated_by_us(out):
        raise OutputRefused(f"{out} exists and is not a file `tuneforge data generate` wrote; pick a new file "
                            f"(nothing was changed: --overwrite replaces only a generated file)")
    if not overwrite:
        raise OutputRefused(f"{out} already holds generated rows; pass --overwrite to replace it")


def add_data_parser(sub) -> None:
    d = sub.add_parser("data", help="prepare, inspect or generate datasets").add_subparsers(dest="data_command",
                                                                                            required=True)
    p = d.add_parser("prepare", help="load, validate, clean, de-duplicate, redact, split and report",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="files, folders (mixed files or a saved datasets folder), builtin:TASK, "
                   "or LLaMA-Factory's dataset_info.json#NAME")
    p.add_argument("-o", "--output", required=True, help="output folder: new or empty (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder (only one "
                   "tuneforge wrote: a folder holding other files, or an input, is never replaced)")
    p.add_argument("--task", default="auto", choices=["auto", "sft", "preference", "unpaired", "classification", "text"])
    p.add_argument("--format", default="auto", help="force a format: chat, sharegpt, instruction, "
                   "prompt_completion, preference, classification, text")
    p.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN", help="map a format field")
    p.add_argument("--ignore-field", action="append", default=[], metavar="NAME",
                   help="drop this row field before loading (counted in the report), e.g. kto_tag to train "
                   "KTO rows as SFT (repeatable)")
    p.add_argument("--text-unit", default="block", choices=["block", "file"], help="plain text: row per block/file")
    p.add_argument("--strict", action="store_true", help="fail on the first bad row")
    p.add_argument("--validation-input", action="append", default=[], help="held-out validation file")
    p.add_argument("--test-input", action="append", default=[], help="held-out test file")
    p.add_argument("--val", type=float, default=0.1, help="validation share (<1) or rows (>=1)")
    p.add_argument("--test", type=float, default=0.1, help="test share (<1) or rows (>=1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stratify", default="auto", choices=["auto", "yes", "no"])
    p.add_argument("--group-threshold", type=float, default=0.8, help="similar prompts share a split")
    p.add_argument("--leakage", default="remove", choices=["remove", "report", "off"])
    p.add_argument("--leakage-threshold", type=float, default=0.8)
    p.add_argument("--normalize", default="NFC", choices=["NFC", "NFKC", "none"])
    p.add_argument("--min-chars", type=int, default=1)
    p.add_argument("--max-chars", type=int)
    p.add_argument("--language", action="append", default=[], help="keep only this language (repeatable)")
    p.add_argument("--pii", default="redact", choices=["redact", "drop", "off"])
    p.add_argument("--no-exact-dedup", action="store_true")
    p.add_argument("--no-near-dedup", action="store_true")
    p.add_argument("--near-threshold", type=float, default=0.85)
    p.add_argument("--tokenizer", help="model alias/folder for the token report (e.g. smollm2-135m-instruct)")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--min-tokens", type=int, default=0)
    p.add_argument("--overlength", default="drop", choices=["drop", "truncate"])
    p.add_argument("--augment", type=int, default=0, help="template paraphrases per train row (sft)")
    p.set_defaults(fn=cmd_prepare)

    i = d.add_parser("inspect", help="detected format, bad rows and shape of a file, or a prepared folder's summary")
    i.add_argument("path")
    i.add_argument("--format", default="auto")
    i.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN")
    i.add_argument("--ignore-field", action="append", default=[], metavar="NAME")
    i.add_argument("--text-unit", default="block", choices=["block", "file"])
    i.set_defaults(fn=cmd_inspect)

    g = d.add_parser("generate", help="write rows of a built-in synthetic task")
    g.add_argument("task", help="orders (sft), sentiment (classification), preferences (preference)")
    g.add_argument("-n", type=int, default=800)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("-o", "--output", required=True, help="a new .jsonl file")
    g.add_argument("--overwrite", action="store_true", help="replace a file this command wrote before")
    g.set_defaults(fn=cmd_generate)
