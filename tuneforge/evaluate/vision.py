"""Generation eval of a vision-language model on held-out rows with images: the final assistant
turn is the reference, scored with the text metrics (tuneforge.evaluate.metrics.score), in the
result shape of ``evaluate.task.evaluate_rows``."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from tuneforge.config import EvalConfig
from tuneforge.data.images import open_image, with_system
from tuneforge.evaluate.metrics import score


def render(proc, messages: list[dict], generation_prompt: bool = False) -> str:
    """The conversation as the processor's chat template writes it (images as placeholders, which
    the processor expands when it sees the images)."""
    plain = [{"role": m["role"], "content": [{"type": "image"} if p.get("type") == "image" else p
                                             for p in m["content"]]}
             for m in messages]
    return proc.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation_prompt)


def split_images(messages: list[dict]) -> list[str]:
    return [p["image"] for m in messages for p in m["content"] if p.get("type") == "image"]


def text_of(message: dict) -> str:
    return "".join(p.get("text", "") for p in message["content"] if p.get("type") == "text")


@torch.no_grad()
def generate_vision(model, proc, convs: list[list[dict]], *, max_new_tokens: int, batch_size: int, device: str,
                    autocast_dtype: torch.dtype | None = None) -> list[str]:
    """Greedy answers to conversations that end with a user turn (left padded batches)."""
    model.eval()
    tok = proc.tokenizer
    outs = []
    ctx = (torch.autocast(device_type=device, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    side, tok.padding_side = tok.padding_side, "left"
    try:
        with ctx:
            for s in range(0, len(convs), batch_size):
                chunk = convs[s : s + batch_size]
                texts = [render(proc, c, generation_prompt=True) for c in chunk]
                images = [[open_image(ref) for ref in split_images(c)] for c in chunk]
                enc = proc(text=texts, images=images if any(images) else None, padding=True, return_tensors="pt",
                           add_special_tokens=False)
                enc = {k: v.to(device) if torch.is_tensor(v) else v for k, v in enc.items()}
                gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                width = enc["input_ids"].shape[1]
                outs += [tok.decode(g[width:], skip_special_tokens=True).strip() for g in gen]
    finally:
        tok.padding_side = side
    return outs


def evaluate_vision_rows(model, proc, rows: list[dict], ev: EvalConfig, *, device: str, autocast_dtype,
                         label: str) -> dict:
    rows = rows[: ev.limit] if ev.limit else rows
    convs = [r["messages"][:-1] for r in rows]
    refs = [text_of(r["messages"][-1]) for r in rows]
    t0 = time.perf_counter()
    preds = generate_vision(model, proc, convs, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                            device=device, autocast_dtype=autocast_dtype)
    seconds = time.perf_counter() - t0
    agg, per = score(ev.metric, preds, refs)
    samples = [{"prompt": text_of(c[-1]) if c else "", "images": split_images(c), "reference": r, "prediction": p,
                "score": s} for c, r, p, s in zip(convs, refs, preds, per)]
    return {"n": len(rows), "scores": agg, "seconds": round(seconds, 1), "samples": samples, "label": label,
            "generation": {"do_sample": False, "max_new_tokens": ev.max_new_tokens}}


def run_vision_eval(opts, cfg, target, console) -> Path:
    """``tuneforge eval RUN`` of a vision-language run: its test split (re-derived from its config,
    refused when the data changed since training) or a data file of rows with images, answered
    by the base (adapter off) and the tuned model; scores with paired bootstrap intervals ->
    OUT/eval_results.json and eval_samples.jsonl (OUT: RUN/eval by default)."""
    import json

    from tuneforge.data.load import DataError, load_rows
    from tuneforge.data.prepare import build_splits
    from tuneforge.evaluate.stats import paired_bootstrap
    from tuneforge.hardware import pick_device, pick_dtype
    from tuneforge.io import write_json
    from tuneforge.runs import load_vision_run

    target = Path(target)
    splits = build_splits(cfg.data, cfg.train.seed, "vision")
    recorded = json.loads((target / "data_report.json").read_text())["manifest_sha256"] \
        if (target / "data_report.json").exists() else None
    if opts.data == "test":
        if recorded is not None and recorded != splits.manifest_hash():
            raise DataError(f"the data behind {target} changed since training (manifest {recorded[:12]} -> "
                            f"{splits.manifest_hash()[:12]}): its test split is not the one held out")
        if not splits.test:
            raise DataError(f"{target} has no test split (data.test_size=0 and no data.test files)")
        rows = splits.test
    else:
        rows, _ = load_rows([opts.data], cfg.data.format, cfg.data.columns, kind="vision")
    rows = [{**r, "messages": with_system(r["messages"], cfg.data.system_prompt)} for r in rows]
    device = pick_device(opts.device)
    dtype = pick_dtype("auto", device)
    model, proc, _ = load_vision_run(target, device, dtype)
    ev = cfg.eval.model_copy(update={k: v for k, v in (("limit", opts.limit), ("batch_size", opts.batch_size),
                                                       ("max_new_tokens", opts.max_new_tokens)) if v})
    kw = dict(device=device, autocast_dtype=None if dtype == torch.float32 else dtype)
    console.print(f"[bold]eval[/] {target} (vision) on {opts.data}: {len(rows[: ev.limit] if ev.limit else rows)} rows")
    with model.disable_adapter():
        base = evaluate_vision_rows(model, proc, rows, ev, label="base model", **kw)
    tuned = evaluate_vision_rows(model, proc, rows, ev, label="tuned model", **kw)
    per = {name: [s["score"] for s in r["samples"]] for name, r in (("base", base), ("tuned", tuned))}
    main = next(iter(tuned["scores"]))
    comparison = {main: {"base": base["scores"][main], "tuned": tuned["scores"][main]}
                  | paired_bootstrap(per["base"], per["tuned"], n_resamples=opts.n_resamples,
                                     confidence=opts.confidence, seed=opts.seed)}
    out = Path(opts.out) if opts.out else target / "eval"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval_results.json", {
        "target": str(target), "data": opts.data, "kind": "vision", "n": tuned["n"],
        "systems": {"base": {"scores": base["scores"], "seconds": base["seconds"]},
                    "tuned": {"scores": tuned["scores"], "seconds": tuned["seconds"]}},
        "comparisons": {"base": comparison}, "generation": tuned["generation"]})
    with open(out / "eval_samples.jsonl", "w") as f:
        for name, r in (("base", base), ("tuned", tuned)):
            for s in r["samples"]:
                f.write(json.dumps({"system": name, **s}) + "\n")
    c = comparison[main]
    console.print(f"{main}: base {100 * c['base']:.1f}%  tuned {100 * c['tuned']:.1f}%  "
                  f"change {100 * c['delta']:+.1f} pts [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}]")
    console.print(f"[bold green]results[/]: {out / 'eval_results.json'}")
    return out
