"""Many plain LoRA adapters on one base model in one batch, each row with its own adapter.

peft serves a mixed batch (``adapter_names=``) by running every LoRA layer once per adapter
sub-batch (row selection, two small matmuls, scaling, scatter back): with 16 adapters that is
~80 small ops per layer per token, and 16 adapters ran at 0.22x the throughput of one.
Here each target Linear of a batch takes the batch's adapters side by side,
A_cat [in, sum r] and B_cat [sum r, out] (each adapter's scale folded into its B), and every
row keeps its own adapter's columns with a 0/1 mask:

    y = base(x) + ((x @ A_cat) * mask[row]) @ B_cat

Three ops per layer however many adapters the batch holds (ranks may differ; a row without
an adapter has an all-zero mask). This is the batched multi-LoRA idea of punica/S-LoRA/vLLM
(BGMV) written with plain torch ops, because torch has no segmented-gather LoRA kernel and
peft no other batched path. Gathering each row's A and B and multiplying per row (``A[idx]``
+ ``bmm``) does fewer multiplications but measured slower on CPU: see docs/deploy.md.

The side-by-side copies are made once per generate call from the resident adapters (each
kept at its own rank, so no padding and no fixed slots to recycle): a batch owns its copies,
and loading, unloading or evicting an adapter never touches a running batch's weights. The
copy costs one pass over the batch's adapter weights, which every decode step reads anyway.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

_PREFIX = "base_model.model."  # peft's prefix on every saved key
# LoraConfig settings that change the forward pass beyond x @ A @ B * scale; an adapter using
# any of them is served by peft itself.
_PEFT_ONLY = ("use_dora", "modules_to_save", "layer_replication", "lora_bias", "target_parameters",
              "trainable_token_indices", "alora_invocation_tokens", "use_qalora", "megatron_config",
              "velora_config", "monteclora_config", "use_bdlora", "arrow_config", "kasa_config", "fan_in_fan_out")


class LoraBank:
    """The plain LoRA adapters resident on one base model, per target Linear: A [in, r] and
    scale * B [r, out] in the model's dtype and device."""

    def __init__(self, model: nn.Module):
        # Taken before peft wraps any module for an adapter that it serves: peft keeps each
        # Linear as its layer's ``base_layer``, so hooks on these objects see every base output.
        self.linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.adapters: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.adapters

    def load(self, name: str, adapter_dir: str) -> str | None:
        """Load a peft adapter folder under ``name``; returns why it cannot be served here (the
        caller then gives it to peft), or None once it is loaded."""
        from peft import LoraConfig, PeftConfig
        from peft.utils import load_peft_weights
        from peft.utils.other import get_pattern_key

        cfg = PeftConfig.from_pretrained(adapter_dir)
        if type(cfg) is not LoraConfig:
            return f"{cfg.peft_type.value} adapter"
        extras = [f for f in _PEFT_ONLY if getattr(cfg, f, None) not in (None, False, [], {}, ())]
        if cfg.bias != "none":
            extras.append(f"bias={cfg.bias}")
        if extras:
            return "LoRA with " + ", ".join(extras)
        weights = load_peft_weights(adapter_dir, device="cpu")
        modules = {}
        for key, a in weights.items():
            if key.endswith(".lora_B.weight"):
                continue
            if not (key.startswith(_PREFIX) and key.endswith(".lora_A.weight")):
                return f"a weight other than lora_A/lora_B: {key}"
            mod = key[len(_PREFIX):-len(".lora_A.weight")]
            b, lin = weights.get(key.replace(".lora_A.", ".lora_B.")), self.linears.get(mod)
            if lin is None or b is None or a.shape[1] != lin.in_features or b.shape[0] != lin.out_features:
                return f"{mod} is not a Linear of this base with matching lora_A/lora_B shapes"
            # The scale as peft computes it (LoraModel._create_and_replace, LoraLayer.update_layer).
            r = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), mod), cfg.r)
            alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), mod), cfg.lora_alpha)
            scale = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
            modules[mod] = (a.t().to(self.device, self.dtype).contiguous(),
                            (b.float() * scale).t().to(self.device, self.dtype).contiguous())
        if not modules:
            return "no lora_A/lora_B weights"
        self.adapters[name] = modules
        return None

    def unload(self, name: str) -> None:
        del self.adapters[name]

    @contextlib.contextmanager
    def rows(self, names: list[str | None]) -> Iterator[None]:
        """Within: row i of every forward pass of the model gets adapter ``names[i]`` (None: the
        base alone). The engine's single worker runs one batch at a time, so the hooks are
        registered for this batch and removed after it, even when generation fails."""
        used = list(dict.fromkeys(n for n in names if n is not None))
        masks: dict[tuple, torch.Tensor | None] = {}
        handles = []
        try:
            for mod, lin in self.linears.items():
                here = tuple(n for n in used if mod in self.adapters[n])
                if not here:
                    continue
                parts = [self.adapters[n][mod] for n in here]
                a = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts], dim=1)
                b = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts], dim=0)
                key = tuple((n, p[0].shape[1]) for n, p in zip(here, parts, strict=True))  # ranks vary by module
                if key not in masks:
                    masks[key] = self._mask(names, key)
                handles.append(lin.register_forward_hook(_add_lora(a, b, masks[key])))
            yield
        finally:
            for h in handles:
                h.remove()

    def _mask(self, names: list[str | None], ranks: tuple[tuple[str, int], ...]) -> torch.Tensor | None:
        """[rows, 1, sum of ranks]: 1 on each row's own adapter's columns (adapters side by side
        in ``ranks`` order); None when every row uses the one adapter (nothing to mask)."""
        if len(ranks) == 1 and all(n == ranks[0][0] for n in names):
            return None
        mask = torch.zeros(len(names), 1, sum(r for _, r in ranks), dtype=self.dtype, device=self.device)
        cols, start = {}, 0
        for n, r in ranks:
            cols[n], start = slice(start, start + r), start + r
        for row, n in enumerate(names):
            if n in cols:
                mask[row, 0, cols[n]] = 1
        return mask


def _add_lora(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None):
    # As few ops as possible: at decode shapes each op costs more in dispatch (and in thread
    # hand-offs on a busy machine) than in arithmetic; the add rides in addmm.
    def hook(module, args, out):
        h = args[0] @ a  # [rows, tokens, sum r]
        if mask is not None:
            h = h * mask
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b).view(out.shape)
    return hook
