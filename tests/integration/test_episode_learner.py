"""An episode of two turns from the real transformers engine, trained by the real Learner on the tiny policy:
the learner's row is exactly the token sequence the engine fed and generated (turn 2's prompt, images
expanded, then turn 2's answer; two images in one sequence), its loss mask covers the two answers and nothing
the policy was shown, and its logprobs of those tokens are the engine's behaviour logprobs (same weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.worker import RolloutWorker
from cluster.config import TrainConfig
from cluster.data.synth import generate_samples
from learner.learner import Learner
from protos import RolloutGroup, RolloutRequest, SamplingConfig, ScoredGroup
from runtime.images import decode_image, encode_png, resize_for_policy
from runtime.overlay import feedback_image
from runtime.qwen_vl import unpadded_ids
from runtime.turns import join_turns
from tests.support.synthetic import reward

SIZE = 56
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def episodes(tiny_policy_dir):
    cfg = TrainConfig.model_validate(
        {
            "model": {"policy": str(tiny_policy_dir)},
            "prompt": {"preset": "compact"},
            "data": {"image_size": SIZE},
            "rollout": {"engine": "hf", "sampling": {"temperature": 1.0, "max_tokens": 8}},
            "grpo": {"group_size": 2, "beta": 0.0},
            "learner": {"lr": 1e-4, "micro_batch_size": 8},
            "checkpoint": {"dir": str(tiny_policy_dir.parent / "ckpt-episodes")},
        }
    )
    rollout = RolloutWorker(cfg.policy_spec("train"), cfg.rollout, name="rollout-episodes")
    sample = next(iter(generate_samples(1, seed=0, size=64)))
    sampling = SamplingConfig(temperature=1.0, max_tokens=8, seed=5)
    first = rollout.generate([RolloutRequest.for_sample(sample, 2, sampling, request_id="r0")], sample)[0]
    rgb = decode_image(sample.image)
    mask = np.zeros(rgb.shape[:2], bool)  # (H, W): the mask turn 1's prompts made
    mask[10:40, 12:50] = True
    picture = feedback_image(rgb, mask, SIZE, [[12, 10, 50, 40]], [[30, 25]], [1])
    image = resize_for_policy(sample.image, SIZE)
    second = rollout.next_turns(
        [first.prompt_token_ids] * 2,
        [c.token_ids for c in first.completions],
        [[image, picture]] * 2,
        sampling,
    )
    png = encode_png(np.asarray(picture))
    joined = [
        join_turns([(first.prompt_token_ids, c1), (p2, c2[0])], [png])
        for c1, p2, c2 in zip(first.completions, second.prompt_token_ids, second.completions, strict=True)
    ]
    group = first.model_copy(update={"completions": joined})
    return cfg, sample, first, second, group


def test_the_learner_scores_exactly_the_sequence_the_engine_saw(episodes):
    cfg, sample, first, second, group = episodes
    learner = Learner(cfg.learner_spec())
    batch = learner.policy.episode_batch([sample] * 2, [group.prompt_token_ids] * 2, group.completions)
    assert batch["images_per_row"].tolist() == [2, 2]
    rows = unpadded_ids(batch)
    for k in range(2):
        engine_saw = list(second.prompt_token_ids[k]) + list(second.completions[k][0].token_ids)
        assert (
            rows[k] == engine_saw
        )  # token for token, both images' tokens expanded where the engine had them
        answer1, answer2 = first.completions[k].token_ids, second.completions[k][0].token_ids
        episode = group.completions[k]
        width, n = batch["input_ids"].shape[1], len(episode.token_ids)
        in_loss = batch["completion_mask"][k, width - n :].tolist()
        assert in_loss == episode.policy_mask and sum(in_loss) == len(answer1) + len(answer2)
        assert episode.token_ids[: len(answer1)] == answer1 and episode.token_ids[-len(answer2) :] == answer2
    keys = batch["image_key"].tolist()  # per image, row 0's two then row 1's: the sample's once, each picture
    assert keys[0] == keys[2] and len({keys[0], keys[1], keys[3]}) == 3
    logp, mask = learner.policy.logprobs(batch, temperature=1.0)  # (2, T) right-aligned
    plain, _ = learner.policy.logprobs({k: v for k, v in batch.items() if k != "image_key"}, temperature=1.0)
    torch.testing.assert_close(logp * mask, plain * mask, atol=1e-5, rtol=0)  # shared vision == per image
    behaviour = torch.tensor([c.logprobs for c in group.completions])  # same length: right-align is identity
    t = logp.shape[1]
    torch.testing.assert_close(logp * mask, behaviour[:, -t:] * mask, atol=2e-4, rtol=0)


def test_episode_logits_are_made_only_where_the_policy_answered(episodes):
    """The lm_head runs on the answer slots alone (K of them, not the T + 1 of the whole span with the picture and
    the user turn), and the logprobs equal those of the full window's logits."""
    from learner.grpo import masked_logprobs_from_logits

    cfg, sample, _, _, group = episodes
    policy = Learner(cfg.learner_spec()).policy
    batch = policy.episode_batch([sample] * 2, [group.prompt_token_ids] * 2, group.completions)
    shapes = []
    head = policy.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _a, out: shapes.append(tuple(out.shape)))
    with torch.no_grad():
        logp, mask = policy.logprobs(batch)
        t = logp.shape[1]
        full = policy.model(
            **policy._model_inputs(batch, policy.model), logits_to_keep=t + 1, use_cache=False
        )
    handle.remove()
    k = int(mask.sum(1).max())
    assert (
        shapes[0][:2] == (2, k) and k < t // 2 and shapes[1][:2] == (2, t + 1)
    )  # a picture is most of a span
    tokens = batch["input_ids"][:, -t:]
    expected = masked_logprobs_from_logits(full.logits[:, :-1], tokens, 1.0, policy.suppress_ids)
    answered = mask > 0  # elsewhere the full window has -inf (the picture's tokens are never sampled)
    torch.testing.assert_close(logp[answered], expected[answered], atol=1e-6, rtol=0)
    assert logp[~answered].abs().max() == 0  # nothing outside the answers


def test_a_grpo_step_on_two_turn_episodes_covers_only_the_policys_tokens(episodes):
    cfg, sample, _, _, group = episodes
    learner = Learner(cfg.learner_spec())
    scored = ScoredGroup(group=RolloutGroup.model_validate(group), scores=[reward(0.5), reward(1.5)])
    before = {n: p.detach().clone() for n, p in learner.policy.model.named_parameters()}
    stats = learner.step([scored], sample)
    assert stats.num_tokens == sum(c.policy_tokens for c in group.completions)
    assert stats.num_tokens < sum(len(c.token_ids) for c in group.completions)  # the shown turn is left out
    assert abs(stats.ratio_mean - 1.0) < 1e-4 and stats.mismatch_logp_abs < 1e-3  # the engine's own weights
    assert np.isfinite(stats.loss) and stats.grad_norm > 0 and stats.skipped_non_finite == 0
    changed = [n for n, p in learner.policy.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed
