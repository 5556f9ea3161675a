"""Write a Llama-architecture HF model + tokenizer to a GGUF file (f16 or q8_0).

Uses the ``gguf`` package's writer, tensor-name map and quantiser. What it lacks and is
written here: the loop over tensors, llama.cpp's q/k row permutation (llama.cpp applies
rotary embeddings to interleaved pairs, HF to halves; transformers' GGUF loader undoes
exactly this permutation) and the token list with token types from a fast tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

QTYPES = ("f16", "q8_0")


class GGUFExportError(ValueError):
    pass


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows (heads x [first half | second half]) -> llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def token_list(tok, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their GGUF types; ids past the tokenizer (padded embeddings) are UNUSED."""
    import gguf  # deferred: an optional extra, needed only for --format gguf

    by_id = {i: t for t, i in tok.get_vocab().items()}
    special = set(tok.all_special_ids)
    added = {i for i, t in tok.added_tokens_decoder.items() if not t.special}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    return tokens, types


def write_gguf(model, tok, tokenizer_dir: Path, path: Path, qtype: str, name: str) -> None:
    """``tokenizer_dir`` holds the saved tokenizer files (merges and special ids are read from there)."""
    import gguf  # deferred: an optional extra, needed only for --format gguf

    cfg = model.config
    if cfg.model_type != "llama":
        raise GGUFExportError(f"GGUF export supports the llama architecture (SmolLM2, Llama); this model is "
                              f"'{cfg.model_type}'. Export --format merged and use llama.cpp's convert_hf_to_gguf.py")
    if tok.backend_tokenizer.model.__class__.__name__ != "BPE":
        raise GGUFExportError("GGUF export supports byte-level BPE tokenizers only")
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None)
                         else float(cfg.rope_theta))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)

    tokens, types = token_list(tok, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=cfg.vocab_size)
    if not special.merges:
        raise GGUFExportError(f"no BPE merges found in {tokenizer_dir}/tokenizer.json")
    special.add_to_gguf(w)
    # eos must be the end-of-turn token (fix_chat_tokenizer set it); the HF files may say otherwise.
    w.add_eos_token_id(tok.eos_token_id)
    w.add_add_bos_token(False)

    tied = cfg.tie_word_embeddings
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # no output.weight in the file: loaders tie it to token_embd
        gg_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg_name is None:
            raise GGUFExportError(f"no GGUF name for tensor {hf_name}")
        data = t.detach().to(torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute_qk(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_qk(data, n_kv)
        if data.ndim == 1:  # norms stay f32, as llama.cpp's converter does
            w.add_tensor(gg_name, data)
        elif qtype == "q8_0" and data.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gg_name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gg_name, data.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
