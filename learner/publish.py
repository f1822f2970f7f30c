"""How the learner's rank 0 sends its weights: the weight-sync sender of a resolved backend, and the object
store's versions with `weight_sync.delta` (runtime/weights/delta.py)."""

from __future__ import annotations

from runtime.weights.collective import DistributedWeightSender
from runtime.weights.config import WeightSyncConfig
from runtime.weights.cuda_ipc import CudaIpcSender
from runtime.weights.delta import DeltaEncoder, DeltaExport, export_version
from runtime.weights.interface import WeightSender
from runtime.weights.layout import StreamedWeights, plan_manifest


def weight_sender(backend: str, host: str, ws: WeightSyncConfig, gpu: bool) -> WeightSender:
    """The sender of a resolved weight_sync.backend (gloo, nccl or cuda-ipc) at this node's address."""
    delta = DeltaEncoder(ws.delta_max_changed, ws.full_every) if ws.delta_on(backend, gpu) else None
    if backend == "cuda-ipc":
        return CudaIpcSender(host=host, bucket_mb=ws.bucket_mb, timeout_s=ws.timeout_s, delta=delta)
    return DistributedWeightSender(
        backend=backend, host=host, bucket_mb=ws.bucket_mb, timeout_s=ws.timeout_s, delta=delta
    )


def node_ip() -> str:
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.util.get_node_ip_address()
    return "127.0.0.1"


def export_streamed(
    encoder: DeltaEncoder, weights: StreamedWeights, bucket_mb: float, base: int | None, version: int
) -> DeltaExport:
    """Version `version` of streamed weights (one full tensor at a time) as a DeltaExport against `base`."""
    return export_version(encoder, plan_manifest(weights.specs, version, bucket_mb), weights, base)
