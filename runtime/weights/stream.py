"""One weight version as it arrives, bucket by bucket: the receiving side of every transport (bucket broadcast,
/dev/shm, CUDA IPC, in-process).

A receiver used to stage EVERY bucket of a version before handing it on: on NCCL that is the whole policy on the
rollout GPU, outside vLLM's gpu_memory_utilization. `WeightStream` instead hands the engine one bucket at a time:
the transport's generator receives bucket i+1 (a fresh buffer from `Staging`) while the engine loads bucket i, and
bucket i's buffer is freed as soon as the engine drops its views. The manifest travels first, so an engine
validates every name and shape before it loads anything (actors/engine.py validate_update).

Every member acknowledges a version once (wire.py: all-reduce MIN): with the version when the engine took every
bucket, with -1 when it stopped early (`close` receives the rest first, so the group stays in step and the
learner's send fails cleanly). A transport failure leaves nothing to acknowledge: the stream is broken and the
driver abandons the generation (runtime/weights/abandon.py).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import weakref
from collections.abc import Callable, Iterator

import torch

from protos import WeightsManifest
from runtime.weights.layout import WeightSyncError, dtype_from_name
from runtime.weights.wire import broadcast

logger = logging.getLogger(__name__)

POLL_S = 0.002  # how often a wait for a bucket checks whether the generation was abandoned


class Staging:
    """A receiver's staging buffers: a fresh flat buffer per bucket, freed when nobody holds a view of it any more.
    Counts the bytes alive at once (`peak_bytes`), which the memory plan bounds by two buckets."""

    def __init__(self):
        self._live: list[tuple[weakref.ref, int]] = []
        self.peak_bytes = 0

    def new(self, nbytes: int, device: torch.device) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)  # (nbytes,)
        self._live = [(ref, n) for ref, n in self._live if ref() is not None]
        self._live.append((weakref.ref(buf), nbytes))
        self.peak_bytes = max(self.peak_bytes, self.live_bytes())
        return buf

    def live_bytes(self) -> int:
        return sum(n for ref, n in self._live if ref() is not None)


def wait_work(work, abort: threading.Event | None, what: str) -> None:
    """Wait for a collective's Work, giving up at once (WeightSyncAborted) when `abort` is set: a worker whose
    generation was abandoned must not stay blocked inside its engine's load (it holds the rollout lock)."""
    if abort is not None:
        while not work.is_completed():
            if abort.wait(POLL_S):
                from runtime.weights.abandon import WeightSyncAborted

                raise WeightSyncAborted(f"weight-sync generation abandoned while {what}")
    work.wait()


def recv_json(pg, device: torch.device, abort: threading.Event | None, what: str) -> dict:
    """wire.recv_header whose waits end at once when the generation is abandoned (`wait_work`)."""
    n = torch.zeros(1, dtype=torch.int64, device=device)
    wait_work(broadcast(pg, n), abort, what)
    payload = torch.empty(int(n.item()), dtype=torch.uint8, device=device)  # (n,)
    wait_work(broadcast(pg, payload), abort, what)
    return json.loads(bytes(payload.cpu().numpy()).decode())


def bucket_specs(manifest: WeightsManifest) -> list[list]:
    """The manifest's tensors per bucket, in manifest order."""
    out: list[list] = [[] for _ in manifest.bucket_nbytes]
    for spec in manifest.tensors:
        out[spec.bucket].append(spec)
    return out


class WeightStream:
    """The tensors of one version, delivered bucket by bucket; iterate it once.

    `buffers` yields each bucket's flat uint8 buffer in order (the transport); `finish(ok)` acknowledges the
    version (ok: every bucket was taken). Iterating gives (name, tensor) views; the stream keeps no reference to a
    bucket it has handed out, so its buffer lives only as long as the consumer keeps views of it."""

    def __init__(
        self,
        manifest: WeightsManifest,
        buffers: Iterator[torch.Tensor],
        finish: Callable[[bool], None] = lambda ok: None,
    ):
        self.manifest = manifest
        self.version = manifest.version
        self._buffers = buffers
        self._finish = finish
        self._state = "new"  # new -> taking -> done | broken | closed

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor, known before any bucket arrived."""
        return [(t.name, tuple(t.shape)) for t in self.manifest.tensors]

    @property
    def done(self) -> bool:
        return self._state == "done"

    def buckets(self) -> Iterator[collections.deque]:
        """One deque of (name, view) per bucket; the caller pops them (so it alone holds the views)."""
        if self._state != "new":
            raise WeightSyncError(f"the weight stream of version {self.version} was already read")
        self._state = "taking"
        for i, specs in enumerate(bucket_specs(self.manifest)):
            buf = self._next_buffer(i)
            views = collections.deque(
                (s.name, buf[s.offset : s.offset + s.nbytes].view(dtype_from_name(s.dtype)).view(s.shape))
                for s in specs
            )
            del buf
            yield views
            del views
        self._state = "done"
        self._finish(True)

    def _next_buffer(self, index: int) -> torch.Tensor:
        try:
            return next(self._buffers)
        except StopIteration:
            self._state = "broken"
            raise WeightSyncError(
                f"weight stream of version {self.version} ended before bucket {index}"
            ) from None
        except BaseException:
            self._state = "broken"
            raise

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        it = self.buckets()
        while (views := next(it, None)) is not None:
            while views:
                yield views.popleft()
            views = None

    def close(self, failed: bool = False) -> None:
        """After the engine's load: if it stopped before the end, receive the rest (dropped) and acknowledge -1, so
        the learner's send fails cleanly instead of waiting. `failed`: the load raised; a failure to drain is then
        only logged (the load's error is the one to report)."""
        if self._state in ("done", "broken", "closed"):
            return
        self._state = "closed"
        try:
            for _ in self._buffers:
                pass
            self._finish(False)
        except Exception as err:
            if not failed:
                raise
            logger.warning("weight stream of version %d: could not drain the rest (%s)", self.version, err)
