"""Benchmark: learner steps/s of 1 vs 2 learner ranks (FSDP2 over gloo, real processes, no Ray) for the SAME
global batch on the tiny policy, measured side by side in one run; scaling efficiency = (sps_2 / sps_1) / 2.

    .venv/bin/python bench/learner_scaling.py [--quick] --out bench/results/learner_scaling_cpu.json

Each rank is one process with --threads-per-rank torch threads (1 by default: a rank is one core here as it is
one GPU on a GPU cluster). samples/s counts completions trained per second (groups x G), the median over --steps
timed steps after one warm-up step. On a machine with fewer free cores than ranks x threads the 2-rank figure
is bounded by the cores, not by the learner: the JSON records the core count and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.multiprocessing as tmp  # noqa: E402


def _cfg(policy_dir: str, micro_batch_size: int):
    from cluster.config import TrainConfig

    return TrainConfig.model_validate(
        {
            "model": {"policy": policy_dir},
            "prompt": {"preset": "compact"},
            "data": {"image_size": 56},
            "rollout": {"sampling": {"temperature": 1.0, "max_tokens": 48}},
            "grpo": {"group_size": 4, "beta": 0.04},
            "learner": {"lr": 1e-5, "micro_batch_size": micro_batch_size},
            "checkpoint": {"dir": str(Path(policy_dir).parent / "ckpt")},
        }
    )


def _batch(policy_dir: str, groups: int, seed: int):
    from cluster.data.synth import generate_samples
    from learner.learner import Learner
    from tests.support.synthetic import scored_groups

    learner = Learner(_cfg(policy_dir, 8).learner_spec())
    samples = list(generate_samples(groups, seed=seed, size=64))
    return samples, scored_groups(learner.policy, samples, group_size=4, seed=seed, max_tokens=40)


def _rank(rank: int, world: int, port: int, args: dict, batch, out: str) -> None:
    from learner.learner import Learner

    torch.set_num_threads(args["threads"])
    init = f"tcp://127.0.0.1:{port}" if world > 1 else None
    learner = Learner(_cfg(args["policy"], args["micro_batch_size"]).learner_spec(), rank, world, init)
    samples, groups = batch
    times = []
    for k in range(args["steps"] + 1):
        t0 = time.perf_counter()
        stats = learner.step(groups, *samples)
        if k > 0:  # the first step warms up (allocations, FSDP2 lazy init)
            times.append(time.perf_counter() - t0)
    if rank == 0:
        body = {"step_s": times, "loss": stats.loss, "completions": stats.num_completions}
        Path(out).write_text(json.dumps(body))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world: int, args: dict, batch, work: Path) -> dict:
    out = work / f"ranks{world}.json"
    tmp.spawn(_rank, args=(world, _free_port(), args, batch, str(out)), nprocs=world, join=True)
    r = json.loads(out.read_text())
    step_s = statistics.median(r["step_s"])
    return {"ranks": world, "step_s": step_s, "samples_per_s": r["completions"] / step_s, "loss": r["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="2 timed steps of 4 groups (default: 4 steps, 8 groups)"
    )
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--groups", type=int, default=None, help="groups per batch (G=4 completions each)")
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--threads-per-rank", type=int, default=1)
    ap.add_argument("--out", default="bench/results/learner_scaling_cpu.json")
    a = ap.parse_args()
    from cluster.dev.tiny_models import build_tiny_policy

    steps = a.steps or (2 if a.quick else 4)
    groups = a.groups or (4 if a.quick else 8)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        policy = str(build_tiny_policy(work / "policy", seed=0, preset="test"))
        args = {"policy": policy, "steps": steps, "threads": a.threads_per_rank}
        args["micro_batch_size"] = a.micro_batch_size
        batch = _batch(policy, groups, seed=0)
        runs = [measure(w, args, batch, work) for w in (1, 2)]
    sps1, sps2 = runs[0]["samples_per_s"], runs[1]["samples_per_s"]
    result = {
        "benchmark": "learner_scaling",
        "policy": "tiny Qwen2.5-VL (test preset), float32, gloo",
        "global_batch": {"groups": groups, "group_size": 4, "completions": groups * 4},
        "micro_batch_size": a.micro_batch_size,
        "threads_per_rank": a.threads_per_rank,
        "timed_steps": steps,
        "runs": runs,
        "speedup_2_over_1": sps2 / sps1,
        "scaling_efficiency": (sps2 / sps1) / 2,
        "loss_1_vs_2": [runs[0]["loss"], runs[1]["loss"]],
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
