"""What a worker process has used at its peak, for `segr1 preflight` (cluster/preflight.py asks every actor).

- GPU, CUDA used in this process: torch's peak of allocated bytes over its devices (the caching allocator's view:
  what the learner, SAM2 and an in-process vLLM engine allocate through torch, KV cache included).
- GPU, CUDA used only by child processes (a vLLM engine core in its own process, tensor-parallel workers): NVML's
  figure of the GPU memory those processes hold now, not a peak (vLLM claims its share at start and keeps it).
- CPU: the peak resident set of this process plus that of each live child (/proc VmHWM; an engine core on CPU).
"""

from __future__ import annotations

import os
import resource
import socket
import sys
from pathlib import Path


def _hwm_bytes(pid: int) -> int:
    """Peak resident set of a live process (Linux /proc/<pid>/status VmHWM); 0 where unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _children() -> list[int]:
    try:
        import psutil

        return [p.pid for p in psutil.Process().children(recursive=True)]
    except Exception:  # psutil missing, or a child gone meanwhile
        return []


def _nvml_bytes(pids: list[int]) -> int | None:
    """GPU memory the processes `pids` hold now, over every GPU NVML sees; None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        wanted, total = set(pids), 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid in wanted and proc.usedGpuMemory:
                    total += int(proc.usedGpuMemory)
        return total
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()


def peak_memory() -> dict:
    """{"device", "peak_bytes", "measure", "rss_peak_bytes", "children_rss_peak_bytes", "gpus", "node"}:
    peak_bytes is what `measure` names (see the module docstring); None where it cannot be measured."""
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    children = _children()
    child_rss = sum(_hwm_bytes(pid) for pid in children)
    out = {
        "device": "cpu",
        "peak_bytes": rss + child_rss,
        "measure": "peak RSS" + (f" (+{len(children)} child processes)" if children else ""),
        "rss_peak_bytes": rss,
        "children_rss_peak_bytes": child_rss,
        "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "node": socket.gethostname(),
    }
    torch = sys.modules.get("torch")  # a process that never imported torch used no GPU itself
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks = [torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())]
        out.update(device="cuda", peak_bytes=max(peaks, default=0), measure="torch max_memory_allocated")
    elif out["gpus"] and children:  # a GPU actor whose CUDA work runs in its children (vLLM's engine core)
        out.update(device="cuda", peak_bytes=_nvml_bytes(children), measure="NVML, child processes, now")
    return out
