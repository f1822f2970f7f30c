"""The throughput model (cluster/plan/throughput.py, profile.py, split.py) and `segr1 plan --throughput`: a step's
seconds worked by hand in each mode, the shared-core term of a CPU profile, a profile fitted back from the steps it
predicts, the GPU splits within N GPUs and memory, and the command's answers and errors. Its predictions against
measured runs: bench/plan_validation.py (docs/benchmarks.md)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from cluster.cli import main
from cluster.config import load_config
from cluster.plan.profile import fit_profile
from cluster.plan.split import best_splits
from cluster.plan.throughput import Linear, Profile, ProfileError, Shape, predict, with_split
from tests.support.paths import REPO

CONFIGS = REPO / "cluster" / "configs"
GPU = Profile(
    rollout=Linear(1.0, 0.5),  # a call of 4 prompts: 3 s
    reward=Linear(0.2, 0.1),  # 4 prompts: 0.6 s
    learner=Linear(0.5, 0.25),  # 8 prompts on one rank: 2.5 s
    weight_sync=Linear(0.1, 0.05),  # to 2 workers: 0.2 s
    overhead={"sync": Linear(0.3, 0.0), "async": Linear(0.1, 0.0)},
)


def _shape(mode: str = "sync", batch: int = 8, rollout: int = 2, reward: int = 1, ranks: int = 1) -> Shape:
    return Shape(mode, batch, 4, rollout, reward, ranks, max_batch_groups=32)


def test_linear_fit_recovers_a_line_and_falls_back_to_proportional():
    line = Linear.fit([(4, 1.0 + 4 * 0.5), (12, 1.0 + 12 * 0.5), (8, 5.0)])
    assert line.fixed == pytest.approx(1.0) and line.per_unit == pytest.approx(0.5)
    one_size = Linear.fit([(4, 2.0), (4, 2.2)])  # proportional
    assert one_size.fixed == 0.0 and one_size.per_unit == pytest.approx(0.525)
    assert Linear.fit([(2, 0.1), (10, 3.0)]).fixed >= 0.0  # never a negative fixed cost


def test_a_sync_step_is_its_stages_in_turn():
    # 2 calls of 4 prompts, one per rollout worker: 3 s; the reward worker scores both after: 2 x 0.6;
    # learner 2.5; publish to 2 workers 0.2; overhead 0.3
    p = predict(_shape("sync"), GPU)
    assert p.step_s == pytest.approx(3.0 + 1.2 + 2.5 + 0.2 + 0.3)
    assert p.samples_per_s == pytest.approx(8 / 7.2) and p.completions_per_s == pytest.approx(32 / 7.2)
    assert p.limit == "stages" and p.bottleneck == "rollout"  # a rollout worker's 3.0 s against 2.7
    assert p.busy_s == {"rollout": 3.0, "reward": 1.2, "learner": 2.7}


def test_an_async_step_is_paced_by_the_busiest_pool_and_moves_with_the_split():
    deep = replace(_shape("async"), max_staleness=3)  # 4 steps' chains in flight: the pools set the pace
    p = predict(deep, GPU)  # rollout 2 x 3 / 2 + 0.2 = 3.2, reward 1.2, learner 2.7, chain 6.9 / 4
    assert p.step_s == pytest.approx(3.2 + 0.1) and p.limit == "rollout"
    more = predict(with_split(deep, 4, 1, 1), GPU)  # 4 calls of 2 prompts: 2.0 s each, 1 per worker
    assert more.limit == "learner" and more.step_s == pytest.approx(2.5 + 0.3 + 0.1)  # a publish to 4: 0.3
    assert more.samples_per_s > p.samples_per_s
    two_ranks = predict(with_split(deep, 4, 1, 2), GPU)  # the learner's prompts split over 2 ranks
    assert two_ranks.step_s < more.step_s
    # max_staleness 1: two steps in flight, each one's stages in turn (a sync step's 6.9 s): 3.45 s a step
    shallow = predict(_shape("async"), GPU)
    assert shallow.limit == "stages" and shallow.step_s == pytest.approx(6.9 / 2 + 0.1)


def test_a_cpu_profile_shares_its_cores():
    cpu = Profile(**{**GPU.__dict__, "cores": 1.0})
    sync_gpu, sync_cpu = predict(_shape("sync"), GPU), predict(_shape("sync"), cpu)
    assert sync_cpu.step_s - sync_gpu.step_s == pytest.approx(3.0)  # two workers generating on one core
    a = predict(_shape("async"), cpu)
    cpu_s = 2 * (3.0 + 0.6) + 2.5 + 0.2 * 3  # every pool's work, one thread each, on one core
    assert a.limit == "cpu" and a.step_s == pytest.approx(cpu_s + 0.1)
    assert a.bottleneck == "rollout"  # still the pool whose workers wait least


def _lines(shape: Shape, profile: Profile, n: int = 3) -> list[dict]:
    """Steps as the driver writes them, from what `profile` says they take (an episode's calls summed over its
    turns, as the workers report them)."""
    step = predict(shape, profile).step_s
    gen, score = shape.episode(profile.rollout, shape.chunk), shape.episode(profile.reward, shape.chunk)
    return [
        {
            "generate_s": gen,
            "score_s": score * shape.calls,
            "learner_s": profile.learner(shape.batch_size / shape.learner_ranks * shape.episode_tokens),
            "weight_sync_s": profile.weight_sync(shape.rollout_workers),
            "step_s": step,
            "groups": shape.batch_size,
            "episode_turns_mean": shape.turns,
        }
    ] * n


def test_a_profile_fitted_from_steps_predicts_those_steps():
    true = Profile(
        **{**GPU.__dict__, "cores": 2.0, "overhead": {"sync": Linear(0.3, 0.0), "async": Linear(0.1, 0.0)}}
    )
    runs = [
        (_shape(m, b, 1, 1), _lines(_shape(m, b, 1, 1), true)) for m in ("sync", "async") for b in (4, 12)
    ]
    fitted = fit_profile(runs, cores=2.0, source="test")
    for stage in ("rollout", "reward", "learner"):
        got, want = getattr(fitted, stage), getattr(true, stage)
        assert (got.fixed, got.per_unit) == pytest.approx((want.fixed, want.per_unit))
    for shape in (_shape("sync", 16, 2, 2), _shape("async", 8, 2, 1)):  # configs it did not see
        assert predict(shape, fitted).step_s == pytest.approx(predict(shape, true).step_s, rel=0.05)
    again = Profile.from_json(json.loads(json.dumps(fitted.to_json())))
    assert again == fitted


def test_episodes_add_a_call_per_later_turn_and_longer_learner_rows():
    two = replace(_shape("sync"), max_turns=2, turns=1.5, later_turn_tokens=0.8)
    # a chunk of 4: generate 3 s + a second call (fixed 1 s) over half the completions (0.5 x 4 x 0.5 s);
    # score 0.6 + 0.2 + 0.1 x 4 x 0.5; the learner's 8 prompts count 1 + (2 - 1) x 0.8 = 1.8 times (its rows
    # padded to a whole episode's)
    p = predict(two, GPU)
    assert p.busy_s["rollout"] == pytest.approx(5.0) and p.busy_s["reward"] == pytest.approx(2 * 1.0)
    assert p.step_s == pytest.approx(5.0 + 2 * 1.0 + (0.5 + 0.25 * 8 * 1.8) + 0.2 + 0.3)
    # no episode going on: one-turn work, whatever max_turns allows
    assert predict(replace(two, turns=1.0), GPU).step_s == pytest.approx(predict(_shape("sync"), GPU).step_s)


def test_a_config_of_episodes_reads_its_turns_and_token_counts(tmp_path, capsys):
    one = load_config(CONFIGS / "qwen3b-1gpu.yaml")
    two = load_config(CONFIGS / "qwen3b-1gpu.yaml", ["rollout.max_turns=2"])
    assert (Shape.from_config(one).turns, Shape.from_config(one).later_turn_tokens) == (1.0, 0.0)
    worst, half = Shape.from_config(two), Shape.from_config(two, turns=1.5)
    assert worst.turns == 2.0 and half.turns == 1.5 and 0.0 < worst.later_turn_tokens < 2.0
    assert predict(worst, GPU).samples_per_s < predict(half, GPU).samples_per_s
    with pytest.raises(ValueError, match=r"outside 1 .. rollout.max_turns=2"):
        Shape.from_config(two, turns=3)
    config = ["plan", "--config", str(CONFIGS / "qwen3b-1gpu.yaml"), "rollout.max_turns=2", "--throughput"]
    assert main([*config, "--profile", _profile_file(tmp_path, None), "--turns-mean", "1.5"]) == 0
    assert "episodes: 1.5 turns on average of rollout.max_turns=2" in capsys.readouterr().out
    assert main([*config, "--profile", _profile_file(tmp_path, None), "--turns-mean", "3"]) == 2
    assert "--turns-mean" in capsys.readouterr().err


def test_a_profile_fitted_from_episodes_reads_their_measured_turns():
    true = Profile(**{**GPU.__dict__, "rollout": Linear(0.0, 0.5), "reward": Linear(0.0, 0.1)})
    shape = replace(_shape("sync", 4, 1, 1), max_turns=2, later_turn_tokens=0.8)
    runs = [
        (replace(shape, batch_size=b), _lines(replace(shape, batch_size=b, turns=t), true))
        for b, t in ((4, 1.25), (12, 1.75))
    ]
    fitted = fit_profile(runs, cores=None)  # the shapes say max_turns 2; the lines say how many were taken
    for stage in ("rollout", "reward", "learner"):
        got, want = getattr(fitted, stage), getattr(true, stage)
        assert (got.fixed, got.per_unit) == pytest.approx((want.fixed, want.per_unit))


def test_a_profile_that_is_not_one_is_named_with_the_fix(tmp_path):
    bad = tmp_path / "preflight.json"
    bad.write_text(json.dumps({"passed": True, "profile": {"rollout": {"fixed": 1}}}))
    with pytest.raises(ProfileError, match=r"preflight.json: no reward, learner, weight_sync, overhead"):
        Profile.load(bad)
    data = GPU.to_json() | {"reward": {"fixed": -1.0, "per_unit": 0.1}}
    bad.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=r"reward has a negative cost"):
        Profile.load(bad)


def test_gpu_splits_fit_in_the_gpus_and_memory_and_beat_the_written_split():
    cfg = load_config(CONFIGS / "qwen7b-8gpu.yaml")
    written = predict(Shape.from_config(cfg), GPU)
    splits = best_splits(Shape.from_config(cfg), cfg, GPU, 8, learner_fits=lambda ranks: ranks >= 2, top=50)
    assert splits and all(s.gpus <= 8 and s.learner_ranks >= 2 for s in splits)
    rates = [s.prediction.samples_per_s for s in splits]
    assert rates == sorted(rates, reverse=True)
    assert rates[0] >= written.samples_per_s  # the written split (3 / 1 / 4) is one of the candidates
    assert (3, 1, 4) in {(s.rollout_workers, s.reward_workers, s.learner_ranks) for s in splits}


def _profile_file(tmp_path, cores) -> str:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"profile": {**GPU.to_json(), "cores": cores, "source": "test"}}))
    return str(path)


def test_plan_throughput_prints_the_prediction_and_the_splits(tmp_path, capsys):
    demo = str(CONFIGS / "demo.yaml")
    assert main(["plan", "--config", demo, "--throughput", "--profile", _profile_file(tmp_path, 2)]) == 0
    out = capsys.readouterr().out
    assert "samples/s" in out and "bottleneck:" in out and "CPU, 2 shared cores" in out
    qwen = str(CONFIGS / "qwen7b-8gpu.yaml")
    args = ["plan", "--config", qwen, "--throughput", "--profile", _profile_file(tmp_path, 2), "--gpus", "8"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cpu_profile_for_gpu_config"] is True and out["splits"]
    best = out["splits"][0]
    assert best["gpus"] <= 8 and math.isclose(
        best["prediction"]["samples_per_s"], max(s["prediction"]["samples_per_s"] for s in out["splits"])
    )
    assert main(args) == 0
    assert "NOT a GPU figure" in capsys.readouterr().out


def test_plan_throughput_without_a_profile_says_where_to_get_one(capsys):
    assert main(["plan", "--config", str(CONFIGS / "demo.yaml"), "--throughput"]) == 2
    assert "segr1 preflight" in capsys.readouterr().err
