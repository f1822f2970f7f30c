"""`segr1 preflight --config FILE [key.sub=value ...] [--steps 3] [--out DIR]`: prove a cluster in minutes.

The real training job (`segr1 train`'s driver, pools, placement, weight sync and metrics: cluster/preflight.py) at
the config's real shapes with dummy weights (`model.dummy_weights=true`: vLLM `load_format="dummy"`, the learner,
the reference and SAM2 built from their config.json with random weights), for --steps steps, on local Ray or
RAY_ADDRESS. It reads only the model folders' config, tokenizer and processor files (docs/kubernetes.md says how
to get them without the weights). Its metrics and summary go to DIR (default <metrics.run_dir>/preflight, never
the run's own files; trackers: jsonl only; no checkpoint is written).

Prints one table: per pool and actor (and its GPU), the measured peak memory (torch's peak allocation on a GPU,
the peak resident set on CPU) beside `segr1 plan`'s figure for that pool; the weight-sync seconds per transport;
rollout tokens/s; reward masks/s; learner s/step. Writes DIR/preflight.json.

Exit status: 0 passed; 1 a stage failed (model files, start checks, placement, learner start, engine start, reward
start, first weight sync, step N), named with its cause in one message; 2 an invalid configuration.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from cluster.commands.common import CommandError, add_config_args, load_config_from_args
from cluster.commands.plan import add_plan_args, make_plan

GB = 1e9


def register(sub) -> None:
    p = sub.add_parser(
        "preflight",
        help="the training job with dummy weights for a few steps: per-pool peak memory vs the plan, "
        "weight-sync seconds, throughput; names the stage that fails",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--steps", type=int, default=3, help="optimiser steps to run (default 3)")
    p.add_argument(
        "--out",
        default=None,
        help="folder for preflight.json and the job's metrics (default: <metrics.run_dir>/preflight)",
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=1800.0,
        metavar="S",
        help="seconds every actor may take to be placed and start its engine (default 1800)",
    )
    add_plan_args(p)
    p.set_defaults(func=run)


def preflight_overrides(args: argparse.Namespace, run_dir: str) -> list[str]:
    """The user's overrides, then the preflight's own: dummy weights, --steps, its own run folder, jsonl only."""
    if not 1 <= args.steps <= 1000:
        raise CommandError(f"--steps {args.steps}: give 1 to 1000 steps (default 3)", exit_code=2)
    out = Path(args.out) if args.out else Path(run_dir) / "preflight"
    return [
        *args.overrides,
        "model.dummy_weights=true",
        f"grpo.steps={args.steps}",
        f"metrics.run_dir={out}",
        "metrics.trackers=[jsonl]",
    ]


def run(args: argparse.Namespace) -> int:
    from cluster.preflight import StageFailed, run_preflight

    user = load_config_from_args(args)
    args.overrides = preflight_overrides(args, user.metrics.run_dir)
    cfg = load_config_from_args(args)
    build_demo_assets(cfg)
    out = Path(cfg.metrics.run_dir)
    plan = _plan(cfg, args)
    started_ray = not _ray_running()
    try:
        result = run_preflight(cfg, args.start_timeout)
    except StageFailed as err:
        _write(out, {"passed": False, "stage": err.stage, "cause": err.cause})
        if started_ray:
            _stop_log_stream()
        raise CommandError(f"stage {err.stage!r} failed: {err.cause}", exit_code=1) from None
    report = build_report(cfg, result, plan)
    print(format_report(report), flush=True)
    path = _write(out, report)
    print(f"wrote {path}")
    return 0


# cluster/configs/demo.yaml reads the tiny policy and synthetic data sets that `make demo` builds offline, under
# runs/; on a fresh clone they are missing, so preflight builds them the same way (seconds) before it starts.
DEMO_ROOT = Path("runs")
DEMO_TRAIN, DEMO_EVAL = 2048, 128  # the demo's own sizes (cluster/dev/demo.py --n-train / --n-eval)


def build_demo_assets(cfg) -> bool:
    """Build the demo config's tiny models and data where the config points at them and they are missing; True
    when something was built. Any other config is left alone: its missing files are the model-files stage's."""
    wanted = {
        "model.policy": DEMO_ROOT / "models" / "policy",
        "data.train": DEMO_ROOT / "data" / "train",
        "data.eval": DEMO_ROOT / "data" / "eval",
    }
    given = {"model.policy": cfg.model.policy, "data.train": cfg.data.train, "data.eval": cfg.data.eval}
    if any(given[key] is None or Path(given[key]) != path for key, path in wanted.items()):
        return False
    if (wanted["model.policy"] / "config.json").is_file() and any(wanted["data.train"].glob("*.parquet")):
        return False
    from cluster.dev.demo import build_assets

    build_assets(cfg, DEMO_ROOT, seed=cfg.seed, n_train=DEMO_TRAIN, n_eval=DEMO_EVAL)
    print(f"built the demo config's tiny models and synthetic data under {DEMO_ROOT}/ (offline)", flush=True)
    return True


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()


def _stop_log_stream() -> None:
    """Disconnect from Ray so the failed actors' log lines (streamed to this process, and a dump Ray prints when
    a threaded actor's __init__ raised) end before the one-line message, which stays the last thing printed."""
    import ray

    ray.shutdown()


def _plan(cfg, args: argparse.Namespace):
    """`segr1 plan`'s plan of the same config, or None where it cannot be made (the column then says n/a)."""
    try:
        return make_plan(cfg, args)
    except CommandError:
        return None


