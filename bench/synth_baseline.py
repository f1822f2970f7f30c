"""How well do constant answers do on the synthetic data? (They must not: mean IoU < 0.3.)

Each box is turned into a mask by OpenCV GrabCut (box as the rect, `--iters` iterations), as the weight-free
segmenter of the reward service does, and scored by IoU against the target mask:
- `whole`: the whole-image box; `centre`: the middle 50% of each side (both constant answers);
- `grid_best`: the best of nine constant half-size boxes on a 3x3 grid (what a policy that ignores the image
  could find at most), reported per box too;
- `oracle`: the target's true bounding box (what looking at the image can reach with a box alone).

    .venv/bin/python bench/synth_baseline.py --n 512 --seed 0 --kind mixed --size 128

Prints one JSON object (per kind when --kind all).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.data.synth import KINDS, generate_item  # noqa: E402

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 inclusive pixels


def grabcut_box(image: np.ndarray, box: Box, iters: int = 4) -> np.ndarray:
    """GrabCut from a box. image (H, W, 3) uint8 RGB -> (H, W) bool.

    The rect is clamped to leave a one-pixel frame: GrabCut needs background pixels outside the rect, so the
    whole-image box becomes the image less its outermost pixels.
    """
    h, w = image.shape[:2]
    x1, y1 = max(int(box[0]), 1), max(int(box[1]), 1)
    x2, y2 = min(int(box[2]), w - 2), min(int(box[3]), h - 2)
    if x2 <= x1 or y2 <= y1:
        return np.zeros((h, w), dtype=bool)
    gc = np.zeros((h, w), dtype=np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    cv2.grabCut(bgr, gc, (x1, y1, x2 - x1 + 1, y2 - y1 + 1), bgd, fgd, iters, cv2.GC_INIT_WITH_RECT)
    return (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)


def service_segment_fn(iters: int = 4):
    """The reward service's GrabCut segmenter (what training rewards use), as `fn(image, box) -> mask`.

    Boxes here are inclusive pixel boxes; the service takes continuous x1, y1, x2, y2, so x2/y2 get +1.
    """
    from protos import MaskPrompt
    from reward_service.segmenters.grabcut import GrabCutSegmenter

    segmenter = GrabCutSegmenter(iterations=iters)

    def segment(image: np.ndarray, box: Box) -> np.ndarray:
        prompt = MaskPrompt(box=(box[0], box[1], box[2] + 1, box[3] + 1))
        return segmenter.segment(image, [prompt])[0]  # (H, W) bool

    return segment


def segment_fn(name: str, iters: int):
    """`rect`: cv2.grabCut from the rect (grabcut_box); `service`: reward_service's GrabCutSegmenter."""
    if name == "service":
        return service_segment_fn(iters)
    return lambda image, box: grabcut_box(image, box, iters)


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = int((pred | gt).sum())
    return float((pred & gt).sum()) / union if union else 1.0


def constant_boxes(size: int) -> dict[str, Box]:
    q, s = size // 4, size
    boxes = {"whole": (0, 0, s - 1, s - 1), "centre": (q, q, s - q - 1, s - q - 1)}
    half = s // 2
    for gy, y in enumerate((0, q, s - half)):
        for gx, x in enumerate((0, q, s - half)):
            boxes[f"grid_{gy}{gx}"] = (x, y, x + half - 1, y + half - 1)
    return boxes


def oracle_box(mask: np.ndarray) -> Box:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def measure(
    n: int, seed: int, kind: str, size: int, iters: int = 4, grid: bool = True, segmenter: str = "rect"
) -> dict:
    """Mean IoU of each answer over items 0..n-1 of the synthetic set (seed, kind, size)."""
    segment = segment_fn(segmenter, iters)
    boxes = constant_boxes(size)
    if not grid:
        boxes = {k: v for k, v in boxes.items() if not k.startswith("grid")}
    scores: dict[str, list[float]] = {name: [] for name in [*boxes, "oracle"]}
    t0 = time.perf_counter()
    for index in range(n):
        item = generate_item(seed, index, kind, size)
        for name, box in [*boxes.items(), ("oracle", oracle_box(item.mask))]:
            scores[name].append(iou(segment(item.image, box), item.mask))
    means = {name: round(float(np.mean(v)), 4) for name, v in scores.items()}
    out = {"kind": kind, "n": n, "seed": seed, "size": size, "segmenter": segmenter, "grabcut_iters": iters}
    out["mean_iou"] = {k: means[k] for k in ("whole", "centre", "oracle")}
    if grid:
        grid_means = {k: v for k, v in means.items() if k.startswith("grid")}
        out["mean_iou"]["grid_best"] = max(grid_means.values())
        out["mean_iou_grid"] = grid_means
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=[*KINDS, "all"], default="all")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--iters", type=int, default=4, help="GrabCut iterations")
    p.add_argument(
        "--segmenter",
        choices=["rect", "service"],
        default="rect",
        help="rect: cv2.grabCut from the box as rect; service: reward_service's GrabCutSegmenter",
    )
    p.add_argument("--no-grid", action="store_true", help="skip the 3x3 grid of constant half-size boxes")
    args = p.parse_args(argv)
    cv2.setNumThreads(1)
    kinds = KINDS if args.kind == "all" else (args.kind,)
    results = [
        measure(args.n, args.seed, k, args.size, args.iters, not args.no_grid, args.segmenter) for k in kinds
    ]
    print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
