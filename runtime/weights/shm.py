"""Shared-memory weight transport (same node, CPU): the bytes go through /dev/shm, gloo carries only headers.

When every member of a gloo weight-sync group can map the learner's shared memory (probed once per generation:
`probe_shared_memory` / `answer_shared_memory_probe`), the learner packs each bucket into a /dev/shm segment of
its own (`SharedSegments`, reused across versions: the whole version in the learner node's /dev/shm) and
announces, every SHM_CHUNK_BYTES packed, a (bucket, end offset) integer pair over gloo (`send_shm`); a receiver
copies one bucket at a time out of them (`MappedSegments.buffers`) when its engine asks for it; then the usual
ack. The sending side is driven by collective.DistributedWeightSender, the receiving side by
collective.DistributedWeightReceiver (header op `WireOp.WEIGHTS_SHM`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import torch

from protos import WeightsManifest
from runtime.weights.layout import WeightSyncError
from runtime.weights.stream import Staging, wait_work
from runtime.weights.wire import WireOp, all_min, broadcast, recv_header, send_op

# Announce packed bytes every 16 MiB, so receivers copy while the learner packs.
SHM_CHUNK_BYTES = 16 << 20
SHM_PREFIX = "segr1-w-"  # segment names: segr1-w-<creator pid>-<tag>-<bucket>
_TRACKER_LOCK = threading.Lock()
_CPU = torch.device("cpu")


def open_shared(name: str) -> shared_memory.SharedMemory:
    """Map an existing segment without registering it with this process's resource tracker (which would unlink
    the learner's segment when this process exits, or, in a child sharing the learner's tracker, drop its entry)."""
    try:
        return shared_memory.SharedMemory(name=name, create=False, track=False)  # Python >= 3.13
    except TypeError:
        pass
    with _TRACKER_LOCK:
        register = resource_tracker.register
        resource_tracker.register = lambda *_a, **_k: None
        try:
            return shared_memory.SharedMemory(name=name, create=False)
        finally:
            resource_tracker.register = register


def shared_tensor(seg: shared_memory.SharedMemory, nbytes: int) -> torch.Tensor:
    """A uint8 tensor over the first nbytes of a segment (shares its memory). # (nbytes,)"""
    return (
        torch.frombuffer(seg.buf, dtype=torch.uint8, count=nbytes)
        if nbytes
        else torch.empty(0, dtype=torch.uint8)
    )


# ------------------------------------------------------------------------------------------------------------
# Learner side


class SharedSegments:
    """The learner's /dev/shm segments, one per bucket, reused while the bucket sizes stay the same."""

    def __init__(self):
        self._segs: list[shared_memory.SharedMemory] = []
        self._tensors: list[torch.Tensor] = []
        self._sizes: list[int] = []
        self._finalizer = weakref.finalize(self, SharedSegments._unlink_all, self._segs)

    def ensure(self, sizes: Sequence[int]) -> list[str]:
        if list(sizes) != self._sizes:
            self.release()
            remove_orphan_segments()
            tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                for i, n in enumerate(sizes):
                    name = f"{SHM_PREFIX}{tag}-{i}"
                    self._segs.append(shared_memory.SharedMemory(name=name, create=True, size=max(1, n)))
            except OSError as err:
                self.release()
                raise WeightSyncError(
                    f"cannot create {sum(sizes)} bytes of shared memory in /dev/shm ({err}); "
                    "enlarge /dev/shm or send the bytes over gloo (use_shm=False)"
                ) from err
            self._tensors = [shared_tensor(s, n) for s, n in zip(self._segs, sizes, strict=True)]
            self._sizes = list(sizes)
        return [s.name for s in self._segs]

    def tensor(self, i: int) -> torch.Tensor:
        return self._tensors[i]

    def release(self) -> None:
        self._tensors = []
        SharedSegments._unlink_all(self._segs)
        self._segs.clear()  # the same list object the finalizer holds
        self._sizes = []

    @staticmethod
    def _unlink_all(segs: list) -> None:
        """Also runs at interpreter exit (weakref.finalize): a learner that ends without close() leaves nothing."""
        for s in segs:
            with contextlib.suppress(Exception):
                s.unlink()
            with contextlib.suppress(Exception):
                s.close()


