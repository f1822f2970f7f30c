"""`bench/weight_sync.py --delta`: weight_sync.delta against full versions, on versions from real AdamW steps.

For each learning rate (1e-6, the Seg-R1 recipe's, and 1e-5) a Qwen2.5-0.5B-shaped policy with fp32 master
weights (init scale 0.02, norms at 1) takes AdamW steps on random gradients; after each step its bf16 export goes
to 2 receivers four ways, in a rotating order: full and delta, over gloo TCP and through /dev/shm (every sender has
its own receivers). Reported per way: bytes and seconds per version (median over the versions after the first,
which every way sends whole), the changed fraction, encode seconds, and whether the receivers' last version is
bit-identical to the learner's export.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import statistics
from pathlib import Path

import torch

from runtime.weights.collective import DistributedWeightSender
from runtime.weights.delta import DeltaEncoder

WAYS = (("tcp", "full"), ("tcp", "delta"), ("shm", "full"), ("shm", "delta"))
LRS = (1e-6, 1e-5)


class AdamWPolicy:
    """fp32 master weights and their AdamW state; `export()` is the bf16 policy a learner sends. One AdamW per
    tensor (AdamW is element-wise: the same update), so only one tensor's gradient exists at a time."""

    def __init__(self, shapes, lr: float, seed: int = 0, device: str = "cpu"):
        self.g = torch.Generator().manual_seed(seed)
        self.params = []
        for name, shape in shapes:
            norm = name.endswith("norm.weight")
            init = torch.ones(shape) if norm else torch.randn(shape, generator=self.g) * 0.02
            self.params.append((name, torch.nn.Parameter(init.to(device))))
        self.opts = [torch.optim.AdamW([p], lr=lr, weight_decay=0.01, foreach=False) for _, p in self.params]

    def step(self) -> None:
        for (_, p), opt in zip(self.params, self.opts, strict=True):
            p.grad = torch.randn(p.shape, generator=self.g).to(p.device)
            opt.step()
            p.grad = None

    def export(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p.detach().to(torch.bfloat16)) for n, p in self.params]


def _start_way(ctx, way: tuple[str, str], versions: int, bucket_mb: int, out_q, tag: str):
    from bench.weight_sync import _receiver  # noqa: PLC0415 (the spawn target lives beside the other modes)

    transport, mode = way
    names = [f"{tag}-{transport}-{mode}-{k}" for k in range(2)]
    procs, queues = [], []
    for name in names:
        q = ctx.Queue()
        p = ctx.Process(target=_receiver, args=(name, None, versions, q, out_q), daemon=True)
        p.start()
        procs.append(p)
        queues.append(q)
    sender = DistributedWeightSender("gloo", bucket_mb=bucket_mb, use_shm=transport == "shm")
    if mode == "delta":
        sender.delta = DeltaEncoder(max_changed=0.1, full_every=1000)
    info = sender.prepare(names)
    for q in queues:
        q.put(info)
    sender.connect()
    return sender, procs


def run_lr(shapes, lr: float, versions: int, bucket_mb: int, device: str = "cpu") -> dict:
    """Every way's figures for `versions` AdamW versions at `lr`."""
    from bench.weight_sync import digest  # noqa: PLC0415

    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    ways = {way: _start_way(ctx, way, versions, bucket_mb, out_q, f"lr{lr:g}") for way in WAYS}
    policy = AdamWPolicy(shapes, lr, device=device)
    rows: dict = {way: [] for way in WAYS}
    for v in range(1, versions + 1):
        policy.step()
        named = policy.export()
        order = WAYS[v % len(WAYS) :] + WAYS[: v % len(WAYS)]  # rotate who goes first
        for way in order:
            s = ways[way][0].send(named, v)
            rows[way].append(
                {
                    "version": v,
                    "seconds": s.seconds,
                    "bytes": s.nbytes,
                    "delta": s.delta_base is not None,
                    "changed_fraction": s.changed_fraction,
                    "encode_s": s.encode_s,
                }
            )
    want = digest(named)
    for sender, _ in ways.values():
        sender.close(notify=True)
    digests = []
    while len(digests) < 2 * len(WAYS):
        kind, _, val = out_q.get(timeout=600)
        if kind == "digest":
            digests.append(val)
    for _, procs in ways.values():
        for p in procs:
            p.join(timeout=30)
    return {"lr": lr, "bit_identical": all(d == want for d in digests), **_summary(rows)}


def _summary(rows: dict) -> dict:
    out = {}
    for (transport, mode), rs in rows.items():
        later = rs[1:]  # the first version goes whole every way
        key = f"{transport}_{mode}"
        out[key] = {
            "seconds_per_version": statistics.median(r["seconds"] for r in later),
            "mean_seconds_per_version": statistics.mean(r["seconds"] for r in later),
            "bytes_per_version": statistics.median(r["bytes"] for r in later),
            "versions_as_delta": sum(r["delta"] for r in later),
            "changed_fraction": [round(r["changed_fraction"], 4) for r in later if r["changed_fraction"]],
            "encode_s": statistics.median(r["encode_s"] for r in later),
            "rounds": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rs],
        }
    for transport in ("tcp", "shm"):
        full, delta = out[f"{transport}_full"], out[f"{transport}_delta"]
        out[f"{transport}_bytes_ratio_full_over_delta"] = (
            full["bytes_per_version"] / delta["bytes_per_version"]
        )
        out[f"{transport}_seconds_ratio_full_over_delta"] = (
            full["seconds_per_version"] / delta["seconds_per_version"]
        )
        out[f"{transport}_mean_seconds_ratio_full_over_delta"] = (
            full["mean_seconds_per_version"] / delta["mean_seconds_per_version"]
        )
    return out


def run_delta(args, shapes) -> int:
    from bench.weight_sync import _meta, random_model  # noqa: PLC0415

    versions = max(3, args.rounds + 1)
    named = random_model({"hidden": 8, "intermediate": 8, "layers": 0, "heads": 1, "kv_heads": 1, "vocab": 8})
    res = _meta(args, named, 0)
    res["parameters"] = sum(torch.Size(s).numel() for _, s in shapes)
    res["total_bytes"] = 2 * res["parameters"]
    res["tensors"] = len(shapes)
    res["versions_per_lr"] = versions
    res["notes"] = (
        "Per lr: AdamW (weight_decay 0.01) on fp32 master weights at init scale 0.02 (norms at 1), random "
        "gradients; each version's bf16 export sent 4 ways in a rotating order (tcp/shm x full/delta), 2 receivers "
        "each, delta with max_changed 0.1. seconds/bytes: median over the versions after the first (sent whole "
        "by every way). *_ratio_full_over_delta: full / delta."
    )
    res["learner_device"] = args.learner_device
    res["by_lr"] = [run_lr(shapes, lr, versions, args.bucket_mb, args.learner_device) for lr in LRS]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    for r in res["by_lr"]:
        brief = {k: v for k, v in r.items() if "ratio" in k or k in ("lr", "bit_identical")}
        for key in ("tcp_full", "tcp_delta", "shm_full", "shm_delta"):
            brief[key] = {
                k: r[key][k]
                for k in (
                    "seconds_per_version",
                    "mean_seconds_per_version",
                    "bytes_per_version",
                    "changed_fraction",
                )
            }
        print(json.dumps(brief, indent=2))
    return 0
