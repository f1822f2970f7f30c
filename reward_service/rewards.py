"""Reward terms of one completion: format, IoU, S-measure, segmentation, the two box terms, total.

    format       = 1.0 when the answer parsed (ParsedAnswer.ok), else 0.0
    segmentation = w.iou * IoU(pred, gt) + w.s_measure * clip(S(pred, gt), 0, 1)     (0 when there is no mask)
    box_iou      = IoU of the answer's box (the enclosing box of its boxes) with the gt mask's bounding box
    box_l1       = clip(1 - mean |corner - gt corner| / (half the gt box's longer side), 0, 1)
    total        = w.format * format + w.segmentation * segmentation + w.box_iou * box_iou + w.box_l1 * box_l1
with RewardWeights w (defaults 1.0, 0.7, 0.3, 1.0, 0, 0: the reference's total = format + 0.7 IoU + 0.3 S).
Both box terms are 0 for an answer without a box (or an empty ground truth), are always reported, and count only
when weighted. They are Seg-Zero's localisation rewards, made continuous. Why the L1 one exists: when the policy
is unsure where the object is, every IoU-type reward (the mask's, and box_iou) is higher for a box enlarged to
hedge, and a segmenter that carves the object out of a loose box (GrabCut) makes that cheap, so RL learns loose
boxes. The expected L1 corner error is smallest at the unbiased box, so box_l1 pays for localising, not hedging.

Edge cases (both masks are (H, W) bool of the same shape):
- IoU: |pred & gt| / |pred | gt|; both empty -> 1.0 (nothing to find, nothing predicted). The reference returns 0
  there; a GT-empty sample would then give every completion 0 and no learning signal.
- S-measure (alpha 0.5, Fan et al. ICCV 2017, exactly as py_sod_metrics.Smeasure on 0/255 masks):
  empty GT -> 1 - mean(pred) (1.0 for an empty prediction, 0.0 for a full one); full GT -> mean(pred);
  otherwise alpha * object + (1 - alpha) * region, floored at 0.
The reference's S-measure term binarised the 0/1 ground truth again with `> 128` (all zeros), so it rewarded
predicting little foreground; here the ground truth is a bool mask and is used as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protos import RewardComponents

EPS = np.spacing(1)  # py_sod_metrics' epsilon


@dataclass(frozen=True)
class GroundTruth:
    """What the reward terms need of one ground truth, computed once per sample.

    The S-measure's region term splits the image at the GT centroid (py_sod_metrics: np.argwhere(gt).mean(0),
    rounded half to even, + 1) into four quadrants; every other figure is a pixel count, so a prediction is
    summarised by 8 counts (mask_counts) wherever its mask lives (numpy here, torch on the segmenter's device).
    """

    mask: np.ndarray  # (H, W) bool
    n_gt: int
    cy: int
    cx: int
    quad_size: tuple[int, int, int, int]  # pixels per quadrant (lt, rt, lb, rb)
    quad_gt: tuple[int, int, int, int]  # GT pixels per quadrant
    box: tuple[float, float, float, float] | None = (
        None  # pixel-edge box of the GT foreground; None when empty
    )

    @property
    def n(self) -> int:
        return int(self.mask.size)

    def quadrants(self) -> list[tuple[slice, slice]]:
        h, w = self.mask.shape
        cy, cx = self.cy, self.cx
        return [
            (slice(0, cy), slice(0, cx)),
            (slice(0, cy), slice(cx, w)),
            (slice(cy, h), slice(0, cx)),
            (slice(cy, h), slice(cx, w)),
        ]


def ground_truth(gt: np.ndarray) -> GroundTruth:
    if gt.ndim != 2 or gt.size == 0:
        raise ValueError(f"ground truth must be a non-empty (H, W) mask, got shape {gt.shape}")
    gt = gt.astype(bool, copy=False)
    h, w = gt.shape
    n_gt = int(np.count_nonzero(gt))
    rows = np.count_nonzero(gt, axis=1)  # (H,) GT pixels per row
    cols = np.count_nonzero(gt, axis=0)  # (W,) GT pixels per column
    if 0 < n_gt < gt.size:
        cy = int(np.round(float(np.dot(np.arange(h, dtype=np.int64), rows)) / n_gt)) + 1
        cx = int(np.round(float(np.dot(np.arange(w, dtype=np.int64), cols)) / n_gt)) + 1
    else:  # S-measure uses no region term here; the split only keeps mask_counts uniform
        cy = cx = 0
    st = GroundTruth(gt, n_gt, cy, cx, (0, 0, 0, 0), (0, 0, 0, 0))
    sizes = tuple(gt[ys, xs].size for ys, xs in st.quadrants())
    ones = tuple(int(np.count_nonzero(gt[ys, xs])) for ys, xs in st.quadrants())
    return GroundTruth(gt, n_gt, cy, cx, sizes, ones, _box_of(rows, cols))


def mask_bbox(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Pixel-edge box (x1, y1, x2, y2) of a mask's foreground (x2, y2 exclusive); None for an empty mask."""
    return _box_of(mask.any(axis=1), mask.any(axis=0))


def _box_of(rows: np.ndarray, cols: np.ndarray) -> tuple[float, float, float, float] | None:
    """The box of the non-zero entries of per-row and per-column foreground counts (or flags)."""
    ys, xs = np.flatnonzero(rows), np.flatnonzero(cols)
    if len(xs) == 0:
        return None
    return float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)


