"""`segr1 plan --throughput`: the throughput model's prediction for a config and, with --gpus N, the best splits
of N GPUs between the pools (cluster/plan/throughput.py, split.py; docs/scaling.md, "Throughput model")."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from cluster.commands.common import CommandError


def run_throughput(cfg, args: argparse.Namespace) -> int:
    from cluster.plan.split import best_splits
    from cluster.plan.throughput import Profile, ProfileError, Shape, predict

    if not args.profile:
        raise CommandError(
            "--throughput needs --profile FILE: the preflight.json `segr1 preflight` writes on the cluster the job "
            "will run on (or bench/plan_validation.py's profile on CPU)",
            exit_code=2,
        )
    try:
        profile = Profile.load(args.profile)
    except ProfileError as err:
        raise CommandError(str(err), exit_code=2) from None
    on_gpu = cfg.rollout.resources.num_gpus > 0
    cpu_profile_for_gpu = on_gpu and profile.cores is not None
    if cpu_profile_for_gpu:  # on GPUs each pool owns its devices: no shared cores, whatever the profile saw
        profile = replace(profile, cores=None)
    try:
        shape = Shape.from_config(cfg, args.turns_mean, args.model_shapes)
    except ValueError as err:
        raise CommandError(f"--turns-mean: {err}", exit_code=2) from None
    out = {"prediction": predict(shape, profile).to_json(), "profile": args.profile}
    out["cpu_profile_for_gpu_config"] = cpu_profile_for_gpu
    if args.gpus is not None:
        if args.gpus < 1:
            raise CommandError(
                f"--gpus {args.gpus}: pass the number of GPUs to split, e.g. --gpus 8", exit_code=2
            )
        try:
            splits = best_splits(shape, cfg, profile, args.gpus, _learner_fits(cfg, args))
        except ValueError as err:
            raise CommandError(f"--gpus {args.gpus}: {err}", exit_code=2) from None
        out["splits"] = [
            {k: getattr(s, k) for k in ("rollout_workers", "reward_workers", "learner_ranks", "gpus")}
            | {"prediction": s.prediction.to_json()}
            for s in splits
        ]
    print(json.dumps(out, indent=1) if args.json else format_throughput(cfg, profile, out), flush=True)
    return 0


def _learner_fits(cfg, args: argparse.Namespace):
    """ranks -> whether the learner's memory plan fits one GPU at that many FSDP ranks."""
    from cluster.plan.report import build_plan, with_overrides

    def fits(ranks: int) -> bool:
        changed = with_overrides(cfg, f"learner.world_size={ranks}", f"learner.num_gpus={ranks}")
        plan = build_plan(changed, args.gpu_memory_gb, args.model_shapes)
        return not any(f.startswith("learner") for f in plan.failures)

    return fits


def format_throughput(cfg, profile, out: dict) -> str:
    p, shape = out["prediction"], out["prediction"]["shape"]
    busy = p["busy_s"]
    lines = [
        f"{shape['mode']}, B={shape['batch_size']} x G={shape['group_size']}: "
        f"{p['samples_per_s']:.3g} samples/s, {p['completions_per_s']:.3g} completions/s, {p['step_s']:.3g} s/step",
        f"  bottleneck: {p['bottleneck']} (its workers wait least); the step's time is set by {p['limit']}",
        f"  busy per step: rollout {busy['rollout']:.3g} s x {shape['rollout_workers']} workers, reward "
        f"{busy['reward']:.3g} s x {shape['reward_workers']}, learner {busy['learner']:.3g} s x "
        f"{shape['learner_ranks']} ranks",
        *_turn_lines(shape),
        f"  profile: {out['profile']} ({profile.source or 'measured'}; "
        + (
            f"CPU, {profile.cores:g} shared cores)"
            if profile.cores is not None
            else "each pool on its own devices)"
        ),
    ]
    if out["cpu_profile_for_gpu_config"]:
        lines.append(
            "  NOT a GPU figure: the profile was measured on CPU; run `segr1 preflight` on the GPUs for a GPU "
            "profile (it replaces every stage line and the overheads)"
        )
    if "splits" in out:
        lines.append("best splits (rollout workers / reward workers / learner ranks):")
        for i, s in enumerate(out["splits"], 1):
            q = s["prediction"]
            lines.append(
                f"  {i}. {s['rollout_workers']} / {s['reward_workers']} / {s['learner_ranks']} on {s['gpus']:g} GPUs: "
                f"{q['samples_per_s']:.3g} samples/s, bottleneck {q['bottleneck']}"
            )
        if not out["splits"]:
            lines.append("  none fits: see `segr1 plan` for what does not fit in memory")
    return "\n".join(lines)


def _turn_lines(shape: dict) -> list[str]:
    if shape["max_turns"] <= 1:
        return []
    return [
        f"  episodes: {shape['turns']:g} turns on average of rollout.max_turns={shape['max_turns']} (--turns-mean); "
        f"a later turn adds {shape['later_turn_tokens']:.2f}x a one-turn row's tokens to the learner's rows"
    ]
