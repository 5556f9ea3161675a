"""Preference objectives on (prompt, chosen, rejected) pairs: DPO (sigmoid, IPO, hinge),
SimPO and ORPO, as small pure losses over per-sequence log-probabilities. (KTO trains on
unpaired rows: tuneforge.objectives.kto.)

Every loss takes summed response log-probs and response lengths (one value per pair) and
returns ``(loss [B], chosen_reward [B], rejected_reward [B])``; the rewards are each
method's implicit reward, so margins and preference accuracy read the same for all.
The pair recipe (tuneforge.train.recipes.pairs) computes the log-probs; the reference model is
the policy with its adapter disabled.

Why not trl's trainers: trl 1.16 has DPOTrainer (loss_type sigmoid, ipo, hinge, ...) and
KTOTrainer, but SimPO (CPO) and ORPO live in ``trl.experimental``, and each trainer brings
its own tokenisation and logging. One loop over these few tested functions trains every
variant with tuneforge's chat rendering (the eos fixes) and run folder.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from tuneforge.config import Strict
from tuneforge.objectives.base import ONE_TASK_RECIPE_REFUSES, Objective, register_objective


def sequence_logps(hidden: torch.Tensor, labels: torch.Tensor, head, ignore: int = -100):
    """Summed log-prob of the labelled tokens per row, and their count.

    hidden: [B, T, D] final hidden states; labels: [B, T] (IGNORE outside the response);
    head: the LM head. Position t predicts t+1. Only the N response positions go through
    the head ([N, V] instead of [B, T, V]): answers are a small share of each sequence, and
    full vocabulary logits are the largest tensors of the step (as in SFT's hidden path).
    """
    targets = labels[:, 1:]
    mask = targets != ignore
    logp = torch.log_softmax(head(hidden[:, :-1][mask]).float(), dim=-1)  # [N, V]
    tok_logp = logp.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)  # [N]
    rows = mask.nonzero()[:, 0]
    return torch.zeros(labels.shape[0], dtype=tok_logp.dtype, device=tok_logp.device).index_add(0, rows, tok_logp), \
        mask.sum(-1)


def dpo_loss(pc, pr, rc, rr, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """DPO family on summed log-probs (policy/reference x chosen/rejected, each [B]).

    h = (pc - rc) - (pr - rr) is the log-ratio margin.
      sigmoid: -log σ(β h)  (with label smoothing ε: -(1-ε) log σ(β h) - ε log σ(-β h), cDPO)
      hinge:   max(0, 1 - β h)  (SLiC)
      ipo:     (h - 1/(2β))²  (IPO, Azar et al.; pass length-averaged log-probs as trl does)
    """
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    return loss, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def simpo_loss(pc, pr, nc, nr, beta: float, gamma: float):
    """SimPO (Meng et al., 2024): reference-free, length-normalised, with a target margin γ.
    loss = -log σ(β pc/|yc| - β pr/|yr| - γ)."""
    rc, rj = beta * pc / nc, beta * pr / nr
    return -F.logsigmoid(rc - rj - gamma), rc.detach(), rj.detach()


def orpo_loss(pc, pr, nc, nr, lam: float):
    """ORPO (Hong et al., 2024): SFT NLL on the chosen answer plus λ times the odds-ratio term.
    With mean token log-probs a = p/|y|, log odds(y) = a - log(1 - e^a), and
    loss = -a_c - λ log σ(log odds(yc) - log odds(yr)). Rewards are the log odds."""
    ac, ar = pc / nc, pr / nr
    log_odds_c = ac - torch.log1p(-torch.exp(ac).clamp(max=1 - 1e-6))
    log_odds_r = ar - torch.log1p(-torch.exp(ar).clamp(max=1 - 1e-6))
    return -ac - lam * F.logsigmoid(log_odds_c - log_odds_r), log_odds_c.detach(), log_odds_r.detach()


# --- objectives (options + which loss) ----------------------------------------------------


class DpoOptions(Strict):
    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0, description="strength of the KL tie to the reference model")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO: assumed share of flipped labels")


class SimpoOptions(Strict):
    name: Literal["simpo"] = "simpo"
    beta: float = Field(2.0, gt=0)
    gamma: float = Field(0.5, ge=0, description="target reward margin")


class OrpoOptions(Strict):
    name: Literal["orpo"] = "orpo"
    lam: float = Field(0.1, gt=0, description="weight of the odds-ratio term next to the SFT loss")


class PreferenceObjective(Objective):
    data_kind = "preference"
    recipe = "pairs"
    refuses = ONE_TASK_RECIPE_REFUSES | {
        "privacy": "DP-SGD bounds each row's gradient, and a pair trains as two rows (chosen, rejected) "
                   "whose losses are coupled, so clipping per row bounds no pair's contribution",
    }
    needs_reference: ClassVar[bool] = True

    def pair_loss(self, opts, pc, pr, nc, nr, rc=None, rr=None):
        """(loss [B], chosen_reward [B], rejected_reward [B]) from summed log-probs and lengths."""
        raise NotImplementedError


@register_objective
class DPO(PreferenceObjective):
    name = "dpo"
    options = DpoOptions

    def pair_loss(self, opts, pc, pr, nc, nr, rc=None, rr=None):
        if opts.loss_type == "ipo":  # IPO's margin is on length-averaged log-probs
            pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
        return dpo_loss(pc, pr, rc, rr, opts.beta, opts.loss_type, opts.label_smoothing)


@register_objective
class SimPO(PreferenceObjective):
    name = "simpo"
    options = SimpoOptions
    needs_reference = False

    def pair_loss(self, opts, pc, pr, nc, nr, rc=None, rr=None):
        return simpo_loss(pc, pr, nc, nr, opts.beta, opts.gamma)


@register_objective
class ORPO(PreferenceObjective):
    name = "orpo"
    options = OrpoOptions
    needs_reference = False

    def pair_loss(self, opts, pc, pr, nc, nr, rc=None, rr=None):
        return orpo_loss(pc, pr, nc, nr, opts.lam)
