"""Pictures of predictions: an overlay (mask, ground-truth outline, boxes, points) and the grid of the best and
worst predictions of a run (grid.png), every turn of an episode of several turns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from protos import Sample
from runtime.overlay import overlay

if TYPE_CHECKING:
    from cluster.evaluation.loop import SampleResult


def _panel(image: np.ndarray, size: int, caption: str) -> np.ndarray:
    """`image` scaled into a size x size panel with a caption line under it."""
    import cv2

    h, w = image.shape[:2]
    scale = size / max(h, w)
    img = cv2.resize(
        image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
    )
    tile = np.full((size + 18, size, 3), 255, np.uint8)
    tile[: img.shape[0], : img.shape[1]] = img
    cv2.putText(tile, caption, (2, size + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return tile


def _tile(result: SampleResult, sample: Sample, size: int) -> np.ndarray:
    """One sample: its last mask on the image (with the ground truth's outline and the boxes); after an episode of
    several turns, every earlier turn's mask first, left to right (one panel a turn)."""
    from cluster.evaluation.metrics import iou
    from runtime.images import decode_image, decode_mask

    image = decode_image(sample.image)
    gt = decode_mask(sample.mask)
    name = result.id.rsplit("/", 1)[-1][-16:]
    panels = []
    for t, png in enumerate(result.earlier_png, start=1):
        mask = decode_mask(png) if png is not None else None
        caption = (
            f"{name} turn {t} IoU {iou(mask, gt):.2f}" if t == 1 else f"turn {t} IoU {iou(mask, gt):.2f}"
        )
        panels.append(_panel(overlay(image, mask, [], gt=gt), size, caption))
    mask = decode_mask(result.mask_png) if result.mask_png is not None else None
    stop = " stop" if result.stop else ""
    caption = f"turn {result.turns}{stop} IoU {result.iou:.2f}" if panels else f"IoU {result.iou:.2f} {name}"
    panels.append(_panel(overlay(image, mask, result.boxes, gt=gt), size, caption))
    if len(panels) > 1:  # a white gap after the sample's turns, before the next sample's
        panels.append(np.full((size + 18, 6, 3), 255, np.uint8))
    return np.concatenate(panels, axis=1)


def render_grid(
    results: Sequence[SampleResult], samples: Sequence[Sample], k: int = 6, size: int = 192
) -> np.ndarray | None:
    """Two rows: the k best and the k worst predictions by (last-turn) IoU, ties by id; a sample of several turns
    takes a panel per turn. None for an empty run."""
    if not results:
        return None
    by_id = {s.id: s for s in samples}
    ranked = sorted(results, key=lambda r: (-r.iou, r.id))
    k = min(k, len(ranked))
    rows = []
    for chosen in (ranked[:k], ranked[::-1][:k]):
        tiles = [_tile(r, by_id[r.id], size) for r in chosen]
        rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)  # samples of the two rows may have taken different numbers of turns
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)
