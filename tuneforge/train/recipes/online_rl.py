"""The online-RL recipe: policy optimisation against a reward model (objective ``policy``): setup ->
prompts -> policy (method applied) + reward model (a reward run, merged) -> trl GRPO/RLOO
with a KL penalty -> save -> held-out reward before/after.

trl runs the loop (sampling, group advantages, clipped policy loss, KL to the reference)
and checkpoints it for --resume (it is the one recipe not on tuneforge's loop: what that loop
adds and trl's does not, objectives/policy.py refuses at validation); tuneforge adds the run folder and a watch for reward
hacking: every logged step writes KL, reward and answer length to metrics.jsonl, and
training stops with a warning when the KL explodes or the answers collapse in length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console

from tuneforge.config import RunConfig
from tuneforge.data.render import with_system
from tuneforge.evaluate.generate import generate_texts
from tuneforge.hardware import autocast
from tuneforge.io import write_json
from tuneforge.methods import count_trainable
from tuneforge.models.load import load_causal_lm, load_tokenizer
from tuneforge.models.tokenizer import fix_chat_tokenizer
from tuneforge.plugins import method_of
from tuneforge.runs import load_head
from tuneforge.train.checkpoint import truncate_metrics
from tuneforge.train.run_folder import RunStart, finish, start_run


def hacking_alarm(row: dict, first_length: float | None, max_kl: float, min_length_ratio: float) -> str | None:
    """Why training should stop at this logged step, or None. ``row`` holds trl's logged
    ``kl`` and ``completions/mean_length``; ``first_length`` is the first step's length."""
    kl, length = row.get("kl"), row.get("completions/mean_length")
    if kl is not None and kl > max_kl:
        return f"KL to the reference {kl:.3f} > objective.max_kl={max_kl}: the policy is drifting (reward hacking?)"
    if length is not None and first_length and length < min_length_ratio * first_length:
        return (f"mean answer length {length:.1f} < {min_length_ratio} x the first step's {first_length:.1f}: "
                "the answers are collapsing")
    return None


def _watch_callback(metrics_path: Path, opts, console: Console, state_out: dict, tracker=None):
    # deferred: transformers takes seconds to import; only code that builds a model pays
    from transformers import TrainerCallback

    class Watch(TrainerCallback):
        """Logs KL, reward and length per step; stops training on a hacking alarm."""

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "kl" not in logs and "reward" not in logs:
                return
            row = {"kind": "train", "step": state.global_step,
                   **{k: round(v, 5) for k, v in logs.items() if isinstance(v, (int, float))}}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if tracker is not None:
                tracker.log(row)
            state_out.setdefault("first_length", row.get("completions/mean_length"))
            console.print(f"step {state.global_step}: reward {row.get('reward', float('nan')):.4f}  "
                          f"kl {row.get('kl', float('nan')):.4f}  "
                          f"length {row.get('completions/mean_length', float('nan')):.1f}")
            alarm = hacking_alarm(row, state_out["first_length"], opts.max_kl, opts.min_length_ratio)
            if alarm:
                console.print(f"[bold yellow]stopping[/]: {alarm}")
                state_out["stopped"] = {"step": state.global_step, "reason": alarm}
                control.should_training_stop = True

    return Watch()


def _fresh_autocast_weights_callback():
    # deferred: transformers takes seconds to import; only code that builds a model pays
    from transformers import TrainerCallback

    class FreshAutocastWeights(TrainerCallback):
        """Drops autocast's cached low-precision copies of the weights after each update.

        torch.autocast casts an fp32 parameter (the LoRA weights on a bf16 base) once and
        reuses that copy until the outermost autocast region exits. trl.train() runs inside
        one region here (see below), so without this every forward - sampling, the
        reference, the loss - kept using the step-1 weights: the policy never moved
        (KL exactly 0, held-out answers unchanged) while the fp32 adapter still trained."""

        def on_optimizer_step(self, args, state, control, **kw):
            torch.clear_autocast_cache()

    return FreshAutocastWeights()


def warmup_steps(t) -> int | float:
    """Warm-up as tuneforge's own loops count it: ``round(warmup_ratio x steps)``. Passed on
    as a ratio (< 1), transformers rounds up instead, so a 10-step run spent its first step
    at learning rate 0. Without ``max_steps`` the step count is trl's, and so is the rounding."""
    if t.warmup_steps is not None:
        return t.warmup_steps
    return round(t.warmup_ratio * t.max_steps) if t.max_steps else t.warmup_ratio


