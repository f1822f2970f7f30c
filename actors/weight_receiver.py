"""Applying received weights to a rollout engine (the transports themselves, both ends: runtime/weights/).

A rollout worker's `WeightReceiver` (runtime/weights/collective.py's `DistributedWeightReceiver` in a cluster,
runtime/weights/inprocess.py's in one process) returns each version as a `WeightStream`: the manifest first, then
one bucket at a time as the engine asks for it, so the receiving side stages at most the bucket being loaded and
the one arriving (never the whole policy). `receive_and_load` hands the stream to the engine in ONE
`engine.load_weights(stream, version)` call under the rollout lock: the engine validates every name and shape from
the manifest before it loads anything, marks itself inconsistent while it loads (it refuses to generate,
`InconsistentWeightsError`) and switches to the version only when it took the last bucket. A transfer that fails
or is abandoned half-way leaves the engine refusing until a complete version loads (the driver re-sends the
current one to the next generation). An engine that stops early makes the stream receive the rest and
acknowledge -1, so the learner's send fails instead of waiting.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Protocol

from runtime.weights.interface import WeightReceiver

__all__ = ["WeightLoadingEngine", "receive_and_load"]


class WeightLoadingEngine(Protocol):
    def load_weights(self, named_tensors, version: int) -> None: ...


def receive_and_load(receiver: WeightReceiver, engine: WeightLoadingEngine, lock=None) -> int | None:
    """Receive one version and stream it into the engine in ONE load_weights call (under `lock`, the lock the
    rollout worker holds while generating). Returns the version, or None when the stream closed."""
    got = receiver.receive()
    if got is None:
        return None
    version, named = got
    close = getattr(named, "close", None)  # a WeightStream (the per-parameter baseline arrives whole)
    try:
        with lock if lock is not None else nullcontext():
            engine.load_weights(named, version)
    except BaseException:
        if close is not None:
            close(failed=True)
        raise
    if close is not None:
        close()
        if not named.done:
            raise RuntimeError(f"the engine returned before it took every bucket of version {version}")
    return version
