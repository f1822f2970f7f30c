"""The `rollout_hf` part: the transformers rollout engine (actors/hf_engine.py) loading the policy folder, 8
prompts x G=8 with one image each, sampled at temperature 1 up to the 1-GPU config's max_tokens (400; 32 with
--tiny). Tokens are every generated token (stop tokens included); random weights stop at <|im_end|> at random,
so completions end before max_tokens, while generate keeps stepping until the longest row ends.
"""

from __future__ import annotations

import time

from bench.gpu.common import ONE_GPU_CONFIG, Context, peak_memory, reset_peak_memory, synchronize

PROMPTS = 8
GROUP_SIZE = 8


def requests(n: int, g: int, max_tokens: int, seed: int = 1000, temperature: float = 1.0):
    from protos import RolloutRequest, SamplingConfig

    return [
        RolloutRequest(
            request_id=f"gpu-check-{i}",
            sample_id=f"gpu-check-{i}",
            instruction=f"Identify and segment the object number {i} in the image.",
            group_size=g,
            sampling=SamplingConfig(temperature=temperature, top_p=1.0, max_tokens=max_tokens, seed=seed + i),
        )
        for i in range(n)
    ]


def run(ctx: Context) -> dict:
    import numpy as np
    from PIL import Image

    from actors.hf_engine import HFEngine
    from cluster.config import load_config

    cfg = load_config(ONE_GPU_CONFIG)
    size = 112 if ctx.tiny else cfg.data.image_size
    max_tokens = 32 if ctx.tiny else cfg.rollout.sampling.max_tokens
    t0 = time.perf_counter()
    dtype = "bfloat16" if ctx.cuda else "float32"
    engine = HFEngine(ctx.require_policy(), device=ctx.device, dtype=dtype, image_size=size)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(PROMPTS)]
    engine.generate_batch(requests(1, 2, 4, seed=1), images[:1])  # warm-up: kernels, allocator
    reset_peak_memory(ctx)
    t0 = time.perf_counter()
    batch = engine.generate_batch(requests(PROMPTS, GROUP_SIZE, max_tokens), images)
    synchronize(ctx)
    wall = time.perf_counter() - t0
    lengths = [len(c.token_ids) for group in batch.completions for c in group]
    figures = {"tokens_per_s": round(sum(lengths) / wall, 1), **peak_memory(ctx)}
    detail = {
        "prompts": PROMPTS,
        "group_size": GROUP_SIZE,
        "rows": len(lengths),
        "image_size": size,
        "max_tokens": max_tokens,
        "dtype": dtype,
        "tokens": sum(lengths),
        "mean_completion_tokens": round(sum(lengths) / len(lengths), 1),
        "longest_completion_tokens": max(lengths),
        "prompt_tokens": batch.prompt_tokens,
        "generate_s": round(wall, 3),
        "load_s": round(load_s, 2),
    }
    return {"figures": figures, "detail": detail}
