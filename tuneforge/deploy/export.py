"""tuneforge export RUN_DIR --format merged|gguf|int8|pruned: a servable artefact with a manifest.

Every format starts from the same merge: the run's LoRA folded into an fp32 copy of the
base (merging in bf16 would round the update away), then:
  merged  plain HF folder (safetensors, fixed tokenizer, chat template, generation config
          whose eos is the end-of-turn token). fp32 by default: rounding the merged weights
          to bf16 changed SmolLM2's greedy output within 32 tokens; --dtype bf16 halves the size
  gguf    model-f16.gguf and model-q8_0.gguf (llama.cpp, Ollama, LM Studio)
  int8    Linear weights stored as int8 (weight-only) for CPU serving (see deploy/int8.py)
  pruned  a smaller plain HF folder: MLP channels, attention heads (by key/value group) or
          whole layers removed (deploy/prune.py), optionally a LoRA recovery fine-tune, and a
          size/params/speed/metric table for dense, pruned and recovered (deploy/prune_export.py)
Every format's folder gets a README.md model card (registry/card.py); a README.md the user put
into an earlier export of the same folder is kept instead. Writes go to a temp folder renamed
into place, so a reader never sees half an export.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import torch

from tuneforge.data.render import with_system
from tuneforge.data.tools import chat_ids
from tuneforge.deploy.prune import PruneError, PruneOptions
from tuneforge.io import atomic_dir, check_output, write_json
from tuneforge.models.load import resolve
from tuneforge.registry.card import CARD, owned_card, write_card
from tuneforge.runs import RunInfo, load_run, model_weights_sha256, read_run

FORMATS = ("merged", "gguf", "int8", "pruned")
# The model card's library_name: how each format's folder loads.
LIBRARY = {"merged": "transformers", "pruned": "transformers", "gguf": "gguf", "int8": "tuneforge"}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export(run_dir: str | Path, fmt: str, out: str | Path | None = None, dtype: str = "fp32",
           prune: PruneOptions | None = None, console=None) -> Path:
    """``prune``: the options of --format pruned (that format needs them; the others refuse them)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}")
    if (fmt == "pruned") != (prune is not None):
        raise PruneError("--sparsity/--structured/--recover are the options of --format pruned (and it needs "
                         "--sparsity)" if fmt != "pruned" else "--format pruned needs --sparsity")
    if prune is not None and prune.problems():
        raise PruneError("; ".join(prune.problems()))
    run = read_run(run_dir)
    out = Path(out) if out else run.run_dir / "export" / fmt
    # The run's own files are inputs (only RUN_DIR/export holds exports); checked before the slow merge.
    guard = {"owned": made_by_export, "what": "export folder",
             "inputs": [p for p in run.run_dir.iterdir() if p.name != "export"]}
    check_output(out, **guard)
    if fmt == "pruned":
        from tuneforge.deploy.prune_export import check_run  # deferred: only for this format

        check_run(run)
    user_card = out / CARD if (out / CARD).is_file() and not owned_card(out / CARD) else None
    model, tok, _ = load_run(run.run_dir, merge=True)  # fp32 on the CPU: what every format starts from
    extra: dict = {}
    with atomic_dir(out, **guard) as tmp:
        if fmt == "merged":
            model.to(DTYPES[dtype]).save_pretrained(tmp)
            tok.save_pretrained(tmp)
            extra["dtype"] = dtype
        elif fmt == "pruned":
            from tuneforge.deploy.prune_export import write_pruned  # deferred: only for this format

            extra["dtype"] = dtype
            extra["pruning"] = write_pruned(run, model, tok, tmp, prune, DTYPES[dtype], _probe_prompts(run, tok),
                                            console)
        elif fmt == "gguf":
            from tuneforge.deploy.gguf_export import QTYPES, write_gguf  # deferred: gguf, only for this format

            tok_dir = tmp / "tokenizer"
            tok.save_pretrained(tok_dir)
            for q in QTYPES:
                write_gguf(model, tok, tok_dir, tmp / f"model-{q}.gguf", q, name=run.run_dir.name)
        else:
            from tuneforge.deploy.int8 import quantize, save_int8  # deferred: only for this format

            reference = _copy_in(model, torch.bfloat16)
            qmodel = quantize(model)
            save_int8(qmodel, tmp)
            model.generation_config.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            extra["vs_bf16"] = compare_models(reference, qmodel, tok, _probe_prompts(run, tok))
        m = manifest(run, fmt, tmp, extra)
        if user_card is not None:  # a README.md the user wrote into the old export survives the new one
            shutil.copyfile(user_card, tmp / CARD)
        else:
            write_card(tmp, run.run_dir, title=f"{run.run_dir.name} ({fmt} export)", library=LIBRARY[fmt],
                       tags=(fmt,), command=export_command(run.run_dir, fmt, out, dtype, prune), export=m)
        write_json(tmp / "manifest.json", m)
    return out


