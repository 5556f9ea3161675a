"""Render canonical chat rows to token ids with a loss mask, and batch them.

Labels: the assistant turns' tokens plus the end-of-turn (eos) token that closes each, so
the tuned model learns to stop; prompts (system/user, turn headers) are IGNORE. The
template's text after the end-of-turn token (a newline, for ChatML) is not trained.

Rows with tools (``tools``, assistant ``tool_calls``, ``tool`` results) render through
``data/tools.py``: the model's own template when it renders tools, else the fallback format.
An assistant turn's tool-call blocks are trained like its text; tool results (a user turn in
the fallback, a ``tool`` turn natively) never are. An assistant turn with ``weight: 0`` is
context only: no labels.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from tuneforge.data.tools import chat_ids

IGNORE = -100


class RenderError(ValueError):
    pass


def _ids(tok, messages, add_generation_prompt=False, tools=None) -> list[int]:
    return chat_ids(tok, messages, tools or None, add_generation_prompt=add_generation_prompt)


def render_chat(tok, messages: list[dict], tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels for one conversation (labels are IGNORE outside assistant spans;
    ``tools``: the row's tool schemas, rendered as the template or the fallback does)."""
    eos = tok.eos_token_id
    full = _ids(tok, messages, tools=tools)
    labels = [IGNORE] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        prefix = _ids(tok, messages[:i], add_generation_prompt=True, tools=tools)
        start, end = len(prefix), len(_ids(tok, messages[: i + 1], tools=tools))
        if full[:start] != prefix:
            raise RenderError("the chat template's prompt prefix does not tokenize as a prefix of the conversation")
        # Train up to and including the end-of-turn token; not the template's trailing text.
        span_end = start
        while span_end < end and full[span_end] != eos:
            span_end += 1
        if span_end == end:
            raise RenderError(f"the chat template does not close assistant turns with eos {tok.eos_token!r}")
        labels[start : span_end + 1] = full[start : span_end + 1]
    return full, labels


