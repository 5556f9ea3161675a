"""Prompt-learning methods through peft: the base is frozen and untouched; what trains is
a short sequence of virtual tokens.

- prompt: soft prompt embeddings prepended to the input (Lester et al.), optionally
  initialised from the embeddings of a text such as a task description.
- ptuning: P-tuning, the virtual token embeddings produced by a small MLP/LSTM encoder.
- prefix: prefix tuning, trained key/value prefixes for every attention layer.

These methods change the inputs of the whole model, so the loss must run through peft's
own forward (``supports_hidden_path = False``).

Their defaults are their own, because LoRA's do not carry over: a handful of input vectors
moved at LoRA's learning rate (2e-4) barely move in a short run, and a soft prompt started
from random vectors first has to undo the noise it adds to every input. So each has its own
default learning rate (applied only when the config sets no ``train.lr``), and prompt tuning
starts from the embeddings of the task's own text (peft's ``PromptTuningInit.TEXT``). The
measured effect on the quick-start task is in docs/methods.md.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tuneforge.config import Strict
from tuneforge.methods.base import Method, PeftMethod, register_method


class PromptOptions(Strict):
    name: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(20, gt=0)
    init: Literal["task", "random"] = Field(
        "task", description="task: start from the token embeddings of the task's text (data.system_prompt, "
        "else the first training row's system turn, then its first request), cut or repeated to "
        "num_virtual_tokens; random: peft's random vectors")
    init_text: str | None = Field(None, description="start from this text's token embeddings instead of the task's")


class PtuningOptions(Strict):
    name: Literal["ptuning"] = "ptuning"
    num_virtual_tokens: int = Field(20, gt=0)
    encoder_hidden_size: int = Field(128, gt=0)
    encoder_type: Literal["MLP", "LSTM"] = "MLP"


class PrefixOptions(Strict):
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, gt=0)
    init: Literal["task", "random"] = Field(
        "task", description="task: start from the keys/values the model itself computes for the task's text "
        "(as for prompt); random: peft's random vectors (which garble the base's output at the start)")
    init_text: str | None = Field(None, description="start from this text's keys/values instead of the task's")
    projection: bool = Field(False, description="reparameterise the prefix through a 2-layer MLP")
    encoder_hidden_size: int = Field(128, gt=0, description="MLP width when projection is on")


class PromptLearning(PeftMethod):
    supports_hidden_path = False
    padding_free = False  # virtual tokens are prepended to each row: rows cannot be laid end to end

    def peft_config(self, model, opts):
        raise NotImplementedError

    def for_task(self, opts, rows, system_prompt):
        if getattr(opts, "init", None) != "task" or opts.init_text:
            return opts
        text = task_text(rows, system_prompt)
        return opts.model_copy(update={"init_text": text}) if text else opts

    def apply(self, model, opts):
        from peft import get_peft_model  # deferred: peft imports transformers; config validation and --help stay quick

        return get_peft_model(model, self.peft_config(model, opts))

    merge = Method.merge  # virtual tokens are inputs, not weights: nothing to fold


def task_text(rows: list[dict], system_prompt: str | None) -> str:
    """The words that describe the task: the system prompt (the config's, else the first row's
    system turn) and the first training row's first request. Its tokens start the soft prompt."""
    messages = rows[0]["messages"] if rows and rows[0].get("messages") else []
    system = system_prompt or next((m["content"] for m in messages if m["role"] == "system"), "")
    request = next((m["content"] for m in messages if m["role"] == "user"), "")
    return "\n".join(t for t in (system, request) if t).strip()


@register_method
class PromptTuning(PromptLearning):
    name = "prompt"
    options = PromptOptions
    default_lr = 3e-2
    default_lr_why = ("a soft prompt is a few input vectors: LoRA's 2e-4 hardly moves them in a short run "
                      "(the value of peft's prompt-tuning examples, measured in docs/methods.md)")

    def peft_config(self, model, opts):
        # deferred: peft imports transformers; config validation and --help stay quick
        from peft import PromptTuningConfig, PromptTuningInit, TaskType

        text = {"prompt_tuning_init": PromptTuningInit.TEXT, "prompt_tuning_init_text": opts.init_text,
                # peft tokenizes the text with the tokenizer saved beside the loaded weights.
                "tokenizer_name_or_path": model.name_or_path} if opts.init_text else {}
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=opts.num_virtual_tokens, **text)


@register_method
class PTuning(PromptLearning):
    name = "ptuning"
    options = PtuningOptions
    default_lr = 1e-2
    default_lr_why = "the virtual tokens come out of a small freshly initialised encoder: LoRA's 2e-4 hardly trains it"

    def peft_config(self, model, opts):
        # deferred: peft imports transformers; config validation and --help stay quick
        from peft import PromptEncoderConfig, TaskType

        return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=opts.num_virtual_tokens,
                                   encoder_hidden_size=opts.encoder_hidden_size,
                                   encoder_reparameterization_type=opts.encoder_type)


@register_method
class PrefixTuning(PromptLearning):
    name = "prefix"
    options = PrefixOptions
    default_lr = 1e-2
    default_lr_why = "a prefix is a few keys/values per layer: LoRA's 2e-4 hardly moves them in a short run"

    def peft_config(self, model, opts):
        # deferred: peft imports transformers; config validation and --help stay quick
        from peft import PrefixTuningConfig, TaskType

        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=opts.num_virtual_tokens,
                                  prefix_projection=opts.projection, encoder_hidden_size=opts.encoder_hidden_size)

    def apply(self, model, opts):
        peft_model = super().apply(model, opts)
        if opts.init_text and not opts.projection and model.device.type != "meta":
            init_prefix_from_text(peft_model, opts.init_text)
        return peft_model


@torch.no_grad()
def init_prefix_from_text(peft_model, text: str) -> None:
    """Set the prefix to the keys/values the frozen model computes for ``text`` (its tokens cut
    or repeated to num_virtual_tokens): the model starts out reading a real prompt, not noise.
    The text runs at positions 0..n-1, where the prefix sits, so rotary keys line up."""
    from transformers import AutoTokenizer  # deferred: transformers takes seconds to import

    cfg = peft_model.peft_config[peft_model.active_adapter]
    n = cfg.num_virtual_tokens
    tok = AutoTokenizer.from_pretrained(peft_model.get_base_model().name_or_path)
    ids = tok(text, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
    ids = (ids * -(-n // len(ids)))[:n]
    embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding
    with peft_model.disable_adapter():
        cache = peft_model.get_base_model()(input_ids=torch.tensor([ids], device=embedding.weight.device),
                                            use_cache=True).past_key_values
    # peft reads the weight [n, layers * 2 * heads * head_dim] as [n, layers * 2, heads, head_dim]:
    # layer l's keys at 2l, its values at 2l + 1 (peft_model.get_prompt).
    kv = []
    for layer in cache.layers:
        kv += [layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)]  # [heads, n, d] -> [n, heads, d]
    weight = torch.stack(kv, dim=1).reshape(n, -1)
    if weight.shape != embedding.weight.shape:
        raise ValueError(f"prefix init: the model's cache is {tuple(weight.shape)}, the prefix "
                         f"{tuple(embedding.weight.shape)}")
    embedding.weight.copy_(weight.to(embedding.weight.dtype))
