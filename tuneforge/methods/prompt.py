"""Prompt-learning methods through peft: the base is frozen and untouched; what trains is
a short sequence of virtual tokens.

- prompt: soft prompt embeddings prepended to the input (Lester et al.), optionally
  initialised from the embeddings of a text such as a task description.
- ptuning: P-tuning, the virtual token embeddings produced by a small MLP/LSTM encoder.
- prefix: prefix tuning, trained key/value prefixes for every attention layer.

These methods change the inputs of the whole model, so the loss must run through peft's
own forward (``supports_hidden_path = False``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tuneforge.config import Strict
from tuneforge.methods.base import Method, PeftMethod, register_method


class PromptOptions(Strict):
    name: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(20, gt=0)
    init_text: str | None = Field(None, description="initialise the soft prompt from this text's token "
                                                    "embeddings (repeated to fill); default random")


class PtuningOptions(Strict):
    name: Literal["ptuning"] = "ptuning"
    num_virtual_tokens: int = Field(20, gt=0)
    encoder_hidden_size: int = Field(128, gt=0)
    encoder_type: Literal["MLP", "LSTM"] = "MLP"


class PrefixOptions(Strict):
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, gt=0)
    projection: bool = Field(False, description="reparameterise the prefix through a 2-layer MLP")
    encoder_hidden_size: int = Field(128, gt=0, description="MLP width when projection is on")


class PromptLearning(PeftMethod):
    supports_hidden_path = False
    padding_free = False  # virtual tokens are prepended to each row: rows cannot be laid end to end

    def peft_config(self, model, opts):
        raise NotImplementedError

    def apply(self, model, opts):
        from peft import get_peft_model  # deferred: peft imports transformers; config validation and --help stay quick

        return get_peft_model(model, self.peft_config(model, opts))

    merge = Method.merge  # virtual tokens are inputs, not weights: nothing to fold


@register_method
class PromptTuning(PromptLearning):
    name = "prompt"
    options = PromptOptions

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

    def peft_config(self, model, opts):
        # deferred: peft imports transformers; config validation and --help stay quick
        from peft import PrefixTuningConfig, TaskType

        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=opts.num_virtual_tokens,
                                  prefix_projection=opts.projection, encoder_hidden_size=opts.encoder_hidden_size)
