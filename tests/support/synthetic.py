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


@torch.no_grad()
def episode_groups(
    policy: Policy,
    samples: Sequence[Sample],
    group_size: int,
    seed: int = 0,
    max_tokens: int = 24,
    every: int = 2,
) -> list[ScoredGroup]:
    """`scored_groups` with every `every`-th completion (the first included) an episode of two turns, joined as the rollout workers join
    them (runtime.turns.join_turns): its answer, the picture of a mask (the image's top-left quarter) after the
    refine turn, a second answer. Behaviour logprobs are the policy's own over the whole episode."""
    import numpy as np

    from runtime.images import decode_image, encode_png, resize_for_policy
    from runtime.overlay import feedback_image
    from runtime.qwen_vl import encode_prompt_ids
    from runtime.turns import join_turns, next_turn_ids

    tok, size = policy.processor.tokenizer, policy.spec.image_size
    refine = policy.spec.prompt.refine_text(size)
    out = []
    for k, (scored, sample) in enumerate(
        zip(scored_groups(policy, samples, group_size, seed, max_tokens), samples, strict=True)
    ):
        group, rgb = scored.group, decode_image(sample.image)  # (H, W, 3)
        h, w = rgb.shape[:2]
        mask = np.zeros((h, w), bool)
        mask[: h // 2, : w // 2] = True
        picture = feedback_image(rgb, mask, size, [[0, 0, w // 2, h // 2]], [], [])
        comps = list(group.completions)
        for c in range(0, group_size, every):
            ids = next_turn_ids(tok, group.prompt_token_ids, comps[c].token_ids, refine)
            images = [[resize_for_policy(sample.image, size), picture]]
            prompt = unpadded_ids(encode_prompt_ids(policy.processor, images, [ids], collapsed=True))[0]
            text = answer_texts(1, seed * 1000 + k * group_size + c, size)[0]
            answer = tok.encode(text, add_special_tokens=False)[:max_tokens]
            second = Completion(text=tok.decode(answer), token_ids=answer, logprobs=[0.0] * len(answer))
            turns = [(group.prompt_token_ids, comps[c]), (prompt, second)]
            comps[c] = join_turns(turns, [encode_png(np.asarray(picture))])
        batch = policy.episode_batch([sample] * group_size, [group.prompt_token_ids] * group_size, comps)
        logp, in_loss = policy.logprobs(batch)  # (G, T) right-aligned
        comps = [
            c.model_copy(
                update={"logprobs": (logp[r] * in_loss[r])[logp.shape[1] - len(c.token_ids) :].tolist()}
            )
            for r, c in enumerate(comps)
        ]
        out.append(scored.model_copy(update={"group": group.model_copy(update={"completions": comps})}))
    return out
