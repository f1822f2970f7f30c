"""One batch's passes through the policy: the plan (rows, advantages, mini-batches, micro-batches), the
no-grad pass that scores the batch under the current weights (pi_old of the ratio, and the behaviour importance
weights against the rollout engine's logprobs), and the loss of one mini-batch. learner/learner.py drives them.

Rows are the batch's completions, N = sum of the groups' G, in group order. The batch is split into
`grpo.updates_per_batch` contiguous mini-batches (one optimiser step each); each into micro-batches per rank
(`learner.micro_batch_size`, or `learner.grad_accumulation` of them). The no-grad pass runs the very same
micro-batches in the same order, so the first micro-batch of the first update recomputes exactly the logprobs
it is compared with: ratio 1, nothing clipped (the reference's exp(logp - logp.detach())).

When the weights cannot move between the no-grad pass and the update's forward (one update per batch) and the
importance weights leave the loss's denominators alone (truncate mode, or IS off), that pass would recompute
exactly the update's own logprobs: then pi_old is taken as `logp.detach()` of the update's forward, micro-batch
by micro-batch, and the pass is skipped (`fused`), the same loss and statistics for one forward less.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from learner.config import GRPOConfig, LearnerConfig
from learner.grpo import BehaviourWeights, behaviour_weights, group_advantages, mismatch_sums, policy_loss
from learner.policy import Policy, right_align
from learner.sharding import sum_over_ranks
from protos import Completion, ScoredGroup

LOSS_STAT_KEYS = ("clip_fraction", "clip_fraction_low", "clip_fraction_high", "ratio_mean", "kl", "entropy")


@dataclass
class Plan:
    """A batch ready for its passes. Tensors (N, L) are right-aligned over L = the longest completion; rows of
    other ranks (FSDP2) stay zero there."""

    prompts: dict
    rows: list[tuple[int, Completion]]  # (group index, completion)
    adv: torch.Tensor  # (N,)
    temperature: float
    max_tokens: int
    minibatches: list[list[list[int]]]  # [update][micro-batch] -> this rank's row indices
    old: torch.Tensor | None = None  # (N, L) pi_old: the learner's logprobs before the first update
    weights: BehaviourWeights | None = None  # (N, L) each
    totals: list[tuple[float, float]] = field(
        default_factory=list
    )  # per update: (sequences, tokens) in the loss
    is_stats: dict = field(default_factory=dict)
    is_sums: list[float] = field(
        default_factory=lambda: [0.0] * 5
    )  # fused: weights, over, |diff|, outside, tokens
    # episodes of several turns (a completion with a policy_mask): each group's (sample, prompt ids); rows are
    # then encoded per micro-batch with their pictures (Policy.episode_batch), `prompts` is unused
    episodes: list[tuple] | None = None


def fused(grpo: GRPOConfig) -> bool:
    """pi_old from the update's own forward (no separate no-grad pass): one update per batch, and importance
    weights that do not change the loss's denominators (mask mode does: it must see the whole batch first)."""
    return grpo.updates_per_batch == 1 and (grpo.tis_cap <= 0 or grpo.is_mode == "truncate")


def split_rows(n: int, parts: int) -> list[list[int]]:
    """range(n) in min(parts, n) contiguous slices of sizes differing by at most one (at least one slice)."""
    count = max(1, min(parts, n))
    size, extra = divmod(n, count)
    out, start = [], 0
    for k in range(count):
        end = start + size + (1 if k < extra else 0)
        out.append(list(range(start, end)))
        start = end
    return out


def micro_chunks(rows: Sequence[int], lc: LearnerConfig, rank: int, world_size: int) -> list[list[int]]:
    """This rank's micro-batches of `rows`: rows are dealt over ranks, then split into micro-batches of
    learner.micro_batch_size (or into learner.grad_accumulation of them). Every rank gets the same number of
    micro-batches (FSDP2 runs collectives in each forward/backward)."""
    mine = list(rows[rank::world_size])
    most = math.ceil(len(rows) / world_size)  # rows of the busiest rank
    count = lc.grad_accumulation or math.ceil(most / lc.micro_batch_size)
    count = max(1, min(count, most))
    size, extra = divmod(len(mine), count)
    chunks, start = [], 0
    for k in range(count):
        end = start + size + (1 if k < extra else 0)
        chunks.append(mine[start:end])
        start = end
    return chunks


