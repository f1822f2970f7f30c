"""COCO segmentations -> (H, W) bool masks, without pycocotools.

- Polygons (`[[x1, y1, x2, y2, ...], ...]`) are rasterised by pixel centres: pixel (x, y) is in when its centre
  (x + 0.5, y + 0.5), COCO's convention, lies inside the polygon (matplotlib's point-in-path test), so a box
  polygon of w x h covers w x h pixels as with pycocotools; pixels whose centre lies exactly on an edge may
  differ from pycocotools' rasteriser.
- RLE: uncompressed (`counts` a list of ints) and compressed (`counts` the LEB128-like string of the COCO API),
  both column-major, decoded in numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class BadSegmentation(ValueError):
    """A segmentation that cannot be rendered; the message says what is wrong."""


def rle_counts_from_string(s: str | bytes) -> list[int]:
    """Decode the COCO compressed RLE string (pycocotools' rleFrString) into run lengths."""
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise BadSegmentation("compressed RLE string ends inside a number")
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def decode_rle(rle: dict) -> np.ndarray:
    """A COCO RLE dict ({'size': [h, w], 'counts': list | str}) -> (h, w) bool."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as err:
        raise BadSegmentation(f"RLE needs 'size' [h, w] and 'counts': {err}") from None
    if isinstance(counts, (str, bytes)):
        counts = rle_counts_from_string(counts)
    runs = np.asarray(counts, dtype=np.int64)
    if (runs < 0).any() or runs.sum() != h * w:
        raise BadSegmentation(f"RLE run lengths sum to {int(runs.sum())}, expected h*w = {h * w}")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True  # runs alternate 0, 1, 0, ... starting with zeros
    flat = np.repeat(values, runs)  # (h*w,) column-major
    return flat.reshape(w, h).T.copy()


def render_polygons(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Fill COCO polygons (flat [x, y, x, y, ...] lists) into an (height, width) bool mask."""
    from matplotlib.path import Path

    canvas = np.zeros((height, width), dtype=bool)
    for poly in polygons:
        arr = np.asarray(poly, dtype=np.float64)
        if arr.ndim == 2 and arr.shape[1] == 2:  # [[x, y], ...] (labelme-style)
            arr = arr.reshape(-1)
        if arr.ndim != 1 or len(arr) < 6 or len(arr) % 2:
            raise BadSegmentation(f"a polygon needs >= 3 (x, y) pairs, got {len(arr)} numbers")
        if not np.isfinite(arr).all():
            raise BadSegmentation("a polygon has a non-finite coordinate")
        xy = arr.reshape(-1, 2)  # (N, 2)
        x0, y0 = (max(int(np.floor(v)), 0) for v in xy.min(axis=0))
        x1, y1 = int(min(np.ceil(xy[:, 0].max()), width)), int(min(np.ceil(xy[:, 1].max()), height))
        if x1 <= x0 or y1 <= y0:
            continue
        gx, gy = np.meshgrid(np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5)  # (h, w) pixel centres
        inside = Path(xy).contains_points(np.stack([gx.ravel(), gy.ravel()], axis=1))
        canvas[y0:y1, x0:x1] |= inside.reshape(gx.shape)
    return canvas


def render_segmentation(seg, height: int, width: int) -> np.ndarray:
    """Any COCO `segmentation` (polygon list, RLE dict, list of RLE dicts) -> (height, width) bool."""
    if isinstance(seg, dict):
        mask = decode_rle(seg)
    elif isinstance(seg, list) and seg and all(isinstance(s, dict) for s in seg):
        masks = [decode_rle(s) for s in seg]
        mask = np.logical_or.reduce(masks)
    elif isinstance(seg, list) and seg:
        return render_polygons(seg, height, width)
    else:
        raise BadSegmentation(f"empty or unknown segmentation of type {type(seg).__name__}")
    if mask.shape != (height, width):
        raise BadSegmentation(
            f"RLE size {mask.shape[1]}x{mask.shape[0]} (WxH) differs from the image {width}x{height}"
        )
    return mask
