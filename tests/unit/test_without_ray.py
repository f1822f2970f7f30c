"""The worker modules import, and the plain worker classes run, with Ray not installed (the GPU machine has no
Ray). A subprocess hides `ray` and `ray.*` behind a meta-path finder, imports every module of protos, runtime,
actors, reward_service and learner, scores one group with RewardWorker and takes one Learner step on a tiny
policy; no ray module may be loaded at the end."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.paths import REPO

SCRIPT = r"""
import importlib, importlib.abc, json, pkgutil, sys

class HideRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None

sys.meta_path.insert(0, HideRay())
try:
    import ray  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("ray was importable although hidden")

imported = []
for top in ("protos", "runtime", "actors", "reward_service", "learner"):
    package = importlib.import_module(top)
    imported.append(top)
    for info in pkgutil.walk_packages(package.__path__, top + "."):
        importlib.import_module(info.name)
        imported.append(info.name)

from cluster.config import TrainConfig
from cluster.data.synth import generate_item
from learner.learner import Learner
from tests.support.synthetic import scored_groups
from protos import Completion, RolloutGroup
from protos.answer import format_answer
from reward_service.worker import RewardWorker

item = generate_item(0, 0, kind="single", size=64)
texts = [format_answer([[8, 8, 40 + k, 40 + k]], [[24, 24]], [1], "the shape") for k in range(3)] + ["no answer"]
group = RolloutGroup(
    group_id="g0", sample_id=item.sample.id, policy_version=0, temperature=1.0, max_tokens=64,
    prompt_token_ids=[1, 2, 3], completions=[Completion(text=t, token_ids=[1], logprobs=[-0.1]) for t in texts],
)
cfg = TrainConfig.model_validate({
    "model": {"policy": sys.argv[1]}, "data": {"image_size": 64}, "grpo": {"group_size": 4, "beta": 0.0},
    "learner": {"lr": 1e-3, "micro_batch_size": 4},
})
scores = RewardWorker(cfg.policy_spec(), cfg.reward, name="no-ray").score([group], item.sample)[0]
learner = Learner(cfg.learner_spec())
groups = scored_groups(learner.policy, [item.sample], group_size=4, seed=0, max_tokens=24)
stats = learner.step(groups, item.sample)
print(json.dumps({
    "imported": imported,
    "ray_modules": sorted(n for n in sys.modules if n == "ray" or n.startswith("ray.")),
    "parse_ok": [s.parse_ok for s in scores.scores],
    "totals": [s.rewards.total for s in scores.scores],
    "policy_version": stats.policy_version,
    "grad_norm": stats.grad_norm,
}))
"""


def test_workers_import_and_run_without_ray(tmp_path):
    from cluster.dev.tiny_models import build_tiny_policy

    policy = build_tiny_policy(tmp_path / "policy", seed=0)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(policy)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["ray_modules"] == []
    for module in (
        "protos",
        "actors.worker",
        "reward_service.worker",
        "reward_service.predictor",
        "learner.learner",
    ):
        assert module in out["imported"]
    assert {"runtime.metrics", "runtime.weights.cuda_ipc", "runtime.weights.collective"} <= set(
        out["imported"]
    )
    assert out["parse_ok"] == [True, True, True, False]
    assert out["totals"][3] == 0.0 and all(t >= 1.0 for t in out["totals"][:3])  # format reward earned
    assert out["policy_version"] == 1 and out["grad_norm"] > 0
