"""GRPO maths against values computed by hand (plain Python math, not the functions under test)."""

from __future__ import annotations

import math

import pytest
import torch

from learner.grpo import aggregate, group_advantages, k3_kl, masked_logprobs_from_logits, policy_loss
from protos import ZERO_VARIANCE_TOL

# Two sequences, T = 3; the second has 2 completion tokens (last slot is padding).
LOGP = [[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]]
OLD = [[-1.0, -2.5, -0.5], [-0.5, -1.2, 0.0]]
REF = [[-1.2, -1.5, -0.5], [-1.0, -0.7, 0.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [1.0, -2.0]


def _t(x):
    return torch.tensor(x, dtype=torch.float32)


def _hand_per_token(clip_low=0.2, clip_high=0.2, beta=0.0):
    """Per-token loss by hand: -min(r*A, clip(r)*A) + beta * (exp(ref-lp) - (ref-lp) - 1)."""
    out = []
    for lp_row, old_row, ref_row, m_row, a in zip(LOGP, OLD, REF, MASK, ADV, strict=True):
        row = []
        for lp, old, ref, m in zip(lp_row, old_row, ref_row, m_row, strict=True):
            r = math.exp(lp - old)
            rc = min(max(r, 1 - clip_low), 1 + clip_high)
            v = -min(r * a, rc * a) + beta * (math.exp(ref - lp) - (ref - lp) - 1)
            row.append(v if m else None)
        out.append([v for v in row if v is not None])
    return out


def _loss(aggregation, beta=0.0, max_length=None, **kw):
    ref = _t(REF) if beta > 0 else None
    return policy_loss(
        _t(LOGP),
        _t(OLD),
        ref,
        _t(ADV),
        _t(MASK),
        beta=beta,
        aggregation=aggregation,
        max_length=max_length,
        **kw,
    )


def test_group_advantages_hand_computed():
    adv = group_advantages(_t([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0]]))
    std0 = math.sqrt((1.5**2 * 2 + 0.5**2 * 2) / 3)  # unbiased sample std
    std1 = math.sqrt(4 * 0.25 / 3)
    want0 = [(r - 2.5) / (std0 + 1e-4) for r in (1, 2, 3, 4)]
    want1 = [(r - 0.5) / (std1 + 1e-4) for r in (0, 0, 1, 1)]
    assert torch.allclose(adv, _t([want0, want1]), atol=1e-6)


def test_group_advantages_zero_variance_group_gives_zeros_and_no_std_option():
    adv = group_advantages(_t([[0.7, 0.7, 0.7], [1.0, 0.0, 2.0]]))
    assert torch.equal(adv[0], torch.zeros(3))
    assert group_advantages(_t([[1.0, 0.0, 2.0]]), normalize_std=False).tolist() == [[0.0, -1.0, 1.0]]


def test_zero_variance_follows_the_scored_groups_rule():
    """Rewards equal up to float noise (0.1 + 0.2 vs 0.3) give zero advantages, as ScoredGroup.zero_variance
    says; a real spread above ZERO_VARIANCE_TOL does not."""
    noisy = torch.tensor([[0.1 + 0.2, 0.3, 0.3], [1.0, 1.0, 1.0 + 1e-6]], dtype=torch.float64)
    assert (0.1 + 0.2) != 0.3 and 1e-6 > ZERO_VARIANCE_TOL
    adv = group_advantages(noisy)
    assert adv.dtype == torch.float32
    assert torch.equal(adv[0], torch.zeros(3)) and adv[1].abs().max() > 0


def test_group_of_one_is_an_explicit_error():
    with pytest.raises(ValueError, match="silent no-op"):
        group_advantages(_t([[1.0], [2.0]]))


def test_seq_mean_token_mean_matches_hand_value():
    per = _hand_per_token()
    want = sum(sum(r) / len(r) for r in per) / len(per)
    loss, _ = _loss("seq-mean-token-mean")
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert want == pytest.approx(((-1 - 1.2 - 1) / 3 + (1.6 + 2 * math.exp(0.2)) / 2) / 2, abs=1e-9)


def test_token_mean_matches_hand_value():
    per = _hand_per_token()
    want = sum(sum(r) for r in per) / sum(len(r) for r in per)
    assert _loss("token-mean")[0].item() == pytest.approx(want, abs=1e-6)


def test_seq_mean_token_sum_norm_divides_by_the_constant_max_length():
    per = _hand_per_token()
    want = sum(sum(r) / 400 for r in per) / len(per)
    assert _loss("seq-mean-token-sum-norm", max_length=400)[0].item() == pytest.approx(want, abs=1e-7)


def test_clipping_on_both_sides_and_clip_fractions():
    # seq 0 (A > 0): token 1 has ratio e^0.5 > 1.2 -> clipped at 1.2 (the "high" side)
    # seq 1 (A < 0): token 0 has ratio e^-0.5 < 0.8 -> clipped at 0.8 (the "low" side);
    #                token 1 has ratio e^0.2 > 1.2 but A < 0, so the unclipped term is the min (not clipped)
    _, stats = _loss("token-mean")
    assert stats["clip_fraction_high"] == pytest.approx(1 / 5)
    assert stats["clip_fraction_low"] == pytest.approx(1 / 5)
    assert stats["clip_fraction"] == pytest.approx(2 / 5)
    ratios = [
        math.exp(a - b)
        for ra, rb, rm in zip(LOGP, OLD, MASK, strict=True)
        for a, b, m in zip(ra, rb, rm, strict=True)
        if m
    ]
    assert stats["ratio_mean"] == pytest.approx(sum(ratios) / 5, abs=1e-6)
    # asymmetric clip (DAPO clip-higher): with clip_high 0.7 nothing is clipped above
    _, wide = _loss("token-mean", clip_high=0.7)
    assert wide["clip_fraction_high"] == 0.0


def test_clipped_tokens_get_no_gradient():
    lp = _t(LOGP).requires_grad_(True)
    loss, _ = policy_loss(lp, _t(OLD), None, _t(ADV), _t(MASK), beta=0.0, aggregation="token-mean")
    loss.backward()
    assert lp.grad[0, 1] == 0 and lp.grad[1, 0] == 0  # the clipped tokens
    assert lp.grad[0, 0] != 0 and lp.grad[1, 1] != 0
    assert lp.grad[1, 2] == 0  # padding


def test_beta_positive_adds_k3_kl_and_beta_zero_needs_no_reference():
    for agg in ("seq-mean-token-mean", "token-mean"):
        per = _hand_per_token(beta=0.04)
        want = (
            sum(sum(r) / len(r) for r in per) / 2 if agg == "seq-mean-token-mean" else sum(map(sum, per)) / 5
        )
        loss, stats = _loss(agg, beta=0.04)
        assert loss.item() == pytest.approx(want, abs=1e-6)
    kls = [
        math.exp(r - p) - (r - p) - 1
        for rr, pr, mr in zip(REF, LOGP, MASK, strict=True)
        for r, p, m in zip(rr, pr, mr, strict=True)
        if m
    ]
    assert stats["kl"] == pytest.approx(sum(kls) / 5, abs=1e-6)
    assert _loss("token-mean", beta=0.0)[1]["kl"] == 0.0
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(_t(LOGP), _t(OLD), None, _t(ADV), _t(MASK), beta=0.1)


def test_k3_is_zero_when_equal_and_positive_otherwise():
    a = _t([[-1.0, -2.0]])
    assert torch.equal(k3_kl(a, a), torch.zeros(1, 2))
    assert (k3_kl(a, a - 0.3) > 0).all() and (k3_kl(a, a + 0.3) > 0).all()


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_with_global_denominators_sum_to_the_full_loss(agg):
    g = torch.Generator().manual_seed(0)
    lp, old, ref = (-torch.rand(6, 5, generator=g) for _ in range(3))
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    mask[:, -1] = 1
    adv = torch.randn(6, generator=g)
    full, _ = policy_loss(lp, old, ref, adv, mask, beta=0.04, aggregation=agg, max_length=8)
    parts = sum(
        policy_loss(
            lp[s],
            old[s],
            ref[s],
            adv[s],
            mask[s],
            beta=0.04,
            aggregation=agg,
            max_length=8,
            total_sequences=6,
            total_tokens=float(mask.sum()),
        )[0]
        for s in (slice(0, 2), slice(2, 6))
    )
    assert parts.item() == pytest.approx(full.item(), abs=1e-6)


def test_unknown_aggregation_names_the_options():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "mean")


