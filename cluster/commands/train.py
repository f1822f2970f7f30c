"""`segr1 train --config FILE [key.sub=value ...] [--dry-run] [--resume | --resume-if-any]`: GRPO training.

`--dry-run` prints the resolved config (YAML), then the prompts it renders: the system prompt and the user text
after the image, for training (reward.answer_format, data.image_size, the foreground instruction) and for
evaluation per task, each verbatim between `# --8<--` and `# -->8--` lines; then the memory plan (`segr1 plan`,
--gpu-memory-gb and --model-shapes as there); then the start checks: what `segr1 train` would refuse before Ray
starts (cluster/job_paths.py: tracker libraries, inputs readable, outputs writable), reported as comment lines
(the dry run still exits 0: a config may name another machine's files).

Exit status: 0 done; 1 the run lost groups, or a learner group could not be restarted; 2 a configuration the job
cannot start with (an invalid value, or a start check), one message naming the key, before Ray starts.
"""

from __future__ import annotations

import argparse
import json

from cluster.commands.common import CommandError, add_config_args, load_config_from_args
from cluster.commands.plan import add_plan_args, make_plan


def register(sub) -> None:
    p = sub.add_parser("train", help="GRPO training on local Ray or RAY_ADDRESS")
    add_config_args(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, the rendered prompts, the memory plan (segr1 plan) and the start checks "
        "(what `segr1 train` would refuse before Ray starts), and exit",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in checkpoint.dir"
    )
    p.add_argument(
        "--resume-if-any",
        action="store_true",
        help="--resume when checkpoint.dir holds a step-* checkpoint, else start afresh: for an entrypoint that "
        "is run again as it is (a RayJob's retries, docs/kubernetes.md)",
    )
    add_plan_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cluster.config import dump_config

    cfg = load_config_from_args(args)
    args.resume = args.resume or (args.resume_if_any and has_checkpoint(cfg))
    if args.dry_run:
        print(dump_config(cfg), end="")
        print(rendered_prompts(cfg), end="")
        print(memory_plan(cfg, args), end="")
        print(start_checks(cfg, args.resume), end="")
        return 0
    if cfg.model.dummy_weights:  # random weights would train and be checkpointed as if they were the policy
        raise CommandError(
            "model.dummy_weights=true builds random weights: it is for `segr1 preflight`; remove it to train",
            exit_code=2,
        )
    from cluster.config import ConfigError
    from cluster.driver.recovery import JobFailed
    from cluster.launch import run_training

    try:
        summary = run_training(cfg, resume=args.resume)
    except ConfigError as err:  # found before the job's actors start (start checks, the cluster's resources)
        raise CommandError(str(err), exit_code=2) from None
    except JobFailed as err:  # a learner group not restarted, a checkpoint not written
        raise CommandError(f"{err}\n{continue_command(args, err.resumable)}") from None
    print(json.dumps(summary, indent=1))
    return 0 if summary["groups_lost"] == 0 else 1


def has_checkpoint(cfg) -> bool:
    """checkpoint.dir holds a step-* checkpoint (--resume-if-any then resumes; an empty or new dir: afresh)."""
    from learner.checkpoint import latest_checkpoint

    return latest_checkpoint(cfg.checkpoint.dir) is not None


def continue_command(args: argparse.Namespace, resumable: bool) -> str:
    """The exact command that continues a run whose learner group failed (or starts it again)."""
    import shlex

    import ray

    ray.shutdown()  # stops the actors' log stream: the failure message is the last thing printed
    _close_progress_bars()
    cmd = ["segr1", "train", *(["--config", args.config] if args.config else []), *args.overrides]
    if resumable:
        return "continue from the latest checkpoint with: " + shlex.join([*cmd, "--resume"])
    return "no checkpoint to resume from; start the run again with: " + shlex.join(cmd)


def _close_progress_bars() -> None:
    """Close the bars Ray's tqdm_ray still draws for the failed driver (they would be redrawn after the message
    and again at exit). Ray has no public call for this; without it only the order of the output suffers."""
    try:
        from ray.experimental import tqdm_ray

        for group in list(getattr(tqdm_ray._manager, "bar_groups", {}).values()):
            for bar in list(group.bars_by_uuid.values()):
                bar.bar.close()
            group.bars_by_uuid.clear()
    except Exception:  # another Ray version: leave the bars
        return


PROMPTS_HEADER = "# ---- rendered prompts"


def memory_plan(cfg, args: argparse.Namespace) -> str:
    """`segr1 plan`'s table, or one line saying why it could not be made (the dry run still succeeds)."""
    from cluster.plan.report import format_plan

    try:
        return format_plan(cfg, make_plan(cfg, args))
    except CommandError as err:
        return f"# memory plan: not made: {err}\n"


def start_checks(cfg, resume: bool) -> str:
    """What `segr1 train` would refuse before starting Ray (cluster/job_paths.py `check_start`), as comments."""
    from cluster.job_paths import start_problems

    problems = start_problems(cfg, resume)
    if not problems:
        return "# start checks: passed (tracker libraries, inputs readable, outputs writable)\n"
    lines = "".join(f"#   {p}\n" for p in problems)
    return f"# start checks: `segr1 train` would stop before Ray starts:\n{lines}"


def _block(title: str, text: str) -> str:
    if not text:
        return f"# {title}: none (no system message; the chat template's default applies)\n"
    return f"# --8<-- {title}\n{text}\n# -->8--\n"


def rendered_prompts(cfg) -> str:
    """The prompts `cfg` renders, verbatim: training (foreground instruction) and evaluation per task."""
    from protos.answer import default_instruction

    fmt, size = cfg.reward.answer_format, cfg.data.image_size
    out = [
        f"{PROMPTS_HEADER} (prompt.preset={cfg.prompt.preset}, reward.answer_format={fmt}, "
        f"data.image_size={size}) ----\n"
    ]
    examples = {
        "foreground": default_instruction("foreground"),
        "referring": default_instruction("referring", "<expression>"),
        "reasoning": default_instruction("reasoning", "<question>"),
    }
    for phase in ("train", "eval"):
        prompts = cfg.policy_spec(phase).prompt
        out.append(_block(f"{phase} system", prompts.system_text(fmt, size)))
        tasks = ("foreground",) if phase == "train" else tuple(examples)
        for task in tasks:
            title = f"{phase} user text after the image, task {task} ({examples[task]!r})"
            out.append(_block(title, prompts.user_text(examples[task], task, fmt, size)))
    return "".join(out)
