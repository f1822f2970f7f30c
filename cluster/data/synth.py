"""Synthetic segmentation data with exact masks, hard enough that a constant answer fails.

Each image holds one target object (its mask is the row's mask), distractor objects, and 1-3 large background
patches of other (muted) textures. Every instruction names the target: "Identify and segment the <phrase>."
- `salient`: the target and 2-4 distractors are saturated shapes of distinct colours (red, orange, yellow, green,
  cyan, blue, purple, pink) on a muted blotchy texture; the phrase names the target by colour ("red shape"),
  shape ("triangle"), both ("red triangle") or position ("leftmost coloured shape"), each only where it is
  unambiguous.
- `camouflaged`: the target is cut from a copy of the background's own texture with its colour shifted by 5-11
  levels and its scale changed, so only a subtle texture/colour change gives it away; 0-3 salient distractors.
  The phrase is "object camouflaged in the background" (or "camouflaged <shape>" when the shape is unique).
- `mixed`: each image is camouflaged or salient with probability 1/2.
- `single`: the embedded demo's set. One large red shape (longest side 25-50% of the image) and no distractors, on
  the same blotchy background with its texture patches; the phrase is "red <shape>". Made for a ~2M-parameter
  policy that must learn where the object is within minutes on a CPU: it learns to find one colour quickly but not
  to pick a named target among others of every colour (docs/e2e.md). GrabCut from a constant box scores 0.37-0.47
  mean IoU (the demo's `constant_baseline`, 128 images): the patches and the background's blotches come with it.
Shapes: ellipse, triangle, rectangle, pentagon, star, blob; an object's longest box side is 11-35% of the image
side, anywhere in the frame; the first distractor sits right next to the target in 60% of the images.

Why distractors and a busy background: GrabCut from a large box keeps whatever looks unlike the box's border, so
one object on a plain background is segmented from the whole-image box (IoU ~0.97 in a probe). Here a large box
also collects the distractors and the background's own patches, and objects sit anywhere in the frame, so the
constant answers score a mean IoU well below 0.3 (see bench/synth_baseline.py and docs/data.md).

Determinism: item `i` of seed `s` is drawn from `SeedSequence([s, i])` alone, so a data set does not depend on the
shard size, and the same arguments always give the same PNG bytes and Parquet tables.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from protos.dataset import Sample
from runtime.images import encode_png

KINDS = ("camouflaged", "salient", "mixed", "single")
SHAPES = ("ellipse", "triangle", "rectangle", "pentagon", "star", "blob")
# Saturated colours for salient objects; backgrounds use low saturation, so a named colour is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (240, 135, 20),
    "yellow": (235, 215, 35),
    "green": (40, 175, 55),
    "cyan": (35, 200, 215),
    "blue": (40, 75, 225),
    "purple": (145, 50, 190),
    "pink": (240, 110, 185),
}
SALIENT_DISTRACTORS = (2, 4)  # salient distractors per salient image, inclusive
SIDE_RANGE = (0.13, 0.34)  # longest side of an object's box, as a fraction of the image side
SINGLE_SIDE_RANGE = (0.25, 0.5)  # the same for the target of a `single` image
SINGLE_COLOUR = "red"
NEIGHBOUR_P = 0.6  # chance that the first distractor is put right next to the target
CAMO_SHIFT = (5.0, 11.0)  # colour shift of a camouflaged object's texture, in 8-bit levels
MIN_SIZE, MAX_SIZE = 32, 1024


@dataclass(frozen=True)
class SynthObject:
    """One drawn object; `bbox` is (x1, y1, x2, y2) inclusive, `colour` None for a camouflaged object."""

    shape: str
    colour: str | None
    bbox: tuple[int, int, int, int]
    area: int


@dataclass(frozen=True)
class SynthItem:
    """A generated sample with what the generator knows about it (for tests and debugging)."""

    sample: Sample
    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) bool, the target
    kind: str  # "camouflaged" | "salient"
    target: SynthObject
    distractors: tuple[SynthObject, ...]
    # how the instruction names the target: colour|shape|colour_shape|position|camouflaged|camouflaged_shape
    naming: str


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(index)])))


# ----------------------------------------------------------------------------------------------- textures


def _noise(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """Smooth noise in [0, 1], features about `cell` pixels wide. # (S, S) float32"""
    g = max(2, int(round(size / cell)))
    coarse = rng.random((g + 1, g + 1), dtype=np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).clip(0.0, 1.0)


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation RGB colour (earth, grey, olive tones). # (3,) float32"""
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(20, 90), rng.uniform(70, 200)]]], dtype=np.float32)
    hsv_u8 = hsv.round().clip(0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv_u8, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


@dataclass(frozen=True)
class _Texture:
    c1: np.ndarray  # (3,) float32
    c2: np.ndarray  # (3,) float32
    cell: float  # feature size in pixels
    contrast: float


def _random_texture(rng: np.random.Generator, size: int) -> _Texture:
    c1, c2 = _muted_colour(rng), _muted_colour(rng)
    return _Texture(c1, c2, cell=size * rng.uniform(0.05, 0.12), contrast=rng.uniform(4.0, 9.0))


def _render_texture(rng: np.random.Generator, tex: _Texture, size: int) -> np.ndarray:
    """Blotchy two-colour pattern with fine grain. # (S, S, 3) float32"""
    t = _noise(rng, size, tex.cell)
    t = 1.0 / (1.0 + np.exp(-tex.contrast * (t - 0.5)))  # sharpen the blotches
    t = 0.85 * t + 0.15 * _noise(rng, size, max(1.5, tex.cell / 4))
    return tex.c1 + (tex.c2 - tex.c1) * t[:, :, None]


def _camouflage_of(rng: np.random.Generator, tex: _Texture) -> _Texture:
    """The same texture with a slightly shifted colour and scale."""
    shift = rng.uniform(*CAMO_SHIFT) * rng.choice([-1.0, 1.0]) + rng.normal(0, 4, size=3).astype(np.float32)
    scale = rng.uniform(1.4, 2.0) if rng.random() < 0.5 else rng.uniform(0.5, 0.7)
    return _Texture(
        (tex.c1 + shift).clip(0, 255), (tex.c2 + shift).clip(0, 255), tex.cell * scale, tex.contrast
    )


# ----------------------------------------------------------------------------------------------- shapes


def _polygon(rng: np.random.Generator, shape: str, radius: float) -> np.ndarray:
    """Vertices around (0, 0). # (K, 2) float64"""
    if shape == "blob":
        k = 36
        theta = np.linspace(0, 2 * np.pi, k, endpoint=False)
        r = np.ones(k)
        for harmonic in (2, 3, 4):
            r += rng.uniform(0.05, 0.22) * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi))
        r = radius * r / r.max()
    else:
        k = {"triangle": 3, "rectangle": 4, "pentagon": 5, "star": 10}[shape]
        theta = np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(0, 2 * np.pi)
        r = np.full(k, radius)
        if shape == "star":
            r[1::2] *= 0.45
    pts = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)
    if shape == "rectangle":  # stretch the square along a random axis
        pts = _stretch(pts, rng.uniform(0.45, 0.8), rng.uniform(0, np.pi))
    return pts


