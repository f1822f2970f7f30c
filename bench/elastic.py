"""Elastic pools on a multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`, each node advertising
what its KubeRay group advertises; disaggregated placement; docs/scaling.md), measured in one script run:

    python bench/elastic.py --out bench/results/elastic_cpu.json

- phases: one async job whose rollout pool follows the cluster: 1 rollout node, then a second rollout node added
  (the pool grows to 2 workers), then that node removed (back to 1). samples/s of each phase = groups trained /
  the sum of metrics.jsonl step_s over the steps of that phase (the steps across a change are left out).
- node_removal: the same job with 2 rollout nodes from the start, twice: undisturbed, and with one rollout node
  removed after `--remove-at` steps. The time lost = wall of the disturbed run - wall of the undisturbed one.

The policy and data are bench/e2e.py's --quick ones (the 0.2M-parameter test preset after a short SFT). Every
process shares the machine's cores with whatever else runs: the JSON records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

from e2e import QUICK, bench_config, build_policy  # noqa: E402  (bench/e2e.py: its env, --quick policy, config)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)
    return value


class Bench:
    def __init__(self, work: Path, steps: int):
        import ray
        from ray.cluster_utils import Cluster

        self.ray, self.work, self.steps = ray, work, steps
        self.policy, self.data = build_policy(work, QUICK, None)
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 0, "resources": {"segr1_driver": 1}, "include_dashboard": False},
        )
        self.add(segr1_learner=1)
        self.add(segr1_reward=1)
        ray.init(address=self.cluster.address, namespace="segr1-bench", log_to_driver=False)

    def add(self, **resources):
        return self.cluster.add_node(num_cpus=1, resources=resources, include_dashboard=False)

    def config(self, name: str, *overrides: str):
        s = {**QUICK, "steps": self.steps}
        return bench_config(self.policy, self.data, self.work / name, s, [
            "grpo.mode=async", "placement.mode=disaggregated", "placement.namespace=segr1-bench",
            "placement.capacity_interval_s=0.5", "rollout.max_workers=2", "reward.num_workers=1", *overrides,
        ])  # fmt: skip

    def start(self, cfg):
        from cluster.launch import spawn_driver_actor

        driver = spawn_driver_actor(cfg)
        return driver, driver.run.remote()

    def finish(self, driver, run_ref) -> dict:
        summary = self.ray.get(run_ref, timeout=1800)
        self.ray.get(driver.close.remote(), timeout=120)
        self.ray.kill(driver, no_restart=True)
        assert summary["groups_lost"] == 0 and summary["steps"] == self.steps, summary
        return summary

    def phases(self, per_phase: int) -> dict:
        """1 -> 2 -> 1 rollout workers, the pool following a rollout node added, then removed."""
        first = self.add(segr1_rollout=1)
        cfg = self.config("phases", "rollout.num_workers=1")
        run_dir = Path(cfg.metrics.run_dir)
        driver, run_ref = self.start(cfg)
        _wait(lambda: len(_metrics(run_dir)) >= per_phase, 600, "phase 1")
        second = self.add(segr1_rollout=1)
        grown = _wait(lambda: _first(run_dir, 2), 600, "2 rollout workers")
        _wait(lambda: len(_metrics(run_dir)) >= grown + per_phase, 600, "phase 2")
        self.cluster.remove_node(second)
        _wait(lambda: _first(run_dir, 1, after=grown), 900, "back to 1 rollout worker")
        summary = self.finish(driver, run_ref)
        self.cluster.remove_node(first)
        rows = _metrics(run_dir)
        return {"phases": _phase_figures(rows), "summary_wall_s": round(summary["wall_s"], 1)}

    def node_removal(self, remove_at: int) -> dict:
        """Wall of a 2-rollout-node run with one node removed after `remove_at` steps minus an undisturbed one."""
        out = {}
        for name in ("undisturbed", "removal"):
            nodes = [self.add(segr1_rollout=1), self.add(segr1_rollout=1)]
            cfg = self.config(f"removal-{name}", "rollout.num_workers=2")
            driver, run_ref = self.start(cfg)
            if name == "removal":
                run_dir = Path(cfg.metrics.run_dir)
                _wait(lambda d=run_dir: len(_metrics(d)) >= remove_at, 600, f"step {remove_at}")
                self.cluster.remove_node(nodes.pop())
            summary = self.finish(driver, run_ref)
            out[name] = {"wall_s": round(summary["wall_s"], 1), "actor_restarts": summary["actor_restarts"]}
            for node in nodes:
                self.cluster.remove_node(node)
        out["lost_s"] = round(out["removal"]["wall_s"] - out["undisturbed"]["wall_s"], 1)
        return out

    def close(self) -> None:
        self.ray.shutdown()
        self.cluster.shutdown()


def _first(run_dir: Path, workers: int, after: int = 0) -> int:
    """Number of metrics lines up to the first step (after line `after`) run with `workers` rollout workers."""
    for i, row in enumerate(_metrics(run_dir)):
        if i >= after and row.get("rollout_workers") == workers:
            return i + 1
    return 0


def _phase_figures(rows: list[dict]) -> list[dict]:
    """Consecutive steps with the same rollout pool size, the first step of each (the change) left out."""
    phases: list[list[dict]] = []
    for row in rows:
        if not phases or phases[-1][0]["rollout_workers"] != row["rollout_workers"]:
            phases.append([row])
        else:
            phases[-1].append(row)
    out = []
    for phase in phases:
        timed = phase[1:] or phase
        seconds = sum(r["step_s"] for r in timed)
        groups = sum(r["groups"] for r in timed)
        out.append({
            "rollout_workers": phase[0]["rollout_workers"], "steps": [phase[0]["step"], phase[-1]["step"]],
            "samples_per_s": round(groups / seconds, 3) if seconds else None,
            "step_s_mean": round(seconds / len(timed), 3),
        })  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "elastic_cpu.json")
    p.add_argument("--per-phase", type=int, default=8, help="steps measured in each phase")
    p.add_argument("--steps", type=int, default=36, help="grpo.steps of every run")
    p.add_argument("--remove-at", type=int, default=6, help="node_removal: step after which a node goes")
    p.add_argument("--work", type=Path, default=None, help="folder for the policy, data and runs (cached)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="segr1-elastic-"))
    bench = Bench(work, args.steps)
    try:
        result = {"phases": bench.phases(args.per_phase), "node_removal": bench.node_removal(args.remove_at)}
    finally:
        bench.close()
    result.update(
        steps=args.steps, per_phase=args.per_phase, load_average=os.getloadavg(), cpus=os.cpu_count(),
        config="bench/e2e.py --quick policy, async, B=8 G=8, disaggregated on ray.cluster_utils.Cluster",
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for phase in result["phases"]["phases"]:
        print(
            f"{phase['rollout_workers']} rollout worker(s), steps {phase['steps']}: {phase['samples_per_s']} samples/s"
        )
    nr = result["node_removal"]
    print(f"rollout node removal: {nr['removal']['wall_s']} s vs {nr['undisturbed']['wall_s']} s undisturbed, "
          f"{nr['lost_s']} s lost")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
