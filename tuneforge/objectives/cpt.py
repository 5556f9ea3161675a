"""Continued pre-training: raw domain text, packed into full sequences, loss on every token.

Reuses the token-loss recipe (train/recipes/tokens.py): only the encoding differs (labels = input ids)
and the held-out measure is perplexity on domain text, before (adapter off) and after.
"""

from __future__ import annotations

from typing import Literal

from tuneforge.config import Strict
from tuneforge.data.render import Encoded
from tuneforge.objectives.base import register_objective
from tuneforge.objectives.sft import SFT


def pack_text(token_lists: list[list[int]], eos_id: int, block: int) -> tuple[list[list[int]], int]:
    """Documents joined with eos, cut into blocks of ``block`` tokens (the standard CPT
    packing: no padding, attention may cross a document boundary, eos marks it).
    Returns the blocks and the number of tail tokens that did not fill a last block; a
    tail of at least half a block is kept as a shorter block, a shorter one is dropped."""
    stream = [t for ids in token_lists for t in (*ids, eos_id)]
    blocks = [stream[i : i + block] for i in range(0, len(stream), block)]
    dropped = 0
    if blocks and len(blocks[-1]) < block and len(blocks[-1]) < block // 2:
        dropped = len(blocks.pop())
    return blocks, dropped


class CptOptions(Strict):
    name: Literal["cpt"] = "cpt"


@register_objective
class CPT(SFT):
    name = "cpt"
    options = CptOptions
    data_kind = "text"
    held_out = "perplexity"  # raw text has no answers to generate: held-out perplexity, base vs tuned

    def encode(self, tok, rows, data_cfg):
        ids = [tok(r["text"], add_special_tokens=False)["input_ids"] for r in rows]
        blocks, tail = pack_text(ids, tok.eos_token_id, data_cfg.max_length)
        enc = Encoded(rows=[{"input_ids": b, "labels": list(b)} for b in blocks])
        if tail:
            enc.dropped["tail shorter than half of max_length (tokens)"] = tail
            enc.examples.append(f"the last {tail} of {sum(map(len, ids)) + len(ids)} tokens (with eos) fill no block")
        return enc
