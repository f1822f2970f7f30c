"""CUDA-IPC weight transport: learner and rollout workers on ONE GPU.

The buckets stay on the GPU; the learner sends CUDA IPC handles of them (JSON, no pickle) over a gloo weight-sync
group (header op `WireOp.WEIGHTS_IPC`); every member maps them, copies into its own staging buffers
(`copy_from_ipc`, driven by collective.DistributedWeightReceiver) and acks, and only then may the learner free
the buckets. No bytes cross the host.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping, Sequence

import torch

from protos import WeightsManifest
from runtime.weights.interface import SendStats
from runtime.weights.layout import (
    NamedTensors,
    Staging,
    WeightSyncError,
    bucket_views,
    layout_of,
    pack_bucket,
    plan_manifest,
    tensor_source,
)
from runtime.weights.wire import GroupInfo, SenderGroup, WireOp, check_ack, send_op

_CPU = torch.device("cpu")


class CudaIpcSender:
    """`WeightSender` for a learner whose rollout workers share its GPU (rank 0 of a gloo group)."""

    def __init__(self, host: str = "127.0.0.1", bucket_mb: float = 256, timeout_s: float = 1800.0):
        self.bucket_mb = bucket_mb
        self.group = SenderGroup("gloo", host, timeout_s)

    @property
    def info(self) -> GroupInfo | None:
        return self.group.info

    def prepare(self, members: Sequence[str]) -> GroupInfo:
        """Open the rendezvous of a new generation for `members` (ranks 1..n in that order); non-blocking."""
        return self.group.prepare(members)

    def connect(self) -> None:
        """Blocks until every member of the prepared generation joined; the old group is dropped."""
        self.group.connect()

    def send(self, named_tensors: NamedTensors, version: int) -> SendStats:
        pg, t0 = self.group.require(), time.perf_counter()
        manifest = plan_manifest(layout_of(named_tensors), version, self.bucket_mb)
        by_name = tensor_source(named_tensors)
        buckets = [pack_bucket(manifest, i, by_name) for i in range(len(manifest.bucket_nbytes))]
        if any(not b.is_cuda for b in buckets):
            raise WeightSyncError("cuda-ipc weight sync needs the policy's parameters on a CUDA device")
        torch.cuda.current_stream().synchronize()  # the packing kernels finished before anyone maps the buffers
        handles = [cuda_ipc_handle(b) for b in buckets]
        send_op(pg, _CPU, WireOp.WEIGHTS_IPC, manifest=manifest.model_dump(mode="json"), handles=handles)
        check_ack(pg, _CPU, version, "map CUDA IPC weights")  # receivers copied out; buckets may be freed now
        del buckets
        return SendStats(version, manifest.total_bytes, len(handles), time.perf_counter() - t0)

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


def copy_from_ipc(
    manifest: WeightsManifest, handles: list, staging: Staging
) -> list[tuple[str, torch.Tensor]]:
    """Member side: map the learner's GPU buckets, copy them into our own staging, release the mapping."""
    shared = [
        open_cuda_ipc_handle(h) for h in handles
    ]  # each (bucket_nbytes[i],) uint8, the learner's memory
    buffers = staging.for_manifest(manifest, shared[0].device)
    for dst, src in zip(buffers, shared, strict=True):
        dst.copy_(src[: dst.numel()])
    torch.cuda.current_stream().synchronize()
    del shared
    return bucket_views(manifest, buffers)
