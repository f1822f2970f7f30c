"""One weight version as it arrives, bucket by bucket: the receiving side of every transport (bucket broadcast,
/dev/shm, CUDA IPC, in-process).

A receiver used to stage EVERY bucket of a version before handing it on: on NCCL that is the whole policy on the
rollout GPU, outside vLLM's gpu_memory_utilization. `WeightStream` instead hands the engine one bucket at a time:
the transport's generator receives bucket i+1 (a buffer from `Staging`) while the engine loads bucket i, and
bucket i's buffer is free again as soon as the engine drops its views. The manifest travels first, so an engine
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
    """A receiver's staging buffers, one per bucket, counting the bytes in use at once (`peak_bytes`, which the
    memory plan bounds by two buckets).

    On CPU a buffer nobody holds a view of any more (the engine copied its bucket) serves a later bucket again, and
    at most `KEEP` idle ones are kept for the next version: allocating and first touching a fresh 64 MB buffer cost
    ~20 ms per bucket, which made a version over gloo 1.5x (TCP) to 2x (/dev/shm) slower than reused buffers. A view
    the engine still holds (vLLM keeps the tensors of a layer whose weights are not all there yet) keeps its buffer
    from reuse. On a GPU every bucket gets a fresh buffer: torch's caching allocator already reuses the memory."""

    KEEP = 2

    def __init__(self):
        self._cpu: list[torch.Tensor] = []  # CPU buffers this staging owns, each its own storage
        self._other: list[tuple[weakref.ref, int]] = []  # fresh device buffers, alive while a view is
        self.peak_bytes = 0

    def new(self, nbytes: int, device: torch.device) -> torch.Tensor:
        if torch.device(device).type == "cpu":
            buf = self._reuse(nbytes)
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)  # (nbytes,)
            self._other = [(ref, n) for ref, n in self._other if ref() is not None]
            self._other.append((weakref.ref(buf), nbytes))
        self.peak_bytes = max(self.peak_bytes, self.live_bytes())
        return buf

    def _reuse(self, nbytes: int) -> torch.Tensor:
        idle = sorted((b for b in self._cpu if not _in_use(b)), key=lambda b: b.numel())
        fits = [b for b in idle if b.numel() >= nbytes]
        if fits:
            base = fits[0]
        else:
            base = torch.empty(nbytes, dtype=torch.uint8)  # (nbytes,)
            self._cpu.append(base)
        spare = [b for b in idle if b is not base][: self.KEEP]
        self._cpu = [b for b in self._cpu if b is base or _in_use(b) or any(b is k for k in spare)]
        return base[:nbytes]

    def live_bytes(self) -> int:
        cpu = sum(b.numel() for b in self._cpu if _in_use(b))
        return cpu + sum(n for ref, n in self._other if ref() is not None)


def _in_use(buf: torch.Tensor) -> bool:
    """Whether anything but this staging holds the buffer's storage (a view handed out, the engine's tensors).
    Reads the storage's use count (torch._C): here 2 (the buffer, the storage object asked for); where that call is
    missing, a buffer counts as in use, so every bucket gets a fresh one (correct, slower)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return True
    return use_count(buf.untyped_storage()._cdata) > 2


def wait_work(work, abort: threading.Event | None, what: str) -> None:
    """Wait for a collective's Work, giving up at once (WeightSyncAborted) when `abort` is set: a worker whose
    generation was abandoned must not stay blocked inside its engine's load (it holds the rollout lock)."""
    if abort is not None:
        # short at first: a chunk announcement arrives within microseconds when the sender is ahead
        delay = 5e-5
        while not work.is_completed():
            delay = min(2 * delay, POLL_S)
            if abort.wait(delay):
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
