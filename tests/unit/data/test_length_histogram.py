"""length_histogram: whole-number bins that cover every length exactly once."""

from __future__ import annotations

import numpy as np

from tuneforge.data.lengths import length_histogram


def test_bins_cover_every_row_once_with_whole_number_edges():
    lengths = np.array([5, 6, 7, 33, 33, 100])
    h = length_histogram(lengths)
    assert len(h["edges"]) == len(h["counts"]) + 1 <= 21 and sum(h["counts"]) == len(lengths)
    assert h["edges"][0] == 5 and h["edges"][-1] > 100 and all(isinstance(e, int) for e in h["edges"])
    assert h["counts"][0] == 3 and h["counts"][-1] == 1  # 5, 6, 7 in the first bin; 100 alone in the last
    assert length_histogram([42, 42]) == {"edges": [42, 43], "counts": [2]}
    assert length_histogram([]) == {"edges": [], "counts": []}
