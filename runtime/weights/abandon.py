"""Abandoning a weight-sync generation at once when one of its members is gone.

Forming a generation (`ProcessGroupGloo(...)` waits for every rank) and one transfer (a broadcast waits for every
receiver) block until the transport's own timeout (weight_sync.timeout_s, minutes) when a member died: a node lost
takes its rollout workers with it and nothing tells torch.distributed. Ray does tell the driver at once (the
member's pending call fails), so both ends run these blocking calls through `Abandonable.run`: the call runs in a
daemon thread that the caller watches, and `abandon(generation)` (from another thread: a concurrent actor call)
makes the caller raise `WeightSyncAborted` within `poll_s`. The thread itself is left behind; it ends when the
transport gives up, holding only the abandoned group. The next generation is a fresh rendezvous (TCPStore on a new
port), so nothing of the abandoned one is waited for.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

from runtime.weights.layout import WeightSyncError

T = TypeVar("T")


class WeightSyncAborted(WeightSyncError):
    """The generation was abandoned (a member left) while this call waited on it."""


class Abandonable:
    """Runs the blocking calls of weight-sync generations so that abandon(generation) ends them at once."""

    def __init__(self, poll_s: float = 0.05):
        self.poll_s = poll_s
        self._upto = 0  # every generation <= this one is abandoned
        self._lock = threading.Lock()
        self.left_behind = 0  # threads still blocked in an abandoned call when it was given up

    def abandon(self, generation: int) -> None:
        """Give up every generation up to `generation`: calls waiting on them raise WeightSyncAborted."""
        with self._lock:
            self._upto = max(self._upto, generation)

    def abandoned(self, generation: int) -> bool:
        with self._lock:
            return generation <= self._upto

    def run(self, generation: int, fn: Callable[[], T], what: str) -> T:
        """fn() (a blocking call of `generation`), unless that generation is abandoned first."""
        self._check(generation, what)
        box: dict = {}
        device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

        def target() -> None:
            try:
                if device is not None:  # the CUDA device is per thread (NCCL groups)
                    torch.cuda.set_device(device)
                box["value"] = fn()
            except BaseException as err:  # handed to the caller below
                box["error"] = err

        thread = threading.Thread(target=target, name=f"weight-sync-{what}", daemon=True)
        thread.start()
        while True:
            thread.join(self.poll_s)
            if not thread.is_alive():
                break
            if self.abandoned(generation):
                self.left_behind += 1
                self._check(generation, what)
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _check(self, generation: int, what: str) -> None:
        if self.abandoned(generation):
            raise WeightSyncAborted(
                f"weight-sync generation {generation} was abandoned while {what} (a member left the group); "
                "the driver forms the next generation with the live members"
            )
