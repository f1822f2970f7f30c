"""Receiving side of the weight broadcast (the sending side and the wire protocol: runtime/weights/transport.py).

A rollout worker joins one generation of the weight-sync group with `join(info)` (rank from `info.ranks[name]`),
then each `receive()` stages EVERY bucket of one version into buffers it owns and only then returns
`(version, named_tensors)`; `receive_and_load` hands them to the engine in one
`engine.load_weights(named_tensors, version)` call, so the engine switches from v to v+1 atomically: it never
sees a mix of versions, and a failed or partial transfer leaves it on v.

The tensors returned are views into the staging buffers, valid until the next receive(): load_weights copies.
Membership changes (a worker joins mid-run) are a new generation: every member calls join() again with the new
GroupInfo; the previous group is dropped.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any, Protocol

import torch

from protos import WeightsManifest
from runtime.weights.transport import (
    GroupInfo,
    WeightReceiver,
    WeightSyncError,
    all_min,
    answer_shared_memory_probe,
    broadcast,
    bucket_views,
    dtype_from_name,
    group_device,
    make_group,
    open_cuda_ipc_handle,
    open_shared,
    open_store,
    recv_header,
    shared_tensor,
)

__all__ = [
    "BackgroundWeightLoader",
    "DistributedWeightReceiver",
    "InMemoryEngine",
    "WeightReceiverEndpoint",
    "WeightLoadingEngine",
    "WeightReceiver",
    "receive_and_load",
]


class WeightLoadingEngine(Protocol):
    def load_weights(self, named_tensors, version: int) -> None: ...


class DistributedWeightReceiver:
    """A member (rank >= 1) of the learner's weight-sync group."""

    def __init__(self, name: str, device: str | torch.device | None = None):
        self.name = name
        self.version = -1  # last version fully staged
        self.info: GroupInfo | None = None
        self._device = torch.device(device) if device is not None else None
        self._pg = None
        self._store = None
        self._staging: list[torch.Tensor] = []
        self._segments: list[tuple[str, Any]] = []  # the learner's /dev/shm segments, mapped (same node)
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
        self._store = open_store(info.host, info.port, info.world_size, False, info.timeout_s)
        self._pg = make_group(self._store, info, rank)
        self.info = info
        self.shared_memory = answer_shared_memory_probe(self._pg) if info.shm_probe else False
        return rank

    @property
    def device(self) -> torch.device:
        if self._device is not None:
            return self._device
        return group_device(self.info.backend if self.info else "gloo")

    def _staging_for(self, manifest: WeightsManifest, device: torch.device) -> list[torch.Tensor]:
        """Reuse the staging buffers when the layout is unchanged (the usual case); allocate otherwise."""
        same = len(self._staging) == len(manifest.bucket_nbytes) and all(
            b.numel() == n and b.device == device
            for b, n in zip(self._staging, manifest.bucket_nbytes, strict=True)
        )
        if not same:
            self._staging = [torch.empty(n, dtype=torch.uint8, device=device) for n in manifest.bucket_nbytes]
        return self._staging

    def receive(self) -> tuple[int, list[tuple[str, torch.Tensor]]] | None:
        """Block until one complete version arrived; None when the learner closed the stream."""
        if self._pg is None:
            raise WeightSyncError(
                f"weight receiver {self.name!r} has not joined a group: call join(info) first"
            )
        t0 = time.perf_counter()
        wire = group_device(self.info.backend)
        header = recv_header(self._pg, wire)
        op = header.get("op")
        if op == "close":
            self._pg = None
            self._close_segments()
            return None
        if op == "weights":
            manifest = WeightsManifest.model_validate(header["manifest"])
            staging = self._staging_for(manifest, wire)
            works = [broadcast(self._pg, buf) for buf in staging]  # all buckets posted at once
            for w in works:
                w.wait()
            named = bucket_views(manifest, staging)
        elif op == "weights-shm":
            manifest = WeightsManifest.model_validate(header["manifest"])
            named = self._copy_from_shm(manifest, header["segments"])
        elif op == "weights-ipc":
            manifest = WeightsManifest.model_validate(header["manifest"])
            named = self._copy_from_ipc(manifest, header["handles"])
        elif op == "per-param":
            manifest, named = None, self._receive_per_param(int(header["count"]), wire)
        else:
            raise WeightSyncError(f"unknown weight-sync op {op!r} from the learner (protocol mismatch?)")
        version = manifest.version if manifest is not None else int(header["version"])
        all_min(self._pg, torch.device("cpu") if op == "weights-ipc" else wire, version)
        self.version = version
        self.last_receive_s = time.perf_counter() - t0
        return version, named

    def _copy_from_shm(self, manifest: WeightsManifest, names: list[str]) -> list[tuple[str, torch.Tensor]]:
        """Copy bucket i out of the learner's segment i as soon as its one-integer 'ready' broadcast arrives."""
        if [n for n, _ in self._segments] != names:
            self._close_segments()
            self._segments = [(n, open_shared(n)) for n in names]
        staging = self._staging_for(manifest, torch.device("cpu"))
        sources = [
            shared_tensor(seg, buf.numel()) for buf, (_, seg) in zip(staging, self._segments, strict=True)
        ]
        ready = torch.zeros(2, dtype=torch.int64)  # (bucket, end offset) packed so far, in order
        try:
            for i, buf in enumerate(staging):
                start = 0
                while True:  # the learner announces bucket i in chunks; the last one ends at its size
                    broadcast(self._pg, ready).wait()
                    b, end = int(ready[0]), int(ready[1])
                    if b != i or not start <= end <= buf.numel():
                        raise WeightSyncError(f"shared-memory chunk ({b}, {end}) out of order (bucket {i})")
                    buf[start:end].copy_(sources[i][start:end])
                    start = end
                    if end == buf.numel():
                        break
        finally:
            del sources
        return bucket_views(manifest, staging)

    def _close_segments(self) -> None:
        for _, seg in self._segments:
            with contextlib.suppress(Exception):
                seg.close()
        self._segments = []

    def _copy_from_ipc(self, manifest: WeightsManifest, handles: list) -> list[tuple[str, torch.Tensor]]:
        """Map the learner's GPU buckets, copy them into our own staging, release the mapping."""
        shared = [open_cuda_ipc_handle(h) for h in handles]
        staging = self._staging_for(manifest, shared[0].device)
        for dst, src in zip(staging, shared, strict=True):
            dst.copy_(src[: dst.numel()])
        torch.cuda.current_stream().synchronize()
        del shared
        return bucket_views(manifest, staging)

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
        self._close_segments()


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
    weight-broadcast integration test and benchmarks (created in cluster/topology.py), in-process otherwise."""

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
    from runtime.weights.transport import checkpoint_names

    mapping = {disk: mem for mem, disk in checkpoint_names(model).items()}
    mapping.update({mem: mem for mem in list(mapping.values())})
    return mapping
