"""The throughput model (cluster/plan/throughput.py) against measured runs it did not see, on a
`ray.cluster_utils.Cluster` with a node per actor (disaggregated placement, like the KubeRay groups).

    python bench/plan_validation.py --out bench/results/plan_validation_cpu.json [--engine vllm] [--steps 14]
    python bench/plan_validation.py --turns 2 --out bench/results/plan_validation_2turn_cpu.json

1. Profile: four runs with one rollout and one reward worker (sync and async, B = 4 and 12): the stage lines and
   each mode's overhead are fitted from their metrics.jsonl lines (cluster/plan/profile.py), as `segr1 preflight`
   fits them on the cluster a job will run on.
2. Validation: seven other configurations (sync / async, 1 or 2 rollout workers, 1 or 2 reward workers, B = 8 or
   16), each predicted from the profile and then run. Measured samples/s: the groups trained after the warm-up
   steps over their `step_s`; the measured bottleneck: the pool whose workers wait least (busy share of a step:
   rollout generate_s x calls / R, reward score_s / W, learner learner_s + weight_sync_s).
With --turns 2 the validation runs are four configurations of episodes of two turns (rollout.max_turns=2) of a
policy taught the refine turn (bench/e2e.py's SFT with turns=2). The profile runs are made twice, at two turns (what
`segr1 preflight` of such a config measures) and at one; each validation run is predicted from both profiles with
the turns its episodes measured (`episode_turns_mean`; the model's turn terms, docs/scaling.md), and at
rollout.max_turns (every episode taking every turn, the planner's default).
The policy and data are bench/e2e.py's --quick ones (the 0.2M-parameter SFT'd policy, 56-px images). Every node
advertises one CPU; they all share this machine's cores, which the CPU profile's `cores` term models.
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

from chaos import _cluster  # noqa: E402  (bench/chaos.py: the head node, no CPU for actors)
from e2e import QUICK, bench_config, build_policy  # noqa: E402  (bench/e2e.py: its env, policy, config)

NAMESPACE = "segr1-plan"
GROUP = 4
PROFILE_RUNS = [("sync", 4, 1, 1), ("sync", 12, 1, 1), ("async", 4, 1, 1), ("async", 12, 1, 1)]
VALIDATION_RUNS = [
    ("sync", 8, 2, 2),
    ("sync", 16, 1, 2),
    ("sync", 16, 2, 1),
    ("async", 8, 2, 2),
    ("async", 16, 1, 1),
    ("async", 16, 2, 1),
    ("async", 8, 1, 2),
]
TURN_RUNS = [("sync", 8, 1, 1), ("sync", 8, 2, 2), ("async", 8, 1, 1), ("async", 16, 2, 1)]


def run_config(
    ray, cluster, policy, data, work: Path, s: dict, run: tuple, engine: str, steps: int, turns: int = 1
) -> dict:
    """One job on fresh nodes: a learner node, R rollout and W reward nodes; its summary and metrics lines."""
    from cluster.launch import spawn_driver_actor, stop_driver

    mode, batch, rollout, reward = run
    nodes = [cluster.add_node(num_cpus=1, resources={"segr1_learner": 1}, include_dashboard=False)]
    for group, count in (("rollout", rollout), ("reward", reward)):
        nodes += [
            cluster.add_node(num_cpus=1, resources={f"segr1_{group}": 1}, include_dashboard=False)
            for _ in range(count)
        ]
    cluster.wait_for_nodes()
    name = _name(run, turns)
    overrides = [
        f"grpo.mode={mode}",
        f"grpo.batch_size={batch}",
        f"grpo.group_size={GROUP}",
        f"grpo.steps={steps}",
        "grpo.max_staleness=1",
        "placement.mode=disaggregated",
        f"placement.namespace={NAMESPACE}",
        f"rollout.engine={engine}",
        f"rollout.num_workers={rollout}",
        "rollout.max_batch_groups=32",  # a step's prompts in one call per rollout worker
        f"reward.num_workers={reward}",
        "rollout.resources={num_cpus: 1}",
        "reward.resources={num_cpus: 1}",
        "learner.resources={num_cpus: 1}",
        f"rollout.max_turns={turns}",
    ]
    cfg = bench_config(Path(policy), data, work / name, s, overrides)
    t0 = time.perf_counter()
    driver = spawn_driver_actor(cfg, progress_bar=False)
    try:
        summary = ray.get(driver.run.remote())
    finally:
        stop_driver(driver)  # its pools and learner, then the driver: the next run's `driver` takes its name
        for node in nodes:
            cluster.remove_node(node)
    lines = [
        json.loads(x) for x in (Path(cfg.metrics.run_dir) / "metrics.jsonl").read_text().splitlines() if x
    ]
    return {"cfg": cfg, "summary": summary, "lines": lines, "wall_s": time.perf_counter() - t0}


def _name(run: tuple, turns: int = 1) -> str:
    mode, batch, rollout, reward = run
    return f"{mode}-b{batch}-r{rollout}-w{reward}" + (f"-t{turns}" if turns > 1 else "")


def measured(shape, lines: list[dict]) -> dict:
    seconds = sum(x["step_s"] for x in lines)
    busy = {
        "rollout": sum(x["generate_s"] * shape.calls / shape.rollout_workers for x in lines) / seconds,
        "reward": sum(x["score_s"] / shape.reward_workers for x in lines) / seconds,
        "learner": sum(x["learner_s"] + x["weight_sync_s"] for x in lines) / seconds,
    }
    return {
        "samples_per_s": sum(x["groups"] for x in lines) / seconds,
        "busy_share": {k: round(v, 3) for k, v in busy.items()},
        "bottleneck": max(busy, key=busy.__getitem__),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "plan_validation_cpu.json")
    p.add_argument("--engine", default="vllm", choices=("vllm", "hf"))
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out (engine start, pipeline fill)")
    p.add_argument("--turns", type=int, default=1, choices=(1, 2), help="2: validate episodes of two turns")
    p.add_argument("--work", type=Path, default=None)
    args = p.parse_args(argv)
    from cluster.plan.throughput import Shape

    validation = VALIDATION_RUNS if args.turns == 1 else TURN_RUNS
    profiled = sorted(
        {1, args.turns}, reverse=True
    )  # the validation's own turns first (what preflight measures)
    runs = [(run, t) for t in profiled for run in PROFILE_RUNS] + [(run, args.turns) for run in validation]
    done = run_all(args, runs)
    steady = {key: r["lines"][args.warmup :] for key, r in done.items()}
    shapes = {key: Shape.from_config(r["cfg"]) for key, r in done.items()}
    result = {
        "engine": args.engine,
        "steps": args.steps,
        "warmup": args.warmup,
        "turns": args.turns,
        "cpu_count": os.cpu_count(),
        "lines": {_name(*key): steady[key] for key in done},  # what was fitted and compared, to refit offline
    }
    for t in profiled:
        profile, rows = _validate(validation, args.turns, t, shapes, steady, done)
        key = "" if t == args.turns else f"_from_{t}_turn_profile"
        result |= {
            f"profile{key}": profile.to_json(),
            f"validation{key}": rows,
            f"within_25_percent{key}": sum(abs(r["error"]) <= 0.25 for r in rows),
            f"bottleneck_agrees{key}": sum(
                r["predicted_bottleneck"] == r["measured_bottleneck"] for r in rows
            ),
        }
        print(f"profile from {t}-turn runs:\n{_table(rows)}")
        print(
            f"within 25 %: {result[f'within_25_percent{key}']}/{len(rows)}; bottleneck agrees: "
            f"{result[f'bottleneck_agrees{key}']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def _validate(validation: list, turns: int, profile_turns: int, shapes: dict, steady: dict, done: dict):
    """The profile fitted from PROFILE_RUNS at `profile_turns`, and each validation run's row under it."""
    from cluster.plan.profile import fit_profile

    profile = fit_profile(
        [(shapes[run, profile_turns], steady[run, profile_turns]) for run in PROFILE_RUNS],
        cores=os.cpu_count(),
        source=f"bench/plan_validation.py ({profile_turns}-turn runs)",
    )
    return profile, [_row(run, shapes[run, turns], profile, steady[run, turns], done) for run in validation]


