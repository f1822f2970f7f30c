"""The chaos run of bench/chaos.py at the suite's size: an async job on a `ray.cluster_utils.Cluster` (its own
process: a head, a learner node, two rollout and two reward nodes, placement disaggregated, the pools following the
cluster) under a seeded schedule of five faults, one of each kind, each fired once its step's metrics line is
written: a rollout actor and a reward actor killed, a rollout node and a reward node lost without grace (and
replaced, as KubeRay replaces a pod), the learner killed (the group restarts from its checkpoint inside the job).

Checked at the end (bench/chaos.py `problems`, plus what every e2e run checks): no lost or failed group, the
accounting identity closed, one complete metrics line per step, every step's staleness within bound, no sample
trained twice, every fault fired, no hang (each wait has a deadline). The seed is drawn anew at every run, so each
suite run plays another schedule; SEGR1_CHAOS_SEED=N replays one, and a failure names its seed. The wall-time cost
per fault is bench/chaos.py's figure (docs/benchmarks.md), not a test's."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO, assert_accounting, assert_metric_lines, read_metrics, read_summary

pytestmark = pytest.mark.slow

STEPS, FAULTS = 12, 5  # five faults, one of each kind; the bench writes data for one epoch (248 samples)


def test_an_async_job_under_a_seeded_schedule_of_faults_keeps_every_invariant(sft_policy, tmp_path):
    seed = int(os.environ.get("SEGR1_CHAOS_SEED") or random.SystemRandom().randrange(100_000))
    out = tmp_path / "chaos.json"
    cmd = [
        sys.executable, "bench/chaos.py", "--steps", str(STEPS), "--faults", str(FAULTS), "--seed", str(seed),
        "--no-baseline", "--policy", str(sft_policy), "--work", str(tmp_path), "--out", str(out),
    ]  # fmt: skip
    # its own cluster in its own process, not the session's Ray
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    replay = f"SEGR1_CHAOS_SEED={seed}"
    assert out.is_file(), f"{replay}: bench/chaos.py wrote no result\n{proc.stderr[-6000:]}"
    run = json.loads(out.read_text())["disturbed"]
    assert run["problems"] == [], (replay, run["problems"], run["fired"])
    assert proc.returncode == 0, (replay, proc.stderr[-4000:])
    assert len({f["kind"] for f in run["fired"]}) == FAULTS, (replay, run["fired"])  # each kind once
    assert run["learner_restarts"] == 1 and run["actor_restarts"] >= 2, (replay, run)
    summary = read_summary(tmp_path / "disturbed")
    assert_accounting(summary)
    assert summary["stopped_early"] and summary["steps"] >= STEPS, (replay, summary)
    assert_metric_lines(read_metrics(tmp_path / "disturbed"), summary["steps"])
