"""Applying received weights to a rollout engine (the transports themselves, both ends: runtime/weights/).

A rollout worker's `WeightReceiver` (runtime/weights/collective.py's `DistributedWeightReceiver` in a cluster,
runtime/weights/inprocess.py's in one process) stages EVERY bucket of one version before `receive()` returns
`(version, named_tensors)`; `receive_and_load` hands them to the engine in one
`engine.load_weights(named_tensors, version)` call, so the engine switches from v to v+1 atomically: it never
sees a mix of versions, and a failed or partial transfer leaves it on v. The tensors are views into the
receiver's staging buffers, valid until the next receive(): load_weights copies.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Protocol

from runtime.weights.interface import WeightReceiver

__all__ = ["WeightLoadingEngine", "receive_and_load"]


class WeightLoadingEngine(Protocol):
    def load_weights(self, named_tensors, version: int) -> None: ...


def receive_and_load(receiver: WeightReceiver, engine: WeightLoadingEngine, lock=None) -> int | None:
    """Receive one complete version, then switch the engine to it in ONE load_weights call (under `lock`, the
    lock the rollout worker holds while generating). Returns the version, or None when the stream closed."""
    got = receiver.receive()
    if got is None:
        return None
    version, named = got
    with lock if lock is not None else nullcontext():
        engine.load_weights(named, version)
    return version
