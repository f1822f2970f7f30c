"""Abandoning a weight-sync generation at once when one of its members is gone.

Forming a generation (`ProcessGroupGloo(...)` waits for every rank) and one transfer (a broadcast waits for every
receiver) block until the transport's own timeout (weight_sync.timeout_s, minutes) when a member died: a node lost
takes its rollout workers with it and nothing tells torch.distributed. Ray does tell the driver at once (the
member's pending call fails), so both ends run these blocking calls through `Abandonable.run`: the call runs in a
daemon thread that the caller watches, and `abandon(generation)` (from another thread: a concurrent actor call)
makes the caller raise `WeightSyncAborted` within `poll_s`.

Giving up the call is not enough on NCCL: there `work.wait()` does not block the CPU but makes the caller's CUDA
stream wait for the collective, so every later kernel of the process would queue behind one that never ends, and
after timeout_s the NCCL watchdog tears the process down. So every process group a generation's calls create
(`wire.make_group`, on either end) is remembered, and `abandon` aborts it (`wire.abort_group`): ncclCommAbort
ends the waiting kernel, the stream runs again and the left-behind thread's call fails at once. A gloo group
cannot be aborted (torch 2.13: `wire.ABORTABLE_BACKENDS`): its thread stays behind until the transport gives up,
holding only the abandoned group and no device stream. Either way the next generation is a fresh rendezvous
(TCPStore on a new port, a new communicator), so nothing of the abandoned one is waited for.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from runtime.weights.layout import WeightSyncError
from runtime.weights.wire import abort_group, formed_groups

T = TypeVar("T")


class WeightSyncAborted(WeightSyncError):
    """The generation was abandoned (a member left) while this call waited on it."""


class Abandonable:
    """Runs the blocking calls of weight-sync generations so that abandon(generation) ends them at once."""

    def __init__(self, poll_s: float = 0.05):
        self.poll_s = poll_s
        self._upto = 0  # every generation <= this one is abandoned
        self._lock = threading.Lock()
        self._groups: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()  # group -> generation
        self.left_behind = 0  # threads still blocked in an abandoned call when it was given up
        self.aborted = 0  # abandoned generations' groups aborted: their blocked calls fail at once
        self.unabortable = 0  # abandoned generations' groups a backend cannot abort (gloo): left to time out

    def abandon(self, generation: int) -> None:
        """Give up every generation up to `generation`: calls waiting on them raise WeightSyncAborted, and the
        groups they formed are aborted where the backend can."""
        with self._lock:
            self._upto = max(self._upto, generation)
            doomed = [pg for pg, g in list(self._groups.items()) if g <= self._upto]
            for pg in doomed:
                del self._groups[pg]
        for pg in doomed:
            self._abort(pg)

    def abandon_all(self) -> None:
        """Give up every generation, those to come included (the learner that numbered them is gone)."""
        self.abandon(sys.maxsize)

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
                with formed_groups(lambda pg: self._adopt(generation, pg)):
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

    def _adopt(self, generation: int, pg: Any) -> None:
        """A group formed by a call of `generation`: aborted with it (at once if it was abandoned meanwhile)."""
        with self._lock:
            if generation > self._upto:
                self._groups[pg] = generation
                return
        self._abort(pg)

    def _abort(self, pg: Any) -> None:
        if abort_group(pg):
            self.aborted += 1
        else:
            self.unabortable += 1

    def _check(self, generation: int, what: str) -> None:
        if self.abandoned(generation):
            raise WeightSyncAborted(
                f"weight-sync generation {generation} was abandoned while {what} (a member left the group); "
                "the driver forms the next generation with the live members"
            )
