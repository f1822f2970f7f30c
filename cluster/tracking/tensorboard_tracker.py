"""TensorBoard through torch.utils.tensorboard's SummaryWriter (needs the `tensorboard` package: extra
`tensorboard`). Logs go to <run_dir>/tensorboard; a resumed run appends to the same logdir with purge_step so the
steps trained again replace the ones written after the checkpoint; a fresh run in the same run_dir replaces the
previous event files (as it replaces metrics.jsonl)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class TensorBoardTracker:
    def __init__(self) -> None:
        self.writer = None

    def start(self, run_dir: Path, run_name: str, config: dict, resume: bool, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        logdir = Path(run_dir) / "tensorboard"
        if not resume:  # a fresh run replaces the last one's curves, as it replaces metrics.jsonl
            for old in logdir.glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = SummaryWriter(log_dir=str(logdir), purge_step=step + 1 if resume else None)
        if not resume:
            self._hparams(config)

    def _hparams(self, config: dict) -> None:
        """The config as the HParams plugin's hyper-parameters, in this logdir (add_hparams would open a
        second run in a sub-folder)."""
        from torch.utils.tensorboard.summary import hparams

        values = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in config.items()}
        for summary in hparams(values, {"reward/total_mean": 0.0}):
            self.writer.file_writer.add_summary(summary)
        text = "\n".join(f"    {k}: {v}" for k, v in sorted(config.items()))
        self.writer.add_text("config", text, 0)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def log_histogram(self, step: int, name: str, values: np.ndarray) -> None:
        self.writer.add_histogram(name, np.asarray(values, np.float64), step)

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        self.writer.add_image(name, image, step, dataformats="HWC")  # image: (H, W, 3) uint8
        self.writer.flush()

    def log_text(self, step: int, name: str, text: str) -> None:
        self.writer.add_text(name, text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
