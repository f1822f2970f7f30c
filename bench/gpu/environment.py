"""The `environment` part: what the check ran on (versions, the GPU), and which carried packages import."""

from __future__ import annotations

import importlib
import os
import platform
import sys
from importlib import metadata

from bench.gpu.common import GIB, Context

DISTRIBUTIONS = (
    "torch",
    "transformers",
    "torchvision",
    "numpy",
    "opencv-python-headless",
    "pyarrow",
    "pydantic",
    "pydantic-core",
    "pysodmetrics",
    "sam2",
    "hydra-core",
    "omegaconf",
    "iopath",
    "peft",
    "pytest",
    "ray",
    "vllm",
)
# module -> what needs it; each is imported to see that it works here (ray and vllm are hidden by the check)
IMPORTS = {
    "protos": "every part (pydantic)",
    "py_sod_metrics": "pysodmetrics, the S-measure reference of the reward tests",
    "sam2": "reward_meta_sam2",
    "ray": "nothing in the check (hidden)",
}


def run(ctx: Context) -> dict:
    import torch

    detail = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_cuda": torch.version.cuda,
        "versions": {name: _version(name) for name in DISTRIBUTIONS},
        "imports": {name: _imports(name) for name in IMPORTS},
    }
    if not ctx.cuda:
        return {"figures": {"cpu_count": os.cpu_count() or 1}, "detail": detail}
    props = torch.cuda.get_device_properties(0)
    detail.update(
        gpu=torch.cuda.get_device_name(0),
        gpu_count=torch.cuda.device_count(),
        gpu_capability=f"{props.major}.{props.minor}",
        gpu_memory_gib=round(props.total_memory / GIB, 1),
        bf16_supported=torch.cuda.is_bf16_supported(),
    )
    return {"figures": {"gpu_memory_gib": detail["gpu_memory_gib"]}, "detail": detail}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _imports(module: str) -> str:
    try:
        importlib.import_module(module)
    except Exception as err:  # ImportError, or a package that breaks on import (torchvision on a CPU torch)
        return f"no: {type(err).__name__}: {str(err)[:200]}"
    return "yes"
