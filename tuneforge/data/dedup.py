"""Exact and near-duplicate detection.

Near duplicates use MinHash with LSH banding, vectorised in numpy so the cost is about
linear in the number of rows (the only superlinear step is one argsort per band):

  words     lower-cased \\w+ tokens; each distinct word gets a random 32-bit value (seeded),
            so all later arithmetic runs on flat numpy arrays instead of per-shingle calls
  shingles  word 3-grams: h = mix(v1*A + v2*B + v3) over the flat word array (texts of
            fewer than 3 words are padded, so every row has at least one shingle)
  signature (n_rows, num_perm) uint32: min over a row's shingles of g_k(h), where
            g_k(h) = mix(a_k*h + b_k mod 2^32) with odd a_k: a bijection on 32-bit values.
            32-bit arithmetic is ~10x faster in numpy than the textbook mod-prime in 64 bits.
  bands     num_perm = bands * rows_per_band; rows whose band slice is identical in any band
            become candidate pairs; a pair is kept when the signatures agree on >= threshold
            of their positions (the estimated Jaccard similarity)
  groups    connected components of the kept pairs (label propagation in numpy)
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tuneforge.data.formats import row_texts, structure_key
from tuneforge.data.manifest import Stage

_WORD = re.compile(r"\w+")


class DedupOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    exact: bool = Field(True, description="drop rows whose text equals an earlier row's (case and spacing ignored)")
    near: bool = Field(True, description="drop near-duplicates (MinHash LSH)")
    threshold: float = Field(0.85, gt=0, le=1, description="estimated Jaccard similarity of word 3-grams")
    num_perm: int = Field(128, ge=16, le=1024)
    seed: int = 0


def text_key(text: str) -> bytes:
    """Identity of a text up to case and whitespace."""
    return hashlib.blake2b(" ".join(text.casefold().split()).encode(), digest_size=16).digest()


def _mix(v: np.ndarray) -> np.ndarray:
    """xorshift-multiply finaliser (in place): spreads every input bit over the output."""
    v ^= v >> np.uint32(16)
    v *= np.uint32(0x45D9F3B)
    v ^= v >> np.uint32(16)
    return v


class _Ids(dict):
    """word -> id, a new id for each new word (map() over __getitem__ stays in C for hits)."""

    def __missing__(self, key: str) -> int:
        self[key] = len(self)
        return self[key]


def shingles(texts: list[str], seed: int = 0, n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Hashed word n-grams of every text, flat (uint32), and each text's shingle count."""
    vocab = _Ids({"": 0})  # id 0 pads short texts
    ids: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for k, t in enumerate(texts):
        seq = list(map(vocab.__getitem__, _WORD.findall(t.casefold())))
        if len(seq) < n:
            seq += [0] * (n - len(seq))
        ids.extend(seq)
        lengths[k] = len(seq)
    table = np.random.default_rng(seed + 1).integers(0, 1 << 32, len(vocab), dtype=np.uint32)
    v = table[np.asarray(ids, dtype=np.int64)]
    # Shingle k combines words k..k+n-1 of the flat array; drop those crossing into the next text.
    h = np.zeros(len(v) - n + 1, dtype=np.uint32)
    for i, mult in enumerate((0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D)[:n]):
        h += v[i:len(v) - n + 1 + i] * np.uint32(mult)
    valid = np.ones(len(v), dtype=bool)
    ends = np.cumsum(lengths)
    for back in range(1, n):
        valid[ends - back] = False
    return _mix(h[valid[:len(h)]]), lengths - (n - 1)


def shingle_hashes(text: str) -> list[int]:
    """The distinct shingle hashes of one text (for tests and inspection)."""
    return sorted(set(shingles([text])[0].tolist()))


