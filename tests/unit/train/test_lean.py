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


def _saved_storages(loss) -> set[int]:
    """Storage addresses of every tensor the autograd graph behind ``loss`` hands back to backward."""
    seen, todo, ptrs = set(), [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        tensors = list(node.saved_tensors) if hasattr(node, "saved_tensors") else []
        tensors += [getattr(node, a) for a in dir(node) if a.startswith("_saved_")]
        ptrs |= {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}
        todo += [n for n, _ in node.next_functions]
    return ptrs


def _lora_step(model_dir, recompute: bool, record: list | None = None):
    """Loss and LoRA gradients of one step of a lean LoRA model (fused LoRA layers, as training
    runs them); ``record`` collects the blocks' norm outputs and MLP products."""
    from peft import LoraConfig, get_peft_model

    from tuneforge.train import fused_lora

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lean.enable(model)
    if not recompute:  # the blocks' own forward: the lean norms and MLPs without the recipes
        for block in model.model.layers:
            del block.forward
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    fused_lora.enable(model)
    model.train()
    for block in model.base_model.model.model.layers if record is not None else []:
        for m in (block.input_layernorm, block.post_attention_layernorm):
            m.register_forward_hook(lambda m, i, o: record.append(o))
        block.mlp.down_proj.register_forward_pre_hook(lambda m, i: record.append(i[0]))
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    return model, loss


def test_blocks_recompute_norm_outputs_and_mlp_products_instead_of_keeping_them(tiny_model_dir):
    for recompute in (True, False):
        record = []
        _, loss = _lora_step(tiny_model_dir, recompute, record)
        noted = {t.untyped_storage().data_ptr() for t in record}  # held here: no other tensor reuses them
        assert len(noted) == len(record) > 0  # two norms and one MLP product per block
        kept = noted & _saved_storages(loss)
        # Without the recipes autograd keeps every one of them (so this check can fail).
        assert kept == (set() if recompute else noted)


def test_recomputing_gives_the_same_loss_and_gradients_bit_for_bit(tiny_model_dir):
    results = []
    for recompute in (True, False):
        model, loss = _lora_step(tiny_model_dir, recompute)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (la, ga), (lb, gb) = results
    assert torch.equal(la, lb)
    assert ga.keys() == gb.keys() and len(ga) > 0
    assert all(torch.equal(ga[n], gb[n]) for n in gb)


def test_gradient_checkpointing_keeps_its_own_saving(tiny_model_dir):
    """Under gradient checkpointing the blocks run as transformers checkpoints them (recipes off)."""
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = copy.deepcopy(ref)
    lean.enable(model)
    for m in (model, ref):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    ids = torch.randint(3, ref.config.vocab_size, (2, 12))
    grads = []
    for m in (model, ref):
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-5) for n in grads[1])


def test_a_later_output_at_a_freed_outputs_address_gets_its_own_recipe():
    """A noted output saved as a recipe is freed; the next noted output of the same block may sit
    at its address. Each must recompute as itself (it had got the first one's recipe: another
    size, or wrong values)."""
    from tuneforge.train import lean

    storage = torch.zeros(8)
    first, second = storage.view(8), storage.view(2, 4)  # two outputs at one address, in turn
    a, b = torch.arange(8.0), torch.arange(8.0).view(2, 4)
    notes = {}
    lean._block.notes = notes
    try:
        pack = lean._pack_in(notes)
        lean.recomputable(first, torch.neg, a)
        saved_first = pack(first)
        lean.recomputable(second, torch.exp, b)
        saved_second = pack(second)
    finally:
        lean._block.notes = None
    assert torch.equal(lean._unpack(saved_first), -a)
    assert torch.equal(lean._unpack(saved_second), torch.exp(b))
