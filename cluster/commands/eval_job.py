"""`segr1 eval --config FILE --checkpoint DIR --data DIR [--out DIR] [key.sub=value ...]`: evaluate a checkpoint.

Runs the rollout pool (greedy by default, `--sample` for the configured sampling, eval.generation_config for the
policy's own generation_config.json; eval.max_tokens new tokens per task; the evaluation prompts, prompt.eval)
and the segmenter, no learner,
over every sample of --data exactly once in file order, and writes metrics.json, metrics.md (the paper's table
layout), predictions.parquet (one row per sample) and grid.png (best and worst predictions) to --out.
`--local` runs both workers in this process (no Ray): the GPU machine, quick checks, tests.
"""

from __future__ import annotations

import argparse
import sys

from cluster.commands.common import CommandError, add_config_args, load_config_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint on a data set",
        description="Evaluate a checkpoint: every sample once, fixed order; metrics as in the Seg-R1 paper.",
    )
    add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="policy folder, step-* checkpoint, or checkpoint root")
    p.add_argument("--data", required=True, help="folder (or file) of Parquet shards (segr1 data import)")
    p.add_argument("--out", help="output folder (default: runs/eval/<checkpoint>-<data>)")
    p.add_argument(
        "--sample", action="store_true", help="configured sampling (rollout.sampling) instead of greedy"
    )
    p.add_argument("--limit", type=int, help="only the first N samples (in file order)")
    p.add_argument("--local", action="store_true", help="run the workers in this process, without Ray")
    p.add_argument("--no-baselines", action="store_true", help="skip the constant whole-image / centre boxes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _default_out(checkpoint_name: str, data: str) -> str:
    from pathlib import Path

    dt = Path(data).resolve()
    return str(Path("runs/eval") / f"{checkpoint_name}-{dt.stem if dt.is_file() else dt.name}")


def _prepare(args: argparse.Namespace):
    from cluster.config import ConfigError
    from cluster.data.reader import DatasetError
    from cluster.evaluation.inputs import load_samples, resolve_checkpoint
    from runtime.images import CorruptSampleError

    if args.limit is not None and args.limit < 1:
        raise CommandError("--limit must be >= 1", exit_code=2)
    cfg = load_config_from_args(args)
    corrupt: list = []
    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
        cfg.model.policy = checkpoint.policy
        samples = load_samples(args.data, args.limit, cfg.data.on_corrupt, corrupt)
    except (FileNotFoundError, ValueError, ConfigError, DatasetError, CorruptSampleError) as err:
        raise CommandError(str(err), exit_code=2) from None
    if not samples:
        raise CommandError(
            f"--data {args.data} has no readable sample ({len(corrupt)} corrupt rows)", exit_code=2
        )
    for report in corrupt:
        print(f"segr1 eval: skipped corrupt row {report}", file=sys.stderr)
    return cfg, samples, [str(r) for r in corrupt], checkpoint.name


def run(args: argparse.Namespace) -> int:
    from cluster.evaluation.loop import evaluate_samples, settings_from_config
    from cluster.evaluation.on_ray import evaluate_on_ray
    from cluster.evaluation.report import write_outputs

    cfg, samples, corrupt, checkpoint_name = _prepare(args)
    try:
        settings = settings_from_config(cfg, greedy=not args.sample)
    except ValueError as err:  # --sample with eval.generation_config
        raise CommandError(str(err), exit_code=2) from None
    baselines, progress = not args.no_baselines, not args.no_progress
    try:
        if args.local:
            from actors.worker import RolloutWorker
            from reward_service.predictor import Predictor

            rollout, predictor = (
                RolloutWorker(cfg.policy_spec("eval"), cfg.rollout, name="rollout-0"),
                Predictor(cfg.policy_spec("eval"), cfg.reward, name="eval-0"),
            )
            run_ = evaluate_samples(
                rollout, predictor, samples, **settings, baselines=baselines, progress=progress
            )
        else:
            run_ = evaluate_on_ray(cfg, samples, settings, baselines=baselines, progress=progress)
    except ValueError as err:  # duplicate ids, bad settings
        raise CommandError(str(err), exit_code=2) from None
    out = args.out or _default_out(checkpoint_name, args.data)
    used = {"policy": cfg.model.policy, "data": args.data, "segmenter": cfg.reward.segmenter}
    used["image_size"] = cfg.data.image_size
    used["prompt_preset"] = cfg.prompt.preset
    extra = {"corrupt_rows": corrupt, "settings": {**_jsonable(settings), **used}}
    write_outputs(run_, samples, out, title=f"Seg-R1 evaluation of {cfg.model.policy}", extra=extra)
    s = run_.summary
    print(
        f"evaluated {s['n']} samples: mean IoU {s['mean_iou']:.3f}, S-measure {s['s_measure']:.3f}, "
        f"parse rate {s['parse_rate']:.3f}, missing {s['missing']}; wrote {out}/metrics.json, metrics.md, "
        "predictions.parquet, grid.png"
    )
    return 0


def _jsonable(settings: dict) -> dict:
    return {k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in settings.items()}
