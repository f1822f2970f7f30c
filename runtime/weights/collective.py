"""Collective weight transport: learner rank 0 -> every rollout worker over a torch.distributed process group
(gloo on CPU, NCCL on GPU), both ends.

One version travels as header (`WireOp.WEIGHTS` + manifest) -> every bucket (one broadcast each, the learner
packing bucket i+1 while bucket i is on the wire) -> ack (wire.py). On CPU, when every member maps the learner's
shared memory (same node; probed once per generation), `DistributedWeightSender` moves the bytes through /dev/shm
instead (shm.py). `DistributedWeightReceiver` is every member of the group: it stages EVERY bucket of version v,
whichever way the learner sends them (buckets, shared memory, CUDA IPC handles (cuda_ipc.py), the per-parameter
baseline), and only then returns them. Membership changes (a worker joins mid-run) are a new generation: the
learner calls prepare(members) then connect() while every member calls join(info) again; the learner then
re-sends the current version so a new member starts from the current weights.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from protos import WeightsManifest
from runtime.weights.cuda_ipc import copy_from_ipc
from runtime.weights.interface import SendStats
from runtime.weights.layout import (
    NamedTensors,
    Staging,
    WeightSyncError,
    bucket_views,
    dtype_from_name,
    dtype_name,
    layout_of,
    pack_bucket,
    plan_manifest,
    tensor_source,
)
from runtime.weights.shm import (
    MappedSegments,
    SharedSegments,
    answer_shared_memory_probe,
    probe_shared_memory,
    send_shm,
)
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
    ):
        """use_shm (gloo only): None probes at connect() whether every member maps this process's shared memory
        (same node) and then moves the bytes through /dev/shm (gloo carries only the control messages); False
        always sends the bytes over gloo (TCP); True requires shared memory."""
        if backend not in ("gloo", "nccl"):
            raise WeightSyncError(f"DistributedWeightSender backend must be gloo or nccl, got {backend!r}")
        self.backend, self.bucket_mb = backend, bucket_mb
        self.group = SenderGroup(backend, host, timeout_s)
        self.use_shm = use_shm if backend == "gloo" else False
        self.shm_active = False
        self._buffers: list[torch.Tensor] = []
        self._segments = SharedSegments()

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
        self.shm_active = probe_shared_memory(pg) if self.group.info.shm_probe else False
        if self.use_shm is True and not self.shm_active:
            raise WeightSyncError(
                "use_shm=True but a member cannot map the learner's shared memory (another "
                "node?); use use_shm=None (probe) or False (bytes over gloo)"
            )

    def send(self, named_tensors: NamedTensors, version: int) -> SendStats:
        """Broadcast every bucket of `version`; returns once every member acknowledged staging all of them."""
        pg, t0 = self.group.require(), time.perf_counter()
        manifest = plan_manifest(layout_of(named_tensors), version, self.bucket_mb)
        if self.shm_active:
            sent = send_shm(pg, self._segments, manifest, tensor_source(named_tensors))
        else:
            sent = self._send_buckets(pg, manifest, tensor_source(named_tensors))
        check_ack(pg, self.device, version, "stage weights")
        return SendStats(version, manifest.total_bytes, sent, time.perf_counter() - t0)

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

    def close(self, notify: bool = False) -> None:
        """Drop the group and the shared-memory segments. notify=True first tells every member the stream ended
        (their blocked receive() returns None); it blocks until each member is in receive(), so use it only
        when they are (e.g. background receiver loops)."""
        try:
            self.group.close(notify)
        finally:
            self._segments.release()


class DistributedWeightReceiver:
    """`WeightReceiver`: a member (rank >= 1) of the learner's weight-sync group.

    The tensors receive() returns are views into staging buffers this receiver owns, valid until the next
    receive(): the engine's load_weights copies them."""

    def __init__(self, name: str, device: str | torch.device | None = None):
        self.name = name
        self.version = -1  # last version fully staged
        self.info: GroupInfo | None = None
        self._device = torch.device(device) if device is not None else None
        self._pg = None
        self._store = None
        self._staging = Staging()
        self._mapped = MappedSegments()  # the learner's /dev/shm segments, mapped (same node)
        self.shared_memory = False  # whether this generation moves the bytes through shared memory
        self.last_receive_s = 0.0

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

    def receive(self) -> tuple[int, list[tuple[str, torch.Tensor]]] | None:
        """Block until one complete version arrived; None when the learner closed the stream."""
        if self._pg is None:
            raise WeightSyncError(
                f"weight receiver {self.name!r} has not joined a group: call join(info) first"
            )
        t0 = time.perf_counter()
        wire = group_device(self.info.backend)
        op, header = recv_op(self._pg, wire)
        if op is WireOp.CLOSE:
            self._pg = None
            self._mapped.close()
            return None
        version, named = self._receive_payload(op, header, wire)
        all_min(self._pg, torch.device("cpu") if op is WireOp.WEIGHTS_IPC else wire, version)
        self.version = version
        self.last_receive_s = time.perf_counter() - t0
        return version, named

    def _receive_payload(
        self, op: WireOp, header: dict, wire: torch.device
    ) -> tuple[int, list[tuple[str, torch.Tensor]]]:
        """What follows the header of `op`: (version, named views into the staging buffers)."""
        if op is WireOp.PER_PARAM:
            return int(header["version"]), self._receive_per_param(int(header["count"]), wire)
        manifest = WeightsManifest.model_validate(header["manifest"])
        if op is WireOp.WEIGHTS:
            buffers = self._staging.for_manifest(manifest, wire)
            works = [broadcast(self._pg, buf) for buf in buffers]  # all buckets posted at once
            for w in works:
                w.wait()
            return manifest.version, bucket_views(manifest, buffers)
        if op is WireOp.WEIGHTS_SHM:
            return manifest.version, self._mapped.copy_into(
                self._pg, manifest, header["segments"], self._staging
            )
        if op is WireOp.WEIGHTS_IPC:
            return manifest.version, copy_from_ipc(manifest, header["handles"], self._staging)
        raise WeightSyncError(f"weight-sync op {op.value!r} cannot start a version (protocol mismatch?)")

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
