"""Padding-free attention: several examples laid end to end in one row, each attending only to itself.

A padded batch of 4 rows of 60-250 tokens spends about a quarter of every matrix product on
padding. Laid end to end (position ids restarting at 0 for each example) the same rows cost
only their real tokens. transformers understands such rows, but its SDPA path turns them into
a dense [L, L] block-diagonal mask: attention then costs (sum of lengths)^2 instead of the sum
of squares, which at 1024-token rows is more than the padding saved. flash-attn's varlen
kernels do it right but exist only on CUDA; on CPUs nothing maintained does. So this module
registers one small attention function with transformers' AttentionInterface: it finds the
example boundaries from the position ids and runs causal SDPA per example (one fused kernel
each, no mask). Anything else (a padding mask, a KV cache, decoding) goes to the stock SDPA
function unchanged, so generation and evaluation behave exactly as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "tuneforge_varlen"


def segments(position_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every example in rows whose positions restart at 0 per example."""
    out = []
    for b, row in enumerate(position_ids.tolist()):
        starts = [i for i, p in enumerate(row) if p == 0] or [0]
        if starts[0] != 0:
            starts = [0, *starts]
        out += [(b, s, e) for s, e in zip(starts, [*starts[1:], len(row)], strict=True)]
    return out


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None,
                     **kwargs):
    """query/key/value [B, H, L, D] -> ([B, L, H, D], None), per-example causal attention."""
    plain = attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]
    if plain:  # padded batch, decoding with a cache: nothing to split
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # Without a padding mask transformers passes one [1, L] row of default positions for a
    # whole batch of full-length rows (CPT blocks): each row is then one example.
    position_ids = position_ids.expand(query.shape[0], -1)
    groups = getattr(module, "num_key_value_groups", 1)
    out = torch.empty_like(query)
    for b, s, e in segments(position_ids):
        out[b : b + 1, :, s:e] = F.scaled_dot_product_attention(
            query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e], dropout_p=dropout,
            scale=scaling, is_causal=True, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


def varlen_mask(*args, attention_mask=None, **kwargs):
    # No 2D padding mask means every row is real tokens (one example, or several laid end to
    # end): the attention function splits them itself, so no [L, L] mask is built.
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(NAME, varlen_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, varlen_mask)


def supported(model) -> bool:
    """Decoder-only models on SDPA with full (not sliding-window) attention everywhere."""
    cfg = model.config
    windowed = getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)
    layer_types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    return (getattr(cfg, "_attn_implementation", None) == "sdpa" and not windowed
            and layer_types == {"full_attention"} and not cfg.is_encoder_decoder)


def enable(model) -> bool:
    """Switch a (not yet peft-wrapped) model to padding-free attention; False when unsupported."""
    if not supported(model):
        return False
    model.set_attn_implementation(NAME)
    return True