def box_iou(a, b) -> float:
    """IoU of two (x1, y1, x2, y2) boxes; 0.0 when they do not overlap or both are degenerate."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def enclosing_box(boxes) -> tuple[float, float, float, float] | None:
    """The smallest box holding every (x1, y1, x2, y2) of `boxes`; None for no box."""
    boxes = list(boxes)
    if not boxes:
        return None
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def box_terms(boxes, st: GroundTruth) -> tuple[float, float]:
    """(box_iou, box_l1) of an answer's boxes against the GT's box; (0, 0) without a box or for an empty GT."""
    pred = enclosing_box(b for b in boxes if b is not None)
    if pred is None or st.box is None:
        return 0.0, 0.0
    truth = st.box
    half = max(truth[2] - truth[0], truth[3] - truth[1]) / 2  # >= 0.5: a GT box is at least one pixel
    error = sum(abs(p - t) for p, t in zip(pred, truth, strict=True)) / 4
    return box_iou(pred, truth), min(1.0, max(0.0, 1.0 - error / half))


def mask_counts(pred: np.ndarray, st: GroundTruth) -> np.ndarray:
    """(8,) int64: predicted pixels per quadrant, then predicted GT pixels (true positives) per quadrant."""
    if pred.shape != st.mask.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {st.mask.shape} must have one shape")
    pred = pred.astype(bool, copy=False)
    hit = pred & st.mask
    out = [np.count_nonzero(pred[q]) for q in st.quadrants()] + [
        np.count_nonzero(hit[q]) for q in st.quadrants()
    ]
    return np.asarray(out, dtype=np.int64)


def mask_counts_torch(preds, st: GroundTruth, gt_tensor=None) -> np.ndarray:
    """mask_counts of a batch of torch masks `(M, H, W)` bool on any device -> `(M, 8)` int64 numpy."""
    import torch

    if tuple(preds.shape[1:]) != st.mask.shape:
        raise ValueError(f"predictions {tuple(preds.shape)} and ground truth {st.mask.shape} differ in size")
    gt = gt_tensor if gt_tensor is not None else torch.from_numpy(st.mask).to(preds.device)
    hit = preds & gt  # (M, H, W)
    cols = [preds[:, ys, xs].sum(dim=(1, 2)) for ys, xs in st.quadrants()]
    cols += [hit[:, ys, xs].sum(dim=(1, 2)) for ys, xs in st.quadrants()]
    return torch.stack(cols, dim=1).cpu().numpy().astype(np.int64)  # (M, 8)


def scores_from_counts(counts: np.ndarray, st: GroundTruth, alpha: float = 0.5) -> tuple[float, float]:
    """(IoU, S-measure) of one prediction from its mask_counts."""
    sp_q, tp_q = [int(v) for v in counts[:4]], [int(v) for v in counts[4:]]
    sp, tp, n, n_gt = sum(sp_q), sum(tp_q), st.n, st.n_gt
    union = sp + n_gt - tp
    iou_value = 1.0 if union == 0 else tp / union
    if n_gt == 0:
        return iou_value, float(1 - sp / n)
    if n_gt == n:
        return iou_value, float(sp / n)
    obj = _object_score(sp, tp, n_gt, n) * alpha
    area = n
    h, w = st.mask.shape
    cy, cx = st.cy, st.cx
    w_lt = cx * cy / area
    w_rt = cy * (w - cx) / area
    w_lb = (h - cy) * cx / area
    weights = (w_lt, w_rt, w_lb, 1 - w_lt - w_rt - w_lb)
    region = 0.0
    for q in range(4):
        region += _ssim_binary(sp_q[q], st.quad_gt[q], tp_q[q], st.quad_size[q]) * weights[q]
    return iou_value, float(max(0.0, obj + region * (1 - alpha)))


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two (H, W) bool masks; 1.0 when both are empty."""
    _same_shape(pred, gt)
    union = np.count_nonzero(pred | gt)
    if union == 0:
        return 1.0
    return float(np.count_nonzero(pred & gt) / union)