def test_on_policy_ratio_is_one_and_loss_is_minus_mean_advantage():
    lp = _t([[-0.3, -0.7]])
    loss, stats = policy_loss(lp, lp.clone(), None, _t([0.5]), torch.ones(1, 2), beta=0.0)
    assert loss.item() == pytest.approx(-0.5) and stats["ratio_mean"] == pytest.approx(1.0)


def test_logprobs_from_logits_use_the_sampling_temperature():
    logits = _t([[[2.0, 0.0, -1.0]]])  # (N=1, T=1, V=3)
    tokens = torch.tensor([[0]])
    for temp in (1.0, 0.5):
        z = [v / temp for v in (2.0, 0.0, -1.0)]
        want = z[0] - math.log(sum(math.exp(v) for v in z))
        assert masked_logprobs_from_logits(logits, tokens, temp).item() == pytest.approx(want, abs=1e-6)


def test_episode_slots_pick_the_answer_slots_only_where_a_row_has_a_gap():
    from learner.policy import episode_slots

    one_turn = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.float32)  # right-aligned answers
    assert episode_slots(one_turn) is None  # every slot from an answer's start is scored: no saving
    episodes = torch.tensor([[1, 1, 0, 0, 0, 1], [0, 0, 0, 1, 1, 1], [1, 0, 0, 0, 1, 1]], dtype=torch.float32)
    slots = episode_slots(episodes)
    assert slots.tolist() == [[0, 1, 5], [3, 4, 5], [0, 4, 5]]  # each row's answer slots, in order
    padded = episode_slots(torch.tensor([[1, 0, 0, 1], [0, 0, 0, 1]], dtype=torch.float32))
    assert padded.shape == (2, 2) and padded[0].tolist() == [0, 3] and padded[1, 0] == 3
