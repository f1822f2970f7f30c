"""Weights & Biases (extra `wandb`). Offline unless the user configured wandb (WANDB_MODE or WANDB_API_KEY set):
the run is written under <run_dir>/wandb and uploaded later with `wandb sync <run_dir>/wandb/offline-run-*`.
The run id is kept in <run_dir>/trackers.json; a resumed job continues that run (same id, resume="allow")."""

from __future__ import annotations

import os
import secrets
import string
from pathlib import Path

import numpy as np

from cluster.tracking.base import load_ids, save_id


def wandb_mode() -> str:
    """offline unless the environment configures wandb (then wandb's own choice, e.g. online)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbTracker:
    def __init__(self, project: str = "segr1") -> None:
        self.project = project
        self.run = None

    def start(self, run_dir: Path, run_name: str, config: dict, resume: bool, step: int) -> None:
        import wandb

        run_id = load_ids(run_dir).get("wandb") if resume else None
        run_id = run_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        save_id(run_dir, "wandb", run_id)
        self.run = wandb.init(
            project=self.project,
            name=run_name,
            id=run_id,
            dir=str(run_dir),
            config=config,
            resume="allow",
            mode=wandb_mode(),
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def log_histogram(self, step: int, name: str, values: np.ndarray) -> None:
        import wandb

        self.run.log({name: wandb.Histogram(np.asarray(values, np.float64))}, step=step)

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        import wandb

        self.run.log({name: wandb.Image(image)}, step=step)  # image: (H, W, 3) uint8

    def log_text(self, step: int, name: str, text: str) -> None:
        import wandb

        self.run.log({name: wandb.Html(f"<pre>{text}</pre>")}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
