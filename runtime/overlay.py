"""One picture of a segmentation: the image with the predicted mask tinted, the boxes and labelled points that
prompted it, and (for people, never for the policy) the ground truth's outline.

Every picture of the project is drawn here: `segr1 score --overlay`, `segr1 predict`, the evaluation grid, the
trackers' training overlays, and `feedback_image`, what a later turn of a refinement shows the policy (never the
ground truth). All coordinates are in the image's own pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

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
    green and background points magenta. `image` (H, W, 3) uint8, `mask` and `gt` (H, W) bool."""
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


def overlay_prompts(
    image: np.ndarray, mask: np.ndarray | None, prompts: Iterable[Any], gt: np.ndarray | None = None
) -> np.ndarray:
    """`overlay` of segmenter prompts (protos.MaskPrompt: `box`, `points`, `labels`)."""
    boxes, points, labels = [], [], []
    for p in prompts:
        boxes += [p.box] if p.box is not None else []
        points += list(p.points)
        labels += list(p.labels)
    return overlay(image, mask, boxes, points, labels, gt=gt)


def feedback_image(
    image: np.ndarray,
    mask: np.ndarray | None,
    size: int,
    boxes: Sequence[Sequence[float]] = (),
    points: Sequence[Sequence[float]] = (),
    labels: Sequence[int] = (),
):
    """What the policy sees in the turn after an answer: `overlay` of the mask its prompts made and the prompts
    (never the ground truth), drawn at the image's resolution and resized to the policy's NxN like every image
    it sees (PIL)."""
    from PIL import Image

    from runtime.images import resize_for_policy

    return resize_for_policy(Image.fromarray(overlay(image, mask, boxes, points, labels)), size)
