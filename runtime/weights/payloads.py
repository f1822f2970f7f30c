"""A version as payloads (runtime/weights/delta.py) on the wire: both ends, over gloo / NCCL bucket broadcasts or
the learner's /dev/shm segments.

    header (op, manifest, delta: true, base)  ->  [base is not None: all-reduce MIN of "I hold base"]
        -> per bucket: gloo / NCCL: (kind, nbytes) broadcast, then the payload's bytes
                       shared memory: the payload written into the bucket's segment, then (bucket, nbytes, kind)
        -> ack (wire.py)

A member that does not hold `base` answers 0 to the all-reduce, and the learner sends every bucket RAW instead: a
delta is never applied to another base. RAW buckets over gloo land straight in the receiver's held bucket.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping

import torch

from protos import WeightsManifest
from runtime.weights.delta import RAW, DeltaDecoder, DeltaEncoder
from runtime.weights.layout import WeightSyncError
from runtime.weights.shm import MappedSegments, SharedSegments
from runtime.weights.stream import Staging, wait_work
from runtime.weights.wire import WireOp, all_min, broadcast, send_op

_CPU = torch.device("cpu")


def send_payloads(
    pg,
    device: torch.device,
    encoder: DeltaEncoder,
    manifest: WeightsManifest,
    tensors: Mapping[str, torch.Tensor],
    fresh: bool,
    segments: SharedSegments | None = None,
) -> int:
    """Learner side: announce the version and its base, agree on it, send every bucket's payload (through
    `segments` when the members map the learner's shared memory). Returns the number of buckets; the caller acks."""
    base = encoder.begin(manifest, fresh=fresh)
    fields = {"manifest": manifest.model_dump(mode="json"), "delta": True, "base": base}
    if segments is not None:
        fields["segments"] = segments.ensure(manifest.bucket_nbytes)
    send_op(pg, device, WireOp.WEIGHTS_SHM if segments is not None else WireOp.WEIGHTS, **fields)
    if base is not None and all_min(pg, device, 1) != 1:
        encoder.full(manifest)  # a member does not hold the base: this version goes whole
    # per bucket: its (work, tensor) pairs; a tensor lives until its work is done
    in_flight: list[list] = []
    for i in range(len(manifest.bucket_nbytes)):
        kind, payload = encoder.payload(manifest, i, tensors)
        n = payload.numel()
        if segments is not None:
            segments.tensor(i)[:n].copy_(payload.to(_CPU))
            ready = torch.tensor([i, n, kind], dtype=torch.int64)
            in_flight.append([(broadcast(pg, ready), ready)])
            continue
        if len(in_flight) >= 2:  # two buckets in flight at most; the older one's tensors then dropped
            for work, _ in in_flight[-2]:
                work.wait()
            in_flight[-2] = []
        meta, data = torch.tensor([kind, n], dtype=torch.int64, device=device), payload.to(device)
        in_flight.append([(broadcast(pg, meta), meta), (broadcast(pg, data), data)])
    for pairs in in_flight:
        for work, _ in pairs:
            work.wait()
    return len(manifest.bucket_nbytes)


def agree_on_base(
    pg, wire: torch.device, decoder: DeltaDecoder, header: dict, manifest: WeightsManifest
) -> bool:
    """Member side of the agreement: whether this version arrives as deltas against the base every member holds."""
    base = header.get("base")
    if base is None:
        return False
    return all_min(pg, wire, int(decoder.holds(manifest, int(base)))) == 1


def payload_buffers(
    pg,
    wire: torch.device,
    decoder: DeltaDecoder,
    manifest: WeightsManifest,
    staging: Staging,
    abort: threading.Event | None,
    mapped: MappedSegments | None = None,
) -> Iterator[torch.Tensor]:
    """Member side: each bucket's payload applied to the decoder's held bucket, which is what the engine loads;
    `mapped`: the learner's shared-memory segments, read in place."""
    for i in range(len(manifest.bucket_nbytes)):
        if mapped is not None:
            ready = torch.zeros(3, dtype=torch.int64)  # (bucket, nbytes, kind)
            wait_work(broadcast(pg, ready), abort, f"waiting for bucket {i} in shared memory")
            b, n, kind = (int(x) for x in ready)
            if b != i or not 0 <= n <= manifest.bucket_nbytes[i]:
                raise WeightSyncError(f"shared-memory payload ({b}, {n}) out of order (bucket {i})")
            payload = mapped.tensor(i, n)
        else:
            meta = torch.zeros(2, dtype=torch.int64, device=wire)  # (kind, nbytes)
            wait_work(broadcast(pg, meta), abort, f"waiting for bucket {i}'s size")
            kind, n = (int(x) for x in meta.cpu())
            held = decoder.bucket(i)
            straight = kind == RAW and held.device == wire and held.numel() == n
            payload = held if straight else staging.new(n, wire)
            wait_work(broadcast(pg, payload), abort, f"receiving bucket {i}")
        out = decoder.apply(i, kind, payload)
        del payload
        yield out
        del out