def send_shm(
    pg, segments: SharedSegments, manifest: WeightsManifest, by_name: Mapping[str, torch.Tensor]
) -> int:
    """Pack every bucket into its segment, announcing every SHM_CHUNK_BYTES packed with a (bucket, end offset)
    broadcast so receivers copy while packing goes on. Returns the number of announcements; the caller acks."""
    names = segments.ensure(manifest.bucket_nbytes)
    send_op(pg, _CPU, WireOp.WEIGHTS_SHM, manifest=manifest.model_dump(mode="json"), segments=names)
    works, pending = [], 0
    specs = sorted(manifest.tensors, key=lambda t: (t.bucket, t.offset))
    for k, spec in enumerate(specs):
        dst = segments.tensor(spec.bucket)[spec.offset : spec.offset + spec.nbytes]  # (nbytes,) uint8
        src = by_name[spec.name]
        dst.view(src.dtype).view(spec.shape).copy_(src.detach())
        pending += spec.nbytes
        last_of_bucket = k + 1 == len(specs) or specs[k + 1].bucket != spec.bucket
        size = manifest.bucket_nbytes[spec.bucket]
        mid_chunk = pending >= SHM_CHUNK_BYTES and spec.offset + spec.nbytes < size
        if last_of_bucket or mid_chunk:  # receivers copy this much while we pack on
            end = size if last_of_bucket else spec.offset + spec.nbytes
            works.append(broadcast(pg, torch.tensor([spec.bucket, end], dtype=torch.int64)))
            pending = 0
    for w in works:
        w.wait()
    return len(works)


def remove_orphan_segments(min_age_s: float = 60.0) -> list[str]:
    """Unlink weight segments whose creator process is gone (a learner killed without cleaning up), at least
    min_age_s old. Segment names carry the creator's pid; only this machine's /dev/shm is looked at."""
    root = Path("/dev/shm")
    removed: list[str] = []
    if not root.is_dir():
        return removed
    now = time.time()
    for f in root.glob(f"{SHM_PREFIX}*"):
        pid = f.name[len(SHM_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        with contextlib.suppress(OSError):
            if now - f.stat().st_mtime >= min_age_s:
                f.unlink()
                removed.append(f.name)
    return removed


def probe_shared_memory(pg, token_bytes: int = 16) -> bool:
    """Learner side: can every member read a segment this process created? (all-reduce MIN of the answers)"""
    token = os.urandom(token_bytes)
    seg = shared_memory.SharedMemory(
        name=f"segr1-probe-{uuid.uuid4().hex[:12]}", create=True, size=token_bytes
    )
    try:
        seg.buf[:token_bytes] = token
        send_op(pg, _CPU, WireOp.PROBE, name=seg.name, token=token.hex())
        return all_min(pg, _CPU, 1) == 1
    finally:
        seg.close()
        seg.unlink()


# ------------------------------------------------------------------------------------------------------------
# Member side


def answer_shared_memory_probe(pg) -> bool:
    """Member side of probe_shared_memory."""
    header = recv_header(pg, _CPU)
    ok = 0
    with contextlib.suppress(Exception):
        if header.get("op") == WireOp.PROBE:
            seg = open_shared(header["name"])
            ok = int(bytes(seg.buf[: len(header["token"]) // 2]).hex() == header["token"])
            seg.close()
    return all_min(pg, _CPU, ok) == 1


class MappedSegments:
    """A member's mappings of the learner's segments, kept while the learner keeps the same ones."""

    def __init__(self):
        self._segments: list[tuple[str, shared_memory.SharedMemory]] = []

    def open(self, names: list[str]) -> None:
        """Map the learner's segments `names` (kept while they stay the same)."""
        if [n for n, _ in self._segments] != names:
            self.close()
            self._segments = [(n, open_shared(n)) for n in names]

    def tensor(self, index: int, nbytes: int) -> torch.Tensor:
        """The first nbytes of segment `index`, in place (drop it before the mapping closes). # (nbytes,)"""
        return shared_tensor(self._segments[index][1], nbytes)

    def buffers(self, pg, manifest: WeightsManifest, names: list[str], staging: Staging, abort=None):
        """Bucket i copied out of segment i (into a fresh staging buffer) chunk by chunk, as the learner's
        (bucket, end offset) broadcasts arrive; one buffer at a time, when the engine asks for the next bucket."""
        self.open(names)
        for i, size in enumerate(manifest.bucket_nbytes):
            buf = staging.new(size, _CPU)
            source = shared_tensor(self._segments[i][1], size)
            try:
                _copy_bucket(pg, i, source, buf, abort)
            finally:
                del source  # a view of the mapping would keep it from closing
            yield buf
            del buf

    def close(self) -> None:
        for _, seg in self._segments:
            with contextlib.suppress(Exception):
                seg.close()
        self._segments = []


def _copy_bucket(pg, index: int, source: torch.Tensor, buf: torch.Tensor, abort=None) -> None:
    """The learner announces bucket `index` in chunks, in order; the last one ends at its size."""
    ready = torch.zeros(2, dtype=torch.int64)  # (bucket, end offset) packed so far
    start = 0
    while True:
        wait_work(broadcast(pg, ready), abort, f"copying bucket {index} from shared memory")
        b, end = int(ready[0]), int(ready[1])
        if b != index or not start <= end <= buf.numel():
            raise WeightSyncError(f"shared-memory chunk ({b}, {end}) out of order (bucket {index})")
        buf[start:end].copy_(source[start:end])
        start = end
        if end == buf.numel():
            break
