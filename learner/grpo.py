"""GRPO maths as pure functions: group-relative advantages, the importance weights of the behaviour policy and
the clipped policy loss with a k3 KL term.

Shapes: B groups (prompts), G completions per group, N = B*G sequences, T completion tokens (padded).
Nothing here knows about models, Ray or configs; learner/learner.py calls these per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from protos import ZERO_VARIANCE_TOL

Aggregation = Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]
AGGREGATIONS: tuple[str, ...] = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")

# exp() of a log-ratio above this overflows float32 in the k3 term; the clamp changes nothing for any sane policy.
_MAX_LOG_RATIO = 20.0
# The band of the rollout/learner mismatch metric: a token whose pi_old / pi_behaviour leaves it counts (trl #6789).
MISMATCH_BAND = (0.9, 1.1)


def group_advantages(rewards: torch.Tensor, normalize_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps) per group; a group whose rewards are all equal gives zeros.

    rewards: (B, G) -> advantages (B, G), float32. The std is the sample std (unbiased, as the reference and
    TRL). "All equal" is protos' one rule (ScoredGroup.zero_variance): a spread below ZERO_VARIANCE_TOL, taken
    in float64 (pass float64 rewards to agree with it exactly).
    """
    if rewards.dim() != 2:
        raise ValueError(f"group_advantages: rewards must be (B, G), got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(
            f"group_advantages: group size G={rewards.shape[1]}; every group-relative advantage of a single "
            "completion is zero, so training would be a silent no-op. Set grpo.group_size >= 2."
        )
    wide = rewards.double()  # (B, G)
    spread = wide.max(dim=1, keepdim=True).values - wide.min(dim=1, keepdim=True).values  # (B, 1)
    constant = spread < ZERO_VARIANCE_TOL  # (B, 1)
    rewards = rewards.float()
    mean = rewards.mean(dim=1, keepdim=True)  # (B, 1)
    centred = rewards - mean  # (B, G)
    if normalize_std:
        std = rewards.std(dim=1, keepdim=True)  # (B, 1)
        centred = centred / (std + eps)
    return torch.where(constant, torch.zeros_like(centred), centred)  # (B, G)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1, >= 0. (N, T) -> (N, T)."""
    d = (ref_logprobs - logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # (N, T)
    return torch.exp(d) - d - 1.0


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str,
    max_length: int | None = None,
    total_sequences: float | None = None,
    total_tokens: float | None = None,
) -> torch.Tensor:
    """Reduce per-token values (N, T) under mask (N, T) to a scalar.

    seq-mean-token-mean: mean over each sequence's tokens, then over sequences (the reference).
    token-mean: mean over all tokens of the batch (DAPO).
    seq-mean-token-sum-norm: sum of each sequence's tokens / max_length, mean over sequences (Dr. GRPO).
    total_sequences / total_tokens: the denominators of the WHOLE batch when this is one micro-batch of it, so
    that the sum of micro-batch losses equals the full-batch loss (gradient accumulation).
    """
    mask = mask.to(per_token.dtype)  # (N, T)
    n_seq = float(per_token.shape[0]) if total_sequences is None else float(total_sequences)
    if aggregation == "seq-mean-token-mean":
        seq = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (N,)
        return seq.sum() / max(n_seq, 1.0)
    if aggregation == "token-mean":
        n_tok = float(mask.sum().item()) if total_tokens is None else float(total_tokens)
        return (per_token * mask).sum() / max(n_tok, 1.0)
    if aggregation == "seq-mean-token-sum-norm":
        norm = float(per_token.shape[1] if max_length is None else max_length)
        if norm <= 0:
            raise ValueError(
                f"aggregate: max_length must be > 0 for seq-mean-token-sum-norm, got {max_length}"
            )
        seq = (per_token * mask).sum(dim=1) / norm  # (N,)
        return seq.sum() / max(n_seq, 1.0)
    raise ValueError(f"unknown loss aggregation {aggregation!r}; use one of {', '.join(AGGREGATIONS)}")


@dataclass
class BehaviourWeights:
    """Importance weights of the behaviour policy for (N, T) completion tokens, and what they did.

    weights: (N, T) the weight w each token's policy-gradient term is multiplied by (0 off the mask).
    keep: (N, T) the loss mask: the completion mask minus the tokens (sequences) masked out (is_mode=mask).
    over: (N, T) tokens whose raw weight exceeded the cap (truncated or masked, per mode).
    """

    weights: torch.Tensor
    keep: torch.Tensor
    over: torch.Tensor


@torch.no_grad()
def behaviour_weights(
    old_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
    level: str = "token",
    mode: str = "truncate",
) -> BehaviourWeights:
    """Truncated / masked importance sampling of the behaviour policy (verl's rollout correction, TRL's vLLM IS).

    The rollout engine drew the tokens from pi_behaviour (Completion.logprobs: another kernel, and in async mode
    an older policy); the loss's ratio is taken against pi_old, the learner's own logprobs before the update.
    The raw weight is rho_t = pi_old / pi_behaviour per token (level=token), or the product over the sequence's
    tokens, broadcast to them (level=sequence). Above `cap` it is truncated to cap (mode=truncate: TIS) or its
    token / sequence leaves the loss (mode=mask: MIS, dropped like padding, so it leaves the loss's denominators
    too). cap == 0 turns the correction off: every weight 1, nothing masked.

    old_logprobs, behaviour_logprobs, mask: (N, T) right-aligned completion tokens, mask 1 on them.
    """
    if level not in ("token", "sequence") or mode not in ("truncate", "mask"):
        raise ValueError(
            f"behaviour_weights: level {level!r} / mode {mode!r}; use token|sequence, truncate|mask"
        )
    m = mask.to(old_logprobs.dtype)  # (N, T)
    on = m > 0  # (N, T)
    if cap <= 0:
        return BehaviourWeights(m.clone(), m.clone(), torch.zeros_like(on))
    log_w = ((old_logprobs - behaviour_logprobs) * m).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # (N, T)
    if level == "sequence":
        seq = log_w.sum(dim=1, keepdim=True).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # (N, 1)
        log_w = seq.expand_as(log_w)  # (N, T)
    raw = torch.exp(log_w)  # (N, T)
    over = (raw > cap) & on  # (N, T)
    if mode == "truncate":
        return BehaviourWeights(raw.clamp(max=cap) * m, m.clone(), over)
    keep = m * (~over).to(m.dtype)  # (N, T)
    return BehaviourWeights(raw * keep, keep, over)


