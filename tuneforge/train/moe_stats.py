"""Mixture-of-experts training: the router's load-balancing loss, expert utilisation per layer
(tokens per expert, entropy) logged to ``moe_stats.jsonl`` and plotted to
``moe_utilisation.png``, a warning when a router collapses, and the calibration pass that picks
the experts most used on the training data.

The router logits come from forward hooks on the router modules (the class transformers
records ``router_logits`` from), not from ``output_router_logits``: the token recipe runs the
transformer body and computes logits only at trained positions (objectives/sft.py), so the
causal-LM forward that would add ``aux_loss`` never runs. The aux loss is transformers' own
``load_balancing_loss_func`` of the model's family (Switch Transformer: E * sum_e f_e * P_e,
where f_e is the share of top-k assignments and P_e the mean router probability of expert e;
k when perfectly even), weighted by ``method.moe.aux_loss_coef``.

Loss arithmetic: a micro-batch's loss sum gets ``coef * aux * trained_tokens`` added, so after
the window's 1/trained-tokens scaling the logged ``loss`` is ``lm_loss + coef * aux_loss``
(aux token-weighted over the window's micro-batches; one micro-batch: transformers' loss).
``lm_loss`` and ``aux_loss`` are logged beside it in metrics.jsonl. Validation loss is the
plain token loss (comparable across aux weights and with runs of dense models).

Utilisation: per layer, the tokens routed to each expert (each token counts k times), and the
balance: the entropy of that distribution rescaled so 1 = every expert gets the same share and
0 = the same k experts take every token ((H - ln k) / (ln E - ln k)).
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from tuneforge.hardware import autocast, to_device
from tuneforge.io import write_json
from tuneforge.methods.moe import moe_problems, restrict_experts
from tuneforge.models.load import load_config
from tuneforge.models.moe import MoEInfo, describe, describe_config, router_modules
from tuneforge.objectives.sft import body_and_head, model_inputs
from tuneforge.plugins import objective_of

STATS_FILE, PLOT_FILE, CHOICE_FILE = "moe_stats.jsonl", "moe_utilisation.png", "moe_experts.json"


def moe_preflight(cfg) -> list[str]:
    """Problems of ``method.moe`` for this model and objective (before any weights load)."""
    problems = []
    objective = objective_of(cfg)
    moe = getattr(cfg.method, "moe", None)
    if moe is None:
        if getattr(cfg.method, "target_modules", None) != "all-linear":
            return []  # full, freeze, or LoRA on named modules: nothing MoE-specific to refuse
        info = describe_config(load_config(cfg.model.name, revision=cfg.model.revision,
                                           trust_remote_code=cfg.model.trust_remote_code))
        if info is None:
            return []
        return [f"method.target_modules=all-linear on a mixture-of-experts model ({info.model_type}): peft would "
                "silently widen it to every expert and the router (and refuse dropout there); say what trains with "
                "method.moe: {lora_on: attention|experts|both, router: frozen|trained} (method lora), or name "
                "method.target_modules (e.g. [q_proj, k_proj, v_proj, o_proj])"]
    if cfg.train.distributed == "fsdp":
        problems.append("method.moe with train.distributed=fsdp: peft re-parametrises the fused expert weights on "
                        "every forward, which tuneforge has not made work on sharded weights; use "
                        "train.distributed=ddp")
    if (objective.recipe or "tokens") != "tokens":
        problems.append(f"method.moe with objective '{objective.name}': the router loss, expert statistics and "
                        "calibration are built into the token-loss recipe (sft, cpt, distill); train this "
                        "objective with plain method lora (target_modules) instead")
    try:
        info = describe_config(load_config(cfg.model.name, revision=cfg.model.revision,
                                           trust_remote_code=cfg.model.trust_remote_code))
    except Exception:  # noqa: BLE001 - the model problem itself is reported by the caller
        return problems
    return problems + moe_problems(moe, info, cfg.model.name)


def balance(counts: torch.Tensor, top_k: int) -> float:
    """(H - ln k) / (ln E - ln k) of the expert-load distribution ``counts`` [E]: 1 = even, 0 = the
    same k experts take everything (each token's k choices are distinct, so H >= ln k)."""
    n = counts.numel()
    total = float(counts.sum())
    if total == 0 or n <= top_k:
        return 1.0
    p = counts.double() / total
    h = float(-(p[p > 0] * p[p > 0].log()).sum())
    return max(0.0, min(1.0, (h - math.log(top_k)) / (math.log(n) - math.log(top_k))))


def layer_stats(counts: torch.Tensor, top_k: int) -> dict:
    tokens = int(counts.sum()) // max(top_k, 1)
    return {"tokens": [int(c) for c in counts], "balance": round(balance(counts, top_k), 4),
            "top_share": round(float(counts.max()) / max(tokens, 1), 4), "unused": int((counts == 0).sum())}


class RouterTap:
    """Forward hooks on the routers: while armed, each router call appends (layer, logits [T, E],
    chosen experts [T, k])."""

    def __init__(self, model, info: MoEInfo):
        self.info, self.armed, self.records = info, False, []
        self.handles = [m.register_forward_hook(self._hook(layer)) for layer, m in router_modules(model, info)]

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            if not self.armed:
                return
            logits = output[0] if isinstance(output, tuple) else output
            chosen = output[2] if isinstance(output, tuple) and len(output) >= 3 else None
            if chosen is None:
                chosen = logits.topk(self.info.top_k, dim=-1).indices
            self.records.append((layer, logits, chosen))
        return hook

    @contextmanager
    def capture(self):
        self.records, self.armed = [], True
        try:
            yield self.records
        finally:
            self.armed = False

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def aux_loss_fn(model):
    """The family's own load_balancing_loss_func (transformers' modeling module), else Switch's."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    fn = getattr(sys.modules.get(type(hf).__module__), "load_balancing_loss_func", None)
    return fn or switch_aux_loss


def switch_aux_loss(gate_logits: tuple, num_experts: int, top_k: int, attention_mask=None) -> torch.Tensor:
    """E * sum_e f_e * P_e over all layers' rows (mask: [B, S], 1 = real token)."""
    probs = torch.cat(gate_logits).float().softmax(-1)  # [layers * T, E]
    if attention_mask is not None:
        probs = probs[attention_mask.reshape(-1).bool().repeat(len(gate_logits))]
    chosen = probs.topk(top_k, dim=-1).indices
    f = torch.zeros(num_experts, device=probs.device).scatter_add_(
        0, chosen.reshape(-1), torch.ones(chosen.numel(), device=probs.device)) / max(len(probs), 1)
    return num_experts * (f * probs.mean(0)).sum()


class MoELoss:
    """The objective with the router's aux loss added (training forwards only) and the routing
    of every training token counted."""

    def __init__(self, inner, monitor: MoEMonitor):
        self.inner, self.monitor = inner, monitor

    def loss(self, model, batch: dict, opts, *, hidden_path: bool):
        if not model.training:  # validation: the plain token loss
            return self.inner.loss(model, batch, opts, hidden_path=hidden_path)
        m = self.monitor
        with m.tap.capture() as records:
            loss_sum, count = self.inner.loss(model, batch, opts, hidden_path=hidden_path)
        mask = batch.get("attention_mask")
        m.count(records, mask)
        if m.coef and records:
            ordered = tuple(logits for _, logits, _ in sorted(records, key=lambda r: r[0]))
            aux = m.aux_fn(ordered, m.info.num_experts, m.info.top_k, mask)
            loss_sum = loss_sum + m.coef * aux * count
            m.aux_sum += float(aux.detach()) * int(count)
            m.aux_tokens += int(count)
        return loss_sum, count


class MoEMonitor:
    """Everything MoE a token run does beside the loss: calibration, the aux-loss wrapper,
    per-step utilisation rows, the collapse warning, the plot and the summary entry."""

    def __init__(self, model, info: MoEInfo, opts, run_dir: Path | None, console):
        self.info, self.opts, self.run_dir, self.console = info, opts, run_dir, console
        coef = None if opts is None else opts.aux_loss_coef
        self.coef = 0.0 if opts is None else (info.aux_loss_coef if coef is None else coef)
        self.threshold = 0.2 if opts is None else opts.collapse_entropy
        self.tap, self.aux_fn = RouterTap(model, info), aux_loss_fn(model)
        self.chosen: dict[int, list[int]] | None = None
        self.collapsed: dict[int, dict] = {}  # layer -> its stats when first seen collapsed
        self.last: dict[int, dict] = {}
        self._reset()

    def _reset(self) -> None:
        self.counts = {layer: torch.zeros(self.info.num_experts, dtype=torch.long) for layer in self.info.layers}
        self.aux_sum, self.aux_tokens = 0.0, 0

    @torch.no_grad()
    def count(self, records, mask) -> None:
        keep = None if mask is None else mask.reshape(-1).bool()
        for layer, _, chosen in records:
            c = chosen if keep is None or keep.numel() != chosen.shape[0] else chosen[keep]
            self.counts.setdefault(layer, torch.zeros(self.info.num_experts, dtype=torch.long))
            self.counts[layer] += torch.bincount(c.reshape(-1).cpu(), minlength=self.info.num_experts)

    def wrap(self, objective) -> MoELoss:
        return MoELoss(objective, self)

    # --- calibration ------------------------------------------------------------------------

    @torch.no_grad()
    def calibrate(self, model, batches: list[dict], device: str, dtype: torch.dtype) -> dict[int, list[int]]:
        """Route ``batches`` through the (not yet trained) model and keep, per layer, the
        top_k_experts experts that took the most tokens; only their LoRA trains."""
        k = self.opts.top_k_experts
        was_training = model.training
        model.eval()
        body, _ = body_and_head(model)
        self._reset()
        for b in batches:
            b = to_device(b, device)
            with self.tap.capture() as records, autocast(device, dtype):
                body(**model_inputs(b))
            self.count(records, b.get("attention_mask"))
        model.train(was_training)
        counts = {layer: c.clone() for layer, c in self.counts.items()}
        self._reset()
        chosen = {layer: sorted(torch.argsort(c, descending=True, stable=True)[:k].tolist())
                  for layer, c in counts.items()}
        self.restrict(model, chosen, {"by": "top_k", "top_k_experts": k, "calibration_batches": len(batches),
                                      "tokens_per_expert": {str(layer): c.tolist() for layer, c in counts.items()}})
        return chosen

    def restrict(self, model, chosen: dict[int, list[int]], how: dict) -> None:
        restrict_experts(model, chosen)
        self.chosen = chosen
        if self.run_dir is not None:
            write_json(self.run_dir / CHOICE_FILE, {**how, "trained_experts": {str(k): v for k, v in chosen.items()}})
        self.console.print("MoE: training experts " + "; ".join(f"layer {layer}: {v}" for layer, v in chosen.items()))

    # --- the loop's hooks (tuneforge.train.loop.Loop ``monitor``) ------------------------------

    def start(self, step: int) -> None:
        """A fresh run starts a new moe_stats.jsonl; a resumed one drops rows after its checkpoint."""
        self._reset()
        if self.run_dir is None:
            return
        path = self.run_dir / STATS_FILE
        rows = [line for line in (path.read_text().splitlines() if path.exists() else [])
                if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in rows))

    def window_metrics(self) -> dict[str, float]:
        """Scalars for the step's metrics.jsonl row (the window's aux loss, the worst balance)."""
        self.pending = {layer: layer_stats(c, self.info.top_k) for layer, c in sorted(self.counts.items())
                        if int(c.sum())}
        out = {}
        if self.aux_tokens:
            aux = self.aux_sum / self.aux_tokens
            out["aux_loss"] = aux
            out["aux_weighted"] = self.coef * aux
        if self.pending:
            out["router_balance_min"] = min(s["balance"] for s in self.pending.values())
        self._reset()
        return out

    def logged(self, row: dict, console) -> None:
        """After the loop logs a train row: this step's per-layer utilisation -> moe_stats.jsonl,
        and a warning the first time a layer's router has collapsed."""
        stats = getattr(self, "pending", {})
        if not stats:
            return
        self.last = stats
        if self.run_dir is not None:
            with open(self.run_dir / STATS_FILE, "a") as f:
                f.write(json.dumps({"step": row["step"], "layers": {str(k): v for k, v in stats.items()}}) + "\n")
        for layer, s in stats.items():
            if s["balance"] < self.threshold and layer not in self.collapsed:
                self.collapsed[layer] = {"step": row["step"], **s}
                console.print(f"[bold yellow]warning: router collapse[/] in layer {layer} at step {row['step']}: "
                              f"balance {s['balance']:.3f} < {self.threshold} (most used expert takes "
                              f"{100 * s['top_share']:.0f}% of tokens, {s['unused']} of {self.info.num_experts} "
                              "experts unused). Raise method.moe.aux_loss_coef, lower train.lr, or freeze the router")
        self.pending = {}

    def finish(self) -> dict:
        """The summary's ``moe`` entry; draws moe_utilisation.png."""
        self.tap.close()
        if self.run_dir is not None and (self.run_dir / STATS_FILE).exists():
            plot_utilisation(self.run_dir / STATS_FILE, self.run_dir / PLOT_FILE, self.threshold)
        out = {"model_type": self.info.model_type, "experts": self.info.num_experts, "top_k": self.info.top_k,
               "total_params": self.info.total_params, "active_params": self.info.active_params,
               "aux_loss_coef": self.coef,
               "trained_experts": "all" if self.chosen is None else {str(k): v for k, v in self.chosen.items()},
               "final_balance": {str(k): s["balance"] for k, s in self.last.items()},
               "collapsed_layers": sorted(self.collapsed)}
        if self.collapsed:
            out["warning"] = (f"router collapse in layer(s) {sorted(self.collapsed)}: expert-load balance fell below "
                              f"{self.threshold} (see {STATS_FILE} and {PLOT_FILE})")
            self.console.print(f"[bold yellow]warning[/]: {out['warning']}")
        return out


