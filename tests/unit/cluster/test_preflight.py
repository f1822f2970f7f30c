"""`segr1 preflight`'s report and checks without a job (cluster/commands/preflight.py, cluster/preflight.py): the
table and preflight.json built from a hand-made job result beside the real plan of the demo config, the
preflight's overrides, the model files it needs, and the one-line cause of a remote failure. The job itself runs
in tests/e2e/test_preflight.py."""

from __future__ import annotations

import argparse
import os
import shutil

import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from cluster.commands.common import CommandError
from cluster.commands.preflight import (
    build_report,
    format_report,
    masks_per_s,
    preflight_overrides,
    weight_sync_figures,
)
from cluster.config import load_config
from cluster.plan.report import build_plan
from cluster.preflight import describe, model_file_problems
from tests.support.paths import REPO

DEMO = REPO / "cluster" / "configs" / "demo.yaml"


def _step(step: int, tokens: int, generate_s: float, score_s: float, learner_s: float) -> dict:
    return {
        "step": step,
        "learner_s": learner_s,
        "generate_s": generate_s,
        "score_s": score_s,
        "weight_sync_s": 0.25,
        "step_s": generate_s + score_s + learner_s + 0.5,
        "groups": 2,
        "by_rollout_worker": {"rollout-0": {"tokens": tokens, "policy_version": step - 1}},
    }


def _result() -> dict:
    mem = lambda pool, actor, peak: {"pool": pool, "actor": actor, "device": "cpu", "peak_bytes": peak}  # noqa: E731
    return {
        "summary": {"groups_lost": 0},
        "weight_syncs": [
            {"step": 1, "backend": "gloo", "seconds": 0.5},
            {"step": 2, "backend": "gloo", "seconds": 0.25},
            {"step": 3, "backend": "object-store", "seconds": 2.0},
        ],
        "memory": [
            mem("rollout", "rollout-0", 3e9),
            mem("reward", "reward-0", 1e9),
            mem("learner", "learner-0", 2e9),
        ],
        "metrics": [
            _step(1, 300, 1.0, 0.5, 2.0),
            {"step": 1, "val/reward_total": 0.5},  # a validation line: not a step
            _step(2, 100, 1.0, 0.5, 4.0),
        ],
    }


def test_report_puts_each_actor_beside_its_pools_plan_and_computes_the_rates(tiny_policy_dir):
    cfg = load_config(DEMO, [f"model.policy={tiny_policy_dir}", "grpo.group_size=4"])
    plan = build_plan(cfg)
    report = build_report(cfg, _result(), plan)
    planned = {p.pool: p.total for p in plan.pools}
    assert [(m["actor"], m["plan_bytes"]) for m in report["memory"]] == [
        ("rollout-0", planned["rollout"]),
        ("reward-0", planned["reward"]),
        ("learner-0", planned["learner"]),
    ]
    assert report["steps"] == 2
    assert report["rollout_tokens_per_s"] == pytest.approx(400 / 2.0)
    assert report["reward_masks_per_s"] == pytest.approx(
        2 * 2 * 4 / 1.0
    )  # groups x G over the scoring seconds
    assert report["learner_s_per_step"] == pytest.approx(3.0)
    table = format_report(report).splitlines()
    assert table[0] == "preflight passed: 2 steps (sync) with dummy weights"
    rows = {tuple(line.split()[:2]) for line in table[2:]}
    assert {("rollout", "rollout-0"), ("reward", "reward-0"), ("learner", "learner-0")} <= rows
    assert {("weight", "sync"), ("rollout", "all"), ("reward", "all"), ("learner", "all")} <= rows
    assert "3.00 GB (RSS)" in table[2] and "200.0 tokens/s" in "\n".join(table)
    assert build_report(cfg, _result(), None)["memory"][0]["plan_bytes"] is None  # no plan: n/a
    # the throughput profile of the steps after the first: B=8 over 2 rollout workers, calls of 4 prompts
    profile = report["profile"]
    assert profile["rollout"] == {"fixed": 0.0, "per_unit": 0.25} and profile["learner"]["per_unit"] == 0.5
    assert profile["cores"] == os.cpu_count()  # a CPU config: its processes share this machine's cores


def test_masks_per_s_counts_every_turn_of_an_episode():
    one = {"groups": 4, "score_s": 2.0}
    assert masks_per_s([one, one], group_size=8) == 16.0  # 64 masks in 4 s
    # two-turn episodes: score_s holds both turns' scoring, and 1.5 turns each scored 1.5 masks a completion
    assert masks_per_s([{**one, "episode_turns_mean": 1.5}], group_size=8) == 24.0


def test_weight_sync_figures_per_transport():
    figures = weight_sync_figures(_result()["weight_syncs"])
    assert figures["gloo"] == {"publishes": 2, "first_s": 0.5, "mean_s": 0.375, "max_s": 0.5}
    assert figures["object-store"]["publishes"] == 1


