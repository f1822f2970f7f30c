"""The driver's side: every configured tracker behind one object, fed once per optimiser step.

    trackers = open_trackers(cfg, run_dir, resume, step)    # in TrainDriver.__init__
    trackers.log_step(step, line, rewards, examples)       # after each metrics.jsonl line
    trackers.log_scalars(step, {"val/mean_iou": ...})      # any other scalars (the validation's val/*)
    trackers.log_image(step, "val/overlay_0", rgb)         # (H, W, 3) uint8, e.g. cluster.evaluation.pictures.overlay
    trackers.close()                                       # end of run()

Training-step overlays (every metrics.image_every steps) show the first completion of the step's first
metrics.image_samples groups: the image, the ground-truth outline, and the box and points parsed from the answer.
The reward workers do not send masks back, so predicted masks appear only in the validation's overlays.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cluster.tracking.base import Tracker, flatten, require, run_info, scalars_of
from protos import REWARD_TERMS

logger = logging.getLogger(__name__)


def make_tracker(name: str, mlflow_uri: str | None = None, project: str = "segr1") -> Tracker:
    require(name)
    if name == "tensorboard":
        from cluster.tracking.tensorboard_tracker import TensorBoardTracker

        return TensorBoardTracker()
    if name == "wandb":
        from cluster.tracking.wandb_tracker import WandbTracker

        return WandbTracker(project)
    from cluster.tracking.mlflow_tracker import MlflowTracker

    return MlflowTracker(mlflow_uri, project)


class Trackers:
    """Fans each call out to every tracker. A tracker that raises is logged and dropped, not fatal: a full disk
    under TensorBoard must not stop a training run."""

    def __init__(
        self, trackers: dict[str, Tracker], image_every: int = 0, image_samples: int = 0, parse=None
    ):
        self.trackers = dict(trackers)
        self.image_every = image_every
        self.image_samples = image_samples
        self.parse = parse  # (text, width, height) -> ParsedAnswer, for the training overlays

    def _each(self, method: str, *args) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception:
                logger.exception("tracker %s failed in %s; it is switched off for this run", name, method)
                self.trackers.pop(name, None)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self._each("log_scalars", step, values)

    def log_histogram(self, step: int, name: str, values: np.ndarray) -> None:
        self._each("log_histogram", step, name, values)

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        self._each("log_image", step, name, image)  # image: (H, W, 3) uint8

    def log_text(self, step: int, name: str, text: str) -> None:
        self._each("log_text", step, name, text)

    def log_step(
        self,
        step: int,
        line: dict,
        rewards: Sequence[Any] = (),
        examples: Callable[[int], list[tuple[str, Any]]] | None = None,
    ) -> None:
        """One metrics.jsonl line, the histograms of the step's `rewards` (RewardComponents) and, every
        image_every steps, overlays of `examples(n)`: the first answer and the Sample of the step's first n
        groups (fetched only then: the driver does not hold the completions)."""
        if not self.trackers:
            return
        self.log_scalars(step, scalars_of(line))
        if rewards:
            for term in REWARD_TERMS:
                self.log_histogram(step, f"reward_hist/{term}", np.array([getattr(r, term) for r in rewards]))
        if self.image_every and step % self.image_every == 0 and examples is not None:
            for i, (text, sample) in enumerate(examples(self.image_samples)):
                self.log_image(step, f"train/overlay_{i}", self.training_overlay(text, sample))

    def training_overlay(self, answer: str, sample) -> np.ndarray:
        """(H, W, 3) uint8: the sample's image, its GT outline and what `answer` (a group's first) proposes."""
        from runtime.images import decode_image, decode_mask
        from runtime.overlay import overlay_prompts

        image = decode_image(sample.image)  # (H, W, 3) uint8
        gt = decode_mask(sample.mask)  # (H, W) bool
        prompts = self.parse(answer, image.shape[1], image.shape[0]).prompts if self.parse is not None else []
        return overlay_prompts(image, None, prompts, gt=gt)

    def close(self) -> None:
        self._each("close")
        self.trackers.clear()


def open_trackers(cfg, run_dir: Path, resume: bool = False, step: int = 0) -> Trackers:
    """Start (resume=True: continue) every tracker of cfg.metrics.trackers but jsonl, which the driver writes.
    Raises ImportError naming the pip extra when a tracker's library is missing."""
    from reward_service.parser import parse_answer_for

    m = cfg.metrics
    run_dir = Path(run_dir)
    config: dict[str, Any] = {**flatten(cfg.model_dump(mode="json")), **run_info()}
    started: dict[str, Tracker] = {}
    try:
        for name in m.trackers:
            if name == "jsonl":
                continue
            tracker = make_tracker(name, mlflow_uri=m.mlflow_uri, project=m.project)
            tracker.start(run_dir, run_dir.resolve().name, config, resume, step)
            started[name] = tracker
    except Exception:  # one cannot open: end the runs the others opened (an MLflow run would stay RUNNING)
        Trackers(started).close()
        raise
    size = cfg.data.image_size

    def parse(text: str, w: int, h: int):
        return parse_answer_for(cfg.reward, text, w, h, size)

    trackers = Trackers(started, m.image_every, m.image_samples, parse)
    if not resume:
        info = run_info()
        trackers.log_text(0, "run", f"segr1 {info['segr1_version']}, git commit {info['git_commit']}")
    return trackers
