"""Reward throughput: naive (one full SAM2 encode + decode per completion) vs grouped (one encode per image,
every prompt of the call decoded in batches), in masks (scored completions) per second.

    python bench/reward_throughput.py --quick --device cpu --out bench/results/reward_throughput_cpu.json
    python bench/reward_throughput.py --device cuda --out bench/results/reward_throughput_h100.json
    python bench/reward_throughput.py --later-turn --quick --device cpu --out bench/results/reward_later_turn_cpu.json

Model: transformers' Sam2Model with random weights (speed does not depend on them) in the SAM2.1 shape:
hiera-tiny on CPU, hiera-large on CUDA (--model overrides), 1024 px input, 1024x1024 images.
- naive:   per completion: parse, `segmenter.segment(image, prompts)` (encode + decode), rewards. Its cost per
           mask does not depend on G, so it is measured once and reported for every G.
- grouped: `RewardWorker.score_requests` on `--images` groups of G completions (distinct images): parse, one
           batched encode of the images, one batched decode of every prompt, rewards.
`--later-turn` measures instead what a refinement's later turn costs the reward worker: the same G answers
scored for images whose embeddings it kept (reward.embedding_cache), against a first turn that encodes them.
Each completion has one box and 1-4 points (random), so the grouped decode meets several token layouts, as real
completions do. The measurements are interleaved round by round (naive, then grouped at each G) so that load from
other processes spreads over all of them; the JSON records the load average before and after. Besides wall-clock
rates it reports rates per second of this process's CPU time (`cpu_time`): on a machine shared with other jobs
the wall clock mostly measures their load, the CPU time the work this code does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

GROUP_SIZES = (4, 8)
IMAGE_SIDE = 1024

# SAM2.1 image encoders (Hiera), as in Meta's sam2.1_hiera_{t,l}.yaml and transformers' conversion script.
HIERA = {
    "hiera-tiny": dict(
        hidden_size=96,
        embed_dim_per_stage=[96, 192, 384, 768],
        num_attention_heads_per_stage=[1, 2, 4, 8],
        blocks_per_stage=[1, 2, 7, 2],
        global_attention_blocks=[5, 7, 9],
        window_size_per_stage=[8, 4, 14, 7],
        window_positional_embedding_background_size=[7, 7],
    ),
    "hiera-large": dict(
        hidden_size=144,
        embed_dim_per_stage=[144, 288, 576, 1152],
        num_attention_heads_per_stage=[2, 4, 8, 16],
        blocks_per_stage=[2, 6, 36, 4],
        global_attention_blocks=[23, 33, 43],
        window_size_per_stage=[8, 4, 16, 8],
        window_positional_embedding_background_size=[7, 7],
    ),
}


def build_model(name: str, seed: int = 0):
    import torch
    from transformers import Sam2Config, Sam2Model

    backbone = dict(HIERA[name])
    backbone["num_attention_heads"] = backbone["num_attention_heads_per_stage"][0]
    channels = list(reversed(backbone["embed_dim_per_stage"]))
    config = Sam2Config(vision_config={"backbone_config": backbone, "backbone_channel_list": channels})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return Sam2Model(config).eval()


def make_data(n_images: int, group_size: int, seed: int, tag: str):
    """n_images samples (random 1024x1024 RGB, a disk as ground truth) with G random completions each."""
    import cv2

    from protos import Completion, RewardRequest, RolloutGroup, Sample
    from protos.answer import format_answer
    from runtime.images import encode_png

    rng = np.random.default_rng(seed)
    requests = []
    for i in range(n_images):
        image = _photo_like(rng)
        gt = np.zeros((IMAGE_SIDE, IMAGE_SIDE), np.uint8)
        cv2.circle(
            gt, (int(rng.integers(300, 700)), int(rng.integers(300, 700))), int(rng.integers(80, 250)), 1, -1
        )
        sid = f"{tag}-{i}"
        sample = Sample(
            id=sid,
            source="bench",
            split="train",
            task="foreground",
            instruction="segment",
            image=cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes(),
            mask=encode_png(gt.astype(bool)),
            width=IMAGE_SIDE,
            height=IMAGE_SIDE,
        )
        completions = [
            Completion(text=_answer(rng, format_answer), token_ids=[0], logprobs=[0.0])
            for _ in range(group_size)
        ]
        group = RolloutGroup(
            temperature=1.0,
            max_tokens=64,
            prompt_token_ids=[1, 2, 3],
            group_id=f"g-{sid}",
            sample_id=sid,
            policy_version=0,
            completions=completions,
        )
        requests.append(RewardRequest(group=group, sample=sample, policy_image_size=IMAGE_SIDE))
    return requests


def _photo_like(rng) -> np.ndarray:
    """A smooth random RGB image with fine noise (JPEG-compressible like a photo): (1024, 1024, 3) uint8."""
    import cv2

    coarse = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    smooth = cv2.resize(coarse, (IMAGE_SIDE, IMAGE_SIDE), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    noise = rng.integers(-12, 13, smooth.shape, dtype=np.int16)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def _answer(rng, format_answer) -> str:
    x1, y1 = (int(v) for v in rng.integers(0, 500, 2))
    x2, y2 = x1 + int(rng.integers(100, 500)), y1 + int(rng.integers(100, 500))
    n = int(rng.integers(1, 5))
    points = [[int(rng.integers(x1, x2)), int(rng.integers(y1, y2))] for _ in range(n)]
    labels = [int(v) for v in rng.integers(0, 2, n)]
    return format_answer([[x1, y1, x2, y2]], points, labels, think="the object")


def run_naive(segmenter, cfg, request) -> tuple[float, float]:
    """One completion the way a per-sample reward function does it; returns (wall, process CPU) seconds."""
    from reward_service.parser import parse_answer_for
    from reward_service.rewards import compute_rewards
    from reward_service.segmenters import union_mask
    from runtime.images import decode_sample_arrays

    t0, c0 = time.perf_counter(), time.process_time()
    s = request.sample
    image, gt = decode_sample_arrays(s.image, s.mask, s.width, s.height)
    parsed = parse_answer_for(
        cfg.reward, request.group.completions[0].text, s.width, s.height, request.policy_image_size
    )
    masks = segmenter.segment(image, parsed.prompts)  # (P, H, W): a full encode + decode
    boxes = [p.box for p in parsed.prompts]
    compute_rewards(parsed.ok, union_mask(masks, s.height, s.width), gt, cfg.reward.weights, boxes)
    return time.perf_counter() - t0, time.process_time() - c0


def run_grouped(worker, requests) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = worker.score_requests(requests)
    assert all(len(gs.scores) == r.group.group_size for gs, r in zip(out, requests, strict=True))
    return time.perf_counter() - t0, time.process_time() - c0


def summarise(
    naive: list[tuple[float, float]], grouped: dict[int, list[tuple[float, float]]], images: int
) -> dict:
    """Masks/s and the grouped/naive ratio per G, from wall-clock and from process CPU time."""
    out: dict = {"naive_masks_per_s": {}, "grouped_masks_per_s": {}, "grouped_over_naive": {}}
    cpu: dict = {"naive_masks_per_cpu_s": {}, "grouped_masks_per_cpu_s": {}, "grouped_over_naive": {}}
    for g in GROUP_SIZES:
        masks = len(grouped[g]) * images * g
        for col, block, keys in (
            (0, out, ("naive_masks_per_s", "grouped_masks_per_s")),
            (1, cpu, ("naive_masks_per_cpu_s", "grouped_masks_per_cpu_s")),
        ):
            naive_rate = len(naive) / sum(t[col] for t in naive)
            rate = masks / sum(t[col] for t in grouped[g])
            block[keys[0]][str(g)] = round(naive_rate, 4)
            block[keys[1]][str(g)] = round(rate, 4)
            block["grouped_over_naive"][str(g)] = round(rate / naive_rate, 3)
    out["target_ratio"] = {str(g): 0.8 * g for g in GROUP_SIZES}
    out["cpu_time"] = cpu
    return out


def measure(args) -> dict:
    import torch

    from cluster.config import TrainConfig
    from reward_service.segmenters.hf_sam2 import HFSam2Segmenter
    from reward_service.worker import RewardWorker

    torch.set_num_threads(args.threads)
    model_name = args.model or ("hiera-large" if args.device == "cuda" else "hiera-tiny")
    segmenter = HFSam2Segmenter(model=build_model(model_name), device=args.device)
    cfg = TrainConfig(data={"image_size": IMAGE_SIDE})
    worker = RewardWorker(cfg.policy_spec(), cfg.reward, name="bench", segmenter=segmenter)
    naive_req = make_data(args.rounds, 2, seed=1, tag="naive")  # completion 0 of each is used
    grouped_req = {
        g: [make_data(args.images, g, seed=10 * g + r, tag=f"g{g}r{r}") for r in range(args.rounds)]
        for g in GROUP_SIZES
    }
    run_grouped(worker, make_data(1, 2, seed=99, tag="warmup"))  # first-call costs (allocator, kernels)
    naive_t: list[tuple[float, float]] = []
    grouped_t: dict[int, list[tuple[float, float]]] = {g: [] for g in GROUP_SIZES}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        naive_t.append(run_naive(segmenter, cfg, naive_req[r]))
        for g in GROUP_SIZES:
            grouped_t[g].append(run_grouped(worker, grouped_req[g][r]))
        print(
            f"round {r + 1}/{args.rounds} (wall/cpu s): naive {naive_t[-1][0]:.2f}/{naive_t[-1][1]:.2f} per mask, "
            + ", ".join(f"G={g} {grouped_t[g][-1][0]:.2f}/{grouped_t[g][-1][1]:.2f}" for g in GROUP_SIZES),
            flush=True,
        )
    out = summarise(naive_t, grouped_t, args.images)
    out["setup"] = {
        "device": args.device,
        "model": f"SAM2.1 {model_name} shape, random init (transformers Sam2Model, sdpa)",
        "dtype": "bfloat16 autocast" if args.device == "cuda" else "float32",
        "image_px": IMAGE_SIDE,
        "input_px": segmenter.size,
        "images_per_grouped_call": args.images,
        "rounds": args.rounds,
        "naive_seconds_wall_cpu": [[round(v, 3) for v in t] for t in naive_t],
        "grouped_seconds_wall_cpu": {
            str(g): [[round(v, 3) for v in t] for t in grouped_t[g]] for g in GROUP_SIZES
        },
        "torch_threads": args.threads,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "quick": args.quick,
        "command": "python " + " ".join(sys.argv),
    }
    if args.device == "cuda":
        out["setup"]["gpu"] = torch.cuda.get_device_name(0)
    return out


def measure_later_turn(args) -> dict:
    """A refinement's later turn on the reward side: G answers scored for images whose embeddings the worker
    kept (reward.embedding_cache) against the same G answers for images it encodes, per round and G."""
    import torch

    from cluster.config import TrainConfig
    from reward_service.segmenters.hf_sam2 import HFSam2Segmenter
    from reward_service.worker import RewardWorker

    torch.set_num_threads(args.threads)
    model_name = args.model or ("hiera-large" if args.device == "cuda" else "hiera-tiny")
    segmenter = HFSam2Segmenter(model=build_model(model_name), device=args.device)
    cfg = TrainConfig(data={"image_size": IMAGE_SIDE}, reward={"embedding_cache": args.images})
    worker = RewardWorker(cfg.policy_spec(), cfg.reward, name="bench-turns", segmenter=segmenter)
    run_grouped(worker, make_data(1, 2, seed=99, tag="warmup"))
    times: dict[str, dict[str, list]] = {str(g): {"first": [], "later": []} for g in GROUP_SIZES}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for g in GROUP_SIZES:
            requests = make_data(args.images, g, seed=1000 + 10 * g + r, tag=f"turn-g{g}r{r}")
            hits = worker.predictor.embedding_hits
            times[str(g)]["first"].append(run_grouped(worker, requests))  # encodes its images
            times[str(g)]["later"].append(run_grouped(worker, requests))  # the kept embeddings: decodes only
            assert worker.predictor.embedding_hits - hits == args.images
        print(f"round {r + 1}/{args.rounds} (cpu s, first/later): " + ", ".join(
            f"G={g} {times[str(g)]['first'][-1][1]:.2f}/{times[str(g)]['later'][-1][1]:.2f}" for g in GROUP_SIZES
        ), flush=True)  # fmt: skip
    ratio = {
        g: {
            basis: round(sum(t[col] for t in v["later"]) / sum(t[col] for t in v["first"]), 3)
            for col, basis in ((0, "wall"), (1, "cpu_time"))
        }
        for g, v in times.items()
    }
    return {
        "later_over_first": ratio,
        "setup": {
            "device": args.device,
            "model": f"SAM2.1 {model_name} shape, random init (transformers Sam2Model, sdpa)",
            "images_per_call": args.images,
            "rounds": args.rounds,
            "seconds_wall_cpu": {
                g: {k: [[round(x, 3) for x in t] for t in ts] for k, ts in v.items()}
                for g, v in times.items()
            },
            "torch_threads": args.threads,
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
            "command": "python " + " ".join(sys.argv),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="3 rounds, 1 image per grouped call (a few minutes on CPU)"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--model", choices=tuple(HIERA), default=None, help="default: hiera-tiny on cpu, hiera-large on cuda"
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="measurement rounds (default 3 quick, 5 otherwise)"
    )
    p.add_argument(
        "--images",
        type=int,
        default=None,
        help="groups (images) per grouped call (default 1 on cpu, 16 on cuda)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--later-turn",
        action="store_true",
        help="instead: a refinement's later turn (embeddings kept) against a first turn (images encoded)",
    )
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("reward_throughput: --device cuda but torch sees no CUDA GPU", file=sys.stderr)
            return 2
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.images = args.images or (16 if args.device == "cuda" else 1)
    result = measure_later_turn(args) if args.later_turn else measure(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.later_turn:
        print(json.dumps(result["later_over_first"]))
        return 0
    print(
        json.dumps({k: result[k] for k in ("naive_masks_per_s", "grouped_masks_per_s", "grouped_over_naive")})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