def s_measure(pred: np.ndarray, gt: np.ndarray, alpha: float = 0.5) -> float:
    """Structure measure of a binary prediction against a binary ground truth (equal to py_sod_metrics).

    Computed from pixel counts (binary masks make every mean and variance a count), so it is cheap at any size.
    """
    _same_shape(pred, gt)
    st = ground_truth(gt)
    return scores_from_counts(mask_counts(pred, st), st, alpha)[1]


def _s_object_binary(ones: int, size: int) -> float:
    """py_sod_metrics' s_object of a 0/1 vector with `ones` ones among `size` values."""
    mean = ones / size
    std = np.sqrt(max(ones - size * mean * mean, 0.0) / (size - 1)) if size > 1 else 0.0
    return 2 * mean / (mean**2 + 1 + std + EPS)


def _object_score(sp: int, tp: int, n_gt: int, n: int) -> float:
    gt_mean = n_gt / n
    fg = _s_object_binary(tp, n_gt) * gt_mean  # pred values on the foreground
    n_bg = n - n_gt
    tn = n_bg - (sp - tp)  # (1 - pred) values on the background
    bg = _s_object_binary(tn, n_bg) * (1 - gt_mean)
    return fg + bg


def _ssim_binary(sp: int, sg: int, spg: int, n: int) -> float:
    """py_sod_metrics' ssim of a 0/1 region of n pixels from its counts (pred ones, gt ones, both)."""
    if n == 0:  # an empty quadrant (weight 0); py_sod_metrics computes nan * 0 = nan here
        return 0.0
    x, y = sp / n, sg / n
    denom = n - 1 + EPS
    sigma_x = (sp - n * x * x) / denom  # sum((p - x)^2) = sum(p) - n x^2 for 0/1 values
    sigma_y = (sg - n * y * y) / denom
    sigma_xy = (spg - n * x * y) / denom
    a = 4 * x * y * sigma_xy
    b = (x**2 + y**2) * (sigma_x + sigma_y)
    if a != 0:
        return a / (b + EPS)
    return 1.0 if b == 0 else 0.0


def _same_shape(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(
            f"prediction {pred.shape} and ground truth {gt.shape} must be (H, W) masks of one shape"
        )


def combine(
    parse_ok: bool,
    scores: tuple[float, float] | None,
    weights,
    box_scores: tuple[float, float] = (0.0, 0.0),
) -> RewardComponents:
    """Reward terms from (IoU, S) of the predicted mask and (box_iou, box_l1) of its box (box_terms); scores
    None: no mask (unparsable answer) -> segmentation 0. An unparsable answer gets no box terms either."""
    fmt = 1.0 if parse_ok else 0.0
    b_iou, b_l1 = box_scores if parse_ok else (0.0, 0.0)
    if scores is None:
        i = s = seg = 0.0
    else:
        i, s = scores
        seg = weights.iou * i + weights.s_measure * min(max(s, 0.0), 1.0)
    total = (
        weights.format * fmt + weights.segmentation * seg + weights.box_iou * b_iou + weights.box_l1 * b_l1
    )
    return RewardComponents(
        format=fmt, iou=i, s_measure=s, segmentation=seg, box_iou=b_iou, box_l1=b_l1, total=total
    )


def compute_rewards(
    parse_ok: bool, pred: np.ndarray | None, gt: np.ndarray, weights, boxes=()
) -> RewardComponents:
    """All reward terms of one completion; `boxes` are the answer's boxes in the mask's pixels. `pred` None: no
    mask (unparsable answer) -> segmentation 0."""
    st = ground_truth(gt)
    box_scores = box_terms(boxes, st)
    if pred is None:
        return combine(parse_ok, None, weights, box_scores)
    return combine(parse_ok, scores_from_counts(mask_counts(pred, st), st), weights, box_scores)


def zero_rewards() -> RewardComponents:
    return RewardComponents(
        format=0.0, iou=0.0, s_measure=0.0, segmentation=0.0, box_iou=0.0, box_l1=0.0, total=0.0
    )
