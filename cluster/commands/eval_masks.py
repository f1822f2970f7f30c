"""`segr1 eval-masks --pred DIR --gt DIR [--hce] [--json]`: the foreground metrics of a folder of predicted masks.

Pairs files by stem. Every ground truth is scored once; a ground truth without a prediction (or with an unreadable
one) is scored as an empty prediction and counted in `missing` (its stems are listed on stderr). Predictions are
uint8 grayscale or binary maps of any size: they are resized (bilinear) to the ground truth's size.
"""

from __future__ import annotations

import argparse
import json
import sys

from cluster.commands.common import CommandError

MASK_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def register(sub) -> None:
    p = sub.add_parser(
        "eval-masks",
        help="metrics of a folder of predicted masks",
        description="S-measure, weighted F, mean/max/adaptive F and E, MAE (pysodmetrics) of predicted masks "
        "against ground-truth masks, paired by file stem.",
    )
    p.add_argument("--pred", required=True, help="folder of predicted masks (PNG, 0..255 grayscale or 0/1)")
    p.add_argument("--gt", required=True, help="folder of ground-truth masks (0/1 or 0/255)")
    p.add_argument("--hce", action="store_true", help="also HCE, human correction effort (DIS5K)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.set_defaults(func=run)


def _by_stem(folder) -> dict:
    from pathlib import Path

    root = Path(folder)
    if not root.is_dir():
        raise CommandError(f"{root} is not a folder")
    files = {}
    for path in sorted(root.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in MASK_EXTS:
            if path.stem in files:
                raise CommandError(f"{path} and {files[path.stem]} share a stem; keep one mask per image")
            files[path.stem] = path
    return files


def evaluate_mask_folders(pred_dir, gt_dir, hce: bool = False) -> tuple[dict, list[str], list[str]]:
    """(metrics, stems with no usable prediction, prediction stems without a ground truth); `hce` adds HCE."""
    import cv2
    from tqdm import tqdm

    from cluster.evaluation.metrics import ForegroundMeter

    preds, gts = _by_stem(pred_dir), _by_stem(gt_dir)
    if not gts:
        raise CommandError(f"{gt_dir} holds no mask files ({', '.join(MASK_EXTS)})")
    meter = ForegroundMeter(hce=hce)
    for stem, gt_path in tqdm(gts.items(), desc="eval-masks", unit="mask", disable=None):
        gt = cv2.imread(str(gt_path), cv2.IMREAD_GRAYSCALE)  # (H, W) uint8
        if gt is None:
            raise CommandError(f"ground truth {gt_path} cannot be read as an image; fix or remove it")
        pred = cv2.imread(str(preds[stem]), cv2.IMREAD_GRAYSCALE) if stem in preds else None
        meter.add(pred, gt, key=stem)
    extra = sorted(set(preds) - set(gts))
    return meter.results(), list(meter.missing), extra


def run(args: argparse.Namespace) -> int:
    from cluster.evaluation.metrics import text_table

    metrics, missing, extra = evaluate_mask_folders(args.pred, args.gt, hce=args.hce)
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        print(f"eval-masks: {len(missing)} ground truth(s) without a usable prediction, scored as empty: {shown}",
              file=sys.stderr)  # fmt: skip
    if extra:
        print(f"eval-masks: {len(extra)} prediction(s) without a ground truth, ignored", file=sys.stderr)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(text_table(metrics), end="")
    return 0
