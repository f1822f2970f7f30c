"""Importance sampling of the behaviour policy (learner/grpo.py behaviour_weights + policy_loss) against values
computed by hand in plain Python: token and sequence level, truncate and mask, and the mismatch statistics."""

from __future__ import annotations

import math

import pytest
import torch

from learner.grpo import behaviour_weights, mismatch_sums, policy_loss

# Two sequences, T = 3; the second has 2 completion tokens (its first slot is padding: right-aligned).
LOGP = [[-1.0, -2.0, -0.5], [0.0, -1.0, -1.0]]  # pi_theta (the policy being trained)
OLD = [[-1.1, -2.0, -0.4], [0.0, -0.9, -1.3]]  # pi_old: the learner's own logprobs before the update
BEH = [[-1.0, -2.9, -0.45], [0.0, -1.0, -1.0]]  # pi_behaviour: the rollout engine's
MASK = [[1, 1, 1], [0, 1, 1]]
ADV = [1.5, -1.0]
CAP = 2.0
CLIP = 0.2


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _pg(lp, old, a):
    """-min(r A, clip(r) A) of one token."""
    r = math.exp(lp - old)
    return -min(r * a, min(max(r, 1 - CLIP), 1 + CLIP) * a)


def _tokens(i):
    return [j for j in range(3) if MASK[i][j]]


def _hand(level: str, mode: str) -> tuple[float, list[list[float]], int]:
    """(seq-mean-token-mean loss, per-token weights of the kept tokens, number of tokens over the cap)."""
    seq_losses, weights, over = [], [], 0
    for i in range(2):
        raw_tok = {j: math.exp(OLD[i][j] - BEH[i][j]) for j in _tokens(i)}
        raw_seq = math.exp(sum(OLD[i][j] - BEH[i][j] for j in _tokens(i)))
        kept, row = [], []
        for j in _tokens(i):
            raw = raw_tok[j] if level == "token" else raw_seq
            over += raw > CAP
            if mode == "mask" and raw > CAP:
                continue  # leaves the loss, numerator and denominator
            w = min(raw, CAP)
            kept.append(w * _pg(LOGP[i][j], OLD[i][j], ADV[i]))
            row.append(w)
        weights.append(row)
        if kept:
            seq_losses.append(sum(kept) / len(kept))
    return sum(seq_losses) / len(seq_losses), weights, over


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_loss_with_behaviour_weights_matches_the_hand_computation(level, mode):
    expected, hand_weights, hand_over = _hand(level, mode)
    bw = behaviour_weights(_t(OLD), _t(BEH), _t(MASK), CAP, level, mode)
    kept_seqs = int((bw.keep.sum(dim=1) > 0).sum())  # what the learner passes as the loss's denominator
    loss, _ = policy_loss(
        _t(LOGP),
        _t(OLD),
        None,
        _t(ADV),
        bw.keep,
        CLIP,
        CLIP,
        beta=0.0,
        total_sequences=kept_seqs,
        is_weights=bw.weights,
    )
    assert loss.item() == pytest.approx(expected, abs=1e-9)
    got = [[bw.weights[i, j].item() for j in range(3) if bw.keep[i, j] > 0] for i in range(2)]
    assert got == [pytest.approx(row, abs=1e-9) for row in hand_weights]
    assert int(bw.over.sum()) == hand_over


def test_the_hand_data_exercise_every_branch():
    """The fixture is not degenerate: some token is over the cap at token level, the first sequence's product is
    over it at sequence level while the second's is not, and one sequence loses every token when masked."""
    assert _hand("token", "truncate")[2] == 1  # token 1 of sequence 0: exp(0.9) = 2.46
    assert math.exp(sum(OLD[0][j] - BEH[0][j] for j in _tokens(0))) > CAP
    assert math.exp(sum(OLD[1][j] - BEH[1][j] for j in _tokens(1))) < CAP
    assert _hand("sequence", "mask")[1][0] == []  # sequence 0 masked out entirely
    assert _hand("token", "truncate")[0] != _hand("token", "mask")[0]


def test_cap_zero_disables_the_correction():
    bw = behaviour_weights(_t(OLD), _t(BEH), _t(MASK), 0.0, "token", "mask")
    assert torch.equal(bw.weights, _t(MASK)) and torch.equal(bw.keep, _t(MASK)) and not bw.over.any()
    with_w, _ = policy_loss(_t(LOGP), _t(OLD), None, _t(ADV), bw.keep, beta=0.0, is_weights=bw.weights)
    without, _ = policy_loss(_t(LOGP), _t(OLD), None, _t(ADV), _t(MASK), beta=0.0)
    assert with_w.item() == pytest.approx(without.item(), abs=1e-12)


def test_weights_scale_the_policy_gradient_term_only_not_the_kl():
    ref = _t(OLD)
    w = torch.full((2, 3), 0.5, dtype=torch.float64)
    beta = 0.1
    half, _ = policy_loss(_t(LOGP), _t(OLD), ref, _t(ADV), _t(MASK), beta=beta, is_weights=w)
    pg, _ = policy_loss(_t(LOGP), _t(OLD), None, _t(ADV), _t(MASK), beta=0.0)
    full, _ = policy_loss(_t(LOGP), _t(OLD), ref, _t(ADV), _t(MASK), beta=beta)
    kl = full.item() - pg.item()
    assert kl > 0 and half.item() == pytest.approx(0.5 * pg.item() + kl, abs=1e-12)


def test_weights_carry_no_gradient():
    lp = _t(LOGP).requires_grad_(True)
    bw = behaviour_weights(_t(OLD), _t(BEH), _t(MASK), CAP)
    loss, _ = policy_loss(lp, _t(OLD), None, _t(ADV), bw.keep, beta=0.0, is_weights=bw.weights)
    loss.backward()
    assert not bw.weights.requires_grad and lp.grad is not None


def test_mismatch_sums_by_hand():
    s = mismatch_sums(_t(OLD), _t(BEH), _t(MASK))
    diffs = [OLD[i][j] - BEH[i][j] for i in range(2) for j in _tokens(i)]
    assert s["tokens"] == 5
    assert s["abs_diff"] == pytest.approx(sum(abs(d) for d in diffs), abs=1e-12)
    # log-ratios -0.1, 0.9, 0.05, 0.1, -0.3: ratios 0.905, 2.46, 1.05, 1.105, 0.741
    assert s["outside"] == sum(not 0.9 <= math.exp(d) <= 1.1 for d in diffs)
    assert s["outside"] == 3


def test_unknown_level_or_mode_names_the_options():
    with pytest.raises(ValueError, match="token/sequence|token\\|sequence"):
        behaviour_weights(_t(OLD), _t(BEH), _t(MASK), CAP, "geometric")
