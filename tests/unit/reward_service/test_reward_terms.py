"""Reward terms: S-measure equal to py_sod_metrics, IoU edge cases, empty masks, weights, torch counts."""

from __future__ import annotations

import numpy as np
import pytest
from py_sod_metrics import Smeasure

from cluster.config import RewardWeights
from reward_service.rewards import (
    box_terms,
    combine,
    compute_rewards,
    ground_truth,
    iou,
    mask_counts,
    mask_counts_torch,
    s_measure,
    scores_from_counts,
    zero_rewards,
)


def _pysod(pred: np.ndarray, gt: np.ndarray) -> float:
    sm = Smeasure(alpha=0.5)
    sm.step((pred * 255).astype(np.uint8), (gt * 255).astype(np.uint8))
    return float(sm.get_results()["sm"])


def _random_pairs(seed: int, count: int):
    rng = np.random.default_rng(seed)
    for k in range(count):
        h, w = (int(v) for v in rng.integers(2, 90, 2))
        pred = rng.random((h, w)) < rng.random()
        if k % 2:  # a blob-like ground truth (a rectangle) next to fully random ones
            gt = np.zeros((h, w), bool)
            y, x = rng.integers(0, h), rng.integers(0, w)
            gt[y : y + rng.integers(1, h + 1), x : x + rng.integers(1, w + 1)] = True
        else:
            gt = rng.random((h, w)) < rng.random()
        yield pred, gt


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # py_sod_metrics' mean of an empty quadrant
def test_s_measure_equals_py_sod_metrics_on_random_masks():
    compared = 0
    for pred, gt in _random_pairs(0, 400):
        ref = _pysod(pred, gt)
        ours = s_measure(pred, gt)
        if np.isnan(ref):  # py_sod_metrics: the GT centroid on the last row/column leaves an empty quadrant
            assert np.isfinite(ours)
            continue
        assert ours == pytest.approx(ref, abs=1e-12)
        compared += 1
    assert compared > 300


def test_s_measure_equals_py_sod_metrics_on_image_sized_masks():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:240, 0:320]
    gt = (yy - 100) ** 2 + (xx - 150) ** 2 < 60**2
    for shift in (0, 5, 40, 200):
        pred = (yy - 100 - shift) ** 2 + (xx - 150) ** 2 < 55**2
        pred ^= rng.random(pred.shape) < 0.02
        assert s_measure(pred, gt) == pytest.approx(_pysod(pred, gt), abs=1e-12)


def test_empty_quadrant_counts_zero_where_py_sod_metrics_gives_nan():
    gt = np.zeros((4, 6), bool)
    gt[:, -1] = True  # centroid in the last column: the right quadrants are empty
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        assert np.isnan(_pysod(gt, gt))
    assert s_measure(gt, gt) == pytest.approx(0.5 * 1.0 + 0.5 * 1.0, abs=1e-9)  # object 1, region 1


@pytest.mark.parametrize(
    "pred_fill, gt_fill, want_iou, want_s",
    [
        (0.0, 0.0, 1.0, 1.0),  # nothing to find, nothing predicted
        (1.0, 0.0, 0.0, 0.0),  # empty GT, full prediction
        (0.0, 1.0, 0.0, 0.0),  # full GT, empty prediction
        (1.0, 1.0, 1.0, 1.0),
    ],
)
def test_empty_and_full_masks_have_defined_values(pred_fill, gt_fill, want_iou, want_s):
    pred = np.full((20, 30), bool(pred_fill))
    gt = np.full((20, 30), bool(gt_fill))
    assert iou(pred, gt) == want_iou
    assert s_measure(pred, gt) == pytest.approx(want_s)


def test_s_measure_on_empty_gt_is_the_background_fraction():
    gt = np.zeros((10, 10), bool)
    pred = np.zeros((10, 10), bool)
    pred[:2] = True
    assert s_measure(pred, gt) == pytest.approx(0.8)
    assert s_measure(pred, gt) == pytest.approx(_pysod(pred, gt))


def test_iou_edge_cases():
    a = np.zeros((8, 8), bool)
    a[:4] = True
    b = np.zeros((8, 8), bool)
    b[2:6] = True
    assert iou(a, a) == 1.0
    assert iou(a, ~a) == 0.0
    assert iou(a, b) == pytest.approx(16 / 48)
    assert iou(a, np.zeros_like(a)) == 0.0
    one = np.zeros((8, 8), bool)
    one[3, 3] = True
    assert iou(one, one) == 1.0
    with pytest.raises(ValueError, match="one shape"):
        iou(a, np.zeros((8, 9), bool))


def test_counts_give_the_same_scores_as_the_direct_functions():
    for pred, gt in _random_pairs(2, 60):
        st = ground_truth(gt)
        i, s = scores_from_counts(mask_counts(pred, st), st)
        assert i == pytest.approx(iou(pred, gt))
        assert s == pytest.approx(s_measure(pred, gt))


