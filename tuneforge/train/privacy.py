"""Differential privacy: DP-SGD through Opacus on the trainable (e.g. LoRA) weights.

Opacus computes each example's gradient with hooks on the layers that hold trainable
weights (LoRA's A/B are plain ``nn.Linear``), clips each to ``max_grad_norm``, sums, adds
Gaussian noise of std ``noise_multiplier * max_grad_norm`` and averages; its RDP accountant
turns (noise, sample rate, steps) into the epsilon spent. The hooks attach to the peft model
in place (``GradSampleHooks``), so objectives keep calling the model as usual.

Batches are shuffled fixed-size batches, not Poisson-sampled; the epsilon reported uses
the Poisson-subsampling analysis with q = rows per step / training rows, as Opacus does
with ``poisson_sampling=False`` (standard practice; strictly the guarantee assumes Poisson).
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.config import PrivacyConfig


@dataclass
class Private:
    hooks: object  # opacus GradSampleHooks
    optimizer: object  # opacus DPOptimizer (steps the wrapped optimizer)
    noise_multiplier: float
    sample_rate: float
    delta: float

    def epsilon(self, steps: int) -> float:
        """Epsilon spent after ``steps`` noisy steps (same noise and rate each step, so the
        history is one entry and a resumed run needs no saved accountant state)."""
        from opacus.accountants import RDPAccountant  # deferred: the DP-SGD stack loads only for runs with privacy

        if steps == 0:
            return 0.0
        accountant = RDPAccountant()
        accountant.history = [(self.noise_multiplier, self.sample_rate, steps)]
        return float(accountant.get_epsilon(self.delta))

    def close(self) -> None:
        """Remove the per-example hooks (generation afterwards must not store activations)."""
        self.hooks.remove_hooks()

    def report(self, max_grad_norm: float, steps: int) -> dict:
        return {"epsilon": round(self.epsilon(steps), 4), "delta": self.delta,
                "noise_multiplier": round(self.noise_multiplier, 4), "max_grad_norm": max_grad_norm,
                "sample_rate": round(self.sample_rate, 6), "steps": steps, "accountant": "rdp (opacus)"}


def make_private(model, optimizer, pc: PrivacyConfig, *, micro_batch_size: int, rows_per_step: int,
                 n_rows: int, steps: int) -> Private:
    # deferred: the DP-SGD stack loads only for runs with privacy
    from opacus.accountants.utils import get_noise_multiplier

    # deferred: the DP-SGD stack loads only for runs with privacy
    from opacus.grad_sample.grad_sample_module import GradSampleHooks
    from opacus.optimizers import DPOptimizer  # deferred: the DP-SGD stack loads only for runs with privacy

    sample_rate = min(1.0, rows_per_step / n_rows)
    sigma = pc.noise_multiplier if pc.noise_multiplier is not None else get_noise_multiplier(
        target_epsilon=pc.target_epsilon, target_delta=pc.delta, sample_rate=sample_rate, steps=steps,
        accountant="rdp")
    # strict=False: Llama's rotary embedding holds a buffer, which strict mode rejects; it is
    # not a per-batch statistic (unlike BatchNorm), so per-example gradients stay exact.
    # loss_reduction="sum": the loop's loss is a sum over examples (scaled, see dp_loss_scale).
    hooks = GradSampleHooks(model, loss_reduction="sum", strict=False)
    # loss_reduction="mean": the noisy sum is divided by micro_batch_size x accumulated
    # micro-batches, i.e. the mean clipped per-example gradient.
    dp_opt = DPOptimizer(optimizer, noise_multiplier=sigma, max_grad_norm=pc.max_grad_norm,
                         expected_batch_size=micro_batch_size, loss_reduction="mean")
    return Private(hooks, dp_opt, sigma, sample_rate, pc.delta)


def dp_loss_scale(n_rows: int, n_tokens: int) -> float:
    """Multiplier of the summed token loss under DP: rows / tokens.

    Each example's gradient then is its mean token loss's gradient (times its length over the
    window's mean length), the scale at which max_grad_norm is meant; dividing by all the
    window's tokens instead would shrink each example's gradient until the noise dominates.
    """
    return n_rows / max(n_tokens, 1)