@torch.no_grad()
def mismatch_sums(old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor) -> dict:
    """Sums over masked tokens (add them up over micro-batches / ranks, divide by `tokens`): |logp_behaviour -
    logp_old| and the count of tokens whose ratio pi_old / pi_behaviour lies outside MISMATCH_BAND."""
    m = mask.to(old_logprobs.dtype)  # (N, T)
    diff = (old_logprobs - behaviour_logprobs) * m  # (N, T)
    ratio = torch.exp(diff.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))  # (N, T)
    outside = ((ratio < MISMATCH_BAND[0]) | (ratio > MISMATCH_BAND[1])).to(m.dtype) * m  # (N, T)
    return {"abs_diff": float(diff.abs().sum()), "outside": float(outside.sum()), "tokens": float(m.sum())}


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    beta: float = 0.04,
    aggregation: str = "seq-mean-token-mean",
    max_length: int | None = None,
    total_sequences: float | None = None,
    total_tokens: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss: per token -w * min(r A, clip(r) A) + beta * k3, aggregated over the mask.

    logprobs: (N, T) of the policy being trained (carries the gradient).
    old_logprobs: (N, T) pi_old of the ratio r = exp(logprobs - old_logprobs): the learner's own logprobs of the
      batch before its first update (so r == 1 exactly at the first micro-batch of a batch).
    ref_logprobs: (N, T) of the frozen reference, or None when beta == 0.
    advantages: (N,) or (N, 1), broadcast over tokens.  mask: (N, T), 1 on the tokens in the loss.
    is_weights: (N, T) behaviour importance weights w (behaviour_weights().weights), no gradient; None: w = 1.
      They scale the policy-gradient term only, not the KL term (as verl and TRL).
    Returns (scalar loss, stats); stats are means over masked tokens of this call.
    """
    if beta > 0 and ref_logprobs is None:
        raise ValueError("policy_loss: beta > 0 needs ref_logprobs (the frozen reference's logprobs)")
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            f"policy_loss: logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and "
            f"mask {tuple(mask.shape)} must have the same (N, T) shape"
        )
    adv = advantages.reshape(-1, 1).to(logprobs.dtype)  # (N, 1)
    log_ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # (N, T)
    ratio = torch.exp(log_ratio)  # (N, T)
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (N, T)
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # (N, T)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    kl = None
    if beta > 0:
        kl = k3_kl(logprobs, ref_logprobs)  # (N, T)
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, aggregation, max_length, total_sequences, total_tokens)
    return loss, _loss_stats(logprobs, ratio, adv, mask, kl, logprobs.new_tensor([clip_low, clip_high]))


@torch.no_grad()
def _loss_stats(
    logprobs: torch.Tensor,
    ratio: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None,
    clip: torch.Tensor,
) -> dict[str, float]:
    """Token means under mask. Clip fractions count tokens whose clipped term is the one the min picked."""
    m = mask.to(ratio.dtype)  # (N, T)
    n = m.sum().clamp(min=1.0)
    low = ((ratio < 1.0 - clip[0]) & (adv < 0)).to(m.dtype) * m  # (N, T)
    high = ((ratio > 1.0 + clip[1]) & (adv > 0)).to(m.dtype) * m  # (N, T)
    stats = {
        "clip_fraction_low": float(low.sum() / n),
        "clip_fraction_high": float(high.sum() / n),
        "ratio_mean": float((ratio.detach() * m).sum() / n),
        "kl": float((kl.detach() * m).sum() / n) if kl is not None else 0.0,
        # -log p of the sampled tokens: an unbiased estimate of the per-token entropy for on-policy samples.
        "entropy": float((-logprobs.detach() * m).sum() / n),
        "num_tokens": float(m.sum()),
    }
    stats["clip_fraction"] = stats["clip_fraction_low"] + stats["clip_fraction_high"]
    return stats


def masked_logprobs_from_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    suppress: torch.Tensor | None = None,
) -> torch.Tensor:
    """log softmax(logits / T) gathered at tokens: logits (N, T, V), tokens (N, T) -> (N, T) in float32.

    Temperature: the rollout engine sampled from softmax(logits / T), so ratios compare like with like only when
    the learner scores tokens at the same temperature (T == 0, greedy, scores at T = 1). suppress: (S,) ids
    the engine never samples (vision tokens, ids the tokenizer lacks): left out of the softmax, as there.
    """
    t = temperature if temperature > 0 else 1.0
    logits = logits.float() / t  # (N, T, V), a new tensor: filled in place below
    if suppress is not None and suppress.numel():
        logits.index_fill_(-1, suppress.to(logits.device), float("-inf"))
    picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)  # (N, T)
    return picked - torch.logsumexp(logits, dim=-1)  # (N, T)
