"""Vision-language models (model.kind=vision): loading through ``AutoModelForImageTextToText``
and ``AutoProcessor`` by hub id or local folder (SmolVLM/Idefics3, Qwen2-VL, LLaVA families),
and the names of their three parts: vision tower, projector, language model.

Part names differ per family (transformers 5):

    family      vision tower          projector                       language model
    LLaVA       model.vision_tower    model.multi_modal_projector     model.language_model
    Idefics3    model.vision_model    model.connector                 model.text_model
    Qwen2-VL    model.visual          model.visual.merger             model.language_model
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.models.load import ModelLoadError, _hub_hint, load_config, resolve
from tuneforge.models.tokenizer import fix_chat_tokenizer

VISION_NAMES = ("vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder")
PROJECTOR_NAMES = ("multi_modal_projector", "connector", "merger", "mm_projector", "projector")
LANGUAGE_NAMES = ("language_model", "text_model")
# Tokens a processor writes around or for an image: never trained (labels -100).
IMAGE_TOKEN_ATTRS = ("image_token", "fake_image_token", "global_image_token", "boi_token", "eoi_token",
                     "image_start_token", "image_end_token", "vision_start_token", "vision_end_token",
                     "video_token")

KNOWN_IMAGE_TOKENS = {"<fake_token_around_image>", "<image>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                      "<|video_pad|>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"}


@dataclass(frozen=True)
class Parts:
    vision: str  # module name of the vision tower
    projector: str | None  # module name of the projector (may sit inside the vision tower: Qwen2-VL)
    language: str  # module name of the language model (decoder layers; the lm_head sits beside it)


def _first(names: list[str], wanted: tuple[str, ...], exclude: str | None = None) -> str | None:
    """The shortest module name whose last part is one of ``wanted`` (outermost match)."""
    hits = [n for n in names if n.rsplit(".", 1)[-1] in wanted and (exclude is None or n != exclude)]
    return min(hits, key=lambda n: (n.count("."), len(n))) if hits else None


def find_parts(module_names: list[str]) -> Parts:
    vision = _first(module_names, VISION_NAMES)
    language = _first(module_names, LANGUAGE_NAMES)
    if vision is None or language is None:
        raise ModelLoadError("not a vision-language model tuneforge knows the parts of: no "
                             f"{'/'.join(VISION_NAMES) if vision is None else '/'.join(LANGUAGE_NAMES)} module")
    return Parts(vision, _first(module_names, PROJECTOR_NAMES), language)


def is_vision_config(config) -> bool:
    return getattr(config, "vision_config", None) is not None


@functools.lru_cache(maxsize=64)
def is_vision_model(name: str) -> bool:
    """Whether ``name`` (alias, folder, hub id) is a vision-language model (its config has a
    vision_config); False for anything whose config cannot be read here."""
    try:
        return is_vision_config(load_config(name))
    except (ModelLoadError, OSError, ValueError):
        return False


def meta_vision_module_names(name: str, **kw) -> list[str]:
    """Module names of a VLM read from its config alone (no weights are loaded)."""
    # deferred: transformers takes seconds to import; only code that builds a model pays
    from transformers import AutoModelForImageTextToText

    config = load_config(name, **kw)
    if not is_vision_config(config):
        raise ModelLoadError(f"'{name}' is a {type(config).__name__.removesuffix('Config')} model without a vision "
                             "encoder (no vision_config): model.kind=vision needs an image-text-to-text model, "
                             "e.g. HuggingFaceTB/SmolVLM-256M-Instruct")
    try:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
    except ValueError as e:
        raise ModelLoadError(f"'{name}': transformers has no image-text-to-text class for it ({e})") from None
    return [n for n, _ in model.named_modules() if n]


def load_processor(name: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's processor (image processor + tokenizer + chat template), the tokenizer's eos
    and pad fixed as for text models (eos = the token that ends a turn)."""
    # deferred: transformers takes seconds to import; only code that builds a model pays
    from transformers import AutoProcessor

    saved = Path(name)  # a run's adapter folder holds the processor alone (no model config.json)
    path = name if (saved / "processor_config.json").is_file() or (saved / "preprocessor_config.json").is_file() \
        else resolve(name).path
    try:
        proc = AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_hint(name, e) from None
    tok = getattr(proc, "tokenizer", None)
    if tok is None or not getattr(proc, "image_processor", None):
        raise ModelLoadError(f"'{name}': its processor has no image processor and tokenizer "
                             f"({type(proc).__name__}); model.kind=vision needs an image-text-to-text processor")
    if not getattr(proc, "chat_template", None) and not tok.chat_template:
        raise ModelLoadError(f"'{name}': its processor has no chat template, so conversations cannot be rendered")
    if not tok.chat_template:  # fix_chat_tokenizer reads the end-of-turn token from the template
        tok.chat_template = proc.chat_template
    fix_chat_tokenizer(tok)
    return proc


def image_token_ids(proc) -> set[int]:
    """Ids of the tokens a processor writes for images (placeholders, image start/end, the row and
    column markers of split images): the loss never falls on them."""
    tok = proc.tokenizer
    out = set()
    for attr in IMAGE_TOKEN_ATTRS:
        text = getattr(proc, attr, None)
        if isinstance(text, str):
            tid = tok.convert_tokens_to_ids(text)
            if isinstance(tid, int) and tid != tok.unk_token_id:
                out.add(tid)
    for attr in ("image_token_id", "image_token_index"):
        if isinstance(getattr(proc, attr, None), int):
            out.add(getattr(proc, attr))
    # Idefics3 / SmolVLM spell tile positions as added tokens (<row_1_col_1>, <global-img>, around
    # them <fake_token_around_image>); Qwen2-VL wraps its pads in <|vision_start|> ... <|vision_end|>.
    out |= {i for t, i in tok.get_added_vocab().items()
            if t.startswith(("<row_", "<global-img")) or t in KNOWN_IMAGE_TOKENS}
    return out


def load_vision_model(name: str, dtype: torch.dtype, device: str, attn_implementation: str = "sdpa",
                      revision: str | None = None, trust_remote_code: bool = False):
    # deferred: transformers takes seconds to import; only code that builds a model pays
    from transformers import AutoModelForImageTextToText

    r = resolve(name)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            r.path, dtype=dtype, attn_implementation=attn_implementation, revision=revision,
            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_hint(name, e) from None
    return model.to(device)


def fix_vision_generation(proc, model) -> None:
    """eos and pad of the model's (and its generation) config follow the fixed tokenizer."""
    tok = proc.tokenizer
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None:
            cfg.eos_token_id = tok.eos_token_id
            cfg.pad_token_id = tok.pad_token_id
