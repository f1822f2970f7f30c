"""Applying received weights to a rollout engine (the transports themselves, both ends: runtime/weights/).

A rollout worker's `WeightReceiver` (runtime/weights/collective.py's `DistributedWeightReceiver` in a cluster,
runtime/weights/inprocess.py's in one process) stages EVERY bucket of one version before `receive()` returns
`(version, named_tensors)`; `receive_and_load` hands them to the engine in one
`engine.load_weights(named_tensors, version)` call, so the engine switches from v to v+1 atomically: it never
sees a mix of versions, and a failed or partial transfer leaves it on v. The tensors are views into the
receiver's staging buffers, valid until the next receive(): load_weights copies.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any, Protocol

import torch

from runtime.weights.collective import DistributedWeightReceiver
from runtime.weights.interface import WeightReceiver
from runtime.weights.layout import WeightSyncError, checkpoint_names
from runtime.weights.wire import GroupInfo

__all__ = [
    "BackgroundWeightLoader",
    "InMemoryEngine",
    "WeightReceiverEndpoint",
    "WeightLoadingEngine",
    "model_name_map",
    "receive_and_load",
]


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


class BackgroundWeightLoader:
    """Receives and applies versions in a daemon thread (asynchronous mode), until the learner closes the stream.

    `lock` serialises load_weights with generation; `loaded_version` is the version the engine holds."""

    def __init__(
        self, receiver: WeightReceiver, engine: WeightLoadingEngine, lock: threading.Lock | None = None
    ):
        self.receiver, self.engine = receiver, engine
        self.lock = lock or threading.Lock()
        self.loaded_version = -1
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="weight-receiver", daemon=True)

    def start(self) -> BackgroundWeightLoader:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while True:
                v = receive_and_load(self.receiver, self.engine, self.lock)
                if v is None:
                    return
                self.loaded_version = v
        except BaseException as err:  # surfaced to the owner through .error / join()
            self.error = err

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
        if self.error is not None:
            raise WeightSyncError(f"weight receiver thread failed: {self.error}") from self.error


class InMemoryEngine:
    """Holds the last complete version it was given (tests, benchmarks): a real engine without a model."""

    def __init__(self):
        self.version = -1
        self.weights: dict[str, torch.Tensor] = {}
        self.loads = 0

    def load_weights(self, named_tensors, version: int) -> None:
        self.weights = {n: t.detach().clone() for n, t in named_tensors}  # copy out of the staging buffers
        self.version = version
        self.loads += 1


class WeightReceiverEndpoint:
    """A receiving endpoint with its own engine (default: InMemoryEngine). A plain class: a Ray actor in the
    weight-broadcast integration test and benchmarks (created in cluster/pools/topology.py), in-process otherwise."""

    def __init__(self, name: str, engine: WeightLoadingEngine | None = None):
        self.name = name
        self.engine = engine if engine is not None else InMemoryEngine()
        self.receiver = DistributedWeightReceiver(name)
        self.lock = threading.Lock()

    def join(self, info: GroupInfo | Mapping[str, Any]) -> int:
        return self.receiver.join(info)

    def receive(self) -> int | None:
        """Receive one version and switch the engine to it; None when the learner closed the stream."""
        return receive_and_load(self.receiver, self.engine, self.lock)

    def state(self) -> dict:
        """Engine version, number of load_weights calls, sha256 of every tensor (bit-identity checks)."""
        import hashlib

        weights = getattr(self.engine, "weights", {})
        digests = {
            n: hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for n, t in weights.items()
            if t.numel()
        }
        return {
            "version": getattr(self.engine, "version", None),
            "loads": getattr(self.engine, "loads", None),
            "digests": digests,
            "shared_memory": self.receiver.shared_memory,
        }


def model_name_map(model) -> dict[str, str]:
    """Checkpoint name -> in-memory parameter name of a transformers model (plus identity for in-memory names).

    Weight updates carry checkpoint names (those of model.safetensors, which vLLM expects); a transformers engine
    translates them with this map (e.g. Qwen2.5-VL `model.layers.0...` -> `model.language_model.layers.0...`)."""
    mapping = {disk: mem for mem, disk in checkpoint_names(model).items()}
    mapping.update({mem: mem for mem in list(mapping.values())})
    return mapping
