"""The two ends of every weight transport: `WeightSender` (the learner) and `WeightReceiver` (a rollout worker).

Implementations: inprocess.py (`InProcessChannel`: one process, tests), collective.py (`DistributedWeightSender`:
buckets over gloo / NCCL, or through /dev/shm (shm.py) when every member maps the learner's shared memory;
`DistributedWeightReceiver`: every group member, whatever the learner sends), cuda_ipc.py (`CudaIpcSender`:
learner and rollout workers on one GPU).

A sender publishes one version at a time; a receiver stages EVERY bucket of a version before `receive()` returns
it, so the engine it feeds switches versions atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from runtime.weights.layout import NamedTensors
from runtime.weights.wire import GroupInfo


@dataclass(frozen=True)
class SendStats:
    """What one send did: version, payload bytes, number of buckets (or tensors), seconds end to end."""

    version: int
    nbytes: int
    buckets: int
    seconds: float


class WeightSender(Protocol):
    """Learner side of a weight transport.

    prepare(members) opens a new generation for those receivers (non-blocking; returns what each passes to
    `WeightReceiver.join`, None where the transport has no rendezvous); connect() blocks until all joined;
    send() returns once every receiver staged the whole version; abandon() drops the current generation without
    talking to its members (one is gone); close(notify=True) ends the receivers' streams."""

    info: GroupInfo | None  # the connected generation, None before connect() (and for in-process)

    def prepare(self, members: Sequence[str]) -> GroupInfo | None: ...

    def connect(self) -> None: ...

    def send(self, named_tensors: NamedTensors, version: int) -> SendStats: ...

    def abandon(self) -> None: ...

    def close(self, notify: bool = False) -> None: ...


class WeightReceiver(Protocol):
    """Worker side: join(info) joins the sender's generation (returns this member's rank); receive() blocks until
    every bucket of one version arrived and returns (version, named views valid until the next receive), or None
    once the sender closed the stream."""

    version: int  # the last version fully staged, -1 before the first

    def join(self, info: GroupInfo | Mapping[str, Any] | None) -> int: ...

    def receive(self) -> tuple[int, list[tuple[str, torch.Tensor]]] | None: ...

    def close(self) -> None: ...
