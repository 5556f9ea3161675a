"""Shared fixtures: a tiny Llama + ChatML tokenizer built from config (no download)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny(out_dir):
    """A 2-layer Llama with a byte-level BPE tokenizer trained on the built-in task's text."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tuneforge.data.builtin import orders

    corpus = [f"{r['instruction']} {r['input']} {r['output']}" for r in orders(n=300, seed=1)]
    corpus += ["system user assistant hello world a b c"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return str(build_tiny(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_tok(tiny_model_dir):
    from tuneforge.models.load import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture
def tiny_raw_cfg(tiny_model_dir, tmp_path):
    """A raw config dict for a short LoRA run of the tiny model (tests tweak it)."""
    return {
        "model": {"name": tiny_model_dir},
        "data": {"train": ["builtin:orders?n=120&seed=3"], "max_length": 160, "val_size": 0.1, "test_size": 0.1},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
        "train": {"lr": 5e-3, "max_steps": 6, "batch_size": 4, "eval_every": 3, "save_every": 3, "seed": 7,
                  "dtype": "fp32"},
        "eval": {"max_new_tokens": 8, "limit": 4, "batch_size": 4},
        "output_dir": str(tmp_path / "runs"),
        "run_name": "tiny",
    }