@torch.no_grad()
def held_out_reward(policy, tok, reward_model, reward_tok, prompts: list[list[dict]], max_new_tokens: int,
                    device: str, dtype: torch.dtype) -> dict:
    """Mean reward-model score of greedy answers to held-out prompts, and their mean length."""
    ids = [tok.apply_chat_template(p, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
           for p in prompts]
    answers = generate_texts(policy, tok, ids, max_new_tokens=max_new_tokens, batch_size=8, device=device,
                             autocast_dtype=None if dtype == torch.float32 else dtype)
    texts = [reward_tok.apply_chat_template([*p, {"role": "assistant", "content": a}], tokenize=False)
             for p, a in zip(prompts, answers)]
    enc = reward_tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    scores = reward_model(**enc).logits[:, 0].float()
    lengths = [len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers]
    return {"reward": round(float(scores.mean()), 4), "answer_tokens": round(sum(lengths) / len(lengths), 2),
            "examples": [{"prompt": p[-1]["content"], "answer": a, "reward": round(float(r), 4)}
                         for p, a, r in zip(prompts, answers, scores)]}


def train(cfg: RunConfig, resume: Path | None = None, console: Console | None = None,
          on_eval: Callable[[int, float], None] | None = None, force: bool = False, tracker=None) -> Path:
    """``on_eval`` is never called: trl's loop computes no validation loss. ``tracker`` gets
    every logged step (train/tracking.py)."""
    # Deferred: datasets and trl are heavy, and only this recipe needs them.
    from datasets import Dataset

    # deferred: transformers takes seconds to import; only code that builds a model pays
    from transformers.trainer_utils import get_last_checkpoint
    from trl import GRPOTrainer, RLOOTrainer  # deferred: trl is heavy and only this recipe needs it

    console = console or Console()
    # --- setup and prompts ---------------------------------------------------------------
    run = start_run(cfg, resume, console)
    method, opts = method_of(cfg), cfg.objective
    reward_dir = Path(opts.reward_run)  # checked by preflight (objectives/policy.py)
    prompts = {s: [with_system(r["prompt"], cfg.data.system_prompt) for r in getattr(run.splits, s)]
               for s in ("train", "test")}

    # --- models --------------------------------------------------------------------------
    tok = load_tokenizer(cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    tok.padding_side = "left"  # generation pads on the left
    model = load_causal_lm(cfg.model.name, method.base_dtype(cfg.method, run.dtype), run.device,
                           cfg.model.attn_implementation, cfg.model.revision, cfg.model.trust_remote_code)
    fix_chat_tokenizer(tok, model)
    model = method.apply(model, cfg.method)
    n_train, n_total = count_trainable(model)
    reward_model, reward_tok = load_head(reward_dir, run.device)
    reward_tok.padding_side = "right"
    console.print(f"[bold]{cfg.method.name}[/] + {opts.algorithm}: {n_train:,} trainable of {n_total:,}; "
                  f"reward model {reward_dir}")

    # --- train (trl) ---------------------------------------------------------------------
    trainer_cls = {"grpo": GRPOTrainer, "rloo": RLOOTrainer}[opts.algorithm]
    trl_dir = run.run_dir / "trl"
    args = trl_args(cfg, run, trl_dir)
    watch: dict = {}
    metrics_path = run.run_dir / "metrics.jsonl"
    last = get_last_checkpoint(str(trl_dir)) if run.resume and trl_dir.is_dir() else None
    if last is not None:
        truncate_metrics(metrics_path, int(last.rsplit("-", 1)[1]))  # checkpoint-N: N steps done
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
        if rows:  # the collapse alarm compares with the first step's length, not the resumed one's
            watch["first_length"] = rows[0].get("completions/mean_length")
        console.print(f"resumed from {last}")
    else:
        metrics_path.unlink(missing_ok=True)
    if tracker is not None:
        tracker.start(run.run_dir, console)
    trainer = trainer_cls(model=model, reward_funcs=reward_model, args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts["train"]]),
                          processing_class=tok, reward_processing_classes=reward_tok,
                          callbacks=[_fresh_autocast_weights_callback(),
                                     _watch_callback(metrics_path, opts, console, watch, tracker)])
    # Under autocast like every tuneforge loop: a bf16 base with fp32 LoRA weights runs its
    # adapters on bf16 inputs (methods/lora.py skips peft's input up-cast), and trl generates
    # its completions outside the Trainer's own autocast. One region around all of training
    # also keeps autocast's weight casts alive across steps: FreshAutocastWeights drops them.
    with autocast(run.device, run.dtype):
        trainer.train(resume_from_checkpoint=last)

    # --- save and evaluate ---------------------------------------------------------------
    if "ref" in getattr(model, "peft_config", {}):  # trl's frozen copy of the starting adapter
        model.delete_adapter("ref")
    method.save(model, run.run_dir / "adapter")
    tok.save_pretrained(run.run_dir / "adapter")
    n_test = min(len(prompts["test"]), cfg.eval.limit or 16)
    results, changed = {}, None
    if n_test:
        results, changed = evaluate_policy(model, tok, reward_model, reward_tok, prompts["test"][:n_test], run,
                                           console)
    return finish(run, {"steps": trainer.state.global_step, "trainable_params": n_train, "total_params": n_total,
                        "reward_run": str(reward_dir), "stopped_early": watch.get("stopped"),
                        "held_out_answers_changed": changed,
                        "eval": {k: {m: v for m, v in r.items() if m != "examples"} for k, r in results.items()}},
                  console)