def run_all(args, runs: list[tuple[tuple, int]]) -> dict[tuple, dict]:
    """Every (run, turns) on fresh nodes of one cluster, in order."""
    import ray

    work = args.work or Path(tempfile.mkdtemp(prefix="segr1-plan-"))
    s = dict(QUICK)
    policy, data = build_policy(work, s, None, turns=args.turns)
    cluster = _cluster()
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    done: dict[tuple, dict] = {}
    try:
        for run, turns in runs:
            done[run, turns] = run_config(
                ray, cluster, policy, data, work, s, run, args.engine, args.steps, turns
            )
            print(run, turns, f"{done[run, turns]['wall_s']:.0f} s", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return done


def _row(run: tuple, shape, profile, lines: list[dict], done: dict) -> dict:
    """A run's prediction (episodes: at the turns they measured, and at max_turns) against its measurement."""

    from cluster.plan.throughput import predict

    turns = sum(x.get("episode_turns_mean", 1.0) for x in lines) / len(lines)
    pred, meas = predict(shape.at_measured_turns(turns), profile), measured(shape, lines)
    out = {
        "mode": run[0],
        "batch_size": run[1],
        "rollout_workers": run[2],
        "reward_workers": run[3],
        "predicted_samples_per_s": round(pred.samples_per_s, 3),
        "measured_samples_per_s": round(meas["samples_per_s"], 3),
        "error": round(pred.samples_per_s / meas["samples_per_s"] - 1, 3),
        "predicted_bottleneck": pred.bottleneck,
        "predicted_limit": pred.limit,
        "measured_bottleneck": meas["bottleneck"],
        "measured_busy_share": meas["busy_share"],
        "groups_lost": done[run, shape.max_turns]["summary"]["groups_lost"],
    }
    if shape.max_turns > 1:
        out["turns_measured"] = round(turns, 3)
        out["predicted_at_max_turns"] = round(predict(shape, profile).samples_per_s, 3)
    return out


def _table(rows: list[dict]) -> str:
    turns = any("turns_measured" in r for r in rows)
    head = "| mode | B | R | W | predicted samples/s | measured | error | bottleneck predicted / measured |"
    out = [
        head + (" turns measured | predicted at max_turns |" if turns else ""),
        "|---" * (10 if turns else 8) + "|",
    ]
    for r in rows:
        out.append(
            f"| {r['mode']} | {r['batch_size']} | {r['rollout_workers']} | {r['reward_workers']} | "
            f"{r['predicted_samples_per_s']:.2f} | {r['measured_samples_per_s']:.2f} | {r['error']:+.0%} | "
            f"{r['predicted_bottleneck']} / {r['measured_bottleneck']} |"
            + (f" {r['turns_measured']:.2f} | {r['predicted_at_max_turns']:.2f} |" if turns else "")
        )
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