def _stretch(pts: np.ndarray, factor: float, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return (pts @ rot) * np.array([1.0, factor]) @ rot.T


def _shape_mask(
    rng: np.random.Generator, shape: str, size: int, radius: float, centre: tuple[float, float]
) -> np.ndarray:
    """Exact (non-antialiased) raster of one shape. # (S, S) bool"""
    canvas = np.zeros((size, size), dtype=np.uint8)
    if shape == "ellipse":
        axes = (max(1, int(round(radius))), max(1, int(round(radius * rng.uniform(0.5, 0.95)))))
        ctr = (int(round(centre[0])), int(round(centre[1])))
        cv2.ellipse(
            canvas, ctr, axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1, lineType=cv2.LINE_8
        )
    else:
        pts = _polygon(rng, shape, radius) + np.array(centre)
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1, lineType=cv2.LINE_8)
    return canvas.astype(bool)


def _random_centre(rng: np.random.Generator, size: int, margin: float) -> tuple[float, float]:
    lo, hi = margin, size - 1 - margin
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _place(
    rng: np.random.Generator,
    shape: str,
    size: int,
    occupied: np.ndarray,
    near: np.ndarray | None = None,
    tries: int = 40,
    side_range: tuple[float, float] = SIDE_RANGE,
) -> np.ndarray | None:
    """A shape mask inside the image, at least 3 px from every occupied pixel; None if it does not fit.

    With `near` (a mask), the shape is put right next to it (a few pixels away), so a box around one of them
    tends to take in the other too.
    """
    grown = cv2.dilate(occupied.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    for _ in range(tries):
        radius = rng.uniform(*side_range) * size / 2
        if near is None:
            centre = _random_centre(rng, size, radius + 2)
        else:
            centre = _centre_beside(rng, near, radius)
        mask = _shape_mask(rng, shape, size, radius, centre)
        if mask.sum() >= 16 and not (mask & grown).any():
            x1, y1, x2, y2 = _bbox(mask)
            if x1 >= 1 and y1 >= 1 and x2 <= size - 2 and y2 <= size - 2:
                return mask
    return None


def _centre_beside(rng: np.random.Generator, near: np.ndarray, radius: float) -> tuple[float, float]:
    """A centre `radius` + a few pixels beyond the edge of `near`, in a random direction."""
    x1, y1, x2, y2 = _bbox(near)
    cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) / 2
    angle = rng.uniform(0, 2 * np.pi)
    dist = half + radius + rng.uniform(3, 9)
    return cx + dist * np.cos(angle), cy + dist * np.sin(angle)