def plan_batch(
    policy: Policy,
    groups: Sequence[ScoredGroup],
    samples: Sequence,
    sampled: tuple[float, int],
    grpo: GRPOConfig,
    lc: LearnerConfig,
    rank: int = 0,
    world_size: int = 1,
) -> Plan:
    """Prompts encoded once (the groups' own prompt ids), advantages per group, mini- and micro-batches."""
    prompt_ids = [sg.group.prompt_token_ids for sg in groups]
    episodes = None
    if any(c.policy_mask is not None for sg in groups for c in sg.group.completions):
        prompts, episodes = {}, list(zip(samples, prompt_ids, strict=True))
    else:
        prompts = policy.encode(samples, prompt_ids)
    rows = [(i, c) for i, sg in enumerate(groups) for c in sg.group.completions]
    adv = torch.cat(
        [
            group_advantages(torch.tensor([sg.totals], dtype=torch.float64), grpo.normalize_std)[0]
            for sg in groups
        ]
    )  # (N,); rewards in float64 so the zero-variance rule sees what ScoredGroup.zero_variance sees
    minibatches = [
        micro_chunks(mb, lc, rank, world_size) for mb in split_rows(len(rows), grpo.updates_per_batch)
    ]
    return Plan(prompts, rows, adv, sampled[0], sampled[1], minibatches, episodes=episodes)


def _batch(policy: Policy, plan: Plan, chunk: Sequence[int]) -> dict:
    if plan.episodes is not None:
        groups = [plan.episodes[plan.rows[r][0]] for r in chunk]
        return policy.episode_batch(
            [g[0] for g in groups], [g[1] for g in groups], [plan.rows[r][1] for r in chunk]
        )
    return policy.batch(
        plan.prompts, [plan.rows[r][1].token_ids for r in chunk], [plan.rows[r][0] for r in chunk]
    )


@torch.no_grad()
def score_old(
    policy: Policy, plan: Plan, grpo: GRPOConfig, world_size: int = 1, skip_pass: bool | None = None
) -> None:
    """The no-grad pass: pi_old of every row of this rank under the current weights, then the behaviour
    importance weights (grpo.tis_cap / is_level / is_mode), the loss's denominators of every update and the
    mismatch statistics (summed over ranks). With `skip_pass` (default: `fused(grpo)`) only the denominators are
    set here; minibatch_loss takes pi_old from its own forward and finish_fused sums the statistics."""
    if fused(grpo) if skip_pass is None else skip_pass:
        _fused_totals(plan, policy.device, world_size)
        return
    device = policy.device
    width = max((len(c.token_ids) for _, c in plan.rows), default=0)
    old = torch.zeros((len(plan.rows), width), device=device)  # (N, L)
    mine = torch.zeros(len(plan.rows), dtype=torch.bool, device=device)  # (N,)
    for chunks in plan.minibatches:
        for chunk in chunks:
            if not chunk:
                _idle_pass(policy, plan, False, False, world_size)
                continue
            logp, mask = policy.logprobs(_batch(policy, plan, chunk), temperature=plan.temperature)  # (n, T)
            old[chunk, width - logp.shape[1] :] = logp.float()
            mine[chunk] = True
    policy_tokens = [c.loss_mask for _, c in plan.rows]
    mask = right_align(policy_tokens, width).to(device) * mine[:, None]  # (N, L) this rank's policy tokens
    behaviour = right_align([c.logprobs for _, c in plan.rows], width).to(device)  # (N, L)
    bw = behaviour_weights(old, behaviour, mask, grpo.tis_cap, grpo.is_level, grpo.is_mode)
    plan.old, plan.weights = old, bw
    sums = [float(bw.weights.sum()), float(bw.over.sum())]
    mm = mismatch_sums(old, behaviour, mask)
    sums += [mm["abs_diff"], mm["outside"], mm["tokens"]]
    for chunks in plan.minibatches:
        rows = [r for chunk in chunks for r in chunk]
        kept = bw.keep[rows].sum(dim=1)  # (n,)
        had = mask[rows].sum(dim=1)  # (n,)
        dropped = int(((had > 0) & (kept == 0)).sum())  # sequences masked out entirely
        sums += [float(len(rows) - dropped), float(kept.sum())]
    sums = sum_over_ranks(sums, device, world_size)
    kept_tokens = sum(sums[6::2])
    plan.totals = [(sums[5 + 2 * k], sums[6 + 2 * k]) for k in range(len(plan.minibatches))]
    plan.is_stats = _is_stats(sums[:5], kept_tokens, grpo)


def _is_stats(sums: list[float], kept_tokens: float, grpo: GRPOConfig) -> dict:
    """(weights, over, |diff|, outside, tokens) summed over ranks -> the StepStats importance-sampling fields."""
    tokens = max(sums[4], 1.0)
    over = sums[1] / tokens
    return {
        "is_weight_mean": sums[0] / max(kept_tokens, 1.0),
        "is_truncated_fraction": over if grpo.tis_cap > 0 and grpo.is_mode == "truncate" else 0.0,
        "is_masked_fraction": over if grpo.tis_cap > 0 and grpo.is_mode == "mask" else 0.0,
        "mismatch_logp_abs": sums[2] / tokens,
        "mismatch_outside_fraction": sums[3] / tokens,
    }


