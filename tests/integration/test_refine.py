"""Episodes of several turns outside training (cluster/evaluation/refine.py, `segr1 predict --turns N`) with the
real transformers engine, the real reward Predictor (GrabCut) and the tiny policy.

A random tiny policy seldom writes an answer that parses, so turn 1 is a teacher-forced answer (a valid one,
tokenized, in a RolloutGroup after the engine's own prompt ids): the test then follows what the loop does with
it: the feedback picture at the policy's size, turn 2 generated after turn 1's prompt and answer token for
token, turn 2 parsed with stops allowed, and the episode ending there (no parse, or the turn limit)."""

from __future__ import annotations

import numpy as np
import pytest

from actors.worker import RolloutWorker
from cluster.config import load_config
from cluster.evaluation.refine import refine
from protos import Completion, RolloutGroup, RolloutRequest, Sample, SamplingConfig
from protos.answer import format_answer, format_stop
from reward_service.predictor import Predictor
from runtime.images import encode_png

SIZE = 56  # the policy sees 56 x 56


@pytest.fixture(scope="module")
def pools(tiny_policy_dir):
    cfg = load_config(
        None,
        [
            "rollout.engine=hf",
            "prompt.preset=compact",
            f"data.image_size={SIZE}",
            f"model.policy={tiny_policy_dir}",
        ],
    )
    policy = cfg.policy_spec("eval")
    return RolloutWorker(policy, cfg.rollout, name="rollout-refine"), Predictor(
        policy, cfg.reward, name="eval-r"
    )


def _sample(k: int) -> tuple[Sample, np.ndarray]:
    rgb = np.full((80, 120, 3), 40, np.uint8)  # (H, W, 3): a red rectangle on grey
    rgb[20:60, 30 + 10 * k : 90, 0] = 220
    data = encode_png(rgb)
    truth = np.zeros((80, 120), bool)  # (H, W): the red rectangle
    truth[20:60, 30 + 10 * k : 90] = True
    mask = encode_png(truth)
    sample = Sample(id=f"s{k}", source="t", split="test", task="foreground", instruction="Segment the red box.",
                    image=data, mask=mask, width=120, height=80)  # fmt: skip
    return sample, rgb


def _forced_first_turn(rollout, samples, answer: str) -> list[RolloutGroup]:
    """Turn 1 as the engine would report it (its own prompt ids) with `answer` as completion 0 (and 1)."""
    requests = [
        RolloutRequest.for_sample(s, 2, SamplingConfig(temperature=0.0, max_tokens=4), request_id=f"r{i}")
        for i, s in enumerate(samples)
    ]
    prompts = [g.prompt_token_ids for g in rollout.generate(requests, *samples)]
    tok = rollout.engine.tokenizer
    ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    done = Completion(text=answer, token_ids=ids, logprobs=[-1.0] * len(ids))
    return [
        RolloutGroup(
            group_id=f"g{i}",
            sample_id=s.id,
            policy_version=0,
            completions=[done, done],
            temperature=0.0,
            max_tokens=64,
            prompt_token_ids=p,
        )  # fmt: skip
        for i, (s, p) in enumerate(zip(samples, prompts, strict=True))
    ]


def test_an_episode_goes_on_after_turn_one_and_ends_by_rule(pools):
    rollout, predictor = pools
    pairs = [_sample(0), _sample(1)]
    samples, rgbs = [s for s, _ in pairs], [r for _, r in pairs]
    answer = format_answer([[14, 14, 42, 42]], [[28, 28]], [1], "the red box")  # in the 56 x 56 view
    groups = _forced_first_turn(rollout, samples, answer)
    first = [p[0] for p in predictor.predict(groups, *samples)]
    assert all(p.parse_ok and p.mask is not None for p in first)
    greedy = SamplingConfig(temperature=0.0, max_tokens=12)
    episodes = refine(rollout, predictor, samples, rgbs, groups, first, 3, greedy)
    for group, episode in zip(groups, episodes, strict=True):
        one, two = episode[0], episode[1]
        assert one.text == answer and one.picture is None and one.prompt_ids == group.prompt_token_ids
        assert two.picture.size == (SIZE, SIZE)  # the mask turn 1 made, at the policy's size
        turn1 = group.prompt_token_ids + group.completions[0].token_ids
        assert two.prompt_ids[: len(turn1)] == turn1 and len(two.prompt_ids) > len(turn1)
        # the random policy's turn 2 does not parse (its episode ends there) or it goes on to the limit
        assert len(episode) == (2 if not two.goes_on else 3)
        assert two.goes_on or two.prediction.mask is None or two.prediction.stop
    assert refine(rollout, predictor, samples, rgbs, groups, first, 1, greedy) == [[e[0]] for e in episodes]


