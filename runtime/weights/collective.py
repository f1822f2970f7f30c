"""Collective weight transport: learner rank 0 -> every rollout worker over a torch.distributed process group
(gloo on CPU, NCCL on GPU), both ends.

One version travels as header (`WireOp.WEIGHTS` + manifest) -> every bucket (one broadcast each, the learner
packing bucket i+1 while bucket i is on the wire) -> ack (wire.py). On CPU, when every member maps the learner's
shared memory (same node; probed once per generation), `DistributedWeightSender` moves the bytes through /dev/shm
instead (shm.py). `DistributedWeightReceiver` is every member of the group: whichever way the learner sends them
(buckets, shared memory, CUDA IPC handles (cuda_ipc.py)), it hands the buckets of version v to the engine one at
a time as a `WeightStream` (stream.py), staging at most the bucket being loaded and the one arriving; the
per-parameter benchmark baseline is received whole. Membership changes (a worker joins mid-run) are a new
generation: the learner calls prepare(members) then connect() while every member calls join(info) again; the
learner then re-sends the current version so a new member starts from the current weights.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from protos import WeightsManifest
from runtime.weights.cuda_ipc import ipc_buffers
from runtime.weights.delta import DeltaDecoder, DeltaEncoder
from runtime.weights.interface import SendStats
from runtime.weights.layout import (
    NamedTensors,
    WeightSyncError,
    dtype_from_name,
    dtype_name,
    layout_of,
    pack_bucket,
    plan_manifest,
    tensor_source,
)
from runtime.weights.payloads import agree_on_base, payload_buffers, send_payloads
from runtime.weights.shm import (
    MappedSegments,
    SharedSegments,
    answer_shared_memory_probe,
    probe_shared_memory,
    send_shm,
)
from runtime.weights.stream import Staging, WeightStream, wait_work
from runtime.weights.wire import (
    GroupInfo,
    SenderGroup,
    WireOp,
    all_min,
    broadcast,
    check_ack,
    group_device,
    join_group,
    recv_header,
    recv_op,
    send_header,
    send_op,
)


class DistributedWeightSender:
    """`WeightSender`: learner rank 0 of a gloo or NCCL weight-sync group."""

    def __init__(
        self,
        backend: str = "gloo",
        host: str = "127.0.0.1",
        bucket_mb: float = 256,
        timeout_s: float = 1800.0,
        use_shm: bool | None = None,
        delta: DeltaEncoder | None = None,
    ):
        """use_shm (gloo only): None probes at connect() whether every member maps this process's shared memory
        (same node) and then moves the bytes through /dev/shm (gloo carries only the control messages); False
        always sends the bytes over gloo (TCP); True requires shared memory. delta: send each version as deltas
        against the last one every member acknowledged (runtime/weights/delta.py, payloads.py)."""
        if backend not in ("gloo", "nccl"):
            raise WeightSyncError(f"DistributedWeightSender backend must be gloo or nccl, got {backend!r}")
        self.backend, self.bucket_mb = backend, bucket_mb
        self.group = SenderGroup(backend, host, timeout_s)
        self.use_shm = use_shm if backend == "gloo" else False
        self.shm_active = False
        self._buffers: list[torch.Tensor] = []
        self._segments = SharedSegments()
        self._abandoned_segments: list[SharedSegments] = []
        self.delta = delta
        self._fresh = (
            True  # a generation whose members may not hold the encoder's base: the next version is full
        )

    @property
    def info(self) -> GroupInfo | None:
        return self.group.info

    @property
    def device(self) -> torch.device:
        return self.group.device

    def prepare(self, members: Sequence[str]) -> GroupInfo:
        """Open the rendezvous of a new generation for `members` (ranks 1..n in that order); non-blocking."""
        return self.group.prepare(members, shm_probe=self.use_shm is not False)

    def connect(self) -> None:
        """Blocks until every member of the prepared generation called join(); the old group is dropped."""
        pg = self.group.connect()
        self._fresh = True
        self.shm_active = probe_shared_memory(pg) if self.group.info.shm_probe else False
        if self.use_shm is True and not self.shm_active:
            raise WeightSyncError(
                "use_shm=True but a member cannot map the learner's shared memory (another "
                "node?); use use_shm=None (probe) or False (bytes over gloo)"
            )

    def send(self, named_tensors: NamedTensors, version: int) -> SendStats:
        """Broadcast every bucket of `version`; returns once every member's engine took all of them (ack)."""
        pg, t0 = self.group.require(), time.perf_counter()
        manifest = plan_manifest(layout_of(named_tensors), version, self.bucket_mb)
        if self.delta is not None:
            return self._send_delta(pg, manifest, tensor_source(named_tensors), t0)
        if self.shm_active:
            sent = send_shm(pg, self._segments, manifest, tensor_source(named_tensors))
        else:
            sent = self._send_buckets(pg, manifest, tensor_source(named_tensors))
        check_ack(pg, self.device, version, "stage weights")
        return SendStats(version, manifest.total_bytes, sent, time.perf_counter() - t0)

    def _send_delta(self, pg, manifest: WeightsManifest, tensors, t0: float) -> SendStats:
        """The version as payloads (deltas where every member holds the base); the base is kept only once every
        member acknowledged the version."""
        segments = self._segments if self.shm_active else None
        try:
            sent = send_payloads(pg, self.device, self.delta, manifest, tensors, self._fresh, segments)
            check_ack(pg, self.device, manifest.version, "stage weights")
        except BaseException:
            self.delta.invalidate(manifest)
            raise
        self.delta.commit(manifest)
        self._fresh = False
        d = self.delta.stats
        return SendStats(
            manifest.version,
            d.payload_bytes,
            sent,
            time.perf_counter() - t0,
            full_bytes=d.full_bytes,
            delta_base=d.base,
            changed_fraction=d.changed_fraction if d.compared else None,
            encode_s=d.encode_s,
        )

    def _send_buckets(self, pg, manifest: WeightsManifest, by_name: dict) -> int:
        """Header, then one broadcast per bucket, double buffered: bucket i+1 is packed while i is on the wire."""
        send_op(pg, self.device, WireOp.WEIGHTS, manifest=manifest.model_dump(mode="json"))
        works = []
        biggest = max(manifest.bucket_nbytes, default=0)
        while len(self._buffers) < 2:
            self._buffers.append(torch.empty(0, dtype=torch.uint8, device=self.device))
        for i in range(len(manifest.bucket_nbytes)):
            slot = i % 2
            if len(works) >= 2:
                works[-2].wait()
            if self._buffers[slot].numel() < biggest:
                self._buffers[slot] = torch.empty(biggest, dtype=torch.uint8, device=self.device)
            works.append(broadcast(pg, pack_bucket(manifest, i, by_name, self._buffers[slot])))
        for w in works:
            w.wait()
        return len(works)

    def send_per_param(self, named_tensors: NamedTensors, version: int) -> SendStats:
        """BENCHMARK BASELINE ONLY: one metadata header and one broadcast per parameter (what several frameworks
        do). Receivers allocate each tensor on arrival and cannot switch atomically without extra copies."""
        pg, t0 = self.group.require(), time.perf_counter()
        send_op(pg, self.device, WireOp.PER_PARAM, version=version, count=len(named_tensors))
        nbytes = 0
        for name, t in named_tensors:
            meta = {"name": name, "shape": list(t.shape), "dtype": dtype_name(t.dtype)}
            send_header(pg, self.device, meta)
            broadcast(pg, t.detach().to(self.device).contiguous()).wait()
            nbytes += t.numel() * t.element_size()
        check_ack(pg, self.device, version, "receive per-parameter")
        return SendStats(version, nbytes, len(named_tensors), time.perf_counter() - t0)

    def abandon(self) -> None:
        """Drop the current generation (a member is gone, runtime/weights/abandon.py): a transfer still blocked on
        it keeps its buffers and shared-memory segments; the next generation gets new ones."""
        self.group.abandon()
        self._fresh = True
        self._buffers = []
        self._abandoned_segments.append(self._segments)
        self._segments = SharedSegments()
        self.shm_active = False

    def close(self, notify: bool = False) -> None:
        """Drop the group and the shared-memory segments. notify=True first tells every member the stream ended
        (their blocked receive() returns None); it blocks until each member is in receive(), so use it only
        when they are (e.g. background receiver loops)."""
        try:
            self.group.close(notify)
        finally:
            for segments in [self._segments, *self._abandoned_segments]:
                segments.release()
            self._abandoned_segments = []


