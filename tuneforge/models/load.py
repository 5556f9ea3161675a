"""Resolve a model spec (embedded alias, local folder, .gguf file, hub id) and load it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.models import zoo
from tuneforge.models.tokenizer import fix_chat_tokenizer


class ModelLoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class Resolved:
    path: str  # a local folder or a hub id
    origin: str  # embedded | local | gguf | hub


def resolve(name: str, prepare: bool = True) -> Resolved:
    if name in zoo.EMBEDDED:
        if not prepare:
            return Resolved(str(zoo.cached_path(zoo.EMBEDDED[name])), "embedded")
        try:
            return Resolved(str(zoo.ensure(name)), "embedded")
        except zoo.ModelNotAvailable as e:
            raise ModelLoadError(str(e)) from None
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"GGUF file {p} does not exist")
        out = zoo.cache_root() / "gguf" / f"{p.stem}-{zoo.sha256_file(p)[:12]}"
        if not (out / "tuneforge_conversion.json").exists():
            zoo.convert_gguf(p, out, source_note=str(p))
        return Resolved(str(out), "gguf")
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{p} is a folder but has no config.json: not a Hugging Face model folder")
        return Resolved(str(p), "local")
    if name.startswith((".", "/", "~")) or p.suffix:
        raise ModelLoadError(
            f"model '{name}' is neither a folder nor a file here; embedded aliases: {', '.join(zoo.EMBEDDED)}"
        )
    return Resolved(name, "hub")


def _hub_hint(name: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load '{name}' ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        f"If the model hub is unreachable, use an embedded alias ({', '.join(zoo.EMBEDDED)}) or a local folder."
    )


def load_config(name: str, revision: str | None = None, trust_remote_code: bool = False):
    # deferred: transformers takes seconds to import; only code that builds a model pays
    from transformers import AutoConfig

    r = resolve(name)
    try:
        return AutoConfig.from_pretrained(r.path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_hint(name, e) from None


def meta_module_names(name: str, **kw) -> list[str]:
    """Module names of the model, read from its config alone (no weights are loaded)."""
    # deferred: transformers takes seconds to import; only code that builds a model pays
    from transformers import AutoModelForCausalLM

    config = load_config(name, **kw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [n for n, _ in model.named_modules() if n]


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False):
    # deferred: transformers takes seconds to import; only code that builds a model pays
    from transformers import AutoTokenizer

    r = resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(r.path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_hint(name, e) from None
    fix_chat_tokenizer(tok)
    return tok


def load_causal_lm(name: str, dtype: torch.dtype, device: str, attn_implementation: str = "sdpa",
                   revision: str | None = None, trust_remote_code: bool = False, quantization_config=None):
    # deferred: transformers takes seconds to import; only code that builds a model pays
    from transformers import AutoModelForCausalLM

    r = resolve(name)
    # A quantised model cannot be moved with .to(): it is placed while loading instead.
    placement = {"quantization_config": quantization_config, "device_map": device} if quantization_config else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            r.path, dtype=dtype, attn_implementation=attn_implementation, revision=revision,
            trust_remote_code=trust_remote_code, **placement,
        )
    except (OSError, ValueError) as e:
        raise _hub_hint(name, e) from None
    return model if quantization_config else model.to(device)


def load_sequence_classifier(name: str, id2label: dict[int, str], dtype: torch.dtype, device: str,
                             pad_token_id: int | None, revision: str | None = None, trust_remote_code: bool = False):
    """A causal LM or encoder with a new classification head (one output per label; a
    reward model is one label). The label names live in the model config (id2label)."""
    # deferred: transformers takes seconds to import; only code that builds a model pays
    from transformers import AutoModelForSequenceClassification

    r = resolve(name)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            r.path, num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()},
            dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise _hub_hint(name, e) from None
    # Decoder heads score the last non-pad token: the model must know which id pads.
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model.to(device)
