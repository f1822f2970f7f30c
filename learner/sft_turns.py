"""Two-turn SFT examples (`segr1 sft --turns 2`): the refine format taught before RL (rollout.max_turns > 1).

A two-turn example is built from a sample's mask-derived answer (learner/sft.py `sft_target`):
- turn 1: that answer with every prompt shifted by (dx, dy) (a first look that missed), or, for KEEP_SHARE of the
  examples, the answer itself;
- the picture: what a later turn shows the policy (runtime.overlay.feedback_image: the mask tinted, the prompts
  drawn, at the image's resolution and then resized to NxN), where the mask is the object's own mask shifted by
  the same offset: the segmenter found the object's shape where the prompts put it;
- turn 2 (the only tokens in the loss): a stop answer when that mask already overlaps the object by STOP_IOU,
  else the unshifted answer.
So the policy learns to answer a later turn in the format, to move its prompts onto the object, and to stop when
the mask it is shown is right. The first answer is never a target: a policy is not taught to miss.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from protos import Sample
from protos.answer import format_answer, format_stop

STOP_IOU = 0.85  # a shown mask overlapping the object this much is right: the second answer stops
KEEP_SHARE = 0.25  # two-turn examples whose first answer is the target itself (their second answer stops)
MAX_SHIFT = 0.6  # the shift's bound per axis, as a fraction of the object's box side
STOP_THINK = "the mask covers the object"


def default_turns(max_turns: int) -> int:
    """The SFT's turns for a job of rollout.max_turns: with episodes of several turns, two-turn examples too (the
    refine format before RL), else one."""
    return 2 if max_turns > 1 else 1


@dataclass(frozen=True)
class RefineExample:
    """The two answers of a two-turn example and the picture shown between them (PIL, NxN)."""

    first: str
    picture: object
    second: str
    iou: float  # of the mask shown with the object's (in the policy's NxN space)


def example_rng(seed: int, sample_id: str, what: str) -> np.random.Generator:
    """A generator of its own for each (seed, sample, purpose): examples do not depend on batch order."""
    digest = hashlib.sha256(f"{seed}:{sample_id}:{what}".encode()).digest()[:8]
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _shift(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """`mask` (H, W) moved by (dx, dy) pixels, what leaves the image dropped."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    ys, xs = slice(max(0, dy), min(h, h + dy)), slice(max(0, dx), min(w, w + dx))
    src_y, src_x = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    out[ys, xs] = mask[src_y, src_x]
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def refine_example(sample: Sample, target, size: int, answer_format: str, seed: int = 0) -> RefineExample:
    """The two-turn example of `sample` whose one-turn answer is `target` (sft_target's, NxN pixels)."""
    from runtime.images import decode_sample_arrays
    from runtime.overlay import feedback_image

    rng = example_rng(seed, sample.id, "refine")
    image, mask = decode_sample_arrays(
        sample.image, sample.mask, sample.width, sample.height
    )  # (H, W, 3), (H, W)
    ys, xs = np.nonzero(mask)
    side_x, side_y = (
        (xs.max() - xs.min() + 1) * size / sample.width,
        (ys.max() - ys.min() + 1) * size / sample.height,
    )
    dx = dy = 0
    if rng.random() >= KEEP_SHARE:
        dx = int(round(rng.uniform(-MAX_SHIFT, MAX_SHIFT) * side_x))
        dy = int(round(rng.uniform(-MAX_SHIFT, MAX_SHIFT) * side_y))
    edge = lambda v: int(min(max(v, 0), size))  # noqa: E731  (box edges: 0..N)
    pixel = lambda v: int(min(max(v, 0), size - 1))  # noqa: E731  (points: 0..N-1)
    boxes = []
    if target.box is not None:
        x1, y1, x2, y2 = target.box
        boxes = [[edge(x1 + dx), edge(y1 + dy), edge(x2 + dx), edge(y2 + dy)]]
    points = [[pixel(x + dx), pixel(y + dy)] for x, y in target.points]
    sx, sy = sample.width / size, sample.height / size  # NxN -> the image's own pixels
    shown = _shift(
        mask, int(round(dx * sx)), int(round(dy * sy))
    )  # (H, W): the object where the prompts went
    picture = feedback_image(
        image,
        shown,
        size,
        [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in boxes],
        [[x * sx, y * sy] for x, y in points],
        target.labels,
    )
    iou = _iou(shown, mask)
    think = "the object is here" if answer_format == "full" else ""
    first = format_answer(boxes, points, target.labels, think, answer_format)
    second = format_stop(STOP_THINK, answer_format) if iou >= STOP_IOU else target.text
    return RefineExample(first, picture, second, iou)
