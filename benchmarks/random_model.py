"""A model of a known architecture with random weights, saved as a Hugging Face folder with the
embedded SmolLM2 tokenizer: for speed and memory benchmarks where hub weights cannot be
reached (a GPU machine with no network). Throughput and memory do not depend on the weights;
losses do, so compare runners on the same folder only.

    python benchmarks/random_model.py smollm2-1.7b /tmp/sm17     # SmolLM2-1.7B's shapes, 1.71 B parameters
    python benchmarks/random_model.py --list
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tuneforge.models.load import resolve

# The published configs of the SmolLM2 family (llama architecture, vocabulary 49152), so the
# embedded tokenizer fits every one of them.
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=10000.0),  # dry runs of the benchmark scripts
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rope_theta=100000.0),
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, rope_theta=100000.0),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, rope_theta=130000.0),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "generation_config.json", "chat_template.jinja")


def build(shape: str, out: Path, tokenizer: str, seed: int = 0) -> int:
    src = Path(resolve(tokenizer).path)
    cfg = LlamaConfig(vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2, **SHAPES[shape])
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of 1.7 B weights: seconds on a GPU
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", nargs="?", choices=list(SHAPES))
    p.add_argument("out", nargs="?", type=Path)
    p.add_argument("--tokenizer", default="smollm2-135m-instruct", help="model spec or folder whose tokenizer to copy")
    p.add_argument("--list", action="store_true")
    a = p.parse_args()
    if a.list or not (a.shape and a.out):
        for k, v in SHAPES.items():
            print(k, v)
    else:
        print(f"{a.shape}: {build(a.shape, a.out, a.tokenizer) / 1e9:.2f} B parameters -> {a.out}")
