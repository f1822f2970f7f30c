"""What the parts of the GPU check share: the context a part runs in, `Skip`, hiding packages, small helpers."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Packages the GPU machine does not have: the parts run with them hidden everywhere, so a CPU run of the check
# fails where the GPU run would (e.g. a worker module that imports ray at module level).
HIDDEN_PACKAGES = ("ray", "vllm")
ONE_GPU_CONFIG = REPO / "cluster" / "configs" / "qwen3b-1gpu.yaml"
GIB = 2**30


@dataclass(frozen=True)
class Context:
    """Where and how one part runs."""

    device: str  # "cuda" or "cpu"
    tiny: bool  # tiny models and batches (the CPU mode; also allowed on CUDA as a smoke test)
    workdir: Path  # scratch shared by the parts of one run (model folders); deleted at the end
    limit_s: float  # this part's own time limit; a subprocess it starts must end sooner

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def policy_folder(self) -> Path:
        """Written by the `policy` part, read by learner_step and rollout_hf."""
        return self.workdir / "policy"

    def require_policy(self) -> Path:
        folder = self.policy_folder
        if not (folder / "config.json").is_file():
            raise RuntimeError(
                f"no policy folder at {folder}: the `policy` part did not write it (see its status)"
            )
        return folder


class Skip(Exception):
    """A part that cannot run here (e.g. CUDA IPC on a CPU machine): recorded as skipped with the reason."""

    def __init__(self, reason: str, detail: dict | None = None):
        super().__init__(reason)
        self.reason, self.detail = reason, detail or {}


def hide_packages(names: tuple[str, ...] = HIDDEN_PACKAGES) -> None:
    """Make `import ray` (and vllm, ...) fail in this process from now on, as on the GPU machine where they are not
    installed: a None entry in sys.modules makes the import raise ModuleNotFoundError and
    importlib.util.find_spec return None (what optional-dependency probes see when a package is absent)."""
    loaded = [n for n in sys.modules if n.split(".")[0] in names]
    if loaded:
        raise RuntimeError(
            f"hide_packages: {sorted(loaded)[:3]} already imported; hide them before any import"
        )
    for name in names:
        sys.modules[name] = None


def synchronize(ctx: Context) -> None:
    if ctx.cuda:
        import torch

        torch.cuda.synchronize()


def peak_memory(ctx: Context) -> dict:
    """The peak memory since the last reset: torch.cuda.max_memory_allocated on CUDA, the process's peak RSS on
    CPU (which includes everything the process ever held)."""
    if ctx.cuda:
        import torch

        return {"peak_memory_gib": round(torch.cuda.max_memory_allocated() / GIB, 2)}
    import resource

    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)}


def reset_peak_memory(ctx: Context) -> None:
    if ctx.cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
