"""`segr1 plan --config FILE [key.sub=value ...] [--gpu-memory-gb 80] [--model-shapes NAME] [--json]`: the memory
plan of a training job before launch (cluster/plan/memory.py; formulas in docs/learner.md, "Memory plan").

`segr1 plan --throughput --profile preflight.json [--gpus N]`: the predicted samples/s of the config as written,
its bottleneck pool and, for N GPUs, the best splits between the pools (cluster/plan/throughput.py, split.py;
docs/scaling.md, "Throughput model").

Per pool, the bytes one GPU holds (one process on a CPU-only config), each term named; pools sharing a GPU
(fractional GPUs) added up. Exits 1 when something cannot fit, naming it and the computed change that would make
it fit. Reads the policy's config.json, or the built-in shapes when model.policy is not a local folder.
"""

from __future__ import annotations

import argparse
import json

from cluster.commands.common import CommandError, add_config_args, load_config_from_args


def register(sub) -> None:
    p = sub.add_parser("plan", help="memory plan per pool and GPU before launch; exits 1 when it cannot fit")
    add_config_args(p)
    add_plan_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--throughput",
        action="store_true",
        help="predict samples/s and the bottleneck from a measured profile",
    )
    p.add_argument(
        "--profile", default=None, metavar="FILE", help="preflight.json (segr1 preflight) or a profile JSON"
    )
    p.add_argument(
        "--gpus", type=int, default=None, metavar="N", help="with --throughput: the best splits of N GPUs"
    )
    p.add_argument(
        "--turns-mean",
        type=float,
        default=None,
        metavar="T",
        help="with --throughput and rollout.max_turns > 1: the turns an episode takes on average (a run's "
        "episode_turns_mean); default rollout.max_turns, every episode taking every turn",
    )
    p.set_defaults(func=run)


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU in GB (1e9 bytes; default 80)"
    )
    p.add_argument(
        "--model-shapes",
        default=None,
        metavar="NAME",
        help="built-in shapes of the model model.policy holds (e.g. Qwen2.5-VL-7B-Instruct), when it is not a "
        "local folder named like it",
    )


def make_plan(cfg, args: argparse.Namespace):
    from cluster.plan.model_shapes import ShapesError
    from cluster.plan.report import build_plan

    if not 1 <= args.gpu_memory_gb <= 10_000:
        raise CommandError(
            f"--gpu-memory-gb {args.gpu_memory_gb} is not a GPU size; pass e.g. 80", exit_code=2
        )
    try:
        return build_plan(cfg, args.gpu_memory_gb, args.model_shapes)
    except ShapesError as err:
        raise CommandError(str(err), exit_code=2) from None


def run(args: argparse.Namespace) -> int:
    from cluster.plan.report import format_plan, plan_json

    cfg = load_config_from_args(args)
    if args.throughput:
        from cluster.commands.plan_throughput import run_throughput

        return run_throughput(cfg, args)
    plan = make_plan(cfg, args)
    print(json.dumps(plan_json(plan), indent=1) if args.json else format_plan(cfg, plan).rstrip(), flush=True)
    if not plan.on_gpu or plan.fits:
        return 0
    raise CommandError("; ".join(plan.failures) + " (see `change:` above)", exit_code=1)
