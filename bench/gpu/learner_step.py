"""The `learner_step` part: GRPO learner steps of `Learner` on the policy folder, with the learner and GRPO
settings of cluster/configs/qwen3b-1gpu.yaml but full fine-tuning (learner.lora_rank=0: bf16 autocast over fp32
master weights, gradient checkpointing, micro-batch 2, B=8 groups of G=4, beta 0.04 so the frozen reference is
loaded too).

The batch is `tests.support.synthetic.scored_groups`: answer-shaped completions of the synthetic set's images, their
behaviour logprobs computed by the policy itself. Two steps on CUDA (the first pays for kernel selection and
the allocator; the second is the figure), one with --tiny. Peak memory is torch.cuda.max_memory_allocated over
the steps (weights, reference, gradients, AdamW state and activations). `segr1 plan`'s prediction (the same
override) is printed beside it. Then one step on episodes of two turns (`tests.support.synthetic.episode_groups`:
half the completions answer twice around the picture of a mask, two images in their rows; the lm_head only at the
answers): its seconds and peak memory, beside the plan's prediction for rollout.max_turns=2.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import time

from bench.gpu.common import ONE_GPU_CONFIG, REPO, Context, peak_memory, reset_peak_memory, synchronize

# The config trains LoRA adapters (full fine-tuning does not fit its one GPU beside vLLM and SAM2); this part
# measures the full fine-tuning step, the larger one, alone on the GPU, and the plan is asked for the same.
FULL_FINE_TUNING = ("learner.lora_rank=0",)


def _config(ctx: Context):
    from cluster.config import load_config

    folder = ctx.require_policy()
    overrides = [f"model.policy={folder}", f"checkpoint.dir={ctx.workdir / 'checkpoints'}", *FULL_FINE_TUNING]
    if ctx.tiny:  # CPU-sized: the tiny policy at 112 px, two groups, float32 unless on CUDA
        overrides += [
            "data.image_size=112",
            "grpo.batch_size=2",
            "model.dtype=auto",
            "learner.precision=auto",
        ]
        overrides += [f"learner.num_gpus={1 if ctx.cuda else 0}"]
    return load_config(ONE_GPU_CONFIG, overrides)


def run(ctx: Context) -> dict:
    from cluster.data.synth import generate_samples
    from learner.learner import Learner
    from tests.support.synthetic import scored_groups

    cfg = _config(ctx)
    t0 = time.perf_counter()
    learner = Learner(cfg.learner_spec())
    load_s = time.perf_counter() - t0
    samples = list(generate_samples(cfg.grpo.batch_size, seed=0, size=256))
    t0 = time.perf_counter()
    groups = scored_groups(
        learner.policy, samples, cfg.grpo.group_size, seed=1, max_tokens=cfg.rollout.sampling.max_tokens
    )
    groups_s = time.perf_counter() - t0
    reset_peak_memory(ctx)
    steps = []
    for _ in range(1 if ctx.tiny else 2):
        t0 = time.perf_counter()
        stats = learner.step(groups, *samples)
        synchronize(ctx)
        steps.append((time.perf_counter() - t0, stats))
    for _, s in steps:
        if s.skipped_non_finite or not s.grad_norm > 0:
            raise RuntimeError(f"step {s.step}: grad_norm {s.grad_norm}, skipped {s.skipped_non_finite}")
    figures = {"step_s": round(steps[-1][0], 3), **peak_memory(ctx)}
    if len(steps) > 1:
        figures["first_step_s"] = round(steps[0][0], 3)
    episodes = _episode_step(ctx, cfg, learner, samples)
    figures.update({f"episode_{k}": v for k, v in episodes.pop("figures").items()})
    lc = cfg.learner
    stats = steps[-1][1]
    detail = {
        "plan": plan_prediction(),
        "precision": str(learner.policy.compute_dtype).removeprefix("torch."),
        "gradient_checkpointing": lc.gradient_checkpointing,
        "micro_batch_size": lc.micro_batch_size,
        "micro_batches": lc.grad_accumulation or math.ceil(stats.num_completions / lc.micro_batch_size),
        "groups": stats.num_groups,
        "completions": stats.num_completions,
        "completion_tokens": stats.num_tokens,
        "prompt_tokens_per_sample": len(groups[0].group.prompt_token_ids),
        "image_size": cfg.data.image_size,
        "reference_loaded": learner.policy.reference is not None,
        "trainable_parameters_m": round(sum(p.numel() for p in learner.params) / 1e6, 1),
        "load_s": round(load_s, 2),
        "synthetic_groups_s": round(groups_s, 2),
        "loss": stats.loss,
        "grad_norm": stats.grad_norm,
        "episodes": episodes,
    }
    return {"figures": figures, "detail": detail}


def _episode_step(ctx: Context, cfg, learner, samples) -> dict:
    """One GRPO step on two-turn episodes of the same samples: figures (seconds, peak memory) and detail."""
    from tests.support.synthetic import episode_groups

    groups = episode_groups(
        learner.policy, samples, cfg.grpo.group_size, seed=2, max_tokens=cfg.rollout.sampling.max_tokens
    )
    reset_peak_memory(ctx)
    t0 = time.perf_counter()
    stats = learner.step(groups, *samples)
    synchronize(ctx)
    if stats.skipped_non_finite or not stats.grad_norm > 0:
        raise RuntimeError(f"episode step: grad_norm {stats.grad_norm}, skipped {stats.skipped_non_finite}")
    return {
        "figures": {"step_s": round(time.perf_counter() - t0, 3), **peak_memory(ctx)},
        "turns": 2,
        "completions": stats.num_completions,
        "policy_tokens": stats.num_tokens,
        "longest_row_tokens": max(
            len(g.group.prompt_token_ids) + len(c.token_ids) for g in groups for c in g.group.completions
        ),
        "plan": plan_prediction("rollout.max_turns=2"),
    }


def plan_prediction(*extra: str) -> str:
    """What `segr1 plan --config cluster/configs/qwen3b-1gpu.yaml` predicts, or "not available"."""
    if importlib.util.find_spec("cluster.commands.plan") is None:
        return "not available (no `segr1 plan` command in this checkout)"
    cmd = [
        sys.executable,
        "-m",
        "cluster.cli",
        "plan",
        "--config",
        str(ONE_GPU_CONFIG),
        *FULL_FINE_TUNING,
        *extra,
    ]
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "segr1 plan did not answer within 60 s"
    text = (
        done.stdout + done.stderr
    ).strip()  # exit 1: the colocated GPU's sum does not fit; the table stands
    return f"{'' if done.returncode == 0 else f'segr1 plan exited {done.returncode}: '}{text[-3000:]}"
