"""Exact and MinHash-LSH near-duplicate removal."""

import random

import numpy as np

from tuneforge.data.dedup import (DedupOptions, components, exact_dedup, lsh_params, near_dedup, shingle_hashes,
                                  signatures, similar_pairs)

WORDS = [f"w{i}" for i in range(3000)]


def doc(rng, n=30):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def jaccard(a, b):
    x, y = set(shingle_hashes(a)), set(shingle_hashes(b))
    return len(x & y) / len(x | y)


def test_exact_dedup_ignores_case_and_spacing_but_not_labels():
    rows = [{"text": "Hello  World", "_where": "f:1"}, {"text": "hello world", "_where": "f:2"},
            {"text": "hello world", "label": "a", "_where": "f:3"}, {"text": "hello world", "label": "b"}]
    out, st = exact_dedup(rows)
    assert [r.get("_where") for r in out] == ["f:1", "f:3", None]
    assert st.dropped == {"exact duplicate": 1} and "f:2 repeats f:1" in st.examples["exact duplicate"][0]


def test_signatures_estimate_jaccard_and_are_reproducible():
    rng = random.Random(0)
    a = doc(rng, 60)
    words = a.split()
    b = " ".join(words[:50] + ["zz"] * 10)
    sig = signatures([a, b, doc(rng, 60)], num_perm=256)
    assert abs((sig[0] == sig[1]).mean() - jaccard(a, b)) < 0.1
    assert (sig[0] == sig[2]).mean() < 0.05
    assert np.array_equal(signatures([a, b], seed=3), signatures([a, b], seed=3))
    assert not np.array_equal(signatures([a, b], seed=3), signatures([a, b], seed=4))


def test_lsh_params_use_all_permutations_sensibly():
    b, r = lsh_params(0.85, 128)
    assert b * r <= 128 and b > 1 and r > 1
    assert lsh_params(0.5, 128)[0] > b  # a lower threshold needs more bands


def test_near_dedup_threshold_decides():
    rng = random.Random(1)
    base = [doc(rng) for _ in range(300)]
    # One word changed in a 30-word text keeps 25 of 28 3-grams: Jaccard ~0.81.
    near = []
    for t in base[:50]:
        w = t.split()
        w[15] = "CHANGED"
        near.append(" ".join(w))
    rows = [{"text": t, "_where": f"f:{i + 1}"} for i, t in enumerate(base + near)]
    out, st = near_dedup(rows, DedupOptions(threshold=0.7))
    assert st.input == 350 and 45 <= st.dropped["near duplicate"] <= 50 and st.kept + st.dropped["near duplicate"] == 350
    assert all(r["_where"] in {f"f:{i + 1}" for i in range(350)} for r in out)
    assert "~ f:" in st.examples["near duplicate"][0]
    _, strict = near_dedup(rows, DedupOptions(threshold=0.95))
    assert strict.dropped["near duplicate"] <= 2


def test_components_groups_chains():
    labels = components(6, np.array([0, 4, 2]), np.array([1, 5, 1]))
    assert labels.tolist() == [0, 0, 0, 3, 4, 4]


def test_similar_pairs_finds_only_similar():
    texts = ["a b c d e f g h", "a b c d e f g h", "completely other words in here now"]
    i, j, est = similar_pairs(signatures(texts), 0.8)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1)] and est[0] == 1.0