# ----------------------------------------------------------------------------------------------- composition


def _salient_pixels(rng: np.random.Generator, colour: str, size: int) -> np.ndarray:
    """A saturated colour with soft shading. # (S, S, 3) float32"""
    shade = 0.82 + 0.18 * _noise(rng, size, size * 0.15)
    return np.array(COLOURS[colour], dtype=np.float32) * shade[:, :, None]


def _add_patches(rng: np.random.Generator, img: np.ndarray, keep_out: np.ndarray, size: int) -> None:
    """Paint 1-3 large blobs of other textures that stay clear of `keep_out` (the target), in place."""
    grown = cv2.dilate(keep_out.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    for _ in range(int(rng.integers(1, 4))):
        for _try in range(8):
            radius = rng.uniform(0.14, 0.26) * size
            patch = _shape_mask(rng, "blob", size, radius, _random_centre(rng, size, 0.2 * size))
            if not (patch & grown).any():
                other = _render_texture(rng, _random_texture(rng, size), size)
                img[patch] = other[patch]
                break


def _object(mask: np.ndarray, shape: str, colour: str | None) -> SynthObject:
    return SynthObject(shape=shape, colour=colour, bbox=_bbox(mask), area=int(mask.sum()))


def _place_target(
    rng: np.random.Generator, shape: str, size: int, side_range: tuple[float, float] = SIDE_RANGE
) -> np.ndarray:
    empty = np.zeros((size, size), dtype=bool)
    mask = _place(rng, shape, size, empty, tries=200, side_range=side_range)
    if mask is None:  # only on absurdly small images; MIN_SIZE keeps this unreachable
        raise ValueError(f"cannot place a {shape} in a {size}x{size} image")
    return mask


def _compose(
    rng: np.random.Generator, kind: str, size: int
) -> tuple[np.ndarray, np.ndarray, SynthObject, list]:
    """Draw one image. Returns (image (S, S, 3) uint8 RGB, target mask (S, S) bool, target, distractors)."""
    tex = _random_texture(rng, size)
    img = _render_texture(rng, tex, size)  # (S, S, 3) float32
    shapes = [str(s) for s in rng.choice(SHAPES, size=5)]
    colours = [str(c) for c in rng.permutation(list(COLOURS))]
    target = _place_target(rng, shapes[0], size, SINGLE_SIDE_RANGE if kind == "single" else SIDE_RANGE)
    _add_patches(rng, img, target, size)
    if kind == "single":
        img[target] = _salient_pixels(rng, SINGLE_COLOUR, size)[target]
        target_obj, n_distract = _object(target, shapes[0], SINGLE_COLOUR), 0
    elif kind == "camouflaged":
        img[target] = _render_texture(rng, _camouflage_of(rng, tex), size)[target]
        target_obj, n_distract = _object(target, shapes[0], None), int(rng.integers(0, 4))
    else:
        img[target] = _salient_pixels(rng, colours[0], size)[target]
        lo, hi = SALIENT_DISTRACTORS
        target_obj, n_distract = _object(target, shapes[0], colours[0]), int(rng.integers(lo, hi + 1))
    occupied, distractors = target.copy(), []
    beside = rng.random() < NEIGHBOUR_P
    for k in range(n_distract):
        mask = _place(rng, shapes[k + 1], size, occupied, near=target if beside and k == 0 else None)
        if mask is None:
            continue
        img[mask] = _salient_pixels(rng, colours[k + 1], size)[mask]
        occupied |= mask
        distractors.append(_object(mask, shapes[k + 1], colours[k + 1]))
    image = img.round().clip(0, 255).astype(np.uint8)
    return image, target, target_obj, distractors


# ----------------------------------------------------------------------------------------------- naming

_POSITION_WORDS = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}


def _centre(obj: SynthObject) -> tuple[float, float]:
    x1, y1, x2, y2 = obj.bbox
    return (x1 + x2) / 2, (y1 + y2) / 2


def _extreme_sides(target: SynthObject, others: list[SynthObject], size: int) -> list[str]:
    """Sides on which the target is clearly the extreme object (by >= 12% of the image side)."""
    tx, ty = _centre(target)
    cs = [_centre(o) for o in others]
    gap = 0.12 * size
    sides = []
    if all(tx + gap <= x for x, _ in cs):
        sides.append("left")
    if all(tx - gap >= x for x, _ in cs):
        sides.append("right")
    if all(ty + gap <= y for _, y in cs):
        sides.append("top")
    if all(ty - gap >= y for _, y in cs):
        sides.append("bottom")
    return sides


