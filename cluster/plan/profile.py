"""A throughput `Profile` (cluster/plan/throughput.py) fitted from steps the job measured: each metrics.jsonl line
holds the step's longest generate call (`generate_s`), its scoring calls' seconds (`score_s`), the learner's step
(`learner_s`), the publish (`weight_sync_s`) and the step's wall time (`step_s`).

    profile = fit_profile([(Shape.from_config(cfg), lines), ...], cores=os.cpu_count())

The stage lines are fitted from synchronous steps, where each call runs alone when a step has one rollout and one
reward worker (with none, from every step: on GPUs each pool owns its devices, so a call's time does not depend on
what overlaps it); two or more batch sizes give each stage its fixed and per-prompt parts (one size:
proportional).
A run of episodes (rollout.max_turns > 1) is fitted with the turns its lines measured (`episode_turns_mean`): a
chunk's calls at chunk x turns prompts and the learner's rows at their longer length (`Shape.episode_tokens`).
What a mode's steps take beyond the stages (the driver, Ray's calls and transfers) is that mode's overhead: the
mean over its steps, seconds per step (a per-prompt term fitted on one-worker runs over-charged larger batches in
bench/plan_validation.py).
"""

from __future__ import annotations

from dataclasses import replace

from cluster.plan.throughput import Linear, Profile, Shape, predict

Run = tuple[Shape, list[dict]]  # a config's shape and its steady-state metrics.jsonl lines


def fit_profile(runs: list[Run], cores: float | None, source: str = "") -> Profile:
    steps = [(_as_measured(shape, line), line) for shape, lines in runs for line in lines]
    if not steps:
        raise ValueError("no measured step to fit a profile from")
    sync = [(shape, line) for shape, line in steps if shape.mode == "sync"] or steps
    stages = Profile(
        rollout=Linear.fit([(s.chunk * s.turns, x["generate_s"]) for s, x in sync]),
        reward=Linear.fit([(s.chunk * s.turns, x["score_s"] / s.calls) for s, x in sync]),
        learner=Linear.fit(
            [(s.batch_size / s.learner_ranks * s.episode_tokens, x["learner_s"]) for s, x in sync]
        ),
        weight_sync=Linear.fit([(s.rollout_workers, x["weight_sync_s"]) for s, x in sync]),
        overhead={},
        cores=cores,
    )
    overhead = {}
    for mode in sorted({shape.mode for shape, _ in runs}):
        extra = [
            max(0.0, x["step_s"] - predict(_as_measured(shape, x), stages).step_s)
            for shape, lines in runs
            if shape.mode == mode
            for x in lines
        ]
        overhead[mode] = Linear(sum(extra) / len(extra), 0.0)
    measured = {
        f"{s.mode} B={s.batch_size} R={s.rollout_workers} W={s.reward_workers}": len(lines)
        for s, lines in runs
    }
    return replace(stages, overhead=overhead, source=source, measured={"steps": measured})


def _as_measured(shape: Shape, line: dict) -> Shape:
    """The shape with the turns per episode the step measured (episodes of several turns)."""
    return shape.at_measured_turns(float(line.get("episode_turns_mean", shape.turns)))
