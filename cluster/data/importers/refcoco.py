"""RefCOCO, RefCOCO+ and RefCOCOg (the REFER release): one row per referring expression.

Layout (lichengunc/refer):
    <src>/instances.json        COCO images + annotations (polygons or RLE) of the referred objects
    <src>/refs(unc).p           refcoco, refcoco+  (splits train, val, testA, testB)
    <src>/refs(umd).p           refcocog           (splits train, val, test)
    COCO train2014 images       --images DIR, or found next to <src> (images/mscoco/images/train2014, ...)

`refs(*).p` is a Python pickle. Unpickling a file can run code chosen by whoever wrote it, so the importer only
reads it with --trust-pickle, and even then with an unpickler that refuses every class and function (the REFER
file holds only lists, dicts, strings and numbers).
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

from cluster.data.importers.coco_masks import BadSegmentation, render_segmentation
from cluster.data.importers.common import ImportError_, ImportItem, Rejected, SkipItem, instruction_for

SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
DEFAULT_SPLIT = "val"
IMAGE_DIR_CANDIDATES = (
    "images/mscoco/images/train2014",
    "../images/mscoco/images/train2014",
    "images/train2014",
    "../images/train2014",
    "train2014",
    "../train2014",
    "../coco_2014/train2014",
    "../../coco_2014/train2014",
    "../../images/mscoco/images/train2014",
)


class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"refs file references {module}.{name}; a REFER refs file holds only plain lists and dicts, "
            "so this file is not one and is not loaded"
        )


def _fix_text(obj):
    """Strings of a Python 2 pickle read as latin-1, turned back into the UTF-8 text they were."""
    if isinstance(obj, str):
        try:
            return obj.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return obj
    if isinstance(obj, list):
        return [_fix_text(v) for v in obj]
    if isinstance(obj, dict):
        return {_fix_text(k): _fix_text(v) for k, v in obj.items()}
    return obj


def load_refs(path: Path, trust_pickle: bool) -> list[dict]:
    """The refs list of a REFER pickle; refuses without trust_pickle (see module docstring)."""
    if not trust_pickle:
        raise ImportError_(
            f"{path} is a Python pickle, and loading a pickle can run code embedded in the file. Pass "
            "--trust-pickle only if this file comes from a source you trust (the official REFER release); "
            "it is then read with an unpickler that accepts plain lists/dicts/strings only"
        )
    data = path.read_bytes()
    try:
        refs = _NoGlobalsUnpickler(io.BytesIO(data)).load()
    except UnicodeDecodeError:  # Python 2 str with non-ASCII bytes
        refs = _fix_text(_NoGlobalsUnpickler(io.BytesIO(data), encoding="latin-1").load())
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ImportError_(f"{path}: not a readable REFER refs pickle ({err})") from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ImportError_(f"{path}: expected a list of ref dicts, got {type(refs).__name__}")
    return refs


def locate(src: Path, dataset: str) -> tuple[Path, Path]:
    """(instances.json, refs file) of `dataset` under src (src itself or src/<dataset>)."""
    split_by = SPLIT_BY[dataset]
    for root in (src, src / dataset):
        inst, refs = root / "instances.json", root / f"refs({split_by}).p"
        if inst.is_file() and refs.is_file():
            return inst, refs
    raise ImportError_(
        f"{src} does not hold {dataset}: expected instances.json and refs({split_by}).p in it or in "
        f"{src / dataset} (the REFER layout, see docs/evaluation.md)"
    )


def locate_images(src: Path, images: Path | None) -> Path:
    if images is not None:
        if not images.is_dir():
            raise ImportError_(f"--images {images} is not a folder; give the COCO train2014 image folder")
        return images
    for rel in IMAGE_DIR_CANDIDATES:
        cand = (src / rel).resolve()
        if cand.is_dir():
            return cand
    raise ImportError_(
        f"cannot find the COCO train2014 images next to {src} (tried {', '.join(IMAGE_DIR_CANDIDATES)}); "
        "pass --images DIR"
    )


@dataclass
class ReferListing:
    items: list[ImportItem] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


def _renderer(seg, what: str):
    def render(height: int, width: int):
        try:
            return render_segmentation(seg, height, width)
        except BadSegmentation as err:
            raise SkipItem(f"bad segmentation of {what}: {err}") from None

    return render


def _load_instances(path: Path) -> tuple[dict, dict]:
    try:
        inst = json.loads(path.read_text(encoding="utf-8"))
        imgs = {img["id"]: img for img in inst["images"]}
        anns = {ann["id"]: ann for ann in inst["annotations"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ImportError_(
            f"{path}: not a COCO instances file with 'images' and 'annotations' ({err})"
        ) from None
    return imgs, anns


def list_refs(
    src: Path, dataset: str, split: str | None, images: Path | None, trust_pickle: bool
) -> tuple[ReferListing, str]:
    """Items (one per expression of `split`) ordered by image, ref and sentence id; returns (listing, split)."""
    inst_path, refs_path = locate(src, dataset)
    refs = load_refs(refs_path, trust_pickle)
    split = split or DEFAULT_SPLIT
    present = sorted({str(r.get("split")) for r in refs})
    if split not in present:
        raise ImportError_(f"{refs_path} has no split {split!r}; choose --split from {present}")
    image_dir = locate_images(src, images)
    imgs, anns = _load_instances(inst_path)
    listing = ReferListing()
    missing_files: dict[str, int] = {}
    chosen = sorted((r for r in refs if r.get("split") == split), key=lambda r: (r["image_id"], r["ref_id"]))
    for ref in chosen:
        ann, img = anns.get(ref.get("ann_id")), imgs.get(ref.get("image_id"))
        if ann is None or img is None:
            listing.rejected.append(
                Rejected(f"{refs_path}#ref{ref['ref_id']}", "annotation or image id not in instances.json")
            )
            continue
        image_path = image_dir / img["file_name"]
        if not image_path.is_file():
            missing_files[str(image_path)] = missing_files.get(str(image_path), 0) + len(
                ref.get("sentences", [])
            )
            continue
        render = _renderer(ann.get("segmentation"), f"annotation {ann['id']}")
        for sent in sorted(ref.get("sentences", []), key=lambda s: s["sent_id"]):
            text = (sent.get("sent") or sent.get("raw") or "").strip()
            ref_key = f"{refs_path}#ref{ref['ref_id']}/sent{sent['sent_id']}"
            if not text:
                listing.rejected.append(Rejected(ref_key, "empty referring expression"))
                continue
            listing.items.append(
                ImportItem(
                    id=f"{dataset}/{split}/{ref['ref_id']}-{sent['sent_id']}",
                    image_path=image_path,
                    mask=render,
                    instruction=instruction_for("referring", text),
                    task="referring",
                    split=split,
                    source=dataset,
                    mask_ref=ref_key,
                    annotated_size=(int(img["height"]), int(img["width"])),
                )
            )
    for path, n in sorted(missing_files.items()):
        listing.rejected.append(
            Rejected(path, f"missing image: COCO file not found ({n} expression(s) lost)")
        )
    return listing, split
