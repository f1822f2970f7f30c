"""The Learner on the tiny Qwen2.5-VL policy (built offline): one step changes every parameter and lowers the
loss on the same batch; micro-batching equals the full batch; exported names are the checkpoint's; the prompts
are the rollout's own token ids."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from actors.worker import RolloutWorker
from cluster.config import TrainConfig
from cluster.data.synth import generate_samples
from learner.learner import Learner, lr_multiplier
from protos import RolloutRequest, ScoredGroup
from tests.support.synthetic import reward, scored_groups

torch.set_num_threads(2)


def make_cfg(policy_dir, grpo: dict | None = None, **learner) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "model": {"policy": str(policy_dir)},
            "prompt": {"preset": "compact"},  # the tiny policy's short prompts
            "data": {"image_size": 56},
            "rollout": {"sampling": {"temperature": 1.0, "max_tokens": 48}},
            "grpo": {"group_size": 4, "beta": learner.pop("beta", 0.04), **(grpo or {})},
            "learner": {"lr": 1e-4, "micro_batch_size": 8, **learner},
            "checkpoint": {"dir": str(policy_dir.parent / "ckpt")},
        }
    )


@pytest.fixture(scope="module")
def batch(tiny_policy_dir):
    samples = list(generate_samples(2, seed=0, size=64))
    learner = Learner(make_cfg(tiny_policy_dir).learner_spec())
    return samples, scored_groups(learner.policy, samples, group_size=4, seed=1, max_tokens=32)


def test_one_step_changes_every_trainable_parameter_and_lowers_the_loss(tiny_policy_dir, batch):
    samples, groups = batch
    learner = Learner(make_cfg(tiny_policy_dir).learner_spec())
    before = {n: p.detach().clone() for n, p in learner.policy.model.named_parameters()}
    loss0 = learner.loss_on(groups, *samples)
    stats = learner.step(groups, *samples)
    assert stats.policy_version == 1 and learner.policy_version == 1 and stats.step == 1
    assert stats.loss == pytest.approx(loss0, abs=1e-6)
    assert abs(stats.ratio_mean - 1.0) < 1e-4 and stats.clip_fraction == 0.0  # on-policy batch
    assert stats.grad_norm > 0 and stats.num_completions == 8 and stats.num_groups == 2
    assert stats.entropy > 0 and stats.skipped_non_finite == 0 and stats.lr > 0
    adv = [a for sg in groups for a in _advantages(sg.totals)]
    assert stats.advantage_abs_mean == pytest.approx(sum(abs(a) for a in adv) / len(adv), abs=1e-6)
    unchanged = [n for n, p in learner.policy.model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []
    assert learner.loss_on(groups, *samples) < loss0
    assert learner.policy.reference is not None  # beta > 0: frozen reference loaded


def test_micro_batches_give_the_same_gradient_as_one_batch(tiny_policy_dir, batch):
    samples, groups = batch
    a = Learner(make_cfg(tiny_policy_dir, micro_batch_size=3).learner_spec())
    b = Learner(make_cfg(tiny_policy_dir, micro_batch_size=64).learner_spec())
    la, _, _ = a._accumulate(groups, samples, backward=True)
    lb, _, _ = b._accumulate(groups, samples, backward=True)
    assert la == pytest.approx(lb, abs=1e-6)
    for (n, pa), (_, pb) in zip(
        a.policy.model.named_parameters(), b.policy.model.named_parameters(), strict=True
    ):
        # float32 sums in another order: equal up to rounding relative to the tensor's scale (a micro-batch
        # weighted wrongly is off by tens of percent)
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-5 * float(pb.grad.abs().max()), msg=n)


def test_beta_zero_loads_no_reference_model(tiny_policy_dir, batch):
    samples, groups = batch
    learner = Learner(make_cfg(tiny_policy_dir, beta=0.0).learner_spec())
    assert learner.policy.reference is None
    assert learner.step(groups, *samples).kl == 0.0


def test_exported_weights_carry_the_checkpoint_names_and_values(tiny_policy_dir):
    learner = Learner(make_cfg(tiny_policy_dir, beta=0.0).learner_spec())
    exported = learner.export_weights()
    with safe_open(str(tiny_policy_dir / "model.safetensors"), "pt") as f:
        assert set(exported) == set(f.keys())
        for name in f.keys():
            assert torch.equal(exported[name], f.get_tensor(name)), name


def test_groups_and_samples_must_pair_up(tiny_policy_dir, batch):
    samples, groups = batch
    learner = Learner(make_cfg(tiny_policy_dir, beta=0.0).learner_spec())
    with pytest.raises(ValueError, match="samples"):
        learner.step(groups, *samples[:1])
    with pytest.raises(ValueError, match="same order"):
        learner.step(groups, *samples[::-1])


def test_lr_schedule_warmup_then_decay():
    assert [lr_multiplier(s, 4, "constant", 10) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_multiplier(4, 4, "cosine", 10) == pytest.approx(1.0)
    assert lr_multiplier(10, 4, "cosine", 10) == pytest.approx(0.0)
    assert lr_multiplier(7, 4, "linear", 10) == pytest.approx(0.5)


def test_shared_vision_features_match_per_row_images(tiny_policy_dir, batch):
    samples, groups = batch
    learner = Learner(make_cfg(tiny_policy_dir, beta=0.0).learner_spec())
    prompts = learner.policy.encode(samples)
    rows = [(i, c.token_ids) for i, g in enumerate(groups) for c in g.group.completions]
    b = learner.policy.batch(prompts, [r[1] for r in rows], [r[0] for r in rows])
    with torch.no_grad():
        shared, mask = learner.policy.logprobs(b)
        plain, _ = learner.policy.logprobs({k: v for k, v in b.items() if k != "image_key"})
    assert torch.allclose(shared * mask, plain * mask, atol=1e-5)


def test_rollout_prompt_ids_are_what_the_learner_renders_and_it_scores_after_them(tiny_policy_dir):
    """A rollout worker on the same policy folder and image_size stamps exactly the ids the learner's own
    processor renders; the learner trains on the groups after them."""
    cfg = make_cfg(tiny_policy_dir, beta=0.0)
    samples = list(generate_samples(3, seed=5, size=64))
    worker = RolloutWorker(cfg.policy_spec(), cfg.rollout.model_copy(update={"engine": "hf"}), "rollout-ids")
    requests = [
        RolloutRequest.for_sample(s, 2, cfg.rollout.sampling, request_id=f"r{i}", seed=i)
        for i, s in enumerate(samples)
    ]
    groups = worker.generate(requests, *samples)
    learner = Learner(cfg.learner_spec())
    assert [g.prompt_token_ids for g in groups] == learner.policy.prompt_ids(samples)
    assert len({len(g.prompt_token_ids) for g in groups}) > 1  # different lengths: padding never leaks in
    scored = [ScoredGroup(group=g, scores=[reward(0.0), reward(1.0)]) for g in groups]
    stats = learner.step(scored, *samples)
    # near 1, not exactly: the engine renormalises over the non-vision tokens, which a random model gives mass
    assert abs(stats.ratio_mean - 1.0) < 0.05 and stats.num_completions == 6


def test_prompt_ids_that_disagree_with_the_image_are_refused_naming_the_sample(tiny_policy_dir, batch):
    samples, groups = batch
    learner = Learner(make_cfg(tiny_policy_dir, beta=0.0).learner_spec())
    image_token = learner.policy.processor.image_token_id
    ids = list(groups[1].group.prompt_token_ids)
    ids.remove(image_token)  # as if the rollout saw a smaller image
    bad = groups[1].model_copy(update={"group": groups[1].group.model_copy(update={"prompt_token_ids": ids})})
    with pytest.raises(ValueError, match=rf"sample '{samples[1].id}'.*3 image tokens.*makes 4.*image_size"):
        learner.step([groups[0], bad], *samples)


def _shift_behaviour(groups, delta: float, only: tuple[int, int] | None = None):
    """The groups with behaviour logprobs moved by delta (an engine that disagrees with the learner), on every
    completion or only on completion (group, index) `only`."""
    out = []
    for gi, sg in enumerate(groups):
        comps = [
            c.model_copy(update={"logprobs": [x + delta for x in c.logprobs]})
            if only is None or only == (gi, ci)
            else c
            for ci, c in enumerate(sg.group.completions)
        ]
        out.append(sg.model_copy(update={"group": sg.group.model_copy(update={"completions": comps})}))
    return out


def test_old_logprobs_are_the_learners_so_the_first_micro_batch_has_ratio_exactly_one(tiny_policy_dir, batch):
    """pi_old is recomputed by the learner: even against an engine whose logprobs are 0.3 off, the first
    micro-batch's ratio is exactly 1 and nothing is clipped, step after step; the mismatch shows in the
    importance weights (exp(-0.3), under the cap) and the mismatch statistics instead."""
    samples, groups = batch
    shifted = _shift_behaviour(groups, 0.3)
    learner = Learner(make_cfg(tiny_policy_dir, beta=0.0, micro_batch_size=3).learner_spec())
    for _ in range(3):
        stats = learner.step(shifted, *samples)
        assert stats.first_ratio_mean == 1.0 and stats.first_clip_fraction == 0.0
        assert stats.num_updates == 1
    assert stats.is_weight_mean == pytest.approx(math.exp(-0.3), rel=0.02)
    assert stats.mismatch_logp_abs == pytest.approx(0.3, abs=0.02)
    assert stats.mismatch_outside_fraction == 1.0 and stats.is_truncated_fraction == 0.0


def test_updates_per_batch_makes_several_updates_in_one_policy_version(tiny_policy_dir, batch):
    samples, groups = batch
    cfg = make_cfg(tiny_policy_dir, {"updates_per_batch": 2}, beta=0.0, lr=1e-3, micro_batch_size=2)
    learner = Learner(cfg.learner_spec())
    before = {n: p.detach().clone() for n, p in learner.policy.model.named_parameters()}
    stats = learner.step(groups, *samples)
    assert stats.num_updates == 2 and stats.policy_version == 1 and learner.step_count == 1
    assert stats.first_ratio_mean == 1.0 and stats.first_clip_fraction == 0.0
    # the second mini-batch is scored after the first update: its ratio has moved off 1
    assert abs(stats.ratio_mean - 1.0) > 1e-6
    assert any(not torch.equal(p, before[n]) for n, p in learner.policy.model.named_parameters())
    assert learner.optimizer.state[learner.params[0]]["step"] == 2  # two AdamW steps


def test_mask_mode_drops_the_sequence_over_the_cap_from_the_loss_and_its_denominator(tiny_policy_dir, batch):
    """Sequence-level masking: a completion whose behaviour logprobs are far below the learner's gets a weight
    above the cap and leaves the loss; the others keep their weight (about 1, on-policy) and the mean is taken
    over the N - 1 sequences left."""
    samples, groups = batch
    learner = Learner(
        make_cfg(tiny_policy_dir, {"is_level": "sequence", "is_mode": "mask"}, beta=0.0).learner_spec()
    )
    odd = _shift_behaviour(groups, -1.0, only=(1, 2))  # weight exp(+1 per token) of completion 2 of group 1
    loss, stats, counts = learner._accumulate(odd, samples, backward=False)
    n_tokens = len(groups[1].group.completions[2].token_ids)
    assert stats["is_masked_fraction"] == pytest.approx(n_tokens / counts["num_tokens"])
    assert stats["is_truncated_fraction"] == 0.0
    adv = [a for sg in groups for a in _advantages(sg.totals)]
    masked = adv.pop(4 + 2)  # at ratio 1 and weight ~1 each sequence's loss is -A; the masked one is gone
    assert abs(masked) > 0.1  # so a denominator that still counted it (N, not N - 1) would show
    assert loss == pytest.approx(-sum(adv) / len(adv), abs=1e-4)


def test_a_non_finite_gradient_skips_the_update_and_is_counted(tiny_policy_dir, batch, monkeypatch):
    samples, groups = batch
    learner = Learner(make_cfg(tiny_policy_dir).learner_spec())
    before = {n: p.detach().clone() for n, p in learner.policy.model.named_parameters()}
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("nan")))
    stats = learner.step(groups, *samples)
    assert stats.skipped_non_finite == stats.num_updates == 1 and stats.grad_norm == 0.0
    assert all(torch.equal(p, before[n]) for n, p in learner.policy.model.named_parameters())


def _advantages(totals):
    from learner.grpo import group_advantages

    return group_advantages(torch.tensor([totals], dtype=torch.float64))[0].tolist()


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_pi_old_from_the_updates_own_forward_equals_the_separate_pass(tiny_policy_dir, batch, level):
    """One update per batch in truncate mode takes pi_old from the update's forward (update.fused) instead of a
    no-grad pass: the same loss, loss statistics, importance-sampling statistics and gradients, one forward less.
    The behaviour logprobs are shifted (one group by -0.9: weights over the cap) so the IS terms matter."""
    from learner.update import finish_fused, fused, minibatch_loss, score_old

    samples, groups = batch
    shifted = _shift_behaviour(groups[:1], -0.9) + _shift_behaviour(groups[1:], -0.2)
    cfg = make_cfg(tiny_policy_dir, {"is_level": level, "tis_cap": 1.5}, beta=0.0, micro_batch_size=3)
    learner = Learner(cfg.learner_spec())
    grpo = learner.spec.grpo
    assert fused(grpo)
    results = []
    for skip in (False, True):
        learner.optimizer.zero_grad(set_to_none=True)
        plan = learner._plan(shifted, samples)
        score_old(learner.policy, plan, grpo, skip_pass=skip)
        loss, sums, first = minibatch_loss(learner.policy, plan, 0, grpo, True)
        finish_fused(plan, grpo, learner.policy.device)
        grads = [p.grad.detach().clone() for p in learner.params]
        results.append((loss, sums, first, plan.is_stats, plan.totals, grads))
    (la, sa, fa, ia, ta, ga), (lb, sb, fb, ib, tb, gb) = results
    assert lb == pytest.approx(la, rel=1e-6, abs=1e-9) and tb == ta
    assert sb == pytest.approx(sa, rel=1e-6, abs=1e-9) and fb == pytest.approx(fa, rel=1e-6, abs=1e-9)
    assert ib == pytest.approx(ia, rel=1e-6, abs=1e-9)
    assert ia["is_truncated_fraction"] > 0 and ia["is_weight_mean"] != pytest.approx(1.0)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(ga, gb, strict=True))


def test_a_short_completion_beside_a_long_one_keeps_every_statistic_finite(tiny_policy_dir, batch):
    """Right-aligned scoring puts a short completion's padding slots on its prompt (image pad tokens, which the
    learner leaves out of the softmax: logprob -inf). Those slots are masked out, and must not turn the masked
    sums into NaN (-inf * 0): loss, KL, ratio and the rollout/learner mismatch stay finite."""
    samples, groups = batch
    g = groups[0]
    long = g.group.completions[0]
    short = g.group.completions[1]
    stretched = long.model_copy(update={"token_ids": long.token_ids * 6, "logprobs": long.logprobs * 6})
    one = short.model_copy(update={"token_ids": short.token_ids[:1], "logprobs": short.logprobs[:1]})
    completions = [stretched, one, *g.group.completions[2:]]
    groups = [
        g.model_copy(update={"group": g.group.model_copy(update={"completions": completions})}),
        *groups[1:],
    ]
    learner = Learner(make_cfg(tiny_policy_dir).learner_spec())
    stats = learner.step(groups, *samples)
    figures = {
        k: getattr(stats, k) for k in ("loss", "kl", "ratio_mean", "is_weight_mean", "mismatch_logp_abs")
    }
    assert all(math.isfinite(v) for v in figures.values()), figures