def _write(out: Path, report: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "preflight.json"
    path.write_text(json.dumps(report, indent=1))
    return path


# -- the report (pure: unit-tested on hand-made results) ---------------------------------------------------------
def plan_bytes(plan) -> dict[str, int]:
    """pool -> the plan's bytes per GPU (or per process on CPU) of that pool."""
    return {} if plan is None else {p.pool: int(p.total) for p in plan.pools}


def build_report(cfg, result: dict, plan) -> dict:
    """preflight.json: the measured figures of run_preflight's `result` beside the plan's."""
    planned = plan_bytes(plan)
    keys = ("pool", "actor", "device", "measure", "gpus", "node", "peak_bytes")
    memory = [{**{k: m.get(k) for k in keys}, "plan_bytes": planned.get(m["pool"])} for m in result["memory"]]
    steps = [m for m in result["metrics"] if "learner_s" in m]  # not the validation lines (val/*)
    return {
        "passed": True,
        "steps": len(steps),
        "mode": cfg.grpo.mode,
        "memory": memory,
        "shared_gpus": shared_gpus(memory, plan),
        "weight_sync": weight_sync_figures(result["weight_syncs"]),
        "rollout_tokens_per_s": rollout_tokens_per_s(steps),
        "reward_masks_per_s": masks_per_s(steps, cfg.grpo.group_size),
        "learner_s_per_step": mean(s["learner_s"] for s in steps) if steps else 0.0,
        "profile": throughput_profile(cfg, steps),
        "plan_sources": [] if plan is None else plan.sources,
        "summary": result["summary"],
    }


def throughput_profile(cfg, steps: list[dict]) -> dict | None:
    """The stage costs of these steps for `segr1 plan --throughput` (cluster/plan/profile.py), the first step
    (engine warm-up, first publish) left out when there are more; None without a step."""
    import os

    from cluster.plan.profile import fit_profile
    from cluster.plan.throughput import Shape

    timed = steps[1:] or steps
    if not timed:
        return None
    cores = None if cfg.rollout.resources.num_gpus > 0 else float(os.cpu_count() or 1)
    source = f"segr1 preflight, {len(timed)} steps of B={cfg.grpo.batch_size}"
    return fit_profile([(Shape.from_config(cfg), timed)], cores, source).to_json()


def shared_gpus(memory: list[dict], plan) -> list[dict]:
    """GPUs the plan packs several actors onto (fractional GPUs, colocated): the actors' measured peaks added up
    beside the plan's figure for that GPU. Only where every member was measured on a GPU."""
    if plan is None:
        return []
    by_actor = {m["actor"]: m for m in memory}
    out = []
    for gpu in plan.gpus:
        members = [by_actor.get(name) for name in gpu.members]
        if len(members) < 2 or any(m is None or m["device"] != "cuda" for m in members):
            continue
        peaks = [m["peak_bytes"] for m in members]
        measured = None if None in peaks else sum(peaks)
        out.append({"actors": list(gpu.members), "peak_bytes": measured, "plan_bytes": int(gpu.bytes)})
    return out


def weight_sync_figures(syncs: list[dict]) -> dict[str, dict]:
    """backend -> {publishes, mean_s, max_s, first_s} (the first publish also forms the group)."""
    out: dict[str, dict] = {}
    for backend in dict.fromkeys(s["backend"] for s in syncs):
        secs = [float(s["seconds"]) for s in syncs if s["backend"] == backend]
        out[backend] = {"publishes": len(secs), "first_s": secs[0], "mean_s": mean(secs), "max_s": max(secs)}
    return out


def rollout_tokens_per_s(steps: list[dict]) -> float:
    """Completion tokens of the steps' groups over the steps' generate seconds (the longest call per step)."""
    tokens = sum(w["tokens"] for s in steps for w in s.get("by_rollout_worker", {}).values())
    seconds = sum(s["generate_s"] for s in steps)
    return tokens / seconds if seconds > 0 else 0.0


def masks_per_s(steps: list[dict], group_size: int) -> float:
    """Masks scored (one per completion and turn: score_s holds every turn's scoring) over the seconds the reward
    workers spent scoring them."""
    masks = sum(s["groups"] * group_size * s.get("episode_turns_mean", 1.0) for s in steps)
    seconds = sum(s["score_s"] for s in steps)
    return masks / seconds if seconds > 0 else 0.0


def _gb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / GB:.2f} GB"


def _measure(m: dict) -> str:
    if m["device"] != "cuda":
        return "RSS"
    return "GPU" if str(m.get("measure", "")).startswith("torch") else "GPU, NVML"


def format_report(report: dict) -> str:
    """The one table `segr1 preflight` prints."""
    rows = [("pool", "actor", "device", "GPU", "node", "peak measured", "plan (segr1 plan)")]
    for m in report["memory"]:
        measured = f"{_gb(m['peak_bytes'])} ({_measure(m)})"
        rows.append(
            (m["pool"], m["actor"], m["device"], m["gpus"] or "-", m["node"], measured, _gb(m["plan_bytes"]))
        )
    for g in report["shared_gpus"]:
        rows.append(
            ("one GPU", "+".join(g["actors"]), "cuda", "", "", _gb(g["peak_bytes"]), _gb(g["plan_bytes"]))
        )
    for backend, w in report["weight_sync"].items():
        detail = f"{w['publishes']} publishes, first {w['first_s']:.3f} s, max {w['max_s']:.3f} s"
        rows.append(("weight sync", backend, "", "", "", f"{w['mean_s']:.3f} s mean", detail))
    rows.append(("rollout", "all", "", "", "", f"{report['rollout_tokens_per_s']:.1f} tokens/s", ""))
    rows.append(("reward", "all", "", "", "", f"{report['reward_masks_per_s']:.1f} masks/s", ""))
    rows.append(("learner", "all", "", "", "", f"{report['learner_s_per_step']:.2f} s/step", ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    head = f"preflight passed: {report['steps']} steps ({report['mode']}) with dummy weights"
    return "\n".join([head, *lines])
