"""Benchmark: send a Qwen2.5-0.5B-shaped random model (494M parameters, ~0.99 GB bf16) from the learner to 2
receiving processes, bucketed (runtime/weights/) vs per-parameter (the baseline several frameworks use),
over gloo on CPU, with a plain memory copy of the same bytes measured in the same run as the ceiling. With a GPU,
also the CUDA IPC path (learner and receivers on one GPU) against a device-to-device copy.

    .venv/bin/python bench/weight_sync.py [--quick] --out bench/results/weight_sync_cpu.json
    .venv/bin/python bench/weight_sync.py [--quick] --delta --out bench/results/weight_sync_delta_cpu.json

--quick uses a smaller model of the same layer shapes (fewer layers, smaller vocabulary) and says so in the JSON.
Each figure is the median of --rounds rounds after one warm-up round (receivers allocate staging buffers once).

--delta (weight_sync.delta, bench/weight_sync_delta.py): the versions come from real AdamW steps (fp32 master
weights at init scale 0.02, random gradients) at lr 1e-6 and 1e-5, and each one goes to 2 receivers four ways,
interleaved: full and delta, over gloo TCP and through /dev/shm. --learner-device cuda keeps the learner's weights
on the GPU (the deployment `weight_sync.delta: auto` turns delta on for: the changes are found on the GPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

QWEN25_05B = {"hidden": 896, "intermediate": 4864, "layers": 24, "heads": 14, "kv_heads": 2, "vocab": 151936}
QUICK = {"hidden": 896, "intermediate": 4864, "layers": 6, "heads": 14, "kv_heads": 2, "vocab": 32768}


def model_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of a Qwen2 decoder with tied embeddings (lm_head not sent)."""
    h, i, kv = c["hidden"], c["intermediate"], c["hidden"] // c["heads"] * c["kv_heads"]
    out = [("model.embed_tokens.weight", (c["vocab"], h))]
    for n in range(c["layers"]):
        p = f"model.layers.{n}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out.append(("model.norm.weight", (h,)))
    return out


def random_model(c: dict, device: str = "cpu") -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(n, torch.randn(s, generator=g, dtype=torch.bfloat16).to(device)) for n, s in model_shapes(c)]


