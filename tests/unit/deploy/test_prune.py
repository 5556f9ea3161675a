"""Structured pruning of a tiny GQA Llama (4 query heads in 2 key/value groups, 2 layers): the
smaller model's weights match its config, what carried nothing can go without changing the
logits, and the written folder reloads with plain transformers to the same logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tuneforge.deploy.prune import PruneError, PruneOptions, keep_top, prune

IDS = torch.tensor([[3, 17, 42, 8, 99, 5, 23, 61, 7, 11]])
CALIB = [[(7 * i + 3 * k) % 100 for k in range(12)] for i in range(4)]


@pytest.fixture
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def logits(m):
    with torch.no_grad():
        return m(input_ids=IDS).logits


def assert_shapes_match_config(m):
    c = m.config
    d = c.head_dim
    assert len(m.model.layers) == c.num_hidden_layers
    for layer in m.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        assert a.q_proj.weight.shape == (c.num_attention_heads * d, c.hidden_size)
        assert a.k_proj.weight.shape == a.v_proj.weight.shape == (c.num_key_value_heads * d, c.hidden_size)
        assert a.o_proj.weight.shape == (c.hidden_size, c.num_attention_heads * d)
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (c.intermediate_size, c.hidden_size)
        assert mlp.down_proj.weight.shape == (c.hidden_size, c.intermediate_size)


def test_pruned_shapes_match_the_written_config_and_reload_gives_the_same_logits(model, tmp_path):
    small, report = prune(model, CALIB, 0.5, ("mlp", "heads"))
    c = small.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 2, 1, 8)
    assert report["heads"]["kv_groups_after"] == 1 and report["mlp"]["intermediate_size_after"] == 32
    assert_shapes_match_config(small)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    small.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers, no masks
    assert_shapes_match_config(reloaded)
    assert torch.equal(logits(reloaded), logits(small))


def test_sparsity_zero_removes_nothing(model):
    small, _ = prune(model, CALIB, 0.0, ("mlp", "heads", "layers"))
    assert small.config.to_dict() | {"head_dim": 8} == model.config.to_dict() | {"head_dim": 8}
    assert torch.equal(logits(small), logits(model))


def test_mlp_channels_that_carry_nothing_are_the_ones_removed(model):
    # Zero down_proj columns: those channels add nothing to the output, so their score is 0 and
    # removing them (and only them) leaves the logits as they were.
    dead = [1, 5, 6, 20, 33, 40, 41, 63]
    for layer in model.model.layers:
        layer.mlp.down_proj.weight.data[:, dead] = 0
    before = logits(model)
    small, _ = prune(model, CALIB, len(dead) / 64, ("mlp",))
    assert small.config.intermediate_size == 64 - len(dead)
    assert torch.allclose(logits(small), before, atol=1e-5)
    # The control: removing as many live channels does change the output.
    for layer in model.model.layers:
        layer.mlp.down_proj.weight.data[:, dead] = 1e-2
    other, _ = prune(model, CALIB, len(dead) / 64, ("mlp",))
    assert not torch.allclose(logits(other), before, atol=1e-3)


def test_a_whole_kv_group_goes_with_its_query_heads(model):
    # Group 0 (query heads 0 and 1, reading k/v head 0) writes nothing through o_proj in either layer.
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.data[:, :16] = 0
    before = logits(model)
    small, report = prune(model, CALIB, 0.5, ("heads",))
    assert report["heads"]["kept_groups"] == [[1], [1]]
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 1)
    kept = model.model.layers[0].self_attn
    assert torch.equal(small.model.layers[0].self_attn.k_proj.weight, kept.k_proj.weight[8:16])
    assert torch.equal(small.model.layers[0].self_attn.q_proj.weight, kept.q_proj.weight[16:32])
    assert torch.allclose(logits(small), before, atol=1e-5)


def test_layers_removes_the_right_count_and_the_layer_that_changes_nothing(model):
    # Layer 0 adds nothing to the residual stream (o_proj and down_proj zero): an identity.
    layer0 = model.model.layers[0]
    layer0.self_attn.o_proj.weight.data.zero_()
    layer0.mlp.down_proj.weight.data.zero_()
    before = logits(model)
    small, report = prune(model, CALIB, 0.5, ("layers",))
    assert small.config.num_hidden_layers == len(small.model.layers) == 1
    assert report["layers"]["removed"] == [0] and report["layers"]["scores"][0] == 0
    assert torch.allclose(logits(small), before, atol=1e-5)


def test_keep_top_keeps_the_highest_in_original_order():
    assert keep_top(torch.tensor([[0.5, 0.1, 0.9, 0.3]]), 2) == [[0, 2]]


def test_bad_options_and_models_are_refused(model):
    assert PruneOptions(1.0, ("mlp",)).problems() and PruneOptions(0.2, ("experts",)).problems()
    assert PruneOptions(0.2, ("mlp",), recover_steps=0).problems()
    assert not PruneOptions(0.2, ("mlp", "layers"), recover_steps=5).problems()
    with pytest.raises(PruneError, match="--structured heads: sparsity 0.2 of 2 key/value groups per layer removes "
                                         "none"):
        prune(model, CALIB, 0.2, ("mlp", "heads"))  # 0.2 x 2 groups rounds to 0: refused, not skipped
    del model.model.layers[0].mlp.gate_proj
    with pytest.raises(PruneError, match="Llama-style"):
        prune(model, CALIB, 0.5, ("mlp",))