def export_command(run_dir: Path, fmt: str, out: Path, dtype: str, prune: PruneOptions | None) -> str:
    """The command that writes this export again (after the run's own training)."""
    cmd = f"tuneforge export {run_dir} --format {fmt} --out {out.resolve()}"
    if dtype != "fp32":
        cmd += f" --dtype {dtype}"
    if prune is not None:
        cmd += f" --sparsity {prune.sparsity} --structured {','.join(prune.structures)}"
        cmd += f" --recover {prune.recover_steps}" if prune.recover_steps else ""
    return cmd


def made_by_export(folder: Path) -> bool:
    """A folder ``tuneforge export`` wrote: its manifest.json names the format and the source run."""
    try:
        m = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("format") in FORMATS and "source_run" in m


def manifest(run: RunInfo, fmt: str, folder: Path, extra: dict) -> dict:
    base_dir = resolve(run.base_model).path
    return {"format": fmt, "source_run": str(run.run_dir), "base_model": run.base_model,
            "base_model_sha256": model_weights_sha256(base_dir) if Path(base_dir).is_dir() else None,
            "adapter_sha256": run.adapter_sha256, "eval_scores": {"tuned": run.scores, "base": run.base_scores},
            "files": {p.relative_to(folder).as_posix(): p.stat().st_size
                      for p in sorted(folder.rglob("*")) if p.is_file()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}


def _copy_in(model, dtype):
    return copy.deepcopy(model).to(dtype).eval()


def _probe_prompts(run: RunInfo, tok, n: int = 4) -> list[list[int]]:
    """Prompts for the int8 comparison: the run's held-out eval prompts, else fixed ones."""
    texts = []
    samples = run.run_dir / "eval_samples.jsonl"
    if samples.is_file():
        texts = [json.loads(x)["prompt"] for x in samples.read_text().splitlines() if x.strip()]
    texts = list(dict.fromkeys(t for t in texts if t))[:n] or ["Hello! Who are you?", "What is 2 + 3?"]
    out = []
    for t in texts:
        out.append(chat_ids(tok, with_system([{"role": "user", "content": t}], run.system_prompt),
                            add_generation_prompt=True))
    return out


@torch.no_grad()
def compare_models(reference, candidate, tok, prompts: list[list[int]], new_tokens: int = 16,
                   generate_on: int = 2) -> dict:
    """Speed (greedy tokens/s, one prompt at a time, on the first ``generate_on`` prompts) and
    quality (next-token agreement over every prompt position; greedy-output equality) of
    ``candidate`` against ``reference``."""
    speed, outs = {}, {}
    for who, m in (("reference", reference), ("candidate", candidate)):
        t0, n_tok, outs[who] = time.perf_counter(), 0, []
        for p in prompts[:generate_on]:
            ids = torch.tensor([p])
            g = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            outs[who].append(g[0, len(p):].tolist())
            n_tok += g.shape[1] - len(p)
        speed[who] = n_tok / (time.perf_counter() - t0)
    agree = []
    for p in prompts:
        ids = torch.tensor([p])
        a, b = reference(input_ids=ids).logits[0].float(), candidate(input_ids=ids).logits[0].float()
        agree.append((a.argmax(-1) == b.argmax(-1)).float().mean().item())
    same = sum(a == b for a, b in zip(outs["reference"], outs["candidate"]))
    return {"reference": "bf16 merged model", "prompts": len(prompts),
            "tokens_per_s": {"bf16": round(speed["reference"], 2), "int8": round(speed["candidate"], 2)},
            "speedup": round(speed["candidate"] / speed["reference"], 2),
            "next_token_agreement": round(sum(agree) / len(agree), 4),
            "same_greedy_output": f"{same}/{len(outs['reference'])}"}