def _fused_totals(plan: Plan, device: torch.device, world_size: int) -> None:
    """Denominators without the pass: truncation keeps every token, so each update's loss covers all its rows
    and all their tokens (summed over ranks)."""
    sums = []
    for chunks in plan.minibatches:
        rows = [r for chunk in chunks for r in chunk]
        sums += [float(len(rows)), float(sum(plan.rows[r][1].policy_tokens for r in rows))]
    sums = sum_over_ranks(sums, device, world_size)
    plan.totals = [(sums[2 * k], sums[2 * k + 1]) for k in range(len(plan.minibatches))]
    plan.is_sums = [0.0] * 5


def finish_fused(plan: Plan, grpo: GRPOConfig, device: torch.device, world_size: int = 1) -> None:
    """After the fused update: the importance-sampling statistics its micro-batches summed (over ranks)."""
    if plan.old is not None:  # the pass ran: score_old set them
        return
    sums = sum_over_ranks(list(plan.is_sums), device, world_size)
    plan.is_stats = _is_stats(sums, sums[4], grpo)


def _fused_old(plan: Plan, chunk: Sequence[int], logp: torch.Tensor, mask: torch.Tensor, grpo: GRPOConfig):
    """(pi_old, keep, weights) of one micro-batch from its own forward (logp, mask: (n, T)), adding its
    importance-sampling statistics to plan.is_sums."""
    old = logp.detach().float()  # (n, T)
    behaviour = right_align([plan.rows[r][1].logprobs for r in chunk], logp.shape[1]).to(
        logp.device
    )  # (n, T)
    bw = behaviour_weights(old, behaviour, mask, grpo.tis_cap, grpo.is_level, grpo.is_mode)
    mm = mismatch_sums(old, behaviour, mask)
    add = [float(bw.weights.sum()), float(bw.over.sum()), mm["abs_diff"], mm["outside"], mm["tokens"]]
    plan.is_sums = [a + b for a, b in zip(plan.is_sums, add, strict=True)]
    return old, bw.keep, bw.weights


def minibatch_loss(
    policy: Policy, plan: Plan, k: int, grpo: GRPOConfig, backward: bool, world_size: int = 1
) -> tuple[float, dict, dict | None]:
    """Forward (+ backward) over the micro-batches of update k. The denominators are the mini-batch's (all
    ranks), so the summed micro-batch losses equal the mini-batch loss. Returns (loss, token-weighted stat sums
    with "num_tokens", the first micro-batch's stats or None)."""
    seqs, tokens = plan.totals[k]
    total, acc, first = 0.0, dict.fromkeys((*LOSS_STAT_KEYS, "num_tokens"), 0.0), None
    for chunk in plan.minibatches[k]:
        if not chunk:  # only under FSDP2 with fewer completions than ranks x micro-batches
            _idle_pass(policy, plan, grpo.beta > 0, backward, world_size)
            continue
        batch = _batch(policy, plan, chunk)
        logp, mask = policy.logprobs(batch, temperature=plan.temperature)  # (n, T), (n, T)
        if mask.numel() == 0:
            continue
        if plan.old is None:  # fused: pi_old is this forward's own logprobs
            old, keep, weights = _fused_old(plan, chunk, logp, mask, grpo)
        else:
            cols = slice(plan.old.shape[1] - mask.shape[1], None)
            old, keep, weights = (
                plan.old[chunk, cols],
                plan.weights.keep[chunk, cols],
                plan.weights.weights[chunk, cols],
            )
        ref = policy.reference_logprobs(batch, plan.temperature) if grpo.beta > 0 else None
        loss, st = policy_loss(
            logp,
            old,
            ref,
            plan.adv[chunk].to(mask.device),
            keep,
            grpo.clip_low,
            grpo.clip_high,
            grpo.beta,
            grpo.loss_aggregation,
            max_length=plan.max_tokens,
            total_sequences=seqs,
            total_tokens=tokens,
            is_weights=weights,
        )
        if backward:
            (loss * world_size).backward()  # FSDP averages gradients over ranks; the loss is a sum
        total += float(loss.detach())
        first = st if first is None else first
        for key in LOSS_STAT_KEYS:
            acc[key] += st[key] * st["num_tokens"]
        acc["num_tokens"] += st["num_tokens"]
    return total, acc, first


def _idle_pass(policy: Policy, plan: Plan, reference: bool, backward: bool, world_size: int) -> None:
    """A rank without rows in this micro-batch still takes part in FSDP2's collectives (every forward and
    backward all-gathers and reduce-scatters): the passes of the batch's first row, counted zero times."""
    if world_size <= 1:
        return
    batch = _batch(policy, plan, [0])
    logp, _ = policy.logprobs(batch, temperature=plan.temperature)
    if reference:
        policy.reference_logprobs(batch, plan.temperature)
    if backward and torch.is_grad_enabled():
        (logp.sum() * 0.0).backward()
