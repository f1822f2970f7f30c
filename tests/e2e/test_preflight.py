"""`segr1 preflight` end to end on the tiny models (cluster/commands/preflight.py, cluster/preflight.py): the demo
config's job with dummy weights from a policy folder that holds no weights passes, prints its table and writes
preflight.json; an engine that cannot start fails the command at stage "engine start", in one message. Both run
in this process on the session's Ray (the second fails within its engine's start)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cluster.cli import main
from tests.e2e.conftest import DEMO_CONFIG, e2e_overrides


@pytest.fixture(scope="module")
def weightless_policy(assets, tmp_path_factory) -> Path:
    """The session's tiny policy without its weights: config, tokenizer and processor files only."""
    out = tmp_path_factory.mktemp("weightless") / "policy"
    shutil.copytree(assets.policy, out, ignore=shutil.ignore_patterns("*.safetensors"))
    assert not list(out.glob("*.safetensors")) and (out / "config.json").is_file()
    return out


def _preflight(assets, policy: Path, out: Path, *extra: str) -> int:
    args = e2e_overrides(assets, out / "run", policy)
    return main(["preflight", "--config", str(DEMO_CONFIG), "--steps", "2", "--out", str(out), *args, *extra])


def test_preflight_passes_and_reports(assets, weightless_policy, ray_job, tmp_path, capsys):
    assert _preflight(assets, weightless_policy, tmp_path) == 0
    printed = capsys.readouterr().out
    assert "preflight passed: 2 steps" in printed and "tokens/s" in printed and "masks/s" in printed
    report = json.loads((tmp_path / "preflight.json").read_text())
    assert report["passed"] is True and report["steps"] == 2
    assert report["rollout_tokens_per_s"] > 0
    assert report["reward_masks_per_s"] > 0
    assert report["learner_s_per_step"] > 0
    gloo = report["weight_sync"]["gloo"]  # the CPU learner's transport, never the object-store fallback
    assert gloo["publishes"] == 2 and gloo["first_s"] > 0
    pools = {m["pool"]: m for m in report["memory"]}
    assert set(pools) == {"rollout", "reward", "learner"}
    for m in pools.values():
        assert m["device"] == "cpu" and m["peak_bytes"] > 0 and m["plan_bytes"] is not None
        assert f"{m['peak_bytes'] / 1e9:.2f} GB" in printed
    assert report["summary"]["groups_lost"] == 0
    assert (tmp_path / "metrics.jsonl").is_file()
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))  # random weights are never saved


def test_preflight_names_the_engine_start_that_failed(assets, weightless_policy, ray_job, tmp_path, capsys):
    # beyond the tiny policy's max_position_embeddings (4096): vLLM refuses to build the engine
    assert _preflight(assets, weightless_policy, tmp_path, "rollout.max_model_len=1000000") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("segr1 preflight: stage 'engine start' failed: rollout-0: ")
    assert "max_model_len" in err and "Traceback" not in err
    report = json.loads((tmp_path / "preflight.json").read_text())
    assert report["passed"] is False and report["stage"] == "engine start"