def signatures(texts: list[str], num_perm: int = 128, seed: int = 0, chunk: int = 1 << 14) -> np.ndarray:
    """MinHash signatures, (len(texts), num_perm) uint32."""
    rng = np.random.default_rng(seed)
    a = (rng.integers(0, 1 << 32, num_perm, dtype=np.uint32) | np.uint32(1))[:, None]
    b = rng.integers(0, 1 << 32, num_perm, dtype=np.uint32)[:, None]
    flat, counts = shingles(texts, seed)
    ends = np.cumsum(counts)
    starts = ends - counts
    out = np.empty((num_perm, len(texts)), dtype=np.uint32)
    row = 0
    while row < len(texts):
        # Take rows until about `chunk` shingles, so the (num_perm, shingles) block stays in cache.
        stop = max(int(np.searchsorted(ends, starts[row] + chunk, side="right")), row + 1)
        vals = _mix(flat[starts[row]:ends[stop - 1]][None, :] * a + b)  # wraps mod 2^32 by design
        out[:, row:stop] = np.minimum.reduceat(vals, starts[row:stop] - starts[row], axis=1)
        row = stop
    return np.ascontiguousarray(out.T)


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) minimising the weighted area of false candidates and missed
    pairs around the threshold, as datasketch does (P(candidate | jaccard s) = 1 - (1 - s^r)^b).
    Misses weigh 9x more than false candidates: every candidate is verified on its full
    signature afterwards, so a false candidate costs a comparison, a miss a kept duplicate."""
    s = np.linspace(0, 1, 201)
    best, best_err = (1, num_perm), float("inf")
    for r in range(1, num_perm + 1):
        bands = num_perm // r
        p = 1 - (1 - s ** r) ** bands
        err = 0.1 * np.trapezoid(np.where(s < threshold, p, 0), s) + 0.9 * np.trapezoid(
            np.where(s >= threshold, 1 - p, 0), s)
        if err < best_err:
            best, best_err = (bands, r), err
    return best


def similar_pairs(sig: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j), i < j, whose estimated Jaccard >= threshold, and that estimate."""
    n, num_perm = sig.shape
    bands, r = lsh_params(threshold, num_perm)
    mult = np.random.default_rng(12345).integers(1, 1 << 63, r, dtype=np.uint64) | np.uint64(1)
    cand = []
    for k in range(bands):
        # One 64-bit hash per band (wrap-around multiply-add); equal hashes = candidate bucket.
        key = (sig[:, k * r:(k + 1) * r].astype(np.uint64) * mult).sum(axis=1, dtype=np.uint64)
        order = np.argsort(key, kind="stable")
        sk = key[order]
        new = np.r_[True, sk[1:] != sk[:-1]]
        heads = order[new][np.cumsum(new) - 1]  # lowest index of each bucket (stable sort)
        member = ~new
        cand.append(heads[member].astype(np.int64) * n + order[member])
    if not cand:
        return (np.empty(0, np.int64),) * 2 + (np.empty(0),)
    codes = np.unique(np.concatenate(cand))
    i, j = codes // n, codes % n
    est = np.empty(len(i))
    for s in range(0, len(i), 1 << 16):  # bounded memory: (chunk, num_perm) booleans
        est[s:s + (1 << 16)] = (sig[i[s:s + (1 << 16)]] == sig[j[s:s + (1 << 16)]]).mean(axis=1)
    keep = est >= threshold
    return i[keep], j[keep], est[keep]


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Group label per row (the lowest row index in its connected component)."""
    labels = np.arange(n)
    while True:
        low = np.minimum(labels[i], labels[j])
        before = labels.copy()
        np.minimum.at(labels, i, low)
        np.minimum.at(labels, j, low)
        labels = labels[labels]  # pointer jumping: halves the remaining path each round
        if np.array_equal(labels, before):
            return labels


def exact_dedup(rows: list[dict]) -> tuple[list[dict], Stage]:
    stage = Stage("exact_dedup", input=len(rows))
    first: dict[bytes, str] = {}
    out = []
    for row in rows:
        # Tools, calls, weights and segment labels count too: rows that differ only there are different rows.
        shape = structure_key(row)
        key = text_key("\x1f".join(row_texts(row) + [str(row.get("label", ""))] + ([shape] if shape else [])))
        if key in first:
            stage.drop("exact duplicate", f"{row.get('_where', '?')} repeats {first[key]}")
        else:
            first[key] = row.get("_where", "?")
            out.append(row)
    stage.kept = len(out)
    return out, stage.check()


def near_dedup(rows: list[dict], opts: DedupOptions) -> tuple[list[dict], Stage]:
    """Keep the first row of each near-duplicate group; the others are dropped, each with
    the row it resembles."""
    stage = Stage("near_dedup", input=len(rows), info={"threshold": opts.threshold, "num_perm": opts.num_perm,
                                                        "bands_x_rows": list(lsh_params(opts.threshold, opts.num_perm))})
    sig = signatures(["\n".join(row_texts(r) + [structure_key(r)]) for r in rows], opts.num_perm, opts.seed)
    i, j, est = similar_pairs(sig, opts.threshold)
    labels = components(len(rows), i, j)
    sim = dict(zip(j.tolist(), est.tolist()))
    out = []
    for k, row in enumerate(rows):
        if labels[k] == k:
            out.append(row)
        else:
            like = rows[labels[k]].get("_where", "?")
            stage.drop("near duplicate", f"{row.get('_where', '?')} ~ {like} (similarity ~{sim.get(k, 0):.2f})")
    stage.kept = len(out)
    return out, stage.check()
