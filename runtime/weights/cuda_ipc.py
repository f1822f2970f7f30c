"""CUDA-IPC weight transport: learner and rollout workers on ONE GPU.

The buckets stay on the GPU; the learner packs them one at a time into two reused slots and sends the CUDA IPC
handle of each (JSON, no pickle) over a gloo weight-sync group (header op `WireOp.WEIGHTS_IPC`, then one header
per bucket); every member maps it, copies it into a staging buffer of its own (`ipc_buffers`, driven by
collective.DistributedWeightReceiver when its engine asks for the bucket) and acks the bucket, and only then is
the slot packed again. The learner holds two buckets, a member one (plus the one its engine is loading). No
bytes cross the host.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping, Sequence

import torch

from protos import WeightsManifest
from runtime.weights.delta import RAW, DeltaDecoder, DeltaEncoder
from runtime.weights.interface import SendStats
from runtime.weights.layout import (
    NamedTensors,
    WeightSyncError,
    layout_of,
    pack_bucket,
    plan_manifest,
    tensor_source,
)
from runtime.weights.stream import Staging, recv_json
from runtime.weights.wire import (
    GroupInfo,
    SenderGroup,
    WireOp,
    all_min,
    check_ack,
    send_header,
    send_op,
)

_CPU = torch.device("cpu")


class CudaIpcSender:
    """`WeightSender` for a learner whose rollout workers share its GPU (rank 0 of a gloo group)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        bucket_mb: float = 256,
        timeout_s: float = 1800.0,
        delta: DeltaEncoder | None = None,
    ):
        self.bucket_mb = bucket_mb
        self.group = SenderGroup("gloo", host, timeout_s)
        self.delta = delta  # deltas against the last acknowledged version (runtime/weights/delta.py)
        self._fresh = True

    @property
    def info(self) -> GroupInfo | None:
        return self.group.info

    def prepare(self, members: Sequence[str]) -> GroupInfo:
        """Open the rendezvous of a new generation for `members` (ranks 1..n in that order); non-blocking."""
        return self.group.prepare(members)

    def connect(self) -> None:
        """Blocks until every member of the prepared generation joined; the old group is dropped."""
        self.group.connect()
        self._fresh = True

    def send(self, named_tensors: NamedTensors, version: int) -> SendStats:
        """Header (manifest), then per bucket: its handle, and every member's ack that it copied it out. Two
        packing slots: bucket i+1 is packed while the members copy bucket i, and a slot is packed again only once
        every member copied what it held."""
        pg, t0 = self.group.require(), time.perf_counter()
        manifest = plan_manifest(layout_of(named_tensors), version, self.bucket_mb)
        by_name = tensor_source(named_tensors)
        payload = lambda i: (RAW, _pack(manifest, i, by_name))  # noqa: E731
        fields: dict = {"manifest": manifest.model_dump(mode="json")}
        if self.delta is not None:
            base = self.delta.begin(manifest, fresh=self._fresh)
            payload = lambda i: self.delta.payload(manifest, i, by_name)  # noqa: E731
            fields.update(delta=True, base=base)
        try:
            self._send(pg, manifest, fields, payload)
        except BaseException:
            if self.delta is not None:
                self.delta.invalidate(manifest)
            raise
        if self.delta is None:
            return SendStats(
                version, manifest.total_bytes, len(manifest.bucket_nbytes), time.perf_counter() - t0
            )
        self.delta.commit(manifest)
        self._fresh, d = False, self.delta.stats
        return SendStats(
            version,
            d.payload_bytes,
            len(manifest.bucket_nbytes),
            time.perf_counter() - t0,
            d.full_bytes,
            d.base,
        )

    def _send(self, pg, manifest: WeightsManifest, fields: dict, payload) -> None:
        send_op(pg, _CPU, WireOp.WEIGHTS_IPC, **fields)
        if fields.get("base") is not None and all_min(pg, _CPU, 1) != 1:
            self.delta.full(manifest)  # a member does not hold the base: this version goes whole
        n = len(manifest.bucket_nbytes)
        slots: list = [payload(0) if n else None, None]  # (kind, buffer) of buckets i and i+1
        for i in range(n):
            kind, buf = slots[i % 2]
            torch.cuda.current_stream().synchronize()  # bucket i packed before anyone maps it
            header = {"bucket": i, "handle": cuda_ipc_handle(buf), "kind": kind, "nbytes": buf.numel()}
            send_header(pg, _CPU, header)
            del buf
            if i + 1 < n:  # the other slot's bucket (i-1) was copied out by every member: free it, pack i+1
                slots[(i + 1) % 2] = None
                slots[(i + 1) % 2] = payload(i + 1)
            if all_min(pg, _CPU, i) != i:
                raise WeightSyncError(
                    f"a rollout worker failed to copy bucket {i} of version {manifest.version}"
                )
        check_ack(pg, _CPU, manifest.version, "load CUDA IPC weights")

    def abandon(self) -> None:
        """Drop the current generation without talking to its members (one of them is gone)."""
        self.group.abandon()
        self._fresh = True

    def close(self, notify: bool = False) -> None:
        """Drop the group; notify=True first ends every member's stream (see SenderGroup.close)."""
        self.group.close(notify)


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


def _pack(manifest: WeightsManifest, index: int, by_name) -> torch.Tensor:
    """Bucket `index` in a fresh buffer on the parameters' GPU (the caching allocator reuses the freed slot)."""
    buf = pack_bucket(manifest, index, by_name)
    if not buf.is_cuda:
        raise WeightSyncError("cuda-ipc weight sync needs the policy's parameters on a CUDA device")
    return buf


def ipc_buffers(
    pg, manifest: WeightsManifest, staging: Staging, abort=None, decoder: DeltaDecoder | None = None
):
    """Member side: per bucket, map the learner's slot from its handle, copy it into a fresh staging buffer,
    release the mapping and ack the bucket (the learner may pack the slot again); one bucket at a time, when the
    engine asks for the next. With a decoder (the learner sends payloads), each one is applied to its held
    bucket, which is what the engine loads."""
    for i, size in enumerate(manifest.bucket_nbytes):
        header = recv_json(pg, _CPU, abort, f"waiting for CUDA IPC bucket {i}")
        if int(header.get("bucket", -1)) != i:
            raise WeightSyncError(f"CUDA IPC bucket {header.get('bucket')} arrived, expected {i}")
        shared = open_cuda_ipc_handle(header["handle"])  # (>= size,) uint8, the learner's memory
        n = int(header.get("nbytes", size))
        buf = staging.new(n, shared.device)
        buf.copy_(shared[:n])
        torch.cuda.current_stream().synchronize()
        del shared
        all_min(pg, _CPU, i)
        if decoder is not None:
            buf = decoder.apply(i, int(header["kind"]), buf)
        yield buf
        del buf
