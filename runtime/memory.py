"""What a worker process has used at its peak, for `segr1 preflight` (cluster/preflight.py asks every actor).

On a GPU: torch's peak of allocated bytes on every device the process touched (the caching allocator's view:
what vLLM's in-process engine, the learner and SAM2 allocate through torch; a vLLM engine core in another
process, AsyncLLM or TP > 1, is not seen). Everywhere: the process's peak resident set, and its children's
(getrusage), which covers an engine core process on CPU.
"""

from __future__ import annotations

import os
import resource
import socket
import sys


def peak_memory() -> dict:
    """{"device": "cuda" | "cpu", "peak_bytes", "rss_peak_bytes", "children_rss_peak_bytes", "gpus", "node"}:
    peak_bytes is the GPU peak where the process used CUDA, else the resident-set peak."""
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * unit
    out = {
        "device": "cpu",
        "peak_bytes": rss,
        "rss_peak_bytes": rss,
        "children_rss_peak_bytes": children,
        "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "node": socket.gethostname(),
    }
    torch = sys.modules.get("torch")  # a process that never imported torch used no GPU
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks = [torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())]
        out.update(device="cuda", peak_bytes=max(peaks, default=0))
    return out
