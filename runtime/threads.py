"""Thread limits of a worker process. Several torch / OpenCV processes share a node's cores, so each Ray actor is
told its share through SEGR1_NUM_THREADS (set per actor by cluster/pools/topology.py); unset means unchanged."""

from __future__ import annotations

import os

THREADS_ENV = "SEGR1_NUM_THREADS"


def thread_budget() -> int | None:
    """The threads this process may use (SEGR1_NUM_THREADS), or None when no limit was set."""
    n = os.environ.get(THREADS_ENV)
    return max(1, int(n)) if n else None


def limit_threads(*, torch_threads: bool = True, opencv_threads: bool = False) -> int | None:
    """Apply the budget to torch (and OpenCV); returns it. Importing torch is skipped when not asked for."""
    n = thread_budget()
    if n is None:
        return None
    if torch_threads:
        import torch

        torch.set_num_threads(n)
    if opencv_threads:
        import cv2

        cv2.setNumThreads(n)
    return n
