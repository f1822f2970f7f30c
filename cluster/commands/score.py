"""`segr1 score`: score one completion against a ground-truth mask, as the reward worker does.

    segr1 score --image IMG --gt MASK --completion TEXT [--segmenter grabcut|hf-sam2|sam2 --segmenter-path P]
                [--resize N] [--json] [--mask-out PNG] [--overlay PNG]

Coordinates are pixels of IMG unless `--resize N` says the policy saw IMG resized to NxN. Any completion text,
however malformed, exits 0 (it scores 0 and the failure reason is printed); unreadable files exit non-zero with a
message.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cluster.commands.common import CommandError


def register(sub) -> None:
    p = sub.add_parser(
        "score",
        help="score one completion against a ground-truth mask",
        description="Parse a completion, segment IMG with its prompts and print the reward terms.",
    )
    p.add_argument("--image", required=True, help="image file (PNG/JPEG), the one the completion is about")
    p.add_argument(
        "--gt", required=True, help="ground-truth mask (PNG, 0/1 or 0/255), same size as the image"
    )
    p.add_argument("--completion", required=True, help="the completion text; '-' reads it from stdin")
    p.add_argument("--segmenter", choices=("grabcut", "hf-sam2", "sam2"), default="grabcut")
    p.add_argument("--segmenter-path", help="hf-sam2: Hugging Face SAM2 folder; sam2: .pt checkpoint")
    p.add_argument("--sam2-config", help="sam2 only: config name, e.g. configs/sam2.1/sam2.1_hiera_l.yaml")
    p.add_argument(
        "--resize", type=int, help="the policy saw the image resized to NxN (coordinates are in it)"
    )
    p.add_argument(
        "--format", choices=("full", "points"), default="full", help="answer format (default full)"
    )
    p.add_argument("--device", default="auto", help="segmenter device: auto, cpu, cuda (hf-sam2 / sam2)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--mask-out", help="write the predicted mask here (PNG, 0/255)")
    p.add_argument("--overlay", help="write image + boxes + points + predicted and true masks here (PNG)")
    p.set_defaults(func=run)


def _read(path: str, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise CommandError(f"{what} file {path} does not exist", exit_code=2)
    try:
        return p.read_bytes()
    except OSError as err:
        raise CommandError(f"cannot read {what} file {path}: {err}", exit_code=2) from None


def _load_inputs(args: argparse.Namespace):
    from runtime.images import CorruptSampleError, decode_image, decode_mask

    try:
        image = decode_image(_read(args.image, "--image"), f"--image {args.image}")  # (H, W, 3) uint8 RGB
        gt = decode_mask(_read(args.gt, "--gt"), f"--gt {args.gt}")  # (H, W) bool
    except CorruptSampleError as err:
        raise CommandError(f"{err}; pass a PNG or JPEG file", exit_code=2) from None
    if image.shape[:2] != gt.shape:
        raise CommandError(
            f"--gt {args.gt} is {gt.shape[1]}x{gt.shape[0]} but --image {args.image} is "
            f"{image.shape[1]}x{image.shape[0]} (WxH); the mask must have the image's size",
            exit_code=2,
        )
    if args.resize is not None and not 16 <= args.resize <= 8192:
        raise CommandError(f"--resize {args.resize}: expected 16..8192 pixels", exit_code=2)
    text = sys.stdin.read() if args.completion == "-" else args.completion
    return image, gt, text


def _segment(args: argparse.Namespace, image, prompts):
    from reward_service.segmenters import SegmenterUnavailable, build_segmenter, union_mask

    try:
        segmenter = build_segmenter(args.segmenter, args.segmenter_path, args.sam2_config, args.device)
    except (SegmenterUnavailable, ValueError) as err:
        raise CommandError(str(err), exit_code=2) from None
    masks = segmenter.segment(image, prompts)  # (P, H, W) bool
    return union_mask(masks, image.shape[0], image.shape[1])


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from cluster.config import RewardConfig
    from reward_service.parser import parse_answer
    from reward_service.rewards import compute_rewards
    from runtime.overlay import overlay_prompts

    image, gt, text = _load_inputs(args)
    h, w = gt.shape
    limits = RewardConfig()
    parsed = parse_answer(
        text,
        w,
        h,
        policy_image_size=args.resize,
        answer_format=args.format,
        max_boxes=limits.max_boxes,
        max_points=limits.max_points,
        max_completion_chars=limits.max_completion_chars,
    )
    pred = _segment(args, image, parsed.prompts) if parsed.prompts else None
    rewards = compute_rewards(parsed.ok, pred, gt, limits.weights, [p.box for p in parsed.prompts])
    shown = pred if pred is not None else np.zeros_like(gt)
    if args.mask_out:
        _write_png(args.mask_out, shown.astype(np.uint8) * 255)
    if args.overlay:
        _write_png(args.overlay, overlay_prompts(image, shown, parsed.prompts, gt=gt), rgb=True)
    result = {
        "parsed": parsed.model_dump(mode="json"),
        "rewards": rewards.model_dump(),
        "segmenter": args.segmenter if parsed.prompts else None,
        "image": {"width": w, "height": h, "policy_image_size": args.resize},
        "mask_pixels": int(shown.sum()),
    }
    print(json.dumps(result) if args.json else _human(result))
    return 0


def _human(result: dict) -> str:
    p, r = result["parsed"], result["rewards"]
    status = "ok" if p["ok"] else f"failed: {p['failure']} ({p['detail']})"
    lines = [f"parse: {status}; {len(p['prompts'])} prompt(s)"]
    lines += [
        f"  prompt {i}: box={q['box']} points={q['points']} labels={q['labels']}"
        for i, q in enumerate(p["prompts"])
    ]
    lines.append("rewards: " + ", ".join(f"{k}={v:.4f}" for k, v in r.items()))
    return "\n".join(lines)


def _write_png(path: str, array, rgb: bool = False) -> None:
    import cv2

    arr = array[:, :, ::-1] if rgb else array
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        ok = cv2.imwrite(str(path), arr)
    except (OSError, cv2.error) as err:
        raise CommandError(f"cannot write {path}: {err}", exit_code=2) from None
    if not ok:
        raise CommandError(f"cannot write {path}: use a .png path in a writable folder", exit_code=2)
