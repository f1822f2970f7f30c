"""The reward parts: masks (scored completions) per second through the reward worker's own path, against the
reference's way, for transformers' Sam2Model (`reward_hf_sam2`) and Meta's sam2 package (`reward_meta_sam2`).

- grouped: `RewardWorker.score_requests` on IMAGES groups of G completions (distinct 1024x1024 images): parse,
  one batched encode of the images (checked: exactly one encode per image), one batched decode of every prompt,
  rewards. No completion may come back with a segmenter or internal error (that would make the path look fast).
- naive: per completion, parse + `segmenter.segment(image, prompts)` (a full encode + decode) + rewards, as a
  per-sample reward function does it.
Data and both timed calls are bench/reward_throughput.py's (make_data, run_naive). One warm-up call of each
first; CUDA runs bf16 autocast (the segmenters' default there).
"""

from __future__ import annotations

import time

from bench.gpu.common import Context, Skip

GROUP_SIZE = 8
GOAL_MASKS_PER_S = 1500  # grouped, SAM2.1-large on one H100/H200 (the goal)


def _sizes(ctx: Context) -> dict:
    if ctx.tiny:
        return {"images": 2, "group_size": GROUP_SIZE, "rounds": 2, "naive": 8}
    return {"images": 16, "group_size": GROUP_SIZE, "rounds": 3, "naive": 16}


def run_hf_sam2(ctx: Context) -> dict:
    from reward_service.segmenters.hf_sam2 import HFSam2Segmenter

    t0 = time.perf_counter()
    if ctx.tiny:
        from cluster.dev.tiny_models import build_tiny_sam2

        segmenter = HFSam2Segmenter(str(build_tiny_sam2(ctx.workdir / "tiny-sam2")), device=ctx.device)
        model = "tiny Sam2Model (cluster.dev.tiny_models, 256 px input), random init"
    else:
        from bench.gpu.models import sam2_large

        segmenter = HFSam2Segmenter(model=sam2_large(ctx.device), device=ctx.device)
        model = "transformers Sam2Model, SAM2.1 hiera-large shape, random init, sdpa"
    build_s = time.perf_counter() - t0
    out = measure(ctx, segmenter)
    out["detail"].update(model=model, input_px=segmenter.size, build_s=round(build_s, 2))
    return out


def run_meta_sam2(ctx: Context) -> dict:
    from reward_service.segmenters import SegmenterUnavailable
    from reward_service.segmenters.meta_sam2 import MetaSam2Segmenter

    config = "configs/sam2.1/sam2.1_hiera_t.yaml" if ctx.tiny else "configs/sam2.1/sam2.1_hiera_l.yaml"
    t0 = time.perf_counter()
    try:
        segmenter = MetaSam2Segmenter(None, config, device=ctx.device)  # no checkpoint: random weights
    except SegmenterUnavailable as err:
        if ctx.cuda:  # the GPU machine gets the package as a carried wheel: not importing there is a failure
            raise
        raise Skip(f"Meta's sam2 does not import here: {err}") from None
    build_s = time.perf_counter() - t0
    out = measure(ctx, segmenter)
    out["detail"].update(model=f"Meta's sam2 package, {config}, random init", build_s=round(build_s, 2))
    return out


def measure(ctx: Context, segmenter) -> dict:
    """Grouped and naive masks/s of `segmenter` (figures) and the timings behind them (detail)."""
    from bench.reward_throughput import IMAGE_SIDE, make_data, run_naive
    from cluster.config import TrainConfig
    from reward_service.worker import RewardWorker

    sz = _sizes(ctx)
    cfg = TrainConfig(data={"image_size": IMAGE_SIDE})  # answers in the 1024-px image's own pixels
    worker = RewardWorker(cfg.policy_spec(), cfg.reward, name="gpu-check", segmenter=segmenter)
    images, g = sz["images"], sz["group_size"]
    calls = [make_data(images, g, seed=10 + r, tag=f"r{r}") for r in range(sz["rounds"])]
    naive = make_data(sz["naive"], 2, seed=1, tag="naive")  # completion 0 of each is used
    _grouped(worker, make_data(images, g, seed=99, tag="warm"))
    run_naive(segmenter, cfg, naive[0])
    grouped = [_grouped(worker, requests) for requests in calls]
    naive_s = [run_naive(segmenter, cfg, request)[0] for request in naive]
    grouped_rate = len(calls) * images * g / sum(c["wall_s"] for c in grouped)
    naive_rate = len(naive_s) / sum(naive_s)
    figures = {
        "grouped_masks_per_s": round(grouped_rate, 2),
        "naive_masks_per_s": round(naive_rate, 2),
        "grouped_over_naive": round(grouped_rate / naive_rate, 2),
    }
    detail = {
        "images_per_call": images,
        "group_size": g,
        "rounds": len(calls),
        "naive_completions": len(naive_s),
        "image_px": IMAGE_SIDE,
        "dtype": "bfloat16 autocast" if ctx.cuda else "float32",
        "grouped_calls": grouped,
        "naive_seconds": [round(s, 4) for s in naive_s],
    }
    if ctx.cuda and not ctx.tiny:
        detail["goal_grouped_masks_per_s"] = GOAL_MASKS_PER_S
    return {"figures": figures, "detail": detail}


def _grouped(worker, requests) -> dict:
    """One timed RewardWorker call; raises when a completion failed in the segmenter or the image was encoded
    more than once."""
    encodes = worker.segmenter.encode_calls
    t0 = time.perf_counter()
    out = worker.score_requests(requests)
    wall = time.perf_counter() - t0
    failures = {s.parse_failure for gs in out for s in gs.scores} & {"segmenter_error", "internal_error"}
    if failures:
        raise RuntimeError(f"the reward worker scored completions with {sorted(failures)}; see the log")
    if worker.segmenter.encode_calls - encodes != len(requests):
        raise RuntimeError(
            f"{len(requests)} images took {worker.segmenter.encode_calls - encodes} encodes; the worker must "
            "encode each image once"
        )
    return {
        "wall_s": round(wall, 4),
        "encode_s": round(sum(gs.encode_s for gs in out), 4),
        "decode_s": round(sum(gs.decode_s for gs in out), 4),
    }