def test_a_stop_keeps_the_mask_it_was_shown_and_a_broken_answer_ends_the_episode(pools):
    rollout, predictor = pools
    pairs = [_sample(0), _sample(1)]
    samples, rgbs = [s for s, _ in pairs], [r for _, r in pairs]
    answer = format_answer([[14, 14, 42, 42]], [[28, 28]], [1], "the red box")
    groups = _forced_first_turn(rollout, samples, answer)
    first = [p[0] for p in predictor.predict(groups, *samples)]
    better = format_answer([[20, 14, 42, 42]], [[30, 28]], [1], "tighter")
    script = {"s0": [format_stop("right")], "s1": [better, "no answer", "never asked"]}
    episodes = refine(_Scripted(rollout, samples, script), predictor, samples, rgbs, groups, first, 3,
                      SamplingConfig(temperature=0.0, max_tokens=8))  # fmt: skip
    stopped, broken = episodes
    assert len(stopped) == 2 and stopped[1].prediction.stop and not stopped[1].goes_on
    assert stopped[1].prediction.mask is first[0].mask  # the mask it was shown stands
    assert len(broken) == 3 and broken[1].goes_on and broken[1].prediction.boxes != first[1].boxes
    assert broken[2].prediction.mask is None and broken[2].prediction.failure == "missing_bbox"
    assert script["s1"] == ["never asked"]  # the limit: no fourth answer


class _Scripted:
    """A rollout worker whose later turns answer from a script (sample id -> the answers of turns 2, 3, ...):
    the loop's rules (stop, no parse, the limit) on answers a random policy would never write. Turn 1, the
    pictures and the Predictor are the real ones."""

    def __init__(self, real: RolloutWorker, samples, script: dict[str, list[str]]):
        from runtime.images import resize_for_policy

        self.policy, self.script = real.policy, script
        # an episode is known by its first picture: its sample's image at the policy's size
        self.ids = {resize_for_policy(s.image, SIZE).tobytes(): s.id for s in samples}

    def next_turns(self, prompt_ids, answers, images, sampling):
        from actors.engine import GenerationBatch

        texts = [self.script[self.ids[pictures[0].tobytes()]].pop(0) for pictures in images]
        done = [[Completion(text=t, token_ids=[7], logprobs=[-1.0])] for t in texts]
        return GenerationBatch(
            done, [list(p) + list(a) + [8] for p, a in zip(prompt_ids, answers, strict=True)], 0
        )


class _ForcedEval(_Scripted):
    """_Scripted, whose turn 1 is the real engine's prompt with a forced answer (`_forced_first_turn`): what an
    evaluation of a policy that answers so would see."""

    def __init__(self, real: RolloutWorker, samples, script, answer: str):
        super().__init__(real, samples, script)
        self.real, self.answer = real, answer

    def generate(self, requests, *samples):
        forced = _forced_first_turn(self.real, samples, self.answer)
        return [
            g.model_copy(update={"group_id": r.request_id}) for g, r in zip(forced, requests, strict=True)
        ]


def test_evaluation_with_turns_reports_the_last_turn_and_the_first(pools):
    from cluster.evaluation.loop import evaluate_samples
    from cluster.evaluation.pictures import render_grid

    rollout, predictor = pools
    samples = [_sample(0)[0], _sample(1)[0]]
    answer = format_answer([[14, 14, 42, 42]], [[28, 28]], [1], "the red box")
    better = format_answer([[30, 16, 50, 44]], [[40, 30]], [1], "further right")
    script = {"s0": [format_stop("right")], "s1": [better]}
    settings = dict(sampling=SamplingConfig(temperature=0.0, max_tokens=8), baselines=False)
    once = evaluate_samples(_ForcedEval(rollout, samples, {}, answer), predictor, samples, **settings)
    looked = evaluate_samples(
        _ForcedEval(rollout, samples, script, answer), predictor, samples, turns=2, **settings
    )
    r = looked.summary["refinement"]
    assert "refinement" not in once.summary and r["turns"] == 2
    assert r["turns_mean"] == 2.0 and r["stop_rate"] == 0.5
    assert r["turn1_mean_iou"] == pytest.approx(once.summary["mean_iou"])
    stopped, moved = looked.results
    assert stopped.iou == once.results[0].iou  # a stop keeps the mask it was shown
    assert (stopped.turns, stopped.stop, moved.turns, moved.stop) == (2, True, 2, False)
    for r, first in zip(looked.results, once.results, strict=True):  # each turn's mask kept for the grid
        assert r.iou_turn1 == first.iou and r.earlier_png == [first.mask_png] and first.earlier_png == []
    # grid.png: a panel per turn (two rows: best and worst, 18 px of caption under each 32 px panel)
    assert render_grid(once.results, samples, k=2, size=32).shape == (2 * 50, 2 * 32, 3)
    assert render_grid(looked.results, samples, k=2, size=32).shape == (
        2 * 50,
        2 * (2 * 32 + 6),
        3,
    )  # + a gap
    assert moved.boxes != once.results[1].boxes and moved.parse_ok  # the second answer's own prompts
    assert 0 < moved.iou != once.results[1].iou > 0  # and its own mask
