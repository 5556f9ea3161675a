"""Lean activations (train/lean.py): the same forward and gradients as transformers' own blocks."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneforge.train import lean
from tuneforge.train.lean import RMSNormFn, SiluMulFn


def _grads(fn, *inputs):
    xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    out = fn(*xs)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), [x.grad for x in xs if x.requires_grad]


def _ref_norm(x, w, eps=1e-5):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rmsnorm_matches_the_reference_forward_and_gradients(dtype, tol):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(16)).to(dtype).requires_grad_(True)  # a trained weight gets its gradient too
    a, ga = _grads(lambda x, w: RMSNormFn.apply(x, w, 1e-5), x, w)
    b, gb = _grads(_ref_norm, x, w)
    assert torch.equal(a, b)  # the same ops in the same dtypes
    for u, v in zip(ga, gb, strict=True):
        assert torch.allclose(u.float(), v.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_the_reference_forward_and_gradients(dtype):
    torch.manual_seed(0)
    gate, up = torch.randn(3, 7, 12, dtype=dtype, requires_grad=True), torch.randn(3, 7, 12, dtype=dtype,
                                                                                  requires_grad=True)
    a, ga = _grads(SiluMulFn.apply, gate, up)
    b, gb = _grads(lambda g, u: torch.nn.functional.silu(g) * u, gate, up)
    assert torch.equal(a, b)
    for u, v in zip(ga, gb, strict=True):
        assert torch.equal(u, v)  # autograd's own kernels, silu recomputed


def test_a_lean_model_gives_the_same_loss_and_gradients(tiny_model_dir):
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = copy.deepcopy(ref)
    n_layers = ref.config.num_hidden_layers
    assert lean.enable(model) == 3 * n_layers + 1  # two norms and an MLP per block, and the final norm
    ids = torch.randint(3, ref.config.vocab_size, (2, 12))
    grads = []
    for m in (model, ref):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (la, ga), (lb, gb) = grads
    assert torch.allclose(la, lb, atol=1e-6)
    assert all(torch.allclose(ga[n], gb[n], atol=1e-5) for n in gb)
    assert ga["model.norm.weight"].abs().sum() > 0


def test_unknown_architectures_are_left_alone():
    class RMSNorm(torch.nn.Module):  # not one of the known classes
        def forward(self, x):
            return x

    assert lean.enable(torch.nn.Sequential(RMSNorm(), torch.nn.Linear(2, 2))) == 0
