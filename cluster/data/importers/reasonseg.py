"""ReasonSeg (LISA): one JSON per image with polygons and the question(s).

Layout:
    <src>/{train,val,test}/<name>.jpg
    <src>/{train,val,test}/<name>.json   {"text": [question, ...], "is_sentence": bool,
                                          "shapes": [{"label": "target" | "ignore" | "flag", "points": [[x, y]...]}]}

The mask is made as LISA makes it: shapes labelled "flag" are dropped, the others are drawn largest first
(outline + fill at integer coordinates), "ignore" shapes as background and the rest as target. LISA marks
"ignore" pixels 255 and leaves them out of the scores; the project's masks are 0/1, so they count as background
here (docs/evaluation.md says so next to the figures).

Rows: by default one per image with its first text (LISA's evaluation protocol); `all_texts` gives one per text.
Instruction: "<question> Identify and segment it." for sentences; for a short phrase (is_sentence false) the
referring form "Identify and segment <phrase>.", as the reference builds it. The task is "reasoning" either way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from cluster.data.importers.common import (
    IMAGE_EXTS,
    ImportError_,
    ImportItem,
    Rejected,
    SkipItem,
    instruction_for,
)

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT = "val"


@dataclass
class ReasonListing:
    items: list[ImportItem] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


def _read_json(path: Path) -> dict:
    raw = path.read_bytes()
    for enc in ("utf-8", "cp1252"):  # a few ReasonSeg files are cp1252, as LISA's loader knows
        try:
            data = json.loads(raw.decode(enc))
            break
        except (UnicodeDecodeError, ValueError):
            continue
    else:
        raise SkipItem(f"corrupt annotation: {path.name} is not JSON (utf-8 or cp1252)")
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
        raise SkipItem("corrupt annotation: no 'shapes' list")
    return data


def _poly(points) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) < 3 or not np.isfinite(arr).all():
        raise SkipItem(
            f"corrupt annotation: a polygon needs >= 3 finite [x, y] points, got shape {arr.shape}"
        )
    return arr.astype(np.int32)  # LISA truncates to int32


def render_shapes(shapes: list, height: int, width: int) -> np.ndarray:
    """LISA's get_mask_from_json, with ignore regions as background: (height, width) bool."""
    valid = [s for s in shapes if str(s.get("label", "")).lower() != "flag"]
    polys = [_poly(s.get("points")) for s in valid]
    areas = []
    for poly in polys:
        tmp = np.zeros((height, width), np.uint8)
        cv2.polylines(tmp, [poly], True, 1, 1)
        cv2.fillPoly(tmp, [poly], 1)
        areas.append(int(tmp.sum()))
    mask = np.zeros((height, width), np.uint8)
    for idx in np.argsort(areas, kind="stable")[::-1]:
        value = 0 if "ignore" in str(valid[idx].get("label", "")).lower() else 1
        cv2.polylines(mask, [polys[idx]], True, value, 1)
        cv2.fillPoly(mask, [polys[idx]], value)
    return mask.astype(bool)


def _texts(data: dict) -> list[str]:
    text = data.get("text", [])
    texts = [text] if isinstance(text, str) else list(text) if isinstance(text, list) else []
    return [t.strip() for t in texts if isinstance(t, str) and t.strip()]


def _instruction(text: str, is_sentence: bool) -> str:
    """The reference's wording (eval/datasets/ReasonSeg_Dataset.py): a sentence "<question> Identify and segment
    it.", a short phrase " Identify and segment <phrase, lower case>." (its leading space dropped; unlike RefCOCO's
    expressions, with a full stop)."""
    if is_sentence:
        return instruction_for("reasoning", text)
    return instruction_for("referring", text.lower().rstrip(".") + ".")


def _renderer(shapes: list):
    def render(height: int, width: int) -> np.ndarray:
        return render_shapes(shapes, height, width)

    return render


def _split_dir(src: Path, split: str) -> Path:
    for cand in (src / split, src / "ReasonSeg" / split, src):
        if cand.is_dir() and any(cand.glob("*.json")):
            return cand
    raise ImportError_(
        f"{src} does not hold ReasonSeg {split}: expected {src / split}/ with <name>.jpg + <name>.json pairs"
    )


def _image_for(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTS:
        for cand in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


def list_reasonseg(src: Path, split: str | None, all_texts: bool = False) -> tuple[ReasonListing, str]:
    """Items of one ReasonSeg split, sorted by image name then text index."""
    split = split or DEFAULT_SPLIT
    if split not in SPLITS:
        raise ImportError_(f"ReasonSeg has no split {split!r}; choose --split from {list(SPLITS)}")
    folder = _split_dir(src, split)
    listing = ReasonListing()
    for json_path in sorted(folder.glob("*.json")):
        image = _image_for(folder, json_path.stem)
        if image is None:
            listing.rejected.append(
                Rejected(str(json_path), "missing image: no image file with the JSON's stem")
            )
            continue
        try:
            data = _read_json(json_path)
        except SkipItem as err:
            listing.rejected.append(Rejected(str(json_path), str(err)))
            continue
        texts = _texts(data)
        if not texts:
            listing.rejected.append(Rejected(str(json_path), "corrupt annotation: no question in 'text'"))
            continue
        is_sentence = bool(data.get("is_sentence", True))
        for k, text in enumerate(texts if all_texts else texts[:1]):
            listing.items.append(
                ImportItem(
                    id=f"reasonseg/{split}/{json_path.stem}" + (f"-{k}" if all_texts else ""),
                    image_path=image,
                    mask=_renderer(data["shapes"]),
                    instruction=_instruction(text, is_sentence),
                    task="reasoning",
                    split=split,
                    source="reasonseg",
                    mask_ref=str(json_path),
                )
            )
    for image_path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        if not image_path.name.startswith(".") and not image_path.with_suffix(".json").is_file():
            listing.rejected.append(
                Rejected(str(image_path), "missing annotation: no JSON with the image's stem")
            )
    return listing, split
