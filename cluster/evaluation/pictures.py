"""Pictures of predictions: an overlay (mask, ground-truth outline, boxes, points) and the grid of the best and
worst predictions of a run (grid.png)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from protos import Sample

if TYPE_CHECKING:
    from cluster.evaluation.loop import SampleResult

PRED_RGB = (230, 40, 40)
GT_RGB = (40, 220, 60)
POINT_RGB = {1: (40, 220, 60), 0: (230, 40, 200)}
BOX_RGB = (255, 200, 0)


def overlay(
    image: np.ndarray,
    mask: np.ndarray | None,
    boxes: Sequence[Sequence[float]] = (),
    points: Sequence[Sequence[float]] = (),
    labels: Sequence[int] = (),
    gt: np.ndarray | None = None,
) -> np.ndarray:
    """(H, W, 3) uint8 RGB: the predicted mask tinted red, the GT outline green, boxes yellow, foreground points
    green and background points magenta (all in the image's own pixels)."""
    import cv2

    out = image.astype(np.float32).copy()  # (H, W, 3)
    if mask is not None:
        out[mask] = 0.5 * out[mask] + 0.5 * np.asarray(PRED_RGB, np.float32)
    out = np.clip(out, 0, 255).astype(np.uint8)
    thick = max(1, round(max(image.shape[:2]) / 300))
    if gt is not None:
        contours, _ = cv2.findContours(gt.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, GT_RGB, thick)
    for x1, y1, x2, y2 in boxes:
        cv2.rectangle(out, (int(x1), int(y1)), (int(x2) - 1, int(y2) - 1), BOX_RGB, thick)
    for (x, y), lab in zip(points, labels, strict=False):
        cv2.circle(out, (int(x), int(y)), 2 * thick + 1, POINT_RGB.get(int(lab), BOX_RGB), -1)
        cv2.circle(out, (int(x), int(y)), 2 * thick + 1, (0, 0, 0), 1)
    return out


def _tile(result: SampleResult, sample: Sample, size: int) -> np.ndarray:
    import cv2

    from runtime.images import decode_image, decode_mask

    image = decode_image(sample.image)
    gt = decode_mask(sample.mask)
    mask = decode_mask(result.mask_png) if result.mask_png is not None else None
    img = overlay(image, mask, result.boxes, gt=gt)
    h, w = img.shape[:2]
    scale = size / max(h, w)
    img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    tile = np.full((size + 18, size, 3), 255, np.uint8)
    tile[: img.shape[0], : img.shape[1]] = img
    caption = f"IoU {result.iou:.2f} {result.id.rsplit('/', 1)[-1][-16:]}"
    cv2.putText(tile, caption, (2, size + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return tile


def render_grid(
    results: Sequence[SampleResult], samples: Sequence[Sample], k: int = 6, size: int = 192
) -> np.ndarray | None:
    """Two rows: the k best and the k worst predictions by IoU (ties by id). None for an empty run."""
    if not results:
        return None
    by_id = {s.id: s for s in samples}
    ranked = sorted(results, key=lambda r: (-r.iou, r.id))
    k = min(k, len(ranked))
    rows = []
    for chosen in (ranked[:k], ranked[::-1][:k]):
        tiles = [_tile(r, by_id[r.id], size) for r in chosen]
        tiles += [np.full_like(tiles[0], 255)] * (k - len(tiles))
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)
