"""The two ends of every weight transport: `WeightSender` (the learner) and `WeightReceiver` (a rollout worker).

Implementations: inprocess.py (`InProcessChannel`: one process, tests), collective.py (`DistributedWeightSender`:
buckets over gloo / NCCL, or through /dev/shm (shm.py) when every member maps the learner's shared memory;
`DistributedWeightReceiver`: every group member, whatever the learner sends), cuda_ipc.py (`CudaIpcSender`:
learner and rollout workers on one GPU).

A sender publishes one version at a time; a receiver's `receive()` returns it as a `WeightStream` (stream.py) that
hands the engine one bucket at a time (the receiving side stages at most two); the engine refuses to generate
from the moment it starts loading until it took the last bucket, so it never generates from a mix of versions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from runtime.weights.layout import NamedTensors
from runtime.weights.wire import GroupInfo


@dataclass(frozen=True)
class SendStats:
    """What one send did: version, payload bytes, number of buckets (or tensors), seconds end to end; with
    `weight_sync.delta`, also the bytes of the whole version, the base its deltas applied to (None: sent whole),
    the fraction of compared elements that changed (None: nothing compared) and the seconds spent encoding."""

    version: int
    nbytes: int
    buckets: int
    seconds: float
    full_bytes: int | None = None
    delta_base: int | None = None
    changed_fraction: float | None = None
    encode_s: float = 0.0


class WeightSender(Protocol):
    """Learner side of a weight transport.

    prepare(members) opens a new generation for those receivers (non-blocking; returns what each passes to
    `WeightReceiver.join`, None where the transport has no rendezvous); connect() blocks until all joined;
    send() returns once every receiver acknowledged the whole version; abandon() drops the current generation without
    talking to its members (one is gone); close(notify=True) ends the receivers' streams."""

    info: GroupInfo | None  # the connected generation, None before connect() (and for in-process)

    def prepare(self, members: Sequence[str]) -> GroupInfo | None: ...

    def connect(self) -> None: ...

    def send(self, named_tensors: NamedTensors, version: int) -> SendStats: ...

    def abandon(self) -> None: ...

    def close(self, notify: bool = False) -> None: ...


class WeightReceiver(Protocol):
    """Worker side: join(info) joins the sender's generation (returns this member's rank); receive() blocks until
    the sender announces a version and returns (version, WeightStream: iterate it to receive the buckets, taking
    the last one acknowledges the version), or None once the sender closed the stream."""

    version: int  # the last version whose every bucket was taken, -1 before the first

    def join(self, info: GroupInfo | Mapping[str, Any] | None) -> int: ...

    def receive(self) -> tuple[int, Iterable[tuple[str, torch.Tensor]]] | None: ...

    def close(self) -> None: ...
