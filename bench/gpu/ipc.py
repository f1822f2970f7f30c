"""The `ipc_publish` part: the learner's CUDA-IPC weight publish (runtime/weights/cuda_ipc.py CudaIpcSender) to a
receiver in a second process on the same GPU (runtime/weights/collective.py DistributedWeightReceiver, the
rollout worker's receiver), over a gloo weight-sync group; GB/s against one device-to-device copy of the same
bytes.

The weights: every parameter of the Qwen2.5-VL-3B shape in bf16 (random values, ~7.5 GB), bucketed as the 1-GPU
config does (256 MiB). One publish = pack the buckets on the GPU, send their IPC handles, the receiver maps them
and copies into its own staging buffers, ack: two device copies of the bytes plus the handshakes, so about half
the copy rate is the ceiling. A warm-up publish first, then ROUNDS timed ones; the receiver checks a digest of
what it staged against the sender's. Without CUDA the part is skipped, and the same two-process harness runs
the tiny policy's weights over the gloo sender instead (its figures are in the detail), so it cannot rot.
"""

from __future__ import annotations

import statistics
import time
import traceback

from bench.gpu.common import Context, Skip

ROUNDS = 3
BUCKET_MB = 256  # weight_sync.bucket_mb of cluster/configs/qwen3b-1gpu.yaml
MEMBER = "rollout-0"
QUEUE_TIMEOUT_S = 120


def run(ctx: Context) -> dict:
    import torch

    named = _weights(ctx)
    if not ctx.cuda:
        harness = publish(named, "gloo", "cpu", rounds=1)
        raise Skip(
            "CUDA IPC needs a CUDA GPU; the same harness ran over the gloo sender instead", {"gloo": harness}
        )
    result = publish(named, "cuda-ipc", "cuda", rounds=ROUNDS)
    nbytes = result["bytes"]
    del named
    torch.cuda.empty_cache()
    copy_gbps = device_copy_gbps(nbytes)
    figures = {
        "gb_per_s": result["gb_per_s"],
        "device_copy_gb_per_s": round(copy_gbps, 1),
        "share_of_device_copy": round(result["gb_per_s"] / copy_gbps, 4),
    }
    return {"figures": figures, "detail": result}


def _weights(ctx: Context) -> list:
    """(name, tensor) of every policy parameter: bf16 on CUDA at the 3B shape, float32 tiny on CPU."""
    import torch

    from bench.gpu.models import policy_shapes

    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    g = torch.Generator(device=ctx.device).manual_seed(0)
    return [  # each tensor has its parameter's own shape
        (name, torch.randn(shape, generator=g, device=ctx.device, dtype=dtype))
        for name, shape in policy_shapes(tiny=ctx.tiny or not ctx.cuda)
    ]


def publish(named: list, backend: str, device: str, rounds: int) -> dict:
    """Send `named` rounds + 1 times (the first is a warm-up) to a receiver process; its timings and bytes."""
    import torch.multiprocessing as mp

    from runtime.weights.collective import DistributedWeightSender
    from runtime.weights.cuda_ipc import CudaIpcSender

    spawn = mp.get_context("spawn")
    info_q, out_q = spawn.Queue(), spawn.Queue()
    proc = spawn.Process(target=receive_versions, args=(device, rounds + 1, info_q, out_q), daemon=True)
    proc.start()
    if backend == "cuda-ipc":
        sender = CudaIpcSender(bucket_mb=BUCKET_MB, timeout_s=QUEUE_TIMEOUT_S)
    else:
        sender = DistributedWeightSender(backend, bucket_mb=BUCKET_MB, timeout_s=QUEUE_TIMEOUT_S)
    try:
        info_q.put(sender.prepare([MEMBER]).to_dict())
        sender.connect()
        sends = [sender.send(named, version) for version in range(1, rounds + 2)]
        got = out_q.get(timeout=QUEUE_TIMEOUT_S)
    finally:
        sender.close()
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    if "error" in got:
        raise RuntimeError(f"the receiver process failed: {got['error']}")
    if got["digest"] != digest(named) or got["version"] != rounds + 1:
        raise RuntimeError(
            f"the receiver staged version {got['version']} with a different digest than was sent"
        )
    timed = [s.seconds for s in sends[1:]]
    nbytes = sends[-1].nbytes
    return {
        "backend": backend,
        "bytes": nbytes,
        "tensors": len(named),
        "buckets": sends[-1].buckets,
        "bucket_mb": BUCKET_MB,
        "gb_per_s": round(nbytes / statistics.median(timed) / 1e9, 3),
        "warmup_s": round(sends[0].seconds, 4),
        "publish_s": [round(s, 4) for s in timed],
        "receiver_receive_s": got["receive_s"],
    }


def receive_versions(device: str, versions: int, info_q, out_q) -> None:
    """The receiver process: join, stage `versions` versions, report the last one's digest (or the error)."""
    try:
        from runtime.weights.collective import DistributedWeightReceiver

        receiver = DistributedWeightReceiver(MEMBER, device=device)
        receiver.join(info_q.get(timeout=QUEUE_TIMEOUT_S))
        for _ in range(versions):
            version, named = receiver.receive()
            named = list(named)  # taking every bucket acknowledges the version
        out_q.put(
            {"version": version, "digest": digest(named), "receive_s": round(receiver.last_receive_s, 4)}
        )
        receiver.close()
    except Exception as err:  # reported to the part, which raises it; the traceback goes to the check's log
        traceback.print_exc()
        out_q.put({"error": f"{type(err).__name__}: {err}"})


def digest(named: list) -> list[int]:
    """Per tensor the sum of its bytes (on its device): cheap, and changes when bytes move or go missing."""
    import torch

    return [
        int(t.detach().contiguous().reshape(-1).view(torch.uint8).sum(dtype=torch.int64)) for _, t in named
    ]


def device_copy_gbps(nbytes: int, reps: int = 5) -> float:
    """GB/s of one device-to-device copy of `nbytes` (median of `reps` after a warm-up)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")  # (nbytes,)
    dst = torch.empty_like(src)  # (nbytes,)
    dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9
