"""In-process weight transport (tests, single-process runs): the same packing and atomicity as the real ones."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from protos import WeightsManifest
from runtime.weights.interface import SendStats
from runtime.weights.layout import (
    NamedTensors,
    layout_of,
    pack_bucket,
    plan_manifest,
    tensor_source,
)
from runtime.weights.stream import Staging, WeightStream
from runtime.weights.wire import GroupInfo


class InProcessChannel:
    """One sender, any number of receivers in the same process.

    A receiver created after a send starts with the latest version queued (a late joiner gets current weights).
    """

    def __init__(self, bucket_mb: float = 256):
        self.bucket_mb = bucket_mb
        self._queues: list[queue.Queue] = []
        self._latest: tuple[WeightsManifest, list[torch.Tensor]] | None = None
        self._lock = threading.Lock()

    def sender(self) -> InProcessSender:
        return InProcessSender(self)

    def receiver(self) -> InProcessReceiver:
        q: queue.Queue = queue.Queue()
        with self._lock:
            if self._latest is not None:
                q.put(self._latest)
            self._queues.append(q)
        return InProcessReceiver(q)

    def _publish(self, item) -> None:
        with self._lock:
            if item is not None:
                self._latest = item
            for q in self._queues:
                q.put(item)


class InProcessSender:
    """`WeightSender` of an InProcessChannel: no rendezvous (receivers come from channel.receiver())."""

    info: GroupInfo | None = None

    def __init__(self, channel: InProcessChannel):
        self.channel = channel

    def prepare(self, members: Sequence[str]) -> None:
        """Nothing to open within one process."""
        return None

    def connect(self) -> None:
        pass

    def send(self, named_tensors: NamedTensors, version: int) -> SendStats:
        t0 = time.perf_counter()
        manifest = plan_manifest(layout_of(named_tensors), version, self.channel.bucket_mb)
        by_name = tensor_source(named_tensors)
        buckets = [pack_bucket(manifest, i, by_name).cpu() for i in range(len(manifest.bucket_nbytes))]
        self.channel._publish((manifest, buckets))
        return SendStats(version, manifest.total_bytes, len(buckets), time.perf_counter() - t0)

    def abandon(self) -> None:
        """Nothing to drop: an in-process channel has no group."""

    def close(self, notify: bool = True) -> None:
        """Ends every receiver's stream (their receive() returns None), whatever notify says."""
        self.channel._publish(None)


class InProcessReceiver:
    """`WeightReceiver` of an InProcessChannel: joined from creation."""

    def __init__(self, q: queue.Queue):
        self._q = q
        self.version = -1
        self.staging = Staging()

    def join(self, info: GroupInfo | Mapping[str, Any] | None = None) -> int:
        """Already joined (channel.receiver()); returns 0."""
        return 0

    def receive(self, timeout: float | None = None):
        """(version, WeightStream) of the next published version; each bucket is copied out of the published
        one when the engine asks for it (the sender may publish again at once)."""
        item = self._q.get(timeout=timeout)
        if item is None:
            return None
        manifest, buckets = item

        def buffers():
            for b in buckets:
                buf = self.staging.new(b.numel(), b.device)
                buf.copy_(b)
                yield buf
                del buf

        def finish(ok: bool) -> None:
            if ok:
                self.version = manifest.version

        return manifest.version, WeightStream(manifest, buffers(), finish)

    def close(self) -> None:
        pass
