"""Synthetic scored groups for tests and benchmarks: real answer-shaped completions, behaviour logprobs computed
by the policy itself (on-policy), deterministic rewards. No rollout engine or reward worker needed."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from learner.policy import Policy
from protos import Completion, CompletionReward, RewardComponents, RolloutGroup, Sample, ScoredGroup
from protos.answer import format_answer
from runtime.qwen_vl import unpadded_ids


def answer_texts(n: int, seed: int, image_size: int) -> list[str]:
    """n answer strings of varied length in the Seg-R1 format."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x1, y1 = rng.randrange(0, image_size // 2), rng.randrange(0, image_size // 2)
        x2, y2 = rng.randrange(x1 + 1, image_size), rng.randrange(y1 + 1, image_size)
        k = rng.randrange(1, 4)
        pts = [[rng.randrange(x1, x2 + 1), rng.randrange(y1, y2 + 1)] for _ in range(k)]
        out.append(format_answer([[x1, y1, x2, y2]], pts, [1] * k, "object " * rng.randrange(1, 4)))
    return out


def reward(total: float) -> CompletionReward:
    comps = RewardComponents(
        format=min(total, 1.0), iou=0.0, s_measure=0.0, segmentation=max(0.0, total - 1), total=total
    )
    return CompletionReward(rewards=comps, parse_ok=True)


@torch.no_grad()
def scored_groups(
    policy: Policy,
    samples: Sequence[Sample],
    group_size: int,
    seed: int = 0,
    max_tokens: int = 48,
    policy_version: int = 0,
) -> list[ScoredGroup]:
    """One ScoredGroup per sample: G answer-shaped completions (truncated to max_tokens), their behaviour
    logprobs under `policy` and distinct deterministic rewards in [0, 2]."""
    tok = policy.processor.tokenizer
    rng = random.Random(seed)
    prompts = policy.encode(samples)
    prompt_ids = unpadded_ids(prompts)  # what a rollout worker on the same policy would stamp
    groups = []
    for i, s in enumerate(samples):
        texts = answer_texts(group_size, rng.randrange(1 << 30), policy.spec.image_size)
        ids = [tok.encode(t, add_special_tokens=False)[:max_tokens] for t in texts]
        batch = policy.batch(prompts, ids, [i] * group_size)
        logp, _ = policy.logprobs(batch)  # (G, T) right-aligned
        comps = [
            Completion(
                text=tok.decode(t),
                token_ids=t,
                logprobs=logp[r, logp.shape[1] - len(t) :].tolist(),
                finish_reason="length" if len(t) == max_tokens else "stop",
            )
            for r, t in enumerate(ids)
        ]
        group = RolloutGroup(
            group_id=f"{s.id}-g",
            sample_id=s.id,
            policy_version=policy_version,
            completions=comps,
            temperature=1.0,
            max_tokens=max_tokens,
            prompt_token_ids=prompt_ids[i],
        )
        rewards = [round(rng.uniform(0.0, 2.0), 3) for _ in range(group_size)]
        groups.append(ScoredGroup(group=group, scores=[reward(r) for r in rewards]))
    return groups
