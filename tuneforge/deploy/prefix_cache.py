"""Prefix caching for the local engine: the attention keys and values (KV) of sequences already
served, per adapter, reused by later prompts that start with the same tokens.

Requests to one adapter nearly always start alike (system prompt and chat template: 46 of the
serving benchmark's 64-78 prompt tokens), and a conversation's next turn starts with the whole
previous turn and its answer. Prefill is compute-bound (every prompt token through every layer),
so skipping the shared part cuts the time to the first token and the cost of each batch. This is
vLLM's automatic prefix caching, kept simple: one entry per served sequence (prompt and answer),
matched by longest common prefix, evicted least recently used within a byte budget. vLLM shares
fixed-size blocks in a hash tree and stores a shared prefix once; here every entry holds its own
copy, which costs memory (bounded) but no block tables in the attention kernels.

KV depends on the adapter (LoRA on the projections of every layer below), so an entry belongs to
one adapter and goes when that adapter is unloaded.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class Entry:
    adapter: str
    tokens: tuple[int, ...]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [kv_heads, len(tokens), head_dim]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv)


class PrefixCache:
    """``max_bytes``: the budget for all entries; ``min_tokens``: shorter matches are not worth a
    cache (they save less than the copy and the mask costs)."""

    def __init__(self, max_bytes: int, min_tokens: int = 16):
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self.entries: OrderedDict[tuple[str, tuple[int, ...]], Entry] = OrderedDict()  # least recent first
        self.bytes = 0
        self.reused_tokens = 0  # prompt tokens not computed again (for stats and tests)

    def match(self, adapter: str, ids: list[int]) -> tuple[int, Entry | None]:
        """The entry of ``adapter`` sharing the longest prefix with ``ids`` and that length, at
        most len(ids) - 1 (the last prompt token must run to give the first new token's logits);
        (0, None) below ``min_tokens``."""
        want, best, n = tuple(ids), None, 0
        for e in self.entries.values():
            if e.adapter == adapter:
                k = _common_prefix(e.tokens, want, len(want) - 1)
                if k > n:
                    best, n = e, k
        if best is None or n < self.min_tokens:
            return 0, None
        self.entries.move_to_end((adapter, best.tokens))
        return n, best

    def covers(self, adapter: str, tokens: tuple[int, ...]) -> bool:
        """An entry of ``adapter`` already holds ``tokens`` (or a sequence they begin)."""
        return any(e.adapter == adapter and e.tokens[:len(tokens)] == tokens for e in self.entries.values())

    def put(self, adapter: str, tokens: tuple[int, ...], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        entry = Entry(adapter, tokens, kv)
        if len(tokens) < self.min_tokens or entry.nbytes > self.max_bytes or self.covers(adapter, tokens):
            return
        # Entries this one extends (a conversation's earlier turn) hold nothing it does not.
        for key in [k for k, e in self.entries.items() if e.adapter == adapter and tokens[:len(e.tokens)] == e.tokens]:
            self._remove(key)
        self.entries[(adapter, tokens)] = entry
        self.bytes += entry.nbytes
        while self.bytes > self.max_bytes:
            self._remove(next(iter(self.entries)))

    def drop(self, adapter: str) -> None:
        """Forget ``adapter``'s entries (it was unloaded: a later load may bring other weights)."""
        for key in [k for k in self.entries if k[0] == adapter]:
            self._remove(key)

    def _remove(self, key: tuple[str, tuple[int, ...]]) -> None:
        self.bytes -= self.entries.pop(key).nbytes


def _common_prefix(a: tuple, b: tuple, limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``limit``: a binary search on tuple
    slices, which compare in C (a token-by-token loop in Python would cost more than it saves)."""
    lo, hi = 0, min(len(a), len(b), limit)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
