"""train/fused_lora.py: one autograd node per LoRA layer gives peft's outputs and gradients."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from tuneforge.train import fused_lora


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 20, bias=True)
        self.down = nn.Linear(20, 6, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _pair(dtype, dropout):
    torch.manual_seed(0)
    # init_lora_weights=False: B starts random, so the adapter path is not zero and its
    # gradients reach A as well.
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["up", "down"], init_lora_weights=False)
    ref = get_peft_model(Net().to(dtype), cfg)
    for n, p in ref.named_parameters():  # peft keeps adapters in fp32 on a bf16 base; so does training
        if "lora_" in n:
            p.data = p.data.float()
    fused = copy.deepcopy(ref)
    assert fused_lora.enable(fused) == 2
    if dropout:  # peft's own forward with the fused path's dropout: the same masks from the same seed
        for layer in (ref.base_model.model.up, ref.base_model.model.down):
            layer.lora_dropout["default"] = Drop(dropout)
    return ref, fused


class Drop(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return fused_lora.dropout(x, self.p)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_lora_gives_pefts_outputs_and_gradients(dtype, dropout):
    ref, fused = _pair(dtype, dropout)
    x = torch.randn(3, 5, 12, dtype=dtype)
    results = []
    for model in (ref, fused):
        model.train()
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)  # the same dropout masks: both draw one per layer, in the same order
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = model(xi)
        (out.float() ** 2).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        frozen = [p.grad for n, p in model.named_parameters() if not p.requires_grad]
        results.append((out.detach().float(), xi.grad.float(), grads, frozen))
    (out_a, dx_a, g_a, frozen_a), (out_b, dx_b, g_b, frozen_b) = results
    # bf16: the two round in a different order (peft rounds x A^T B^T before scaling it), so
    # compare relative to the tensor's size; a wrong scale or a missing term is off by >= 30%.
    tol = 1e-6 if dtype == torch.float32 else 0.02

    def close(a, b):
        return float((a - b).norm() / a.norm()) < tol

    assert close(out_a, out_b)
    assert close(dx_a, dx_b)
    assert g_a.keys() == g_b.keys() and len(g_a) == 4
    for n in g_a:
        assert g_b[n].dtype == torch.float32
        assert close(g_a[n], g_b[n]), n
    assert all(g is None for g in frozen_a + frozen_b)


def test_fused_lora_takes_peft_forward_where_it_does_not_apply():
    ref, fused = _pair(torch.float32, 0.0)
    layer = fused.base_model.model.up
    x = torch.randn(2, 12)
    calls = []
    real = fused_lora.LoraLinearFn.apply
    fused_lora.LoraLinearFn.apply = lambda *a: calls.append(1) or real(*a)
    try:
        with torch.no_grad():
            layer(x)
            assert len(calls) == 1
            with fused.disable_adapter():  # base only: peft's path, and the output shows it
                assert torch.allclose(layer(x), layer.base_layer(x))
            layer(x, adapter_names=["default", "__base__"])  # a mixed-adapter batch (serving)
            layer.merge()
            merged = layer(x)
            layer.unmerge()
            assert len(calls) == 1
            assert torch.allclose(merged, ref.base_model.model.up(x), atol=1e-5)
    finally:
        fused_lora.LoraLinearFn.apply = real


def test_dropout_keeps_each_element_with_1_minus_p_and_scales_it():
    torch.manual_seed(0)
    x = torch.randn(600, 1000, requires_grad=True)
    y = fused_lora.dropout(x, 0.05)
    keep = y != 0
    p = round(0.05 * 65536) / 65536  # p on the mask's 1/65536 grid
    # 600k Bernoulli draws: the kept share is within 5 standard deviations of 1 - p
    assert abs(float(keep.float().mean()) - (1 - p)) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    assert torch.allclose(y[keep], x[keep] / (1 - p))
    # no bias between positions (the mask is cut from 64-bit words, 4 elements each)
    shares = keep.reshape(-1, 4).float().mean(0)
    assert float((shares - (1 - p)).abs().max()) < 5 * (p * (1 - p) / (x.numel() / 4)) ** 0.5
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, keep / (1 - p))  # the gradient flows through the kept elements only
    torch.manual_seed(3)
    a = fused_lora.dropout(x, 0.3)
    torch.manual_seed(3)
    assert torch.equal(a, fused_lora.dropout(x, 0.3))  # seeded: a resumed run draws the same masks