def digest(named) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(named, key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _receiver(name: str, device: str | None, versions: int, info_q, out_q) -> None:
    """Takes `versions` versions like an engine (each bucket's views dropped once taken, so its buffer serves a
    later bucket; an engine copies them into its weights), keeping only the last one's views for the digest."""
    torch.set_num_threads(1)
    from runtime.weights.collective import DistributedWeightReceiver

    r = DistributedWeightReceiver(name, device=device)
    r.join(info_q.get())
    for k in range(versions):
        version, stream = r.receive()
        if k + 1 < versions:
            for _ in stream:  # taking every bucket acknowledges the version
                pass
        else:
            kept = list(stream)
        out_q.put(("version", version, r.last_receive_s))
    assert r.receive() is None  # the sender closed the stream
    out_q.put(("digest", version, digest(kept)))


def memcpy_gbps(nbytes: int, rounds: int, device: str = "cpu") -> float:
    """Plain copy of the same number of bytes between two pre-touched buffers (best of `rounds`)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(rounds + 1):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def run_transport(
    named, backend: str, bucket_mb: int, rounds: int, receivers: int = 2, use_shm: bool = False
) -> dict:
    from runtime.weights.collective import DistributedWeightSender
    from runtime.weights.cuda_ipc import CudaIpcSender

    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    device = "cuda" if backend == "cuda-ipc" else None
    procs, queues = [], []
    modes = ("bucketed", "per_param") if backend == "gloo" and not use_shm else ("bucketed",)
    versions = len(modes) * (rounds + 1) + 1  # every timed mode's rounds, then the checked one
    for k in range(receivers):
        q = ctx.Queue()
        p = ctx.Process(target=_receiver, args=(f"rollout-{k}", device, versions, q, out_q), daemon=True)
        p.start()
        procs.append(p)
        queues.append(q)
    sender = (
        CudaIpcSender(bucket_mb=bucket_mb)
        if backend == "cuda-ipc"
        else DistributedWeightSender("gloo", bucket_mb=bucket_mb, use_shm=use_shm)
    )
    info = sender.prepare([f"rollout-{k}" for k in range(receivers)])
    for q in queues:
        q.put(info)
    sender.connect()
    result = {}
    version = 0
    for mode in modes:
        send = sender.send if mode == "bucketed" else sender.send_per_param
        times = []
        for r in range(rounds + 1):  # round 0 warms up (receivers allocate their staging buffers)
            version += 1
            s = send(named, version)
            if r > 0:
                times.append(s.seconds)
        result[f"{mode}_s"] = statistics.median(times)
        result[f"{mode}_rounds_s"] = [round(t, 4) for t in times]
    sender.send(named, version + 1)  # a last bucketed round, checked bit for bit below
    sender.close(notify=True)
    digests = []
    while len(digests) < receivers:
        kind, v, val = out_q.get(timeout=600)
        if kind == "digest":
            digests.append(val)
    for p in procs:
        p.join(timeout=30)
    result["bit_identical"] = all(d == digest(named) for d in digests)
    return result


def _meta(args, named, nbytes: int) -> dict:
    quick = "quick: qwen2.5-0.5b layer shapes, 6 layers, vocab 32768 (NOT the full model)"
    return {
        "model": quick if args.quick else "qwen2.5-0.5b-shape (tied embeddings, lm_head not sent)",
        "quick": args.quick,
        "parameters": sum(t.numel() for _, t in named),
        "tensors": len(named),
        "total_bytes": nbytes,
        "dtype": "bfloat16",
        "receivers": 2,
        "bucket_mb": args.bucket_mb,
        "rounds": args.rounds,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "notes": "bucketed_s / per_param_s: bytes over gloo TCP (loopback). bucketed_shm_s: the same gloo group "
        "with the bytes through /dev/shm, what the learner uses when every receiver is on its node. memcpy: "
        "best single copy of the same bytes between pre-touched buffers, measured before and after the "
        "transports (the higher one). Times: median of `rounds` after a warm-up round, end to end (header to ack).",
    }


def _cpu_results(named, nbytes: int, args) -> dict:
    before = memcpy_gbps(nbytes, args.rounds)
    tcp = run_transport(named, "gloo", args.bucket_mb, args.rounds)
    shm = run_transport(named, "gloo", args.bucket_mb, args.rounds, use_shm=True)
    memcpy = max(before, memcpy_gbps(nbytes, args.rounds))
    gbps = nbytes / tcp["bucketed_s"] / 1e9
    shm_gbps = nbytes / shm["bucketed_s"] / 1e9
    return {
        "backend": "gloo",
        "bucketed_s": tcp["bucketed_s"],
        "per_param_s": tcp["per_param_s"],
        "memcpy_gbps": memcpy,
        "bucketed_gbps": gbps,
        "per_param_gbps": nbytes / tcp["per_param_s"] / 1e9,
        "bucketed_shm_s": shm["bucketed_s"],
        "bucketed_shm_gbps": shm_gbps,
        "speedup_bucketed_vs_per_param": tcp["per_param_s"] / tcp["bucketed_s"],
        "speedup_bucketed_shm_vs_per_param": tcp["per_param_s"] / shm["bucketed_s"],
        "bucketed_fraction_of_memcpy": gbps / memcpy,
        "bucketed_shm_fraction_of_memcpy": shm_gbps / memcpy,
        "bit_identical": tcp["bit_identical"] and shm["bit_identical"],
        "rounds_s": {
            "bucketed": tcp["bucketed_rounds_s"],
            "per_param": tcp["per_param_rounds_s"],
            "bucketed_shm": shm["bucketed_rounds_s"],
        },
    }


def _cuda_results(named, nbytes: int, args) -> dict:
    gpu_named = [(n, t.cuda()) for n, t in named]
    ipc = run_transport(gpu_named, "cuda-ipc", args.bucket_mb, args.rounds)
    memcpy = memcpy_gbps(nbytes, args.rounds, "cuda")
    gbps = nbytes / ipc["bucketed_s"] / 1e9
    return {
        "device": torch.cuda.get_device_name(),
        "memcpy_gbps": memcpy,
        "ipc_s": ipc["bucketed_s"],
        "ipc_gbps": gbps,
        "ipc_fraction_of_memcpy": gbps / memcpy,
        "bit_identical": ipc["bit_identical"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller model (same layer shapes, fewer layers)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--bucket-mb", type=int, default=64, help="bucket size in MiB (weight_sync.bucket_mb)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per mode (median reported)")
    ap.add_argument(
        "--delta", action="store_true", help="delta vs full on AdamW versions (bench/weight_sync_delta.py)"
    )
    ap.add_argument(
        "--learner-device",
        default="cpu",
        help="--delta: where the learner's weights live (cuda: encode on the GPU)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if args.delta:
        from bench.weight_sync_delta import run_delta

        return run_delta(args, model_shapes(QUICK if args.quick else QWEN25_05B))
    named = random_model(QUICK if args.quick else QWEN25_05B)
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    res = _meta(args, named, nbytes)
    res.update(_cpu_results(named, nbytes, args))
    if torch.cuda.is_available():
        res["cuda"] = _cuda_results(named, nbytes, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("rounds_s", "notes")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
