"""What a training job needs from the machine it starts on, checked before Ray or any actor starts
(cluster/launch.py `run_training`; `segr1 train --dry-run` reports the same), each problem naming its config key:

- `check_job_paths`: a job started with `ray job submit --working-dir .` runs in Ray's unpacked copy of the
  working directory, uploaded WITHOUT its git-ignored files (runs/, where the demo builds its models and data), so
  a relative path of the config points into that copy: inputs are missing there and outputs would vanish with it.
- `check_start`: the tracker libraries metrics.trackers names are installed; the inputs exist and are readable
  (data.train, data.eval when validating, model.policy / model.reference / reward.segmenter_path when local
  paths, the checkpoint --resume continues from); checkpoint.dir and metrics.run_dir are writable.

The paths are checked on this machine, which sees the cluster's shared filesystem (a local run, or the entrypoint
of `ray job submit` on the head node); through Ray Client (a ray:// address) it may not, and they are skipped.
Pure-config rules (metrics.mlflow_uri's scheme) are pydantic validators in cluster/config.py: load_config refuses.
"""

from __future__ import annotations

import os
from pathlib import Path

from cluster.config import ConfigError, TrainConfig

# The folder Ray unpacks a job's --working-dir into (ray/_private/runtime_env: working_dir_files/_ray_pkg_<hash>).
_RAY_WORKING_DIR = "/working_dir_files/_ray_pkg_"


def in_uploaded_working_dir(cwd: str | None = None) -> bool:
    return _RAY_WORKING_DIR in (cwd or os.getcwd())


def check_job_paths(cfg: TrainConfig, cwd: str | None = None) -> None:
    """Inside an uploaded working dir: every input path the config names exists, and no path is relative."""
    if not in_uploaded_working_dir(cwd):
        return
    paths = {
        "model.policy": cfg.model.policy,
        "data.train": cfg.data.train,
        "data.eval": cfg.data.eval,
        "metrics.run_dir": cfg.metrics.run_dir,
        "checkpoint.dir": cfg.checkpoint.dir,
    }
    relative = {k: v for k, v in paths.items() if v and not Path(v).is_absolute() and "://" not in v}
    if not relative:
        return
    fix = " ".join(f'{k}="$PWD/{v}"' for k, v in relative.items())
    raise ConfigError(
        "this job runs in Ray's uploaded copy of --working-dir, which leaves out git-ignored folders such as "
        f"runs/: the relative path(s) {', '.join(f'{k}={v}' for k, v in relative.items())} would be read from "
        "(or written into) that temporary copy. Pass absolute paths on the shared filesystem instead, e.g. "
        f"from the repository root: {fix}"
    )


def check_start(cfg: TrainConfig, resume: bool = False) -> None:
    """Raise one ConfigError listing every problem that would stop the job after Ray and its actors started (a
    tracker library missing, an input missing or unreadable, an output folder not writable)."""
    problems = start_problems(cfg, resume)
    if problems:
        raise ConfigError(
            "the job cannot start (checked before Ray or any actor starts):\n"
            + "\n".join(f"  {p}" for p in problems)
        )


def start_problems(cfg: TrainConfig, resume: bool = False) -> list[str]:
    """check_start's problems, one line each starting with the key (empty: none found)."""
    from cluster.tracking.base import missing_library

    problems = [missing_library(t) for t in cfg.metrics.trackers if t != "jsonl"]
    if not _sees_cluster_files(cfg):
        return [p for p in problems if p]
    problems.append(_dataset("data.train", cfg.data.train))
    if (cfg.eval.every > 0 or cfg.eval.before_train) and cfg.data.eval:  # set then (config.py checks)
        problems.append(_dataset("data.eval", cfg.data.eval))
    local = {"model.policy": cfg.model.policy, "model.reference": cfg.model.reference}
    if cfg.reward.segmenter in ("hf-sam2", "sam2"):
        local["reward.segmenter_path"] = cfg.reward.segmenter_path
    for key, value in local.items():
        if value and _is_local_path(value):
            fix = (
                f"point {key} at a model folder (`segr1 models tiny --out DIR` builds tiny ones) or a hub id"
            )
            problems.append(_readable(key, Path(value), fix))
    if resume:
        problems.append(_resume_checkpoint(cfg))
    problems.append(_writable("checkpoint.dir", Path(cfg.checkpoint.dir)))
    problems.append(_writable("metrics.run_dir", Path(cfg.metrics.run_dir)))
    return [p for p in problems if p]


def _sees_cluster_files(cfg: TrainConfig) -> bool:
    """False through Ray Client (ray://): the actors then run on machines whose files this one may not see."""
    address = cfg.placement.ray_address or os.environ.get("RAY_ADDRESS") or ""
    return not address.startswith("ray://")


def _is_local_path(value: str) -> bool:
    """A path on this filesystem rather than a Hugging Face hub id ("name" or "org/name") or a URL."""
    if "://" in value:
        return False
    return Path(value).exists() or value.startswith(("/", ".", "~")) or value.count("/") >= 2


def _readable(key: str, path: Path, fix: str) -> str | None:
    if not path.exists():
        return f"{key}={path}: no such file or folder; {fix}"
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        return f"{key}={path}: not readable by this user; fix its permissions or {fix}"
    return None


def _dataset(key: str, path: str) -> str | None:
    """A Parquet file, or a folder holding *.parquet shards (cluster/data/reader.py reads them)."""
    fix = f"make a data set with `segr1 data synth --out {path}` or point {key} at a folder of Parquet shards"
    problem = _readable(key, Path(path), fix)
    if problem is None and Path(path).is_dir() and not any(Path(path).glob("*.parquet")):
        return f"{key}={path}: no *.parquet shards in this folder; {fix}"
    return problem


def _resume_checkpoint(cfg: TrainConfig) -> str | None:
    """--resume: the checkpoint it continues from (checkpoint.resume_from: latest | best) exists and is readable."""
    from learner.checkpoint import best_checkpoint, checkpoint_problems, latest_checkpoint, step_dirs

    root, frm = Path(cfg.checkpoint.dir), cfg.checkpoint.resume_from
    problem = _readable("checkpoint.dir", root, "run without --resume to start afresh")
    if problem:
        return f"{problem} (--resume continues from it)"
    folder = best_checkpoint(root) if frm == "best" else latest_checkpoint(root)
    if folder is None:
        what = "a best.json naming an existing step-* folder" if frm == "best" else "a complete step-* folder"
        incomplete = "".join(f"; {f.name}: {', '.join(checkpoint_problems(f))}" for _, f in step_dirs(root))
        return (
            f"checkpoint.dir={root}: --resume with checkpoint.resume_from={frm} needs {what} in it and there is "
            f"none{incomplete}; run without --resume to start afresh, or point checkpoint.dir at the run's "
            "checkpoints"
        )
    return _readable("checkpoint.dir", folder, "run without --resume to start afresh")


def _writable(key: str, path: Path) -> str | None:
    """The job can create `path` (its nearest existing folder is writable) or write into it."""
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        return f"{key}={path}: {existing} is a file, not a folder; choose another folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path.absolute() else f" (nor can it be created in {existing})"
        return f"{key}={path}: not writable by this user{where}; choose a folder you can write to"
    return None