class DistributedWeightReceiver:
    """`WeightReceiver`: a member (rank >= 1) of the learner's weight-sync group.

    receive() returns a `WeightStream` whose tensors are views into one bucket's staging buffer at a time: the
    engine's load_weights copies them, and the buffer serves a later bucket once it dropped them (stream.py Staging)."""

    def __init__(self, name: str, device: str | torch.device | None = None):
        self.name = name
        self.version = -1  # last version whose every bucket the engine took
        self.info: GroupInfo | None = None
        self._device = torch.device(device) if device is not None else None
        self._pg = None
        self._store = None
        self.staging = Staging()  # a buffer per bucket in flight; peak_bytes: at most two buckets at once
        self._abort = threading.Event()
        self._mapped = MappedSegments()  # the learner's /dev/shm segments, mapped (same node)
        self.shared_memory = False  # whether this generation moves the bytes through shared memory
        self.last_receive_s = 0.0
        self.delta = DeltaDecoder()  # the last version, in host memory, when the learner sends deltas

    def join(self, info: GroupInfo | Mapping[str, Any]) -> int:
        """Join the generation described by info; blocks until every member and the learner are there.

        Returns this member's rank."""
        info = info if isinstance(info, GroupInfo) else GroupInfo.from_dict(info)
        if self.name not in info.ranks:
            raise WeightSyncError(
                f"weight-sync generation {info.generation} has no rank for member {self.name!r} "
                f"(members: {sorted(info.ranks)}); the learner must prepare() the group with this worker's name"
            )
        self._pg = None  # drop the previous generation first
        self._abort.clear()
        rank = info.ranks[self.name]
        self._store, self._pg = join_group(info, rank)
        self.info = info
        self.shared_memory = answer_shared_memory_probe(self._pg) if info.shm_probe else False
        return rank

    @property
    def device(self) -> torch.device:
        if self._device is not None:
            return self._device
        return group_device(self.info.backend if self.info else "gloo")

    def receive(self) -> tuple[int, WeightStream | list[tuple[str, torch.Tensor]]] | None:
        """Block until the learner announces a version; None when it closed the stream. Returns the version and
        its `WeightStream`: iterating it receives the buckets one at a time (the engine loads bucket i while
        bucket i+1 arrives), and taking the last one acknowledges the version to the learner."""
        if self._pg is None:
            raise WeightSyncError(
                f"weight receiver {self.name!r} has not joined a group: call join(info) first"
            )
        t0, pg = time.perf_counter(), self._pg
        wire = group_device(self.info.backend)
        op, header = recv_op(pg, wire)
        if op is WireOp.CLOSE:
            self._pg = None
            self._mapped.close()
            return None
        if op is WireOp.PER_PARAM:
            version = int(header["version"])
            named = self._receive_per_param(int(header["count"]), wire)
            self._acknowledge(pg, version, True, wire, t0)
            return version, named
        manifest = WeightsManifest.model_validate(header["manifest"])
        ack_on = torch.device("cpu") if op is WireOp.WEIGHTS_IPC else wire
        decoded = bool(header.get("delta"))
        if decoded:
            buffers = self._payloads(pg, op, header, manifest, ack_on)
        else:
            self.delta.version = -1  # the engine moves past what the decoder holds
            buffers = self._buffers(pg, op, header, manifest, wire)
        finish = lambda ok: self._acknowledge(pg, manifest.version, ok, ack_on, t0, decoded)  # noqa: E731
        return manifest.version, WeightStream(manifest, buffers, finish)

    def _payloads(self, pg, op: WireOp, header: dict, manifest: WeightsManifest, wire: torch.device):
        """A version sent as payloads: agree on its base, then apply each bucket to the decoder's held buckets."""
        delta = agree_on_base(pg, wire, self.delta, header, manifest)
        self.delta.begin(manifest, delta)
        if op is WireOp.WEIGHTS_SHM:
            self._mapped.open(header["segments"])
            return payload_buffers(pg, wire, self.delta, manifest, self.staging, self._abort, self._mapped)
        if op is WireOp.WEIGHTS_IPC:
            return ipc_buffers(pg, manifest, self.staging, self._abort, self.delta)
        return payload_buffers(pg, wire, self.delta, manifest, self.staging, self._abort)

    def abort(self) -> None:
        """The generation was abandoned (a member left): a wait for a bucket raises WeightSyncAborted at once, so
        an engine load blocked on it ends (and releases the rollout lock)."""
        self._abort.set()

    def _acknowledge(
        self, pg, version: int, ok: bool, device: torch.device, t0: float, decoded=False
    ) -> None:
        if ok and decoded:
            self.delta.finish(version)  # every bucket applied: later deltas may build on it
        all_min(pg, device, version if ok else -1)
        if ok:
            self.version = version
        self.last_receive_s = time.perf_counter() - t0

    def _buffers(self, pg, op: WireOp, header: dict, manifest: WeightsManifest, wire: torch.device):
        """The buckets of `op`, one flat buffer at a time (staging holds the one handed out and the next)."""
        if op is WireOp.WEIGHTS:
            return self._broadcast_buffers(pg, manifest, wire)
        if op is WireOp.WEIGHTS_SHM:
            return self._mapped.buffers(pg, manifest, header["segments"], self.staging, self._abort)
        if op is WireOp.WEIGHTS_IPC:
            return ipc_buffers(pg, manifest, self.staging, self._abort)
        raise WeightSyncError(f"weight-sync op {op.value!r} cannot start a version (protocol mismatch?)")

    def _broadcast_buffers(self, pg, manifest: WeightsManifest, wire: torch.device):
        """One broadcast per bucket; bucket i+1 is posted as soon as bucket i arrived, so it travels while the
        engine loads bucket i."""
        sizes = manifest.bucket_nbytes
        post = lambda i: (buf := self.staging.new(sizes[i], wire), broadcast(pg, buf))  # noqa: E731
        nxt = post(0) if sizes else None
        for i in range(len(sizes)):
            buf, work = nxt
            nxt = None
            wait_work(work, self._abort, f"receiving bucket {i}")
            if i + 1 < len(sizes):
                nxt = post(i + 1)
            yield buf
            del buf

    def _receive_per_param(self, count: int, wire: torch.device) -> list[tuple[str, torch.Tensor]]:
        """Benchmark baseline only: one header and one broadcast per parameter, each tensor freshly allocated."""
        out = []
        for _ in range(count):
            meta = recv_header(self._pg, wire)
            t = torch.empty(meta["shape"], dtype=dtype_from_name(meta["dtype"]), device=wire)
            broadcast(self._pg, t).wait()
            out.append((meta["name"], t))
        return out

    def close(self) -> None:
        self._pg = None
        self._store = None
        self._mapped.close()
