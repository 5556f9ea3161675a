"""Tokenizer fixes that make chat fine-tuning correct.

Converted or community checkpoints often ship a tokenizer whose eos is not the token that
ends an assistant turn, whose pad equals eos (so padding-aware code masks the eos the
model must learn to emit), or that prepends a BOS the model never saw. Each fix here is
recorded, and tests check the result round-trips the chat template.
"""

from __future__ import annotations

END_OF_TURN_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|finetune_right_pad_id|>", "<|end_of_text|>", "<unk>")


def fix_chat_tokenizer(tok, model=None) -> list[str]:
    fixes: list[str] = []
    template = tok.chat_template or ""
    vocab = tok.get_vocab()
    for cand in END_OF_TURN_CANDIDATES:
        if cand in template and cand in vocab and tok.eos_token != cand:
            fixes.append(f"eos {tok.eos_token!r} -> {cand!r} (the token that ends a chat turn)")
            tok.eos_token = cand
            break
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        # Llama 3 ships no pad: its <|finetune_right_pad_id|> (3.1+) or <|end_of_text|> (free once eos is <|eot_id|>).
        pad = next((t for t in PAD_CANDIDATES if t in vocab and t != tok.eos_token), None)
        if pad is not None:
            fixes.append(f"pad {tok.pad_token!r} -> {pad!r} (pad must differ from eos)")
            tok.pad_token = pad
    probe = tok("x", add_special_tokens=True).input_ids
    if tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id and len(probe) > 1:
        # The chat template writes its own turn markers; a BOS added on top was never seen in training.
        tok.add_bos_token = False
        fixes.append("stop prepending bos to every input")
        if tok("x", add_special_tokens=True).input_ids[0] == tok.bos_token_id:
            raise RuntimeError("could not stop the tokenizer from prepending BOS")
    if model is not None:
        for cfg in (model.config, model.generation_config):
            cfg.eos_token_id = tok.eos_token_id
            cfg.pad_token_id = tok.pad_token_id
    return fixes
