"""Paths of a job started with `ray job submit --working-dir .`: the job runs in Ray's unpacked copy of the working
directory, uploaded WITHOUT its git-ignored files (runs/, where the demo builds its models and data), so a relative
path of the config points into that copy: inputs are missing there and outputs would vanish with it. Checked
before any actor starts (cluster/launch.py), with one message saying what to pass instead.
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