def _describe(
    rng: np.random.Generator, target: SynthObject, distractors: list[SynthObject], size: int
) -> tuple[str, str]:
    """(naming, noun phrase) for the target. Background patches are blobs too, so "the blob" is never used."""
    unique_shape = target.shape != "blob" and all(d.shape != target.shape for d in distractors)
    if target.colour is None:
        if distractors and unique_shape and rng.random() < 0.5:
            return "camouflaged_shape", f"camouflaged {target.shape}"
        return "camouflaged", "object camouflaged in the background"
    options = ["colour", "colour_shape"]
    if unique_shape:
        options.append("shape")
    sides = _extreme_sides(target, distractors, size)
    if sides:
        options.append("position")
    naming = str(rng.choice(options))
    if naming == "colour":
        return naming, f"{target.colour} shape"
    if naming == "shape":
        return naming, target.shape
    if naming == "position":
        return naming, f"{_POSITION_WORDS[str(rng.choice(sides))]} coloured shape"
    return naming, f"{target.colour} {target.shape}"


# ----------------------------------------------------------------------------------------------- public API


def _check_args(kind: str, size: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size={size} is out of range; use {MIN_SIZE}..{MAX_SIZE} pixels (e.g. 128)")


def generate_item(
    seed: int, index: int, kind: str = "mixed", size: int = 128, split: str = "train"
) -> SynthItem:
    """Item `index` of the synthetic set `seed` (depends on nothing else)."""
    _check_args(kind, size)
    rng = _rng(seed, index)
    item_kind = kind if kind != "mixed" else ("camouflaged" if rng.random() < 0.5 else "salient")
    image, mask, target, distractors = _compose(rng, item_kind, size)
    if item_kind == "single":  # the only coloured object: colour and shape name it
        naming, phrase = "colour_shape", f"{target.colour} {target.shape}"
    else:
        naming, phrase = _describe(rng, target, distractors, size)
    sample = Sample(
        id=f"synth-{kind}-s{seed}-{index:07d}",
        source="synthetic",
        split=split,
        task="referring",
        instruction=f"Identify and segment the {phrase}.",
        image=encode_png(image),
        mask=encode_png(mask),
        width=size,
        height=size,
    )
    return SynthItem(sample, image, mask, item_kind, target, tuple(distractors), naming)


def generate_samples(
    n: int, seed: int, kind: str = "mixed", size: int = 128, split: str = "train", start: int = 0
) -> Iterator[Sample]:
    """Samples `start .. start+n-1` of the synthetic set `seed`."""
    for index in range(start, start + n):
        yield generate_item(seed, index, kind, size, split).sample


def samples_to_table(samples: list[Sample]):
    """Samples -> a pyarrow Table in DATASET_SCHEMA."""
    import pyarrow as pa

    from protos.dataset import DATASET_SCHEMA

    columns = {name: [getattr(s, name) for s in samples] for name in DATASET_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=DATASET_SCHEMA)


def shard_name(split: str, index: int, count: int) -> str:
    """`{split}-00000-of-00004.parquet`: sorts in row order."""
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


@dataclass(frozen=True)
class SynthResult:
    """What write_synthetic wrote: the shard files, the row count, and the earlier shards it removed."""

    paths: list[Path]
    rows: int
    replaced: list[Path]


def write_synthetic(
    out_dir: str | Path,
    n: int,
    seed: int,
    kind: str = "mixed",
    size: int = 128,
    shard_size: int = 512,
    split: str = "train",
    progress: Callable[[int], None] | None = None,
) -> SynthResult:
    """Write `n` samples as Parquet shards `{split}-XXXXX-of-YYYYY.parquet` (+ `_synth_{split}.json`) in out_dir.

    Shards of the same split left by an earlier run are replaced, so the folder holds exactly this set.
    `progress(k)` is called after every k samples.
    """
    import pyarrow.parquet as pq

    _check_args(kind, size)
    if n < 1 or shard_size < 1:
        raise ValueError(f"n={n} and shard_size={shard_size} must both be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    replaced = sorted(out.glob(f"{split}-?????-of-?????.parquet"))
    for old in replaced:
        old.unlink()
    count = (n + shard_size - 1) // shard_size
    paths = []
    for shard in range(count):
        start = shard * shard_size
        rows = []
        for sample in generate_samples(min(shard_size, n - start), seed, kind, size, split, start):
            rows.append(sample)
            if progress is not None:
                progress(1)
        path = out / shard_name(split, shard, count)
        pq.write_table(
            samples_to_table(rows), path, row_group_size=64, write_statistics=["id", "width", "height"]
        )
        paths.append(path)
    meta = {
        "generator": "cluster.data.synth",
        "n": n,
        "seed": seed,
        "kind": kind,
        "size": size,
        "split": split,
    }
    meta["shards"] = [p.name for p in paths]
    (out / f"_synth_{split}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return SynthResult(paths=paths, rows=n, replaced=replaced)