def trl_args(cfg: RunConfig, run: RunStart, trl_dir: Path):
    """tuneforge's train settings as trl's GRPOConfig/RLOOConfig."""
    from trl import GRPOConfig, RLOOConfig  # deferred: trl is heavy and only this recipe needs it

    opts, t = cfg.objective, cfg.train
    config_cls = {"grpo": GRPOConfig, "rloo": RLOOConfig}[opts.algorithm]
    return config_cls(
        output_dir=str(trl_dir), learning_rate=t.lr, max_steps=t.max_steps or -1,
        num_train_epochs=t.epochs, lr_scheduler_type=t.scheduler,
        warmup_steps=warmup_steps(t), gradient_checkpointing=t.gradient_checkpointing,  # trl's default is on
        # train.batch_size counts prompts; trl's batch counts answers (num_generations per prompt).
        per_device_train_batch_size=t.batch_size * opts.num_generations, gradient_accumulation_steps=t.grad_accum,
        num_generations=opts.num_generations, max_completion_length=opts.max_completion_length,
        temperature=opts.temperature, beta=opts.beta, max_grad_norm=t.max_grad_norm or 0.0, seed=t.seed,
        logging_steps=1, report_to=[], use_cpu=run.device == "cpu",
        bf16=run.dtype == torch.bfloat16, fp16=run.dtype == torch.float16,
        # trl's checkpoints (adapter, optimizer, scheduler, RNG, data position) land in
        # run/trl/checkpoint-N for --resume. With save_every=0 there are none: the finished
        # adapter is saved below, and a checkpoint at the last step would resume nothing.
        **({"save_strategy": "steps", "save_steps": t.save_every, "save_total_limit": t.keep_checkpoints}
           if t.save_every else {"save_strategy": "no"}),
    )


def evaluate_policy(model, tok, reward_model, reward_tok, prompts: list, run: RunStart, console) -> tuple[dict, int | None]:
    """Held-out reward of greedy answers, base (adapter off) and tuned -> eval.json; also how
    many greedy answers training changed."""
    opts = run.cfg.objective
    results, changed = {}, None
    # Base and tuned are both scored after training: trl prepares the reward model for its
    # own mixed precision (accelerate patches its forward), so scores taken before and after
    # training would differ for identical answers (seen here: 5.47 vs 4.57 on the same text).
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            results["base"] = held_out_reward(model.eval(), tok, reward_model, reward_tok, prompts,
                                              opts.max_completion_length, run.device, run.dtype)
    results["tuned"] = held_out_reward(model.eval(), tok, reward_model, reward_tok, prompts,
                                       opts.max_completion_length, run.device, run.dtype)
    write_json(run.run_dir / "eval.json", results)
    if "base" in results:
        changed = sum(b["answer"] != t["answer"] for b, t in zip(results["base"]["examples"],
                                                                 results["tuned"]["examples"]))
        console.print(f"held-out prompts ({len(prompts)}): reward {results['base']['reward']:.3f} -> "
                      f"{results['tuned']['reward']:.3f}, answer tokens {results['base']['answer_tokens']:.1f} -> "
                      f"{results['tuned']['answer_tokens']:.1f}, {changed} greedy answers changed")
    return results, changed