def test_torch_counts_equal_numpy_counts():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    gt = np.zeros((37, 53), bool)
    gt[5:30, 10:40] = True
    preds = rng.random((6, 37, 53)) < 0.4
    st = ground_truth(gt)
    got = mask_counts_torch(torch.from_numpy(preds), st)
    want = np.stack([mask_counts(p, st) for p in preds])
    assert got.shape == (6, 8) and (got == want).all()


def test_rewards_combine_terms_with_configurable_weights():
    gt = np.zeros((10, 10), bool)
    gt[2:8, 2:8] = True
    r = compute_rewards(True, gt.copy(), gt, RewardWeights())
    assert (r.format, r.iou) == (1.0, 1.0)
    assert r.s_measure == pytest.approx(1.0)
    assert r.segmentation == pytest.approx(1.0) and r.total == pytest.approx(2.0)
    half = np.zeros_like(gt)
    half[2:8, 2:5] = True
    w = RewardWeights(format=0.5, iou=1.0, s_measure=0.0, segmentation=2.0)
    r = compute_rewards(False, half, gt, w)
    assert r.format == 0.0 and r.iou == pytest.approx(0.5)
    assert r.segmentation == pytest.approx(0.5) and r.total == pytest.approx(1.0)
    r = compute_rewards(True, None, gt, RewardWeights())  # no mask: only the format term
    assert (r.iou, r.s_measure, r.segmentation, r.total) == (0.0, 0.0, 0.0, 1.0)


def test_s_measure_term_is_clipped_in_segmentation():
    r = combine(True, (0.5, 1.7), RewardWeights())
    assert r.s_measure == 1.7 and r.segmentation == pytest.approx(0.7 * 0.5 + 0.3 * 1.0)
    assert zero_rewards().total == 0.0


def test_box_terms_compare_the_enclosing_answer_box_with_the_gt_box():
    gt = np.zeros((20, 20), bool)
    gt[4:12, 6:14] = True  # pixel-edge box (6, 4, 14, 12): 8 x 8, half its side is 4
    mask = gt.copy()
    seg_r1 = compute_rewards(True, mask, gt, RewardWeights(), [(6, 4, 14, 12)])
    assert (seg_r1.box_iou, seg_r1.box_l1) == (1.0, 1.0) and seg_r1.total == pytest.approx(2.0)  # unweighted
    loose = compute_rewards(True, mask, gt, RewardWeights(), [(4, 2, 16, 14)])  # 12 x 12 around it
    assert loose.box_iou == pytest.approx(64 / 144) and loose.box_l1 == pytest.approx(1 - 2 / 4)
    w = RewardWeights(box_iou=0.5, box_l1=1.0)
    for box, b_iou, b_l1 in (((6, 4, 14, 12), 1.0, 1.0), ((4, 2, 16, 14), 64 / 144, 0.5)):
        r = compute_rewards(True, mask, gt, w, [box])  # the same mask: only the box terms tell them apart
        assert r.total == pytest.approx(2.0 + 0.5 * b_iou + 1.0 * b_l1)
    # several boxes count as their enclosing box
    split = compute_rewards(True, mask, gt, w, [(6, 4, 10, 12), (10, 4, 14, 12)])
    assert (split.box_iou, split.box_l1) == (1.0, 1.0)
    far = compute_rewards(True, mask, gt, w, [(15, 15, 19, 19)])  # corners off by 7.5 px on average
    assert far.box_iou == 0.0 and far.box_l1 == 0.0  # clipped at 0
    # no box, an unparsable answer, or an empty ground truth: no box reward
    assert compute_rewards(True, mask, gt, w, [None]).box_l1 == 0.0
    broken = compute_rewards(False, None, gt, w, [(6, 4, 14, 12)])
    assert (broken.box_iou, broken.box_l1, broken.total) == (0.0, 0.0, 0.0)
    assert compute_rewards(True, None, np.zeros_like(gt), w, [(6, 4, 14, 12)]).box_l1 == 0.0


def test_box_l1_does_not_pay_for_a_box_enlarged_to_hedge_where_iou_does():
    """A policy unsure where the object is: its box is off by 3 px along each axis, either way. Enlarging the box
    by the size of that error raises the expected box IoU (a loose box still overlaps an object it missed) but
    not the expected L1 term; once the centre can also be right, enlarging lowers the L1 term."""
    gt = np.zeros((40, 40), bool)
    gt[14:26, 14:26] = True  # 12 x 12
    st = ground_truth(gt)

    def expected(grow: float, offsets: tuple[int, ...]) -> tuple[float, float]:
        terms = [
            box_terms([(14 - grow + dx, 14 - grow + dy, 26 + grow + dx, 26 + grow + dy)], st)
            for dx in offsets
            for dy in offsets
        ]
        return float(np.mean([t[0] for t in terms])), float(np.mean([t[1] for t in terms]))

    (iou_0, l1_0), (iou_3, l1_3) = expected(0, (-3, 3)), expected(3, (-3, 3))
    assert iou_3 > iou_0 + 0.05 and l1_3 <= l1_0
    assert expected(3, (-3, 0, 3))[1] < expected(0, (-3, 0, 3))[1]
