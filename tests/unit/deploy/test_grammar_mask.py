import os
import subprocess
import sys

import numpy as np
import torch

from tuneforge.deploy.grammar import apply_bitmask


def expected(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    bits = np.unpackbits(mask.numpy().view(np.uint8), axis=1, bitorder="little")  # token t: bit t % 32 of word t // 32
    allowed = np.zeros(scores.shape, dtype=bool)
    n = min(bits.shape[1], scores.shape[1])
    allowed[:, :n] = bits[:, :n] == 1
    return torch.where(torch.from_numpy(allowed), scores, torch.tensor(float("-inf")))


def test_each_masked_out_token_gets_minus_inf_and_the_others_keep_their_score():
    g = torch.Generator().manual_seed(0)
    for vocab, words in ((49152, 1536), (100, 4), (70, 2)):  # exact, past the vocab, vocab past the mask
        mask = torch.randint(-2**31, 2**31 - 1, (3, words), dtype=torch.int32, generator=g)
        mask[1] = -1  # a row without a grammar: everything allowed
        mask[2] = 0
        mask[2, 1] = 1 << 5  # only token 37
        scores = torch.randn(3, vocab, generator=g)
        want = expected(scores, mask)
        apply_bitmask(scores, mask)
        assert torch.equal(scores, want)
    assert torch.isfinite(scores[2]).sum() == 1 and torch.isfinite(scores[2, 37])


def test_the_mask_is_right_where_torch_runs_avx2_kernels():
    # llguidance's compiled kernel unpacked ~half the bits wrong where inductor emits AVX2 code
    # (torch 2.13); the mask must not depend on the CPU's vector width.
    code = ("import torch, numpy as np\n"
            "from tuneforge.deploy.grammar import apply_bitmask\n"
            "m = torch.randint(-2**31, 2**31 - 1, (4, 1536), dtype=torch.int32, generator=torch.Generator().manual_seed(1))\n"
            "s = torch.zeros(4, 49152); apply_bitmask(s, m)\n"
            "bits = np.unpackbits(m.numpy().view(np.uint8), axis=1, bitorder='little')\n"
            "print(np.array_equal(np.isfinite(s.numpy()), bits == 1))\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "True"
