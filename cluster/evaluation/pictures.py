"""Pictures of predictions: an overlay (mask, ground-truth outline, boxes, points) and the grid of the best and
worst predictions of a run (grid.png)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from protos import Sample
from runtime.overlay import overlay

if TYPE_CHECKING:
    from cluster.evaluation.loop import SampleResult


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
