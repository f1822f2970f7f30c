"""Faults change nothing but time, under many of them: an async job run under a seeded schedule of faults on a
`ray.cluster_utils.Cluster` with separate rollout, reward and learner nodes, checked against its invariants and
timed against the same job undisturbed in the same call.

    python bench/chaos.py --steps 300 --faults 24 --seed 0 --out bench/results/chaos_cpu.json
    python bench/chaos.py --steps 12 --faults 5 --seed S --no-baseline ...   # tests/e2e/test_chaos.py's size

The cluster: a head advertising segr1_driver (node health checked every second, a lost node seen in ~10 s),
one learner node, two rollout nodes and two reward nodes with room for one worker each, as the KubeRay
groups of cluster/k8s advertise them; placement disaggregated, both pools of two workers following the cluster's
capacity. The job: async (max_staleness 1), B=4, G=4, the transformers engine, bench/e2e.py's --quick policy, a
checkpoint every 4 steps (a killed learner restarts from the latest one, inside the job).

The faults, drawn with --seed (every kind at least once when --faults allows), each fired once the metrics line of
its step is written (events, never timers: late when firing the one before took longer than the steps between):
- kill_rollout / kill_reward: ray.kill of a live rollout-i / reward-i (an OOM kill, an operator);
- rollout_node / reward_node: a node of that group removed without grace (its raylet and workers killed: a lost
  pod), and a new node added in its place (KubeRay replacing the pod);
- kill_learner: ray.kill of learner-0 (the group restarts from its latest checkpoint).
The run is stopped (request_stop) once --steps lines are written and 2 more since the last fault.

Invariants checked at the end (`problems`; the JSON lists them, the exit status is 1 when there is any): no lost
or failed group, the accounting identity closes, one metrics line per step, every step's staleness within
grpo.max_staleness, no sample trained twice (the data holds more samples than the run trains, so the run stays in
one epoch), every fault fired, and no wait ran past its deadline. The undisturbed run (the same job and seeds on
fresh nodes) gives the time the faults cost: when the line of step --steps appeared, disturbed minus undisturbed
(both from the driver's start), divided by the faults for the cost per fault.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

from e2e import QUICK, bench_config, build_policy  # noqa: E402  (bench/e2e.py: its env, --quick policy, config)
from elastic import _metrics, _wait  # noqa: E402  (bench/elastic.py: metrics.jsonl lines, a polled wait)

KINDS = ("kill_rollout", "kill_reward", "rollout_node", "reward_node", "kill_learner")
NAMESPACE = "segr1-chaos"
BATCH, GROUP = 4, 4
SETTLE = 2  # steps trained after the last fault before the run is stopped
CHECKPOINT_EVERY = 4  # a killed learner restarts from the latest checkpoint: no fault before the first one
UNTIL = 100_000  # grpo.steps: the run is stopped by the bench
OVERRIDES = [
    f"grpo.steps={UNTIL}",
    "grpo.mode=async",
    "grpo.max_staleness=1",
    f"grpo.batch_size={BATCH}",
    f"grpo.group_size={GROUP}",
    "placement.mode=disaggregated",
    f"placement.namespace={NAMESPACE}",
    "placement.capacity_interval_s=0.5",
    "rollout.engine=hf",
    "rollout.num_workers=2",
    "rollout.max_workers=2",
    "reward.num_workers=2",
    "reward.max_workers=2",
    f"checkpoint.every={CHECKPOINT_EVERY}",
    "weight_sync.timeout_s=10",  # a group member on a removed node: not five minutes (docs/scaling.md)
]


def schedule(seed: int, steps: int, faults: int) -> list[tuple[int, str]]:
    """(step, kind) pairs: each kind once per round of len(KINDS), in a seeded order, at distinct seeded steps
    after the first checkpoint (once step CHECKPOINT_EVERY + 1's line is written, its checkpoint is: a killed
    learner has one to restart from) up to steps - 2 (the run goes on after the last)."""
    rng = random.Random(seed)
    kinds: list[str] = []
    while len(kinds) < faults:
        kinds += rng.sample(KINDS, len(KINDS))
    room = range(CHECKPOINT_EVERY + 1, steps - 1)
    if faults > len(room):
        raise SystemExit(
            f"--steps {steps} has room for {len(room)} faults (steps {room.start}..{steps - 2}), not {faults}"
        )
    return list(zip(sorted(rng.sample(room, faults)), kinds[:faults], strict=True))


class Chaos:
    """The cluster's worker nodes by group, and the faults fired at them."""

    def __init__(self, ray, cluster, seed: int):
        self.ray, self.cluster, self.rng = ray, cluster, random.Random(seed + 1)
        self.nodes: dict[str, list] = {"learner": [], "rollout": [], "reward": []}

    def add(self, group: str, count: int = 1) -> None:
        for _ in range(count):
            node = self.cluster.add_node(num_cpus=1, resources={f"segr1_{group}": 1}, include_dashboard=False)
            self.nodes[group].append(node)
        self.cluster.wait_for_nodes()

    def remove_all(self) -> None:
        for group in self.nodes.values():
            while group:
                self.cluster.remove_node(group.pop())

    def fire(self, kind: str) -> str:
        """Do fault `kind`; what it hit (an actor's name, a node id)."""
        if kind.endswith("_node"):
            group = kind.removesuffix("_node")
            victim = self.rng.choice(self.nodes[group])
            self.nodes[group].remove(victim)
            self.cluster.remove_node(victim, allow_graceful=False)
            self.add(group)  # KubeRay's replacement pod
            return f"node {victim.node_id[:12]}"
        prefix = {"kill_rollout": "rollout-", "kill_reward": "reward-", "kill_learner": "learner-0"}[kind]
        name = _wait(lambda: self._live(prefix), 300, f"a live {prefix}* actor to kill")
        try:
            self.ray.kill(self.ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:  # gone between the listing and the kill (its pool is replacing it): still a fault
            pass
        return name

    def _live(self, prefix: str) -> str | None:
        names = sorted(
            a["name"]
            for a in self.ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == NAMESPACE and a["name"].startswith(prefix)
        )
        return self.rng.choice(names) if names else None


def run_once(ray, chaos: Chaos, cfg, steps: int, plan: list[tuple[int, str]], deadline_s: float) -> dict:
    """The job on fresh nodes (grpo.steps far beyond `steps`), each fault of `plan` fired once its step's line
    is written (late when firing the one before took longer than the steps between them), then stopped
    (request_stop: the step in progress finishes) once `steps` lines are written and SETTLE more since the last
    fault. Its summary, lines, what fired, and when the line of step `steps` was first seen (seconds from
    the driver's start: the time the faults cost is read from it)."""
    from cluster.launch import spawn_driver_actor

    chaos.add("learner")
    chaos.add("rollout", 2)
    chaos.add("reward", 2)
    run_dir = Path(cfg.metrics.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # an earlier call's lines would fire the faults at once
    driver = spawn_driver_actor(cfg, progress_bar=False)
    run_ref = driver.run.remote()
    t0, fired, hung, reached_s, error = time.monotonic(), [], False, None, None

    def last_step() -> int:
        if ray.wait([run_ref], timeout=0)[0]:
            ray.get(run_ref)  # the run ended early: raise its error here
            raise RuntimeError(f"the run ended on its own before the chaos did ({cfg.grpo.steps} steps)")
        return max((r["step"] for r in _metrics(run_dir)), default=0)

    def until(step: int, what: str) -> None:
        nonlocal reached_s
        _wait(lambda: last_step() >= step, max(1.0, deadline_s - (time.monotonic() - t0)), what)
        if reached_s is None and last_step() >= steps:
            reached_s = time.monotonic() - t0

    try:
        for step, kind in plan:
            until(step, f"step {step}'s line")
            fired.append({"step": step, "kind": kind, "hit": chaos.fire(kind), "at_line": last_step(),
                          "at_s": round(time.monotonic() - t0, 2)})  # fmt: skip
        until(steps, f"step {steps}'s line")
        until(max([steps, *(f["at_line"] + SETTLE for f in fired)]), "the steps after the last fault")
        ray.get(driver.request_stop.remote(), timeout=60)
        summary = ray.get(run_ref, timeout=max(1.0, deadline_s - (time.monotonic() - t0)))
    except (TimeoutError, ray.exceptions.GetTimeoutError):
        hung, summary = True, {}
    except Exception as err:  # the job failed: reported as a problem, with its error
        error, summary = f"{type(err).__name__}: {err}"[-4000:], {}
    finally:
        try:
            ray.get(driver.close.remote(), timeout=120)
        except Exception as err:  # a hung or failed run: its error is what the caller reports
            print(f"closing the driver: {type(err).__name__}: {err}", file=sys.stderr)
        ray.kill(driver, no_restart=True)
        chaos.remove_all()
    return {
        "summary": summary,
        "rows": _metrics(run_dir),
        "fired": fired,
        "hung": hung,
        "error": error,
        "reached_s": reached_s,
    }


def problems(cfg, run: dict, plan: list) -> list[str]:
    """What broke an invariant of the module docstring; empty when none did."""
    s, rows = run["summary"], run["rows"]
    if run["hung"]:
        return [f"no end before the deadline (last line: step {rows[-1]['step'] if rows else 0})"]
    if run["error"]:
        return [f"the job failed after step {rows[-1]['step'] if rows else 0}: {run['error']}"]
    out = []
    if s["groups_lost"] or s["groups_failed"]:
        out.append(f"groups lost {s['groups_lost']}, failed {s['groups_failed']}")
    parts = ("groups_trained", "groups_dropped_stale", "groups_filtered", "groups_left_over")
    if s["groups_generated"] != sum(s[k] for k in parts):
        out.append("accounting: " + ", ".join(f"{k}={s[k]}" for k in ("groups_generated", *parts)))
    steps = s["steps"]
    if [r["step"] for r in rows] != list(range(1, steps + 1)):
        out.append(f"metrics.jsonl steps {[r['step'] for r in rows]}, not 1..{steps} once each")
    stale = [r["step"] for r in rows if r["staleness_max"] > cfg.grpo.max_staleness]
    if stale:
        out.append(f"steps {stale} trained groups beyond max_staleness {cfg.grpo.max_staleness}")
    twice = sorted(i for i, n in Counter(i for r in rows for i in r["sample_ids"]).items() if n > 1)
    if twice:
        out.append(f"samples trained twice in one epoch: {twice[:10]}")
    if len(run["fired"]) != len(plan):
        out.append(f"{len(run['fired'])} of {len(plan)} faults fired")
    return out


def _cluster():
    from ray.cluster_utils import Cluster

    head = {
        "num_cpus": 0,
        "resources": {"segr1_driver": 1},
        "include_dashboard": False,
        # a lost node is seen in ~10 s, not ~30; 10 missed checks, not 5: a raylet starved for 5 s on a loaded
        # machine (a node starting beside the job) is not a lost node
        "_system_config": {"health_check_period_ms": 1000},
    }
    return Cluster(initialize_head=True, head_node_args=head)


def _data_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="grpo.steps of each run")
    p.add_argument("--faults", type=int, default=24, help="faults in the disturbed run")
    p.add_argument("--seed", type=int, default=0, help="draws the schedule and the targets")
    p.add_argument("--no-baseline", action="store_true", help="skip the undisturbed run (no wall-time cost)")
    p.add_argument(
        "--policy", default=None, help="policy folder (default: bench/e2e.py's --quick SFT policy)"
    )
    p.add_argument("--data", type=Path, default=None, help="training data, (steps + 50) x 4 samples at least")
    p.add_argument("--deadline-s", type=float, default=None, help="per run (default: 600 + 10 s per step)")
    p.add_argument("--work", type=Path, default=None, help="folder for the policy, data and runs")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "chaos_cpu.json")
    args = p.parse_args(argv)
    import ray

    work = args.work or Path(tempfile.mkdtemp(prefix="segr1-chaos-"))
    s = {
        **QUICK,
        "n_train": (args.steps + 50) * BATCH,
    }  # one epoch, with room for the steps after the last fault
    policy, data = (
        (args.policy, args.data) if args.policy and args.data else build_policy(work, s, args.policy)
    )
    data = args.data or data
    if _data_rows(data) < s["n_train"]:  # a second epoch would train samples twice, rightly
        raise SystemExit(f"--data {data}: {_data_rows(data)} samples; {args.steps} steps need {s['n_train']}")
    plan = schedule(args.seed, args.steps, args.faults)
    deadline_s = args.deadline_s or 600 + 10 * args.steps  # a hang guard: a loaded machine starts jobs slowly
    cluster = _cluster()
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    runs = {}
    try:
        chaos = Chaos(ray, cluster, args.seed)
        legs = [("disturbed", plan)] + ([] if args.no_baseline else [("undisturbed", [])])
        for name, faults in legs:
            more = [
                f"seed={args.seed}",
                f"learner.max_restarts={args.faults}",
            ]  # one per learner kill at most
            cfg = bench_config(Path(policy), data, work / name, s, [*OVERRIDES, *more])
            runs[name] = {**run_once(ray, chaos, cfg, args.steps, faults, deadline_s), "problems": []}
            runs[name]["problems"] = problems(cfg, runs[name], faults)
    finally:
        ray.shutdown()
        cluster.shutdown()
    result = _report(args, plan, runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 1 if any(r["problems"] for r in runs.values()) else 0


def _report(args, plan, runs: dict) -> dict:
    """The JSON: per run its wall time, restarts, accounting and problems; the cost per fault."""
    out = {"steps": args.steps, "faults": args.faults, "seed": args.seed, "plan": plan}
    for name, run in runs.items():
        s = run["summary"]
        keys = ("wall_s", "actor_restarts", "learner_restarts", "groups_generated", "groups_trained",
                "groups_dropped_stale", "groups_left_over", "groups_replayed", "groups_rewound", "groups_lost")  # fmt: skip
        out[name] = {**{k: s.get(k) for k in ("steps", *keys)}, "reached_s": run["reached_s"], "fired": run["fired"],
                     "problems": run["problems"]}  # fmt: skip
        print(f"{name}: step {args.steps} after {run['reached_s'] or float('nan'):.1f} s, {s.get('steps')} steps, "
              f"{len(run['fired'])} faults, problems: {run['problems'] or 'none'}")  # fmt: skip
    if "undisturbed" in runs and runs["disturbed"]["reached_s"] and runs["undisturbed"]["reached_s"]:
        lost = runs["disturbed"]["reached_s"] - runs["undisturbed"]["reached_s"]
        out.update(
            lost_s=round(lost, 1), per_fault_s=round(lost / max(1, len(runs["disturbed"]["fired"])), 2)
        )
        print(f"the faults cost {lost:.1f} s in all, {out['per_fault_s']} s each")
    out.update(load_average=os.getloadavg(), cpus=os.cpu_count())
    return out


if __name__ == "__main__":
    sys.exit(main())
