"""Experiment trackers of a training run: TensorBoard, Weights & Biases and MLflow behind one small Protocol.

The driver owns them (one tracker run per job, never one per actor) and calls `Trackers.log_step` once per
optimiser step. metrics.jsonl is the `jsonl` tracker: the driver always writes it (resume and the reports read it).

What each tracker receives (names: `scalar_name`, table in docs/training.md "Experiment trackers"):
- every numeric key of a metrics.jsonl line, grouped with '/' (reward_total -> reward/total_mean); keys that
  already hold a '/' (the validation's val/*) keep their name;
- histograms of the per-completion rewards of the step, one per reward term (reward_hist/<term>);
- the resolved config as hyper-parameters (dotted keys), the project version and the git commit;
- prediction overlays (`log_image`, HxWx3 uint8) every `metrics.image_every` steps.

Resume: the ids of the tracker runs are kept in <run_dir>/trackers.json; a resumed job continues the same runs.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np

TRACKER_NAMES = ("jsonl", "tensorboard", "wandb", "mlflow")
# tracker -> (module it needs, the pip extra that installs it)
EXTRAS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}

# metrics.jsonl key -> tracker name. Keys not listed keep their own name (val/* and future keys); non-numeric
# keys (sample_ids) and the wall clock `time` are not sent.
SCALAR_NAMES = {
    "reward_total": "reward/total_mean",
    "reward_format": "reward/format_mean",
    "reward_iou": "reward/iou_mean",
    "reward_s_measure": "reward/s_measure_mean",
    "reward_segmentation": "reward/segmentation_mean",
    "reward_box_iou": "reward/box_iou_mean",
    "reward_box_l1": "reward/box_l1_mean",
    "parse_failure_rate": "reward/parse_failure_rate",
    "policy_version": "learner/policy_version",
    "loss": "learner/loss",
    "kl": "learner/kl",
    "clip_fraction": "learner/clip_fraction",
    "grad_norm": "learner/grad_norm",
    "tokens_per_s": "throughput/tokens_per_s",
    "masks_per_s": "throughput/masks_per_s",
    "generate_s": "time/generate_s",
    "score_s": "time/score_s",
    "learner_s": "time/learner_s",
    "weight_sync_s": "time/weight_sync_s",
    "weight_sync_encode_s": "time/weight_sync_encode_s",
    "weight_sync_decode_s": "time/weight_sync_decode_s",
    "weight_sync_bytes": "weight_sync/bytes",
    "weight_sync_full_bytes": "weight_sync/full_bytes",
    "weight_sync_delta": "weight_sync/delta",
    "weight_sync_changed_fraction": "weight_sync/changed_fraction",
    "step_s": "time/step_s",
    "staleness_mean": "staleness/mean",
    "staleness_max": "staleness/max",
    "groups": "groups/trained",
    "zero_variance_groups": "groups/zero_variance",
    "actor_restarts": "cluster/actor_restarts",
    "episode_turns_mean": "episodes/turns_mean",
    "stop_rate": "episodes/stop_rate",
    "iou_turn1_mean": "episodes/iou_turn1_mean",
}
NOT_SENT = ("step", "time", "sample_ids")


class Tracker(Protocol):
    """One experiment tracker. `start` opens (or, resume=True, continues) the run of `run_dir`."""

    def start(self, run_dir: Path, run_name: str, config: dict, resume: bool, step: int) -> None: ...
    def log_scalars(self, step: int, values: dict[str, float]) -> None: ...
    def log_histogram(self, step: int, name: str, values: np.ndarray) -> None: ...
    def log_image(self, step: int, name: str, image: np.ndarray) -> None: ...  # (H, W, 3) uint8
    def log_text(self, step: int, name: str, text: str) -> None: ...
    def close(self) -> None: ...


def scalar_name(key: str) -> str:
    return SCALAR_NAMES.get(key, key)


def scalars_of(line: dict) -> dict[str, float]:
    """The numeric entries of a metrics.jsonl line under their tracker names."""
    out = {}
    for key, value in line.items():
        if key in NOT_SENT or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out[scalar_name(key)] = float(value)
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'grpo': {'steps': 3}} -> {'grpo.steps': 3}; lists and None become strings (hyper-parameter values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif value is None or isinstance(value, list | tuple):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def run_info() -> dict[str, str]:
    """The project version and the git commit of the code (\"unknown\" outside a git checkout)."""
    try:
        version = metadata.version("segr1")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        commit = done.stdout.strip() if done.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        commit = "unknown"
    return {"segr1_version": version, "git_commit": commit or "unknown"}


def missing_library(tracker: str) -> str | None:
    """Why `tracker` cannot start in this environment (its library is not installed, naming the pip extra), or
    None. Looks the module up without importing it (mlflow takes seconds to import): the check before a job
    starts (cluster/job_paths.py `check_start`)."""
    module, extra = EXTRAS[tracker]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        found = False
    if found:
        return None
    return (
        f"metrics.trackers lists {tracker!r} but the {module!r} package is not installed: "
        f"pip install -e '.[{extra}]' in the repository (pip install 'segr1[{extra}]' from a wheel), "
        f"or remove {tracker!r} from metrics.trackers"
    )


def require(tracker: str) -> None:
    """Raise an ImportError naming the pip extra when the library of `tracker` is not installed."""
    problem = missing_library(tracker)
    if problem is not None:
        raise ImportError(problem)
    module, extra = EXTRAS[tracker]
    try:
        __import__(module)
    except ImportError as err:
        raise ImportError(
            f"metrics.trackers lists {tracker!r}: the {module!r} package is installed but does not import "
            f"({err}); reinstall it: pip install -e '.[{extra}]'"
        ) from None


def load_ids(run_dir: Path) -> dict:
    path = Path(run_dir) / "trackers.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_id(run_dir: Path, key: str, value: str) -> None:
    ids = load_ids(run_dir)
    ids[key] = value
    (Path(run_dir) / "trackers.json").write_text(json.dumps(ids, indent=1))
