"""Prompt drift: are recent prompts drawn from the same distribution as the training prompts?

Both sides are embedded with the embedded all-MiniLM-L6-v2 encoder (the same mean-pooled,
normalised embeddings as the RAG retriever) and compared with a two-sample test: the
maximum mean discrepancy (MMD) under an RBF kernel whose bandwidth is the median pairwise
distance (the median heuristic), with a permutation p-value. Under "no drift" the two
samples are exchangeable, so shuffling the labels gives the statistic's null distribution
exactly and the p-value needs no asymptotics (Gretton et al., 2012).

The prompts that drifted most are the recent ones farthest (cosine) from their nearest
training prompt: the new topics a reviewer should look at first.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuneforge.data.prepare import build_splits
from tuneforge.evaluate.incontext import MiniLMRetriever
from tuneforge.objectives import OBJECTIVES
from tuneforge.runs import load_run_config
from tuneforge.train.multitask import task_configs, task_data


@dataclass
class MMDTest:
    mmd2: float  # biased estimate (V-statistic) of MMD^2; the permutation test makes it exact
    p_value: float
    bandwidth: float  # the RBF sigma (median pairwise distance)
    null: list[float] = field(default_factory=list)  # the statistic under each permutation


def median_bandwidth(z: torch.Tensor) -> float:
    """Median pairwise Euclidean distance among the rows of ``z`` (N, D), zeros excluded."""
    d = torch.cdist(z, z)
    d = d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)]
    d = d[d > 0]
    return float(d.median()) if d.numel() else 1.0


def mmd_permutation_test(x: torch.Tensor, y: torch.Tensor, permutations: int = 500, seed: int = 0) -> MMDTest:
    """Two-sample test of x (N, D) against y (M, D)."""
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"the MMD test needs at least 2 samples a side (got {len(x)} and {len(y)})")
    z = torch.cat([x, y]).double()
    n, total = len(x), len(z)
    sigma = median_bandwidth(z)
    k = torch.exp(-torch.cdist(z, z).pow(2) / (2 * sigma**2))  # (N+M, N+M), computed once

    # MMD^2 (biased) = a^T K a with a_i = 1/N for x rows and -1/M for y rows. A permutation
    # only moves the labels, so all permutations are one batched product: stats = diag(A K A^T).
    def signed(labels: torch.Tensor) -> torch.Tensor:  # (P, N+M) bool: True = "x"
        x_w, y_w = torch.tensor(1.0 / n, dtype=torch.float64), torch.tensor(-1.0 / (total - n), dtype=torch.float64)
        return torch.where(labels, x_w, y_w)

    observed = torch.zeros(1, total, dtype=torch.bool)
    observed[0, :n] = True
    gen = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(total, generator=gen) for _ in range(permutations)])  # (P, N+M)
    labels = order < n  # the first n positions of each permutation are called "x"
    a = signed(torch.cat([observed, labels]))
    stats = ((a @ k) * a).sum(1)  # (1 + P,)
    stat, null = float(stats[0]), stats[1:]
    p = (1 + int((null >= stat - 1e-12).sum())) / (1 + permutations)
    return MMDTest(stat, p, sigma, null.tolist())


@dataclass
class DriftResult:
    test: MMDTest
    n_recent: int
    n_reference: int
    reference: str  # where the training prompts came from
    drifted: list[dict]  # {request_id, prompt, distance, nearest}, farthest first


Embedder = Callable[[list[str], list[str]], tuple[torch.Tensor, torch.Tensor]]


def minilm_pair(reference: list[str], recent: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised MiniLM embeddings of both sides (reference (R, 384), recent (N, 384))."""
    enc = MiniLMRetriever(reference)
    return enc.doc_emb, enc.embed(recent)


def drift_test(reference: list[str], recent: list[tuple[str, str]], *, max_prompts: int, permutations: int,
               top: int, seed: int, source: str, embed: Embedder = minilm_pair) -> DriftResult:
    """``recent``: (request_id, prompt) pairs. Each side is sampled down to ``max_prompts``."""
    rng = random.Random(seed)
    ref = rng.sample(reference, min(max_prompts, len(reference)))
    rec = rng.sample(recent, min(max_prompts, len(recent)))
    ref_emb, rec_emb = embed(ref, [p for _, p in rec])
    test = mmd_permutation_test(rec_emb, ref_emb, permutations, seed)
    sims = rec_emb @ ref_emb.T  # (N, R) cosine: embeddings are normalised
    best, idx = sims.max(dim=1)
    order = torch.argsort(best)[:top]
    drifted = [{"request_id": rec[i][0], "prompt": rec[i][1], "distance": round(1 - float(best[i]), 4),
                "nearest": ref[int(idx[i])]} for i in order.tolist()]
    return DriftResult(test, len(rec), len(ref), source, drifted)


# --- the two sides' prompts ------------------------------------------------------------------------

def row_prompt(row: dict) -> str | None:
    """The user's side of a canonical training row (sft / preference / classification / text)."""
    msgs = row.get("messages") or (row["prompt"] if isinstance(row.get("prompt"), list) else None)
    if msgs:
        if msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]  # the answer is not part of what users send
        return _user_text(msgs)
    for key in ("prompt", "text"):
        if isinstance(row.get(key), str):
            return row[key]
    return None


def logged_prompt(messages: list | None, prompt: str | None) -> str | None:
    """The user's side of a logged request (its user turns, or the completion prompt)."""
    return _user_text(messages) if messages else prompt


def _user_text(messages: list) -> str | None:
    parts = []
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            parts.append("".join(p.get("text", "") for p in c if isinstance(p, dict)) if isinstance(c, list) else str(c or ""))
    return "\n".join(parts) or None


def training_prompts(run_dir: str | Path) -> list[str]:
    """The prompts a run trained on: its config's data, split exactly as the run split it
    (same seed and sizes), train side only, for every task it trained."""
    cfg = load_run_config(Path(run_dir))
    kind = OBJECTIVES[cfg.objective.name].data_kind
    out = []
    for tc, earlier in task_configs(cfg):
        if not earlier:
            splits = build_splits(task_data(cfg.data, tc), cfg.train.seed, kind)
            out += [p for p in map(row_prompt, splits.train) if p]
    return out
