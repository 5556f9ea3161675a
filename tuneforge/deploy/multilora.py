"""Many plain LoRA adapters on one base model in one batch, each row with its own adapter.

peft serves a mixed batch (``adapter_names=``) by running every LoRA layer once per adapter
sub-batch (row selection, two small matmuls, scaling, scatter back): with 16 adapters that is
~80 small ops per layer per token, and 16 adapters ran at 0.22x the throughput of one.
Here each target Linear gets two or three ops per forward pass however many adapters the
batch holds, in one of two layouts built once per generate call (each adapter's scale folded
into its B):

- side by side, for a batch of few adapters: A_cat [in, sum r], B_cat [sum r, out], and a
  0/1 mask keeping each row's own adapter's columns, ``y = base(x) + ((x @ A_cat) * mask) @
  B_cat``. The products grow with the number of adapters (every row multiplies by all of
  them), so this wins only while they are few;
- row by row, for a batch of many: A_rows [rows, in, r], B_rows [rows, r, out] (row i holds
  its own adapter, zeros for the base model), ``y = base(x) + bmm(bmm(x, A_rows), B_rows)``:
  each row multiplies only by its own adapter, at the cost of one copy of an adapter per row.

This is the batched multi-LoRA idea of punica/S-LoRA/vLLM (BGMV), written with plain torch
ops because torch has no segmented-gather LoRA kernel and peft no other batched path.
Measured on SmolLM2-135M with r=16 adapters on all seven Linear kinds (2 cores, bf16 base, no
AMX), the LoRA ops of a 16-row decode step: side by side 9.5 / 17.8 / 24.3 / 38.9 ms for 1 /
4 / 8 / 16 adapters, row by row ~23-25 ms for any of them; a 30-token prefill of 16 rows over
16 adapters 382 vs 87 ms. Hence side by side up to rows/4 adapters, row by row above.

The LoRA products run in float32 (autocast off), as peft keeps adapter weights
(``autocast_adapter_dtype``): at these shapes bf16 products on a CPU without AMX ran 2x
slower than fp32 ones (the 16-row, one-adapter ops above: 19.6 ms in bf16).

Each batch copies its adapters into its layout at its start (a batch of one adapter uses the
bank's tensors as they are), so loading, unloading or evicting an adapter never touches a
running batch's weights; adapters are kept each at its own rank, so there is no padding and
no fixed slots to recycle. The copies cost one pass over the batch's adapter weights, into
tensors the bank keeps from batch to batch (``_buffers``): the last row-by-row batch's copies
(at most 1 GiB, ``_ROW_BYTES``) and the last side-by-side batch's stay allocated.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_PREFIX = "base_model.model."  # peft's prefix on every saved key
# Row-by-row copies of a batch's adapters beyond this size are not made (side by side instead):
# a 16-row batch of r=16 all-linear adapters on a 7B base would need ~2.5 GB of them.
_ROW_BYTES = 2**30
# LoraConfig settings that change the forward pass beyond x @ A @ B * scale; an adapter using
# any of them is served by peft itself.
_PEFT_ONLY = ("use_dora", "modules_to_save", "layer_replication", "lora_bias", "target_parameters",
              "trainable_token_indices", "alora_invocation_tokens", "use_qalora", "megatron_config",
              "velora_config", "monteclora_config", "use_bdlora", "arrow_config", "kasa_config", "fan_in_fan_out")


class LoraBank:
    """The plain LoRA adapters resident on one base model, per target Linear: A [in, r] and
    scale * B [r, out] in float32 on the model's device."""

    def __init__(self, model: nn.Module):
        # Taken before peft wraps any module for an adapter that it serves: peft keeps each
        # Linear as its layer's ``base_layer``, so hooks on these objects see every base output.
        self.linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.device = next(model.parameters()).device
        self.adapters: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        # The last batch's copies per (target Linear, layout), refilled by the next batch of the
        # same shapes. Fresh tensors for every batch cost page faults: 16 rows of r=16
        # all-linear adapters on SmolLM2-135M are 314 MB, which took 350-480 ms a batch to stack
        # into new memory inside the engine against ~85 ms into memory already mapped.
        self._held: dict[tuple[str, str], tuple[torch.Tensor, ...]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.adapters

    def load(self, name: str, adapter_dir: str) -> str | None:
        """Load a peft adapter folder under ``name``; returns why it cannot be served here (the
        caller then gives it to peft), or None once it is loaded."""
        # deferred: peft loads with the first adapter, not when the server starts
        from peft import LoraConfig, PeftConfig

        # deferred: peft imports transformers; config validation and --help stay quick
        from peft.utils import load_peft_weights

        # deferred: peft imports transformers; config validation and --help stay quick
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
            modules[mod] = (a.float().t().to(self.device).contiguous(),
                            (b.float() * scale).t().to(self.device).contiguous())
        if not modules:
            return "no lora_A/lora_B weights"
        self.adapters[name] = modules
        return None

    def unload(self, name: str) -> None:
        del self.adapters[name]

    @contextlib.contextmanager
    def rows(self, names: list[str | None], layout: str | None = None) -> Iterator[None]:
        """Within: row i of every forward pass of the model gets adapter ``names[i]`` (None: the
        base alone). ``layout``: "cat" (side by side) or "rows" (row by row); by default the
        faster one for this batch (module docstring). The engine's single worker runs one
        batch at a time, so the hooks are registered for this batch and removed after it, even
        when generation fails."""
        used = list(dict.fromkeys(n for n in names if n is not None))
        if layout is None:
            layout = "rows" if 4 * len(used) > len(names) and self._row_bytes(names) <= _ROW_BYTES else "cat"
        masks: dict[tuple, torch.Tensor | None] = {}
        handles = []
        try:
            for mod, lin in self.linears.items():
                parts = {n: self.adapters[n][mod] for n in used if mod in self.adapters[n]}
                if not parts:
                    continue
                if layout == "rows":
                    hook = _add_rows(*self._stack(names, parts, mod, lin))
                else:
                    key = tuple((n, pa.shape[1]) for n, (pa, _) in parts.items())  # ranks vary by module
                    if key not in masks:
                        masks[key] = self._mask(names, key)
                    if len(parts) == 1:  # one adapter: its own tensors, no copy
                        (a, b), = parts.values()
                    else:
                        r = sum(pa.shape[1] for pa, _ in parts.values())
                        a, b = self._buffers(mod, "cat", ((lin.in_features, r), (r, lin.out_features)))
                        torch.cat([pa for pa, _ in parts.values()], dim=1, out=a)
                        torch.cat([pb for _, pb in parts.values()], dim=0, out=b)
                    hook = _add_cat(a, b, masks[key])
                handles.append(lin.register_forward_hook(hook))
            yield
        finally:
            for h in handles:
                h.remove()

    def _row_bytes(self, names: list[str | None]) -> int:
        return sum(a.nbytes + b.nbytes for n in names if n is not None for a, b in self.adapters[n].values())

    def _stack(self, names: list[str | None], parts: dict[str, tuple[torch.Tensor, torch.Tensor]],
               mod: str, lin: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """[rows, in, r], [rows, r, out]: each row's adapter, zero-padded to the largest rank
        here; zeros for a row without one; in ``mod``'s held tensors (_buffers)."""
        r = max(a.shape[1] for a, _ in parts.values())
        none = (torch.zeros(lin.in_features, r, device=self.device), torch.zeros(r, lin.out_features, device=self.device))
        # Only lower ranks are padded: F.pad copies even when it adds nothing, and the stack
        # below already copies every adapter once.
        padded = {n: (a, b) if a.shape[1] == r else (F.pad(a, (0, r - a.shape[1])), F.pad(b, (0, 0, 0, r - b.shape[0])))
                  for n, (a, b) in parts.items()}
        rows = [padded.get(n, none) for n in names]
        a, b = self._buffers(mod, "rows", ((len(names), lin.in_features, r), (len(names), r, lin.out_features)))
        torch.stack([a for a, _ in rows], out=a)
        torch.stack([b for _, b in rows], out=b)
        return a, b

    def _buffers(self, mod: str, layout: str, shapes: tuple[tuple[int, ...], ...]) -> tuple[torch.Tensor, ...]:
        """Float32 tensors of ``shapes`` for ``mod``'s copies in ``layout``: the last batch's,
        when their shapes match (one batch runs at a time, and its hooks go before the next
        batch refills them), else new ones that replace them."""
        held = self._held.get((mod, layout))
        if held is None or tuple(t.shape for t in held) != shapes:
            held = self._held[(mod, layout)] = tuple(torch.empty(s, device=self.device) for s in shapes)
        return held

    def _mask(self, names: list[str | None], ranks: tuple[tuple[str, int], ...]) -> torch.Tensor | None:
        """[rows, 1, sum of ranks]: 1 on each row's own adapter's columns (adapters side by side
        in ``ranks`` order); None when every row uses the one adapter (nothing to mask)."""
        if len(ranks) == 1 and all(n == ranks[0][0] for n in names):
            return None
        mask = torch.zeros(len(names), 1, sum(r for _, r in ranks), device=self.device)
        cols, start = {}, 0
        for n, r in ranks:
            cols[n], start = slice(start, start + r), start + r
        for row, n in enumerate(names):
            if n in cols:
                mask[row, 0, cols[n]] = 1
        return mask


# Hooks: as few ops as possible, because at decode shapes each op costs more in dispatch than
# in arithmetic. The products run in float32 with autocast off (module docstring); the sum is
# added into the base output in place (a fresh tensor of the base Linear's). A float32 output
# outside autocast (CPUs without bf16 units, fp32 serving) takes the second product straight
# into it (``addmm_``/``baddbmm_``: C += h @ B in one kernel, no [rows, tokens, out] temporary
# and no second pass to add it) and skips the autocast switch; SmolLM2-135M with r=16 on all
# Linears, a 16-row decode step on one AVX2 core (shared machine): median 200 -> 177 ms.
def _plain_fp32(out: torch.Tensor) -> bool:
    return out.dtype == torch.float32 and not torch.is_autocast_enabled(out.device.type)


def _add_cat(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None):
    def hook(module, args, out):
        if _plain_fp32(out):
            h = args[0] @ a
            if mask is not None:
                h.mul_(mask)
            out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b)
            return out
        with torch.autocast(out.device.type, enabled=False):
            h = args[0].float() @ a  # [rows, tokens, sum r]
            if mask is not None:
                h = h * mask
            return out.add_((h @ b).to(out.dtype))
    return hook


def _add_rows(a: torch.Tensor, b: torch.Tensor):
    def hook(module, args, out):
        if _plain_fp32(out):
            return out.baddbmm_(torch.bmm(args[0], a), b)
        with torch.autocast(out.device.type, enabled=False):
            return out.add_(torch.bmm(torch.bmm(args[0].float(), a), b).to(out.dtype))
    return hook
