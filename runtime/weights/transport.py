"""Sending side of the weight broadcast: learner rank 0 -> every rollout worker.

Named parameters are packed into flat uint8 buckets of at most `bucket_mb` MiB, one dtype per bucket, described by
a `protos.WeightsManifest` (name, shape, dtype, bucket, byte offset). One version travels as:

    header (JSON: op, version, manifest)  ->  every bucket  ->  ack (all-reduce MIN of the version received)

over a torch.distributed process group spanning the learner (rank 0) and the rollout workers (ranks 1..n): gloo
on CPU, NCCL on GPU. On CPU, when every member can map the learner's shared memory (same node; probed once per
group), the bytes go through /dev/shm segments and gloo carries only the header, one (bucket, offset) integer
pair per 16 MiB packed (so receivers copy while the learner packs) and the ack. When learner and rollout workers
share one GPU, `CudaIpcSender` sends CUDA IPC handles of the buckets over the same (gloo) group instead of the
bytes. Tensor names are the checkpoint names (`checkpoint_names`): those of the saved model.safetensors. The receiving side is actors/weight_receiver.py: it
stages every bucket of version v and only then hands the engine all tensors in ONE `load_weights(named, v)`.

Group membership (a worker joins or leaves mid-run) changes at a version boundary: the learner calls
`prepare(members)` which opens a fresh rendezvous (TCPStore on a free port, generation g+1) and returns a
`GroupInfo`; every member (old and new) calls `join(info)` while the learner calls `connect()`, the old group is
destroyed, and the learner re-sends the current version so a new member starts from the current weights. Groups
are stand-alone process groups (not the default one), so they coexist with the learner's FSDP group.

`InProcessChannel` is the same protocol within one process (tests, single-process runs). The per-parameter
broadcast (`send_per_param`) exists only as the benchmark's baseline.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from protos import TensorSpec, WeightsManifest

_ALIGN = 64  # byte alignment of every tensor inside a bucket
NamedTensors = Sequence[tuple[str, torch.Tensor]]


class WeightSyncError(RuntimeError):
    """A weight update could not be delivered (a receiver failed, timed out or left the group)."""


# ------------------------------------------------------------------------------------------------------------
# Packing


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise WeightSyncError(f"manifest dtype {name!r} is not a torch dtype (e.g. 'bfloat16', 'float32')")
    return dt


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def plan_manifest(
    named: Iterable[tuple[str, torch.Tensor]], version: int, bucket_mb: float
) -> WeightsManifest:
    """Lay tensors out in buckets of at most bucket_mb MiB, one dtype per bucket, order kept within a dtype.

    A tensor larger than a bucket gets a bucket of its own.
    """
    limit = max(1, int(bucket_mb * 1024 * 1024))
    by_dtype: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, t in named:
        by_dtype.setdefault(dtype_name(t.dtype), []).append((name, t))
    specs: list[TensorSpec] = []
    sizes: list[int] = []
    for dt, items in by_dtype.items():
        used = None  # bytes used in the current bucket of this dtype; None: no open bucket
        for name, t in items:
            nbytes = t.numel() * t.element_size()
            start = 0 if used is None else -(-used // _ALIGN) * _ALIGN
            if used is None or start + nbytes > limit:
                sizes.append(0)
                start = 0
            specs.append(
                TensorSpec(
                    name=name,
                    shape=tuple(t.shape),
                    dtype=dt,
                    bucket=len(sizes) - 1,
                    offset=start,
                    nbytes=nbytes,
                )
            )
            used = start + nbytes
            sizes[-1] = used
    return WeightsManifest(version=version, bucket_nbytes=sizes, tensors=specs)


def bucket_views(
    manifest: WeightsManifest, buffers: Sequence[torch.Tensor]
) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) views into flat uint8 buffers laid out by the manifest (no copy)."""
    if len(buffers) != len(manifest.bucket_nbytes):
        raise WeightSyncError(
            f"{len(buffers)} buffers for a manifest of {len(manifest.bucket_nbytes)} buckets"
        )
    out = []
    for spec in manifest.tensors:
        raw = buffers[spec.bucket][spec.offset : spec.offset + spec.nbytes]  # (nbytes,) uint8
        out.append((spec.name, raw.view(dtype_from_name(spec.dtype)).view(spec.shape)))
    return out


