"""Synthetic data: masks match their images, determinism, and constant answers fail (GrabCut baseline)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.cli import main
from cluster.data.synth import COLOURS, SHAPES, generate_item, samples_to_table, write_synthetic
from protos.dataset import DATASET_SCHEMA, Sample
from runtime.images import decode_image, decode_mask
from tests.support.paths import REPO

ROOT = REPO


def _load_bench():
    spec = importlib.util.spec_from_file_location("synth_baseline", ROOT / "bench" / "synth_baseline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read_dir(path: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(path.glob("*.parquet"))])


def _saturation(rgb: np.ndarray) -> float:
    hsv = cv2.cvtColor(rgb.reshape(1, 1, 3).round().astype(np.uint8), cv2.COLOR_RGB2HSV)
    return float(hsv[0, 0, 1])


def _nearest_colour(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda name: float(np.linalg.norm(np.array(COLOURS[name]) - rgb)))


@pytest.mark.parametrize("kind", ["salient", "camouflaged", "mixed"])
def test_items_are_consistent_with_their_masks(kind):
    for index in range(12):
        item = generate_item(7, index, kind, size=128)
        s = item.sample
        assert (s.width, s.height, s.source, s.task) == (128, 128, "synthetic", "referring")
        image, mask = decode_image(s.image), decode_mask(s.mask)
        assert np.array_equal(image, item.image) and np.array_equal(mask, item.mask)
        assert image.shape == (128, 128, 3) and mask.shape == (128, 128)
        ys, xs = np.nonzero(mask)
        assert len(xs) >= 16, "target mask must be non-empty"
        x1, y1, x2, y2 = item.target.bbox
        assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x1, y1, x2, y2)
        assert 1 <= x1 and 1 <= y1 and x2 <= 126 and y2 <= 126, "target inside the image"
        side = max(x2 - x1 + 1, y2 - y1 + 1) / 128
        assert 0.09 <= side <= 0.36, f"target side {side:.2f} of the image, expected ~10-35%"
        assert item.target.shape in SHAPES and item.target.area == int(mask.sum())
        mean = image[mask].astype(np.float64).mean(axis=0)
        if item.kind == "salient":
            # A salient target is painted in its named colour; 2-4 distractors of other colours.
            assert _nearest_colour(mean) == item.target.colour
            assert 2 <= len(item.distractors) <= 4
            assert item.target.colour not in {d.colour for d in item.distractors}
        else:
            # A camouflaged target is cut from a shifted copy of the (low-saturation) background texture.
            assert item.target.colour is None and _saturation(mean) < 110
            assert "camouflaged" in s.instruction


def test_instruction_names_the_target():
    seen = set()
    for index in range(60):
        item = generate_item(11, index, "salient")
        t, text = item.target, item.sample.instruction
        seen.add(item.naming)
        if item.naming in ("colour", "colour_shape"):
            assert t.colour in text
        if item.naming in ("shape", "colour_shape"):
            assert t.shape in text
        if item.naming == "shape":
            assert all(d.shape != t.shape for d in item.distractors)
        if item.naming == "position":
            cx = (t.bbox[0] + t.bbox[2]) / 2
            others = [(d.bbox[0] + d.bbox[2]) / 2 for d in item.distractors]
            if "leftmost" in text:
                assert all(cx < o for o in others)
            if "rightmost" in text:
                assert all(cx > o for o in others)
        for d in item.distractors:
            assert d.colour != t.colour and d.area >= 16
        # nothing was painted over the target: (nearly) every target pixel is of the target's colour
        pixels = item.image[item.mask].astype(np.float64)  # (P, 3)
        palette = np.array([COLOURS[c] for c in COLOURS], dtype=np.float64)  # (8, 3)
        nearest = np.linalg.norm(pixels[:, None, :] - palette[None], axis=2).argmin(axis=1)
        assert (nearest == list(COLOURS).index(t.colour)).mean() > 0.97
    assert {"colour", "colour_shape", "shape", "position"} <= seen


def test_same_seed_same_bytes(tmp_path):
    a = write_synthetic(tmp_path / "a", n=16, seed=3, shard_size=16)
    b = write_synthetic(tmp_path / "b", n=16, seed=3, shard_size=5)
    c = write_synthetic(tmp_path / "c", n=16, seed=3, shard_size=16)
    ta, tb = _read_dir(tmp_path / "a"), _read_dir(tmp_path / "b")
    assert ta.num_rows == 16 and len(b.paths) == 4
    assert ta.schema.equals(DATASET_SCHEMA)
    assert ta.equals(tb), "the rows must not depend on the shard size"
    assert a.paths[0].read_bytes() == c.paths[0].read_bytes(), "same arguments, identical file bytes"
    other = write_synthetic(tmp_path / "d", n=16, seed=4)
    assert not _read_dir(tmp_path / "d").equals(ta)
    assert len(set(ta.column("id").to_pylist())) == 16
    assert other.rows == 16


def test_cli_synth_twice_is_identical(tmp_path, capsys):
    for out in ("A", "B"):
        assert main(["data", "synth", "--out", str(tmp_path / out), "--n", "16", "--seed", "3"]) == 0
    ta, tb = _read_dir(tmp_path / "A"), _read_dir(tmp_path / "B")
    assert ta.num_rows == 16 and ta.equals(tb)
    # again into A: the earlier shards are replaced, the table is unchanged
    assert (
        main(["data", "synth", "--out", str(tmp_path / "A"), "--n", "16", "--seed", "3", "--shard-size", "4"])
        == 0
    )
    assert _read_dir(tmp_path / "A").equals(ta)
    assert "replaced 1 earlier train shard(s)" in capsys.readouterr().out
    rows = [Sample.from_row(r) for r in ta.to_pylist()]
    assert {r.split for r in rows} == {"train"}


def test_cli_synth_rejects_bad_arguments(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--n", "0"]) == 2
    assert main(["data", "synth", "--out", str(tmp_path), "--n", "4", "--size", "8"]) == 2
    err = capsys.readouterr().err
    assert "--n (0)" in err and "--size 8" in err


def test_samples_to_table_round_trip():
    samples = [generate_item(0, i, "mixed", size=64).sample for i in range(3)]
    table = samples_to_table(samples)
    assert [Sample.from_row(r) for r in table.to_pylist()] == samples


@pytest.mark.parametrize("kind, segmenter", [("mixed", "rect"), ("salient", "rect"), ("mixed", "service")])
def test_constant_answers_fail_but_the_true_box_works(kind, segmenter):
    """A whole-image or centre box segmented by GrabCut must score a mean IoU < 0.3; the true box far more.

    `service` is the reward service's own GrabCut segmenter, the one that scores training rollouts.
    """
    cv2.setNumThreads(1)
    if segmenter == "service":
        pytest.importorskip("reward_service.segmenters.grabcut")
    bench = _load_bench()
    result = bench.measure(n=40, seed=0, kind=kind, size=128, iters=3, grid=False, segmenter=segmenter)
    iou = result["mean_iou"]
    assert iou["whole"] < 0.3, iou
    assert iou["centre"] < 0.3, iou
    assert iou["oracle"] > 0.7 and iou["oracle"] > max(iou["whole"], iou["centre"]) + 0.4, iou


def test_single_kind_is_one_large_red_shape_named_by_colour_and_shape():
    """The demo's set: one red target, longest side 25-50% of the image, no distractors, "red <shape>"."""
    for index in range(12):
        item = generate_item(5, index, "single", size=128)
        t, mask = item.target, item.mask
        assert item.kind == "single" and item.distractors == () and t.colour == "red"
        assert item.sample.instruction == f"Identify and segment the red {t.shape}."
        x1, y1, x2, y2 = t.bbox
        side = max(x2 - x1 + 1, y2 - y1 + 1) / 128
        assert 0.2 <= side <= 0.52, f"target side {side:.2f} of the image, expected ~25-50%"
        pixels = item.image[mask].astype(np.float64)
        assert _nearest_colour(pixels.mean(axis=0)) == "red"
        # the only saturated object: everything off the target is the muted background and its patches
        off = item.image[~mask].reshape(-1, 1, 3)
        sat = cv2.cvtColor(off, cv2.COLOR_RGB2HSV)[:, 0, 1]
        assert np.percentile(sat, 99) < 150, np.percentile(sat, 99)


def test_constant_answers_stay_well_below_the_true_box_on_the_single_set():
    """Large single objects make constant boxes score more than on the other sets, but still under 0.45, and
    the true box far above: a policy can only win by looking."""
    cv2.setNumThreads(1)
    result = _load_bench().measure(
        n=40, seed=0, kind="single", size=128, iters=3, grid=False, segmenter="rect"
    )
    iou = result["mean_iou"]
    assert iou["whole"] < 0.45 and iou["centre"] < 0.45, iou
    assert iou["oracle"] > max(iou["whole"], iou["centre"]) + 0.4, iou
