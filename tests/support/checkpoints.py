"""Writers for learner.checkpoint.save_checkpoint that make the smallest complete checkpoint: what the completeness
check looks for (policy/config.json, a policy *.safetensors file, an optimiser state), with nothing in it."""

from __future__ import annotations

from pathlib import Path


def empty_policy(folder: Path) -> None:
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")


def empty_optimizer(folder: Path) -> None:
    (folder / "optimizer.json").write_text("{}")