def prompt_ids(tok, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The prompt for generation: every turn before the final assistant one, plus its header
    (with the row's ``tools`` listed the way training rendered them)."""
    return _ids(tok, messages[:-1], add_generation_prompt=True, tools=tools)


@dataclass
class Encoded:
    rows: list[dict]  # {"input_ids": [...], "labels": [...]}
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    examples: list[str] = field(default_factory=list)


def encode_rows(tok, rows: list[dict], max_length: int, overlength: str, system_prompt: str | None = None) -> Encoded:
    """Render every row; count (never hide) what happens to rows longer than max_length."""
    enc = Encoded(rows=[])
    for row in rows:
        if "segments" in row:  # Axolotl input_output rows: no template, labels per segment
            ids, labels = render_segments(tok, row["segments"])
        else:
            ids, labels = render_chat(tok, with_system(row["messages"], system_prompt), row.get("tools"))
        if len(ids) > max_length:
            detail = f"{row.get('_where', '?')}: {len(ids)} tokens > data.max_length={max_length}"
            if overlength == "error":
                raise RenderError(f"{detail}. Raise data.max_length or set data.overlength=drop|truncate")
            if len(enc.examples) < 3:
                enc.examples.append(detail)
            if overlength == "drop":
                enc.dropped["longer than max_length"] += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            enc.truncated += 1
            if all(t == IGNORE for t in labels[1:]):
                enc.dropped["no trained token left after truncation"] += 1
                continue
        enc.rows.append({"input_ids": ids, "labels": labels})
    return enc


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def pad_batch(rows: list[dict], pad_id: int) -> dict:
    """Right-padded batch with an attention mask."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "n_real": mask.sum()}


def pack_rows(rows: list[dict], max_length: int) -> list[list[dict]]:
    """Greedy first-fit packing of rows (in the given order) into bins of <= max_length tokens."""
    bins: list[list[dict]] = []
    space: list[int] = []
    for r in rows:
        n = len(r["input_ids"])
        for b, free in enumerate(space):
            if n <= free:
                bins[b].append(r)
                space[b] -= n
                break
        else:
            bins.append([r])
            space.append(max_length - n)
    return bins


# Rows must share at least this many leading tokens for a batch to compute them once: below it
# the saving does not pay for the extra attention calls.
MIN_SHARED_PREFIX = 16


def shared_prefix(rows: list[dict]) -> int:
    """How many leading tokens every row has in common and none of them trains on (nor on the
    token after them, which the prefix's last position predicts): what a batch may compute once."""
    first = rows[0]["input_ids"]
    n = len(first) - 1  # every row keeps a token of its own
    for r in rows:
        ids, labels = r["input_ids"], r["labels"]
        n = min(n, len(ids) - 1)
        trained = next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))
        n = min(n, trained - 1)
        i = 0
        while i < n and ids[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def shared_prefix_batch(rows: list[dict], pad_id: int, min_prefix: int = MIN_SHARED_PREFIX) -> dict | None:
    """A padding-free row in which the rows' common prefix (a system prompt, an instruction)
    appears once, followed by each row's own tokens; None when they share fewer than
    ``min_prefix`` tokens.

    Each row's own tokens keep their positions (P, P+1, ...): a segment whose positions start
    at P > 0 attends to the row's first P tokens and to itself (train/varlen.py), which is
    exactly what it attended to in its own row, so the loss and every gradient are the
    per-row ones; the prefix's key/value gradients arrive summed over the rows, as they would
    be through its B copies. Only LoRA dropout differs: the prefix gets one mask per batch
    instead of one per row."""
    if len(rows) < 2:
        return None
    n = shared_prefix(rows)
    if n < min_prefix:
        return None
    ids, labels, pos = list(rows[0]["input_ids"][:n]), [IGNORE] * n, list(range(n))
    for r in rows:
        ids += r["input_ids"][n:]
        labels += r["labels"][n:]
        pos += range(n, len(r["input_ids"]))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([pos]),
            "n_real": torch.tensor(sum(len(r["input_ids"]) for r in rows)), "n_computed": torch.tensor(len(ids))}


def packed_batch(bins: list[list[dict]], pad_id: int) -> dict:
    """Each bin becomes one row; position_ids restart at 0 for every packed example, which
    transformers turns into a block-diagonal causal mask (no attention across examples)."""
    width = max(sum(len(r["input_ids"]) for r in b) for b in bins)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(bins), width), dtype=torch.long)
    for i, b in enumerate(bins):
        at = 0
        for r in b:
            n = len(r["input_ids"])
            ids[i, at : at + n] = torch.tensor(r["input_ids"])
            labels[i, at : at + n] = torch.tensor(r["labels"])
            # Position t is trained to predict labels[t + 1]: an example's first label would make
            # the previous example's last token predict it. Alone in a row that label is never a
            # target (objectives with loss on every token, e.g. cpt, have one there).
            labels[i, at] = IGNORE
            pos[i, at : at + n] = torch.arange(n)
            at += n
        # Tail padding continues the last example's positions: a reset there would start a
        # new "sequence" and padding tokens carry no label, so they never contribute loss.
        if at < width:
            pos[i, at:] = torch.arange(pos[i, at - 1] + 1, pos[i, at - 1] + 1 + width - at)
    n_real = torch.tensor(sum(len(r["input_ids"]) for b in bins for r in b))
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "n_real": n_real}


def epoch_batches(rows: list[dict], epoch: int, seed: int, batch_size: int, packing: bool, max_length: int,
                  pad_id: int, padding_free: bool = False, shared_prefix: bool = False) -> list[dict]:
    """The epoch's micro-batches in an order fixed by (seed, epoch), so a resumed run sees
    exactly the batches the uninterrupted run would have seen.

    packing: rows fill bins of max_length (fewer, fuller sequences). padding_free: each
    micro-batch keeps its rows but lays them end to end in one row (needs the per-example
    attention of train/varlen.py), so the step is the same and no padding is computed.
    shared_prefix (with padding_free): a micro-batch whose rows begin with the same untrained
    tokens (a system prompt, an instruction) computes them once (data/render.py)."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    ordered = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
    if packing:
        bins = pack_rows(ordered, max_length)
        return [packed_batch(bins[i : i + batch_size], pad_id) for i in range(0, len(bins), batch_size)]
    chunks = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    if padding_free:
        return [(shared_prefix and shared_prefix_batch(c, pad_id)) or packed_batch([c], pad_id) for c in chunks]
    return [pad_batch(c, pad_id) for c in chunks]


def trained_tokens(batch: dict) -> int:
    """Tokens that carry loss (targets are labels shifted by one)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def render_segments(tok, segments: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels of a template-free row (Axolotl ``input_output``): each segment is
    tokenized alone without special tokens and the pieces concatenated, so a segment boundary is
    a token boundary and its label (trained or not) covers exactly its tokens. A bos token is
    put first when the tokenizer has one and the text does not start with it (a model trained
    with bos expects it); it is never trained."""
    ids: list[int] = []
    labels: list[int] = []
    for seg in segments:
        part = tok(seg["text"], add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if seg["label"] else [IGNORE] * len(part)
    bos = getattr(tok, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids, labels = [bos, *ids], [IGNORE, *labels]
    return ids, labels
