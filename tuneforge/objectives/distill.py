"""Distillation: the student learns from a teacher's logits on the same chat rows.

A token-level (logit) KD objective inside the token-loss recipe, so distillation gets the
same run folder, checkpoints, resume and generation eval as SFT. trl 1.16's
DistillationTrainer/GKD generate on-policy samples each step; on CPUs that generation
dominates the run, and logit KD on the dataset's answers is the classic variant (Hinton
et al.) that works with any method. Teacher and student must share the tokenizer/vocabulary.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from tuneforge.config import Strict
from tuneforge.models.load import load_causal_lm
from tuneforge.objectives.base import register_objective
from tuneforge.objectives.sft import IGNORE, SFT, body_and_head, model_inputs


def kd_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                temperature: float, alpha: float) -> torch.Tensor:
    """Sum over N positions of ``alpha * CE(targets) + (1 - alpha) * T^2 * KL(teacher_T || student_T)``.

    student_logits, teacher_logits: [N, V]; targets: [N]. The T^2 factor keeps the soft
    term's gradient scale independent of the temperature (Hinton et al., 2015).
    """
    ce = F.cross_entropy(student_logits.float(), targets, reduction="sum")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return alpha * ce + (1 - alpha) * temperature**2 * kl


@lru_cache(maxsize=1)
def load_teacher(name: str, device: str, dtype: torch.dtype):
    """The frozen teacher, loaded once per run (the objective is a stateless singleton)."""
    return load_causal_lm(name, dtype, device).eval().requires_grad_(False)


class DistillOptions(Strict):
    name: Literal["distill"] = "distill"
    teacher: str = Field(..., description="teacher model: embedded alias, HF folder or hub id (same vocabulary)")
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the hard-label CE; 1 - alpha goes to the KD term")


@register_objective
class Distill(SFT):
    name = "distill"
    options = DistillOptions

    def loss(self, model, batch, opts, *, hidden_path: bool):
        p = next(model.parameters())
        teacher = load_teacher(opts.teacher, str(p.device.type), torch.get_autocast_dtype(p.device.type)
                               if torch.is_autocast_enabled(p.device.type) else torch.float32)
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE
        with torch.no_grad():
            t_logits = teacher(**model_inputs(batch)).logits[:, :-1][mask]  # [N, V]
        if hidden_path:
            body, head = body_and_head(model)
            s_logits = head(body(**model_inputs(batch)).last_hidden_state[:, :-1][mask])
        else:
            s_logits = model(**model_inputs(batch)).logits[:, :-1][mask]
        if t_logits.shape[-1] != s_logits.shape[-1]:
            raise ValueError(f"teacher vocabulary ({t_logits.shape[-1]}) differs from the student's "
                             f"({s_logits.shape[-1]}): logit distillation needs the same tokenizer")
        return kd_loss_sum(s_logits, t_logits, targets[mask], opts.temperature, opts.alpha), mask.sum()
