"""runtime/overlay.py: the one picture of a segmentation, and the refinement turn's view of it."""

from __future__ import annotations

import numpy as np

from protos import MaskPrompt
from runtime.overlay import BOX_RGB, GT_RGB, PRED_RGB, feedback_image, overlay_prompts


def _scene():
    image = np.full((80, 120, 3), 100, np.uint8)  # (H, W, 3), a grey image wider than tall
    mask = np.zeros((80, 120), bool)
    mask[20:60, 30:90] = True
    prompts = [MaskPrompt(box=(30, 20, 90, 60), points=[(60, 40), (5, 5)], labels=[1, 0])]
    return image, mask, prompts


def test_overlay_tints_the_mask_and_draws_prompts_and_the_truth():
    image, mask, prompts = _scene()
    gt = np.zeros_like(mask)
    gt[10:70, 10:110] = True
    out = overlay_prompts(image, mask, prompts, gt=gt)  # (80, 120, 3) uint8
    tint = tuple((0.5 * 100 + 0.5 * np.asarray(PRED_RGB)).astype(np.uint8))
    assert out.shape == (80, 120, 3) and tuple(out[45, 75]) == tint and tuple(out[75, 5]) == (100, 100, 100)
    assert tuple(out[20, 50]) == BOX_RGB and tuple(out[10, 50]) == GT_RGB


def test_the_feedback_is_the_policys_square_and_never_shows_the_truth():
    image, mask, prompts = _scene()
    (p,) = prompts
    seen = np.asarray(feedback_image(image, mask, 56, [p.box], p.points, p.labels))  # (56, 56, 3)
    assert seen.shape == (56, 56, 3)
    red, green, _ = seen[28, 34].astype(int)  # inside the mask, off the point: tinted
    assert red > 150 and green < 90
    none = np.asarray(feedback_image(image, None, 56))
    assert (none == 100).all()  # nothing drawn: no mask, no prompts, and no ground truth to draw
