"""Structured pruning of a merged decoder (Llama-style: q/k/v/o_proj, gate/up/down_proj) into a
REAL smaller model: the Linear weights are sliced and the config gets the new sizes, so plain
``AutoModelForCausalLM.from_pretrained`` loads it (no masks, no custom code).

What can go (``--structured``), each ranked on calibration rows from the run's own train data:
  mlp     intermediate channels. Channel j's contribution to the layer's output for one token is
          a_j * W_down[:, j] (a = act(gate(x)) * up(x), the input of down_proj), so its score is
          mean_tokens |a_j| * ||W_down[:, j]||: the norm of what removing it takes away
          (Wanda's activation x weight, per output channel).
  heads   attention heads, by whole key/value group: with GQA every query head of a group reads
          that group's k/v, and the HF config has one num_attention_heads / num_key_value_heads
          ratio, so a group goes with all its query heads. A head's score is the mean norm of its
          o_proj contribution, W_o[:, h] @ o_h; a group's is the sum over its query heads.
  layers  whole decoder layers, by how little they change the hidden state: 1 - cos(h_in, h_out)
          averaged over tokens (ShortGPT's block influence). Scored first; mlp/heads are then
          scored on the model without those layers.

Uniform per layer: HF's Llama config has ONE intermediate_size and ONE head count for every
layer, so each layer loses the same number of channels/groups (which ones differs per layer).

Hand-written rather than torch-pruning (1.6.1 on PyPI): it traces a dependency graph through
autograd and its LLM example patches head counts per model class by hand (it breaks on the
attention classes of current transformers, VainF/Torch-Pruning#461) and still leaves the config
to the user; LLM-Pruner is not packaged. For one architecture family the slicing is a few lines
on the state dict, and building the smaller model from its config checks every shape.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from rich.progress import Progress

STRUCTURES = ("heads", "mlp", "layers")
_MLP = ("gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


class PruneError(ValueError):
    """A model or option this pruning cannot take, with the reason."""


@dataclass(frozen=True)
class PruneOptions:
    sparsity: float  # share of each chosen structure removed (per layer for mlp/heads)
    structures: tuple[str, ...] = ("mlp", "heads")
    recover_steps: int | None = None  # LoRA recovery fine-tune steps after pruning
    calibration_rows: int = 32

    def problems(self) -> list[str]:
        out = []
        if not 0 <= self.sparsity < 1:
            out.append(f"--sparsity {self.sparsity}: must be in [0, 1) (the share of channels/heads/layers removed)")
        bad = [s for s in self.structures if s not in STRUCTURES]
        if bad or not self.structures:
            out.append(f"--structured {','.join(self.structures)}: choose from {', '.join(STRUCTURES)}")
        if self.recover_steps is not None and self.recover_steps <= 0:
            out.append(f"--recover {self.recover_steps}: must be a positive number of steps")
        return out


def check_prunable(model) -> None:
    cfg = model.config
    layers = getattr(getattr(model, "model", None), "layers", None)
    missing = [a for a in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
               if getattr(cfg, a, None) is None]
    if layers is None or missing or not all(hasattr(layers[0].mlp, m) for m in _MLP) \
            or not all(hasattr(layers[0].self_attn, m) for m in _ATTN):
        raise PruneError(f"--format pruned handles Llama-style decoders (q/k/v/o_proj, gate/up/down_proj; Llama, "
                         f"Mistral, Qwen2, SmolLM); {cfg.model_type} is not one"
                         + (f" (its config has no {', '.join(missing)})" if missing else ""))
    if getattr(cfg, "layer_types", None) and len(set(cfg.layer_types)) > 1:
        raise PruneError(f"{cfg.model_type} mixes layer types {sorted(set(cfg.layer_types))}: not pruned")


def count_removed(total: int, sparsity: float) -> int:
    """How many of ``total`` units go: round(sparsity * total), always leaving one."""
    return min(round(sparsity * total), total - 1)


def check_counts(cfg, sparsity: float, structures: tuple[str, ...]) -> None:
    """A kind the user asked for that this sparsity would leave whole is refused, not skipped."""
    totals = {"layers": cfg.num_hidden_layers, "mlp": cfg.intermediate_size, "heads": cfg.num_key_value_heads}
    names = {"layers": "layers", "mlp": "MLP channels per layer", "heads": "key/value groups per layer"}
    if sparsity == 0:  # removes nothing by definition
        return
    none = [f"--structured {k}: sparsity {sparsity} of {totals[k]} {names[k]} removes none (needs more than "
            f"{0.5 / totals[k]:.3g}{'' if totals[k] > 1 else '; there is only one'})"
            for k in structures if count_removed(totals[k], sparsity) == 0]
    if none:
        raise PruneError("; ".join(none))


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


# --- importance scores (one forward pass per calibration row, hooks collect) ---------------


@torch.no_grad()
def _run(model, batches: list[list[int]], label: str) -> None:
    with Progress(transient=True) as progress:
        task = progress.add_task(label, total=len(batches))
        for ids in batches:  # one row at a time: no padding to mask out of the statistics
            model(input_ids=torch.tensor([ids]), use_cache=False)
            progress.advance(task)


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def layer_scores(model, batches: list[list[int]]) -> torch.Tensor:
    """(layers,): mean over tokens of 1 - cos(hidden in, hidden out) of each decoder layer."""
    layers = model.model.layers
    sums, count, inputs, hooks = torch.zeros(len(layers)), [0], {}, []
    for i, layer in enumerate(layers):
        def pre(_, args, kwargs, i=i):
            inputs[i] = _first(args) if args else kwargs["hidden_states"]

        def post(_, args, kwargs, out, i=i):
            h_in, h_out = inputs.pop(i)[0].float(), _first(out)[0].float()  # (tokens, hidden)
            sums[i] += (1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)).sum()
            if i == 0:
                count[0] += h_in.shape[0]
        hooks += [layer.register_forward_pre_hook(pre, with_kwargs=True),
                  layer.register_forward_hook(post, with_kwargs=True)]
    try:
        _run(model, batches, "scoring layers")
    finally:
        for h in hooks:
            h.remove()
    return sums / max(count[0], 1)


def channel_scores(model, batches: list[list[int]]) -> torch.Tensor:
    """(layers, intermediate): mean |a_j| * ||W_down[:, j]|| per MLP channel."""
    layers = model.model.layers
    sums = torch.zeros(len(layers), model.config.intermediate_size)

    def add(i, a):  # a: (tokens, intermediate), down_proj's input
        sums[i] += a.abs().sum(0)

    tokens = _calibrate(model, batches, [layer.mlp.down_proj for layer in layers], add, "scoring MLP channels")
    norms = torch.stack([layer.mlp.down_proj.weight.float().norm(dim=0) for layer in layers])
    return sums / tokens * norms


def group_scores(model, batches: list[list[int]]) -> torch.Tensor:
    """(layers, kv_heads): per key/value group, the summed mean norm of its query heads' o_proj
    contributions W_o[:, h] @ o_h."""
    cfg, layers = model.config, model.model.layers
    heads, groups, d = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim(cfg)
    sums = torch.zeros(len(layers), heads)

    def add(i, o):  # o: (tokens, heads * d), o_proj's input
        w = layers[i].self_attn.o_proj.weight.float().view(-1, heads, d)  # (hidden, heads, d)
        sums[i] += torch.einsum("thd,ohd->tho", o.view(-1, heads, d), w).norm(dim=-1).sum(0)  # (tokens, heads, hidden)

    tokens = _calibrate(model, batches, [layer.self_attn.o_proj for layer in layers], add, "scoring attention heads")
    per_head = sums / tokens
    return per_head.view(len(layers), groups, heads // groups).sum(-1)


def _calibrate(model, batches: list[list[int]], modules: list, add, label: str) -> int:
    """Run the calibration rows with ``add(i, x)`` seeing the input ``x`` (tokens, features) of
    ``modules[i]``; returns the number of tokens seen (at least 1)."""
    count, hooks = [0], []
    for i, module in enumerate(modules):
        def pre(_, args, i=i):
            x = args[0][0].float()
            add(i, x)
            if i == 0:
                count[0] += x.shape[0]
        hooks.append(module.register_forward_pre_hook(pre))
    try:
        _run(model, batches, label)
    finally:
        for h in hooks:
            h.remove()
    return max(count[0], 1)


def keep_top(scores: torch.Tensor, remove: int) -> list[list[int]]:
    """Per row of ``scores`` (layers, units): the indices kept, in their original order, after
    dropping the ``remove`` lowest."""
    n = scores.shape[-1]
    return [sorted(torch.topk(row, n - remove).indices.tolist()) for row in scores]


# --- slicing the weights into a smaller model ---------------------------------------------


def shrink(model, layers: list[int] | None = None, channels: list[list[int]] | None = None,
           groups: list[list[int]] | None = None):
    """A new model of the same class with only the kept ``layers`` (original indices), per kept
    layer its kept MLP ``channels`` and kept key/value ``groups`` (None: all). Built from the
    smaller config and loaded strictly, so every sliced shape is checked against the config."""
    cfg = model.config
    layers = list(range(cfg.num_hidden_layers)) if layers is None else layers
    per_group = cfg.num_attention_heads // cfg.num_key_value_heads
    d = head_dim(cfg)
    sd, out = model.state_dict(), {}
    prefix = "model.layers."
    for name, t in sd.items():
        if not name.startswith(prefix):
            out[name] = t
            continue
        idx, rest = name[len(prefix):].split(".", 1)
        if int(idx) not in layers:
            continue
        new = layers.index(int(idx))
        ch = channels[new] if channels is not None else None
        gr = groups[new] if groups is not None else None
        out[f"{prefix}{new}.{rest}"] = _slice(rest, t, ch, gr, per_group, d)
    new_cfg = copy.deepcopy(cfg)
    new_cfg.num_hidden_layers = len(layers)
    if getattr(new_cfg, "layer_types", None):
        new_cfg.layer_types = [new_cfg.layer_types[i] for i in layers]
    if channels is not None:
        new_cfg.intermediate_size = len(channels[0])
    if groups is not None:
        new_cfg.num_key_value_heads = len(groups[0])
        new_cfg.num_attention_heads = len(groups[0]) * per_group
    new_cfg.head_dim = d  # hidden_size // heads no longer gives it once heads go
    small = type(model)(new_cfg).to(next(model.parameters()).dtype)
    small.load_state_dict(out, strict=True)
    small.generation_config = copy.deepcopy(model.generation_config)
    return small.eval()


def _rows(units: list[int], size: int) -> torch.Tensor:
    """Indices of the rows of units of ``size`` rows each (a head's d rows, a channel's 1)."""
    return torch.tensor([u * size + k for u in units for k in range(size)], dtype=torch.long)


def _slice(rest: str, t: torch.Tensor, channels, groups, per_group: int, d: int) -> torch.Tensor:
    """One decoder-layer tensor (``rest``: its name below the layer) cut to the kept units.
    Out-features are rows of a Linear weight (and its bias); in-features are columns."""
    module, _, kind = rest.rpartition(".")
    leaf = module.rpartition(".")[2]
    if channels is not None and leaf in ("gate_proj", "up_proj"):
        return t.index_select(0, _rows(channels, 1)).contiguous()
    if channels is not None and leaf == "down_proj" and kind == "weight":
        return t.index_select(1, _rows(channels, 1)).contiguous()
    if groups is None:
        return t
    q_heads = [g * per_group + k for g in groups for k in range(per_group)]
    if leaf == "q_proj":
        return t.index_select(0, _rows(q_heads, d)).contiguous()
    if leaf in ("k_proj", "v_proj"):
        return t.index_select(0, _rows(groups, d)).contiguous()
    if leaf == "o_proj" and kind == "weight":
        return t.index_select(1, _rows(q_heads, d)).contiguous()
    return t


# --- the whole pass -----------------------------------------------------------------------


def prune(model, batches: list[list[int]], sparsity: float, structures: tuple[str, ...]) -> tuple[object, dict]:
    """(smaller model, report): layers first (scored on the dense model), then MLP channels and
    key/value groups scored on what is left. Sparsity 0 removes nothing and returns a copy."""
    check_prunable(model)
    check_counts(model.config, sparsity, structures)
    cfg, report = model.config, {"sparsity": sparsity, "structures": list(structures),
                                 "calibration_rows": len(batches),
                                 "calibration_tokens": sum(len(b) for b in batches)}
    if "layers" in structures:
        scores = layer_scores(model, batches)
        remove = count_removed(cfg.num_hidden_layers, sparsity)
        keep = keep_top(scores[None], remove)[0]
        report["layers"] = {"before": cfg.num_hidden_layers, "after": len(keep),
                            "removed": [i for i in range(cfg.num_hidden_layers) if i not in keep],
                            "scores": [round(float(s), 5) for s in scores]}
        model = shrink(model, layers=keep)
    channels = groups = None
    if "mlp" in structures:
        remove = count_removed(model.config.intermediate_size, sparsity)
        channels = keep_top(channel_scores(model, batches), remove)
        report["mlp"] = {"intermediate_size_before": model.config.intermediate_size,
                         "intermediate_size_after": len(channels[0])}
    if "heads" in structures:
        kv = model.config.num_key_value_heads
        remove = count_removed(kv, sparsity)
        groups = keep_top(group_scores(model, batches), remove)
        report["heads"] = {"kv_groups_before": kv, "kv_groups_after": len(groups[0]),
                           "query_heads_per_group": model.config.num_attention_heads // kv,
                           "kept_groups": groups}
    return shrink(model, channels=channels, groups=groups), report


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once