def attach(cfg, model, run_dir: Path | None, console) -> MoEMonitor | None:
    """A monitor when ``model`` is a mixture of experts (None otherwise). With ``method.moe``
    the aux loss is on (its weight) and expert choices by index are recorded; without it the
    utilisation is still logged and watched for collapse."""
    info = describe(model)
    if info is None:
        return None
    opts = getattr(cfg.method, "moe", None)
    monitor = MoEMonitor(model, info, opts, run_dir, console)
    console.print(f"MoE: {info.summary()}; aux loss weight {monitor.coef:g}")
    if opts is not None and isinstance(opts.experts, list):
        monitor.chosen = {layer: sorted(opts.experts) for layer in info.layers}
        if run_dir is not None:
            write_json(run_dir / CHOICE_FILE, {"by": "index", "trained_experts": {str(k): v for k, v in
                                                                                  monitor.chosen.items()}})
    return monitor


def plot_utilisation(stats_path: Path, out: Path, threshold: float) -> Path | None:
    """Balance per layer over the steps (left) and each layer's share of tokens per expert over
    the whole run (right)."""
    import matplotlib  # deferred: the plotting stack loads only when a plot is drawn

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt  # deferred: the plotting stack loads only when a plot is drawn

    rows = [json.loads(line) for line in stats_path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    layers = sorted({int(k) for r in rows for k in r["layers"]})
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(11, 4))
    for layer in layers:
        pts = [(r["step"], r["layers"][str(layer)]["balance"]) for r in rows if str(layer) in r["layers"]]
        ax.plot(*zip(*pts), lw=1, label=f"layer {layer}")
    ax.axhline(threshold, color="red", ls="--", lw=1, label="collapse warning")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("expert-load balance (1 = even)")
    ax.grid(alpha=0.3)
    if len(layers) <= 12:
        ax.legend(fontsize=7)
    totals = []
    for layer in layers:
        t = torch.tensor([r["layers"][str(layer)]["tokens"] for r in rows if str(layer) in r["layers"]]).sum(0).double()
        totals.append((t / t.sum().clamp(min=1)).tolist())
    im = hx.imshow(totals, aspect="auto", cmap="viridis")
    hx.set_xlabel("expert")
    hx.set_ylabel("layer")
    hx.set_yticks(range(len(layers)), [str(x) for x in layers])
    hx.set_title("share of routed tokens (whole run)")
    fig.colorbar(im, ax=hx)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