def test_overrides_add_dummy_weights_steps_and_a_run_folder_of_its_own():
    args = argparse.Namespace(steps=3, out=None, overrides=["rollout.num_workers=4"])
    got = preflight_overrides(args, "runs/x")
    assert got[0] == "rollout.num_workers=4" and "model.dummy_weights=true" in got and "grpo.steps=3" in got
    cfg = load_config(DEMO, got)
    assert cfg.metrics.run_dir == "runs/x/preflight" and cfg.metrics.trackers == ["jsonl"]
    assert cfg.policy_spec().dummy_weights is True
    with pytest.raises(CommandError, match="--steps 0"):
        preflight_overrides(argparse.Namespace(steps=0, out=None, overrides=[]), "runs/x")


def test_model_files_named_when_missing(tiny_policy_dir, tmp_path):
    ok = load_config(DEMO, [f"model.policy={tiny_policy_dir}"])
    assert model_file_problems(ok) == []
    lacking = tmp_path / "policy"
    shutil.copytree(tiny_policy_dir, lacking, ignore=shutil.ignore_patterns("tokenizer*", "*.safetensors"))
    problems = model_file_problems(load_config(DEMO, [f"model.policy={lacking}"]))
    assert len(problems) == 1 and "tokenizer_config.json" in problems[0] and "tokenizer.json" in problems[0]
    missing = model_file_problems(load_config(DEMO, [f"model.policy={tmp_path / 'nowhere'}"]))
    assert missing == [f"model.policy={tmp_path / 'nowhere'}: no such folder"]
    assert model_file_problems(load_config(DEMO, ["model.policy=Qwen/Qwen2.5-VL-3B-Instruct"])) == []


def _remote_error(exc: BaseException) -> RayTaskError:
    try:
        raise exc
    except type(exc) as err:
        import traceback

        return RayTaskError("RolloutWorker.__init__", traceback.format_exc(), err)


def test_describe_gives_the_remote_cause_in_one_line():
    task = _remote_error(ValueError("max_model_len 10 is too long"))
    assert describe(task) == "ValueError: max_model_len 10 is too long"
    died = ActorDiedError(cause=_remote_error(FileNotFoundError("/x/config.json not found")))
    assert describe(died) == "FileNotFoundError: /x/config.json not found"
    assert describe(RuntimeError("two\nlines")) == "RuntimeError: two lines"


def test_actors_packed_on_one_gpu_are_added_up_beside_the_plans_gpu():
    cfg = load_config(REPO / "cluster" / "configs" / "qwen3b-1gpu.yaml")  # learner, rollout, reward: one GPU
    plan = build_plan(cfg)
    gpu = lambda pool, actor, peak: {  # noqa: E731
        "pool": pool,
        "actor": actor,
        "device": "cuda",
        "measure": "torch max_memory_allocated",
        "gpus": "0",
        "node": "n",
        "peak_bytes": peak,
    }
    result = {
        **_result(),
        "memory": [
            gpu("learner", "learner-0", 20e9),
            gpu("rollout", "rollout-0", 18e9),
            gpu("reward", "reward-0", 2e9),
        ],
    }
    report = build_report(cfg, result, plan)
    assert report["shared_gpus"] == [
        {
            "actors": ["learner-0", "rollout-0", "reward-0"],
            "peak_bytes": 40e9,
            "plan_bytes": plan.gpus[0].bytes,
        }
    ]
    table = format_report(report)
    assert "learner-0+rollout-0+reward-0" in table and "40.00 GB" in table and "20.00 GB (GPU)" in table
    result["memory"][1]["peak_bytes"] = None  # an engine core in a child process without NVML: not measured
    assert build_report(cfg, result, plan)["shared_gpus"][0]["peak_bytes"] is None


def test_train_refuses_dummy_weights(capsys):
    from cluster.cli import main

    assert main(["train", "--config", str(DEMO), "model.dummy_weights=true"]) == 2
    assert "segr1 preflight" in capsys.readouterr().err


def test_the_demo_configs_tiny_models_and_data_are_built_where_missing(tmp_path, monkeypatch):
    """A fresh clone has no runs/: `segr1 preflight --config cluster/configs/demo.yaml` builds what the demo would
    (tiny policy, synthetic sets) and then finds every model file; another config is never touched."""
    from cluster.commands import preflight

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(preflight, "DEMO_TRAIN", 8)
    monkeypatch.setattr(preflight, "DEMO_EVAL", 4)
    demo = load_config(REPO / "cluster" / "configs" / "demo.yaml")
    assert model_file_problems(demo)  # nothing under runs/ yet
    assert preflight.build_demo_assets(demo)
    assert model_file_problems(demo) == []
    assert (tmp_path / "runs" / "data" / "eval").is_dir()
    assert not preflight.build_demo_assets(demo)  # built once
    other = load_config(REPO / "cluster" / "configs" / "demo.yaml", ["model.policy=elsewhere/policy"])
    assert not preflight.build_demo_assets(other) and not (tmp_path / "elsewhere").exists()