def pack_bucket(
    manifest: WeightsManifest,
    index: int,
    tensors: Mapping[str, torch.Tensor],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy the tensors of bucket `index` into a flat uint8 buffer (out, reused when large enough)."""
    nbytes = manifest.bucket_nbytes[index]
    if out is None or out.numel() < nbytes:
        device = next(iter(tensors.values())).device if tensors else "cpu"
        out = torch.empty(nbytes, dtype=torch.uint8, device=device)
    buf = out[:nbytes]  # (nbytes,)
    for spec in manifest.tensors:
        if spec.bucket != index:
            continue
        src = tensors[spec.name]
        buf[spec.offset : spec.offset + spec.nbytes].view(src.dtype).view(spec.shape).copy_(src.detach())
    return buf


def checkpoint_names(model) -> dict[str, str]:
    """In-memory parameter name -> the name `save_pretrained` writes to model.safetensors (transformers 5 renames
    e.g. Qwen2.5-VL's `model.language_model.layers.0...` to `model.layers.0...`). Weight updates carry the
    checkpoint names, the ones vLLM's load_weights and every on-disk loader expect; a transformers engine maps
    them back with the inverse of this dict. Identity when transformers has no conversion for the model."""
    params = {n: p for n, p in model.named_parameters()}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return {n: n for n in params}
    by_id = {id(p): n for n, p in params.items()}
    reverted = revert_weight_conversion(model, dict(params))
    out = {by_id[id(t)]: disk for disk, t in reverted.items() if id(t) in by_id}
    if len(out) != len(params):  # a non-renaming conversion (fused weights): keep the model's own names
        return {n: n for n in params}
    return out


@dataclass(frozen=True)
class SendStats:
    """What one send did: version, payload bytes, number of buckets (or tensors), seconds end to end."""

    version: int
    nbytes: int
    buckets: int
    seconds: float


class WeightSender(Protocol):
    """Learner side of a weight transport."""

    def send(self, named_tensors: NamedTensors, version: int) -> SendStats: ...

    def close(self) -> None: ...


class WeightReceiver(Protocol):
    """Worker side: blocks until every bucket of one version arrived; None once the sender closed."""

    version: int

    def receive(self) -> tuple[int, list[tuple[str, torch.Tensor]]] | None: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------------------------
# In-process transport (tests, single-process runs)


class InProcessChannel:
    """One sender, any number of receivers in the same process; same packing and atomicity as the real one.

    A receiver created after a send starts with the latest version queued (a late joiner gets current weights).
    """

    def __init__(self, bucket_mb: float = 256):
        self.bucket_mb = bucket_mb
        self._queues: list[queue.Queue] = []
        self._latest: tuple[WeightsManifest, list[torch.Tensor]] | None = None
        self._lock = threading.Lock()

    def sender(self) -> _InProcessSender:
        return _InProcessSender(self)

    def receiver(self) -> _InProcessReceiver:
        q: queue.Queue = queue.Queue()
        with self._lock:
            if self._latest is not None:
                q.put(self._latest)
            self._queues.append(q)
        return _InProcessReceiver(q)

    def _publish(self, item) -> None:
        with self._lock:
            if item is not None:
                self._latest = item
            for q in self._queues:
                q.put(item)


class _InProcessSender:
    def __init__(self, channel: InProcessChannel):
        self.channel = channel

    def send(self, named_tensors: NamedTensors, version: int) -> SendStats:
        t0 = time.perf_counter()
        manifest = plan_manifest(named_tensors, version, self.channel.bucket_mb)
        by_name = dict(named_tensors)
        buckets = [pack_bucket(manifest, i, by_name).cpu() for i in range(len(manifest.bucket_nbytes))]
        self.channel._publish((manifest, buckets))
        return SendStats(version, manifest.total_bytes, len(buckets), time.perf_counter() - t0)

    def close(self, notify: bool = True) -> None:
        self.channel._publish(None)


class _InProcessReceiver:
    def __init__(self, q: queue.Queue):
        self._q = q
        self.version = -1

    def receive(self, timeout: float | None = None):
        item = self._q.get(timeout=timeout)
        if item is None:
            return None
        manifest, buckets = item
        staged = [b.clone() for b in buckets]  # private staging copy: the sender may publish again at once
        self.version = manifest.version
        return manifest.version, bucket_views(manifest, staged)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------------------
# torch.distributed transport: wire protocol shared by both sides


@dataclass(frozen=True)
class GroupInfo:
    """Everything a member needs to join one generation of the weight-sync group (plain data: travels over Ray)."""

    host: str
    port: int
    world_size: int
    generation: int
    backend: str
    ranks: dict[str, int] = field(default_factory=dict)  # member name -> rank (1..world_size-1)
    timeout_s: float = 1800.0
    shm_probe: bool = False  # right after connecting, test whether every member maps the learner's /dev/shm

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> GroupInfo:
        return cls(**dict(d))


def open_store(host: str, port: int, world_size: int, is_master: bool, timeout_s: float) -> dist.Store:
    return dist.TCPStore(
        host,
        port,
        world_size,
        is_master,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def make_group(store: dist.Store, info: GroupInfo, rank: int):
    """A stand-alone process group (not the default group) for one generation; blocks until all ranks joined."""
    prefixed = dist.PrefixStore(f"segr1-weights-{info.generation}", store)
    timeout = datetime.timedelta(seconds=info.timeout_s)
    if info.backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, info.world_size, timeout)
    if info.backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, info.world_size, opts)
    raise WeightSyncError(f"weight_sync backend {info.backend!r} is not a process-group backend (gloo, nccl)")


def group_device(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def broadcast(pg, tensor: torch.Tensor, src: int = 0):
    """Start a broadcast from rank src; returns the Work handle (call .wait())."""
    opts = dist.BroadcastOptions()
    opts.rootRank = src
    opts.rootTensor = 0
    return pg.broadcast([tensor], opts)


def send_header(pg, device: torch.device, header: dict) -> None:
    payload = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8).to(device)  # (n,)
    broadcast(pg, torch.tensor([payload.numel()], dtype=torch.int64, device=device)).wait()
    broadcast(pg, payload).wait()


def recv_header(pg, device: torch.device) -> dict:
    n = torch.zeros(1, dtype=torch.int64, device=device)
    broadcast(pg, n).wait()
    payload = torch.empty(int(n.item()), dtype=torch.uint8, device=device)  # (n,)
    broadcast(pg, payload).wait()
    return json.loads(bytes(payload.cpu().numpy()).decode())


def all_min(pg, device: torch.device, value: int) -> int:
    """All-reduce MIN of one integer: the ack that every member holds a version (-1 from a failed member)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MIN
    pg.allreduce([t], opts).wait()
    return int(t.item())


# ------------------------------------------------------------------------------------------------------------
# torch.distributed transport: learner side


class DistributedWeightSender:
    """Learner rank 0 of the weight-sync group (see the module docstring for the join protocol)."""

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
        self.backend, self.host, self.bucket_mb, self.timeout_s = backend, host, bucket_mb, timeout_s
        self.use_shm = use_shm if backend == "gloo" else False
        self.shm_active = False
        self.generation = 0
        self.info: GroupInfo | None = None
        self._store = None
        self._pg = None
        self._pending: tuple[dist.Store, GroupInfo] | None = None
        self._buffers: list[torch.Tensor] = []
        self._segments = SharedSegments()

    def prepare(self, members: Sequence[str]) -> GroupInfo:
        """Open the rendezvous of a new generation for `members` (ranks 1..n in that order); non-blocking."""
        if len(set(members)) != len(members) or not members:
            raise WeightSyncError(f"weight-sync members must be distinct and non-empty, got {list(members)}")
        self.generation += 1
        store = open_store(self.host, 0, len(members) + 1, True, self.timeout_s)
        self._pending = (
            store,
            GroupInfo(
                self.host,
                store.port,
                len(members) + 1,
                self.generation,
                self.backend,
                {m: i + 1 for i, m in enumerate(members)},
                self.timeout_s,
                shm_probe=self.use_shm is not False,
            ),
        )
        return self._pending[1]

    def connect(self) -> None:
        """Blocks until every member of the prepared generation called join(); the old group is dropped."""
        if self._pending is None:
            raise WeightSyncError("connect() before prepare(members): open a generation first")
        store, info = self._pending
        pg = make_group(store, info, 0)
        self._store, self._pg, self.info, self._pending = store, pg, info, None
        self.shm_active = probe_shared_memory(pg) if info.shm_probe else False
        if self.use_shm is True and not self.shm_active:
            raise WeightSyncError(
                "use_shm=True but a member cannot map the learner's shared memory (another "
                "node?); use use_shm=None (probe) or False (bytes over gloo)"
            )

    @property
    def device(self) -> torch.device:
        return group_device(self.backend)

    def _require_group(self):
        if self._pg is None:
            raise WeightSyncError("weight-sync group not connected: call prepare(members), then connect()")
        return self._pg

    def send(self, named_tensors: NamedTensors, version: int) -> SendStats:
        """Broadcast every bucket of `version`; returns once every member acknowledged staging all of them."""
        pg, t0 = self._require_group(), time.perf_counter()
        manifest = plan_manifest(named_tensors, version, self.bucket_mb)
        if self.shm_active:
            return self._send_shm(pg, manifest, dict(named_tensors), t0)
        send_header(pg, self.device, {"op": "weights", "manifest": manifest.model_dump(mode="json")})
        by_name, works = dict(named_tensors), []
        biggest = max(manifest.bucket_nbytes, default=0)
        while len(self._buffers) < 2:  # double buffering: pack bucket i+1 while bucket i is on the wire
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
        acked = all_min(pg, self.device, version)
        if acked != version:
            raise WeightSyncError(f"a rollout worker failed to stage weights version {version} (ack {acked})")
        return SendStats(version, manifest.total_bytes, len(works), time.perf_counter() - t0)

    def _send_shm(self, pg, manifest: WeightsManifest, by_name: dict, t0: float) -> SendStats:
        """Same node: pack the buckets into /dev/shm segments (reused across versions), announcing every
        SHM_CHUNK_BYTES packed with a (bucket, end offset) broadcast so receivers copy while packing goes on;
        then the usual ack."""
        names = self._segments.ensure(manifest.bucket_nbytes)
        send_header(
            pg,
            self.device,
            {"op": "weights-shm", "manifest": manifest.model_dump(mode="json"), "segments": names},
        )
        works, pending = [], 0
        specs = sorted(manifest.tensors, key=lambda t: (t.bucket, t.offset))
        for k, spec in enumerate(specs):
            dst = self._segments.tensor(spec.bucket)[spec.offset : spec.offset + spec.nbytes]
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
        acked = all_min(pg, self.device, manifest.version)
        if acked != manifest.version:
            raise WeightSyncError(
                f"a rollout worker failed to stage weights version {manifest.version} (ack {acked})"
            )
        return SendStats(manifest.version, manifest.total_bytes, len(works), time.perf_counter() - t0)

    def send_per_param(self, named_tensors: NamedTensors, version: int) -> SendStats:
        """BENCHMARK BASELINE ONLY: one metadata header and one broadcast per parameter (what several frameworks
        do). Receivers allocate each tensor on arrival and cannot switch atomically without extra copies."""
        pg, t0 = self._require_group(), time.perf_counter()
        send_header(pg, self.device, {"op": "per-param", "version": version, "count": len(named_tensors)})
        nbytes = 0
        for name, t in named_tensors:
            meta = {"name": name, "shape": list(t.shape), "dtype": dtype_name(t.dtype)}
            send_header(pg, self.device, meta)
            broadcast(pg, t.detach().to(self.device).contiguous()).wait()
            nbytes += t.numel() * t.element_size()
        if all_min(pg, self.device, version) != version:
            raise WeightSyncError(f"a rollout worker failed to receive per-parameter version {version}")
        return SendStats(version, nbytes, len(named_tensors), time.perf_counter() - t0)

    def close(self, notify: bool = False) -> None:
        """Drop the group and the shared-memory segments. notify=True first tells every member the stream ended
        (their blocked receive() returns None); it blocks until each member is in receive(), so use it only
        when they are (e.g. background receiver loops)."""
        if self._pg is not None:
            try:
                if notify:
                    send_header(self._pg, self.device, {"op": "close"})
            finally:
                self._pg = None
                self._store = None
        self._segments.release()


# ------------------------------------------------------------------------------------------------------------
# Shared memory (same node, CPU): the bytes go through /dev/shm, gloo carries only control messages


# Shared-memory path: announce packed bytes every 16 MiB, so receivers copy while the learner packs.
SHM_CHUNK_BYTES = 16 << 20
SHM_PREFIX = "segr1-w-"  # segment names: segr1-w-<creator pid>-<tag>-<bucket>
_TRACKER_LOCK = threading.Lock()


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
        send_header(pg, torch.device("cpu"), {"op": "probe", "name": seg.name, "token": token.hex()})
        return all_min(pg, torch.device("cpu"), 1) == 1
    finally:
        seg.close()
        seg.unlink()


def answer_shared_memory_probe(pg) -> bool:
    """Member side of probe_shared_memory."""
    header = recv_header(pg, torch.device("cpu"))
    ok = 0
    with contextlib.suppress(Exception):
        seg = open_shared(header["name"])
        ok = int(bytes(seg.buf[: len(header["token"]) // 2]).hex() == header["token"])
        seg.close()
    return all_min(pg, torch.device("cpu"), ok) == 1


class CudaIpcSender(DistributedWeightSender):
    """Learner and rollout workers on ONE GPU: buckets stay on the GPU, receivers map them via CUDA IPC handles
    sent over the (gloo) group, copy them into their own staging buffers, then ack; no bytes cross the host."""

    def __init__(self, host: str = "127.0.0.1", bucket_mb: float = 256, timeout_s: float = 1800.0):
        super().__init__("gloo", host, bucket_mb, timeout_s, use_shm=False)

    def send(self, named_tensors: NamedTensors, version: int) -> SendStats:
        pg, t0 = self._require_group(), time.perf_counter()
        manifest = plan_manifest(named_tensors, version, self.bucket_mb)
        by_name = dict(named_tensors)
        buckets = [pack_bucket(manifest, i, by_name) for i in range(len(manifest.bucket_nbytes))]
        if any(not b.is_cuda for b in buckets):
            raise WeightSyncError("cuda-ipc weight sync needs the policy's parameters on a CUDA device")
        torch.cuda.current_stream().synchronize()  # the packing kernels finished before anyone maps the buffers
        handles = [cuda_ipc_handle(b) for b in buckets]
        send_header(
            pg,
            torch.device("cpu"),
            {"op": "weights-ipc", "manifest": manifest.model_dump(mode="json"), "handles": handles},
        )
        acked = all_min(pg, torch.device("cpu"), version)  # receivers copied out; buckets may be freed now
        del buckets
        if acked != version:
            raise WeightSyncError(f"a rollout worker failed to map CUDA IPC weights version {version}")
        return SendStats(version, manifest.total_bytes, len(handles), time.perf_counter() - t0)


def cuda_ipc_handle(t: torch.Tensor) -> dict:
    """JSON-safe IPC description of a contiguous CUDA uint8 buffer (no pickle on the wire)."""
    storage = t.untyped_storage()
    parts = storage._share_cuda_()
    enc = [base64.b64encode(p).decode() if isinstance(p, bytes) else p for p in parts]
    kinds = ["b" if isinstance(p, bytes) else "v" for p in parts]
    return {"parts": enc, "kinds": kinds, "numel": t.numel(), "storage_offset": t.storage_offset()}


def open_cuda_ipc_handle(h: Mapping) -> torch.Tensor:
    """Map a buffer described by cuda_ipc_handle() in this process: a uint8 CUDA tensor sharing its memory."""
    parts = [base64.b64decode(p) if k == "b" else p for p, k in zip(h["parts"], h["kinds"], strict=True)]
    storage = torch.UntypedStorage._new_shared_cuda(*parts)
    out = torch.empty(0, dtype=torch.uint8, device=storage.device)
    return out.set_(storage, int(h["storage_offset"]), (int(h["numel"]),), (1,))
