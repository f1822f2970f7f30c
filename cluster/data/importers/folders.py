"""Image + mask folder data sets, paired by file stem: the generic `folder` format and the foreground benchmarks
(COD10K, CAMO, NC4K, DUTS, DUT-OMRON, HKU-IS, ECSSD, DIS5K) in the layouts they are distributed in.

Each format lists, per split, the (images, masks) folder pairs it accepts under --src, in order; the first pair
that exists is used (folder names match case-insensitively). `--images DIR --masks DIR` replace the lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cluster.data.importers.common import (
    IMAGE_EXTS,
    MASK_EXTS,
    ImportError_,
    ImportItem,
    Rejected,
    instruction_for,
    list_files,
)


@dataclass(frozen=True)
class Layout:
    """One images folder and its masks folder, relative to --src. `shared_masks`: the masks folder also holds
    other splits' masks (CAMO's GT), so a mask without an image is not reported."""

    images: str
    masks: str
    shared_masks: bool = False


# An alternative is a tuple of layouts read together (DIS5K's test = TE1..TE4).
Alternative = tuple[Layout, ...]

# Tried after a format's own layouts: the layouts most re-distributions of these sets use.
GENERIC: tuple[Alternative, ...] = tuple(
    (Layout(i, m),)
    for i, m in (
        ("Imgs", "GT"),
        ("Image", "GT_Object"),
        ("Image", "Mask"),
        ("images", "masks"),
        ("im", "gt"),
        ("imgs", "gt"),
        ("img", "gt"),
    )
)


@dataclass(frozen=True)
class FolderFormat:
    name: str
    default_split: str
    splits: dict[str, tuple[Alternative, ...]]
    # stem -> reason to leave the image out (counted under `dropped`), or None to keep it
    drop: Callable[[str], str | None] | None = None
    notes: str = ""
    extra_splits_ok: bool = False  # the generic `folder` format takes any --split name


def _alts(*pairs: tuple[str, str] | tuple[str, str, bool]) -> tuple[Alternative, ...]:
    return tuple((Layout(*p),) for p in pairs)


def _cod10k_drop(stem: str) -> str | None:
    return "noncam" if "-NonCAM-" in stem or stem.startswith("COD10K-NonCAM") else None


_DIS_TE = tuple(f"DIS-TE{k}" for k in range(1, 5))

FORMATS: dict[str, FolderFormat] = {
    "folder": FolderFormat("folder", "train", {}, extra_splits_ok=True, notes="--images DIR --masks DIR"),
    "cod10k": FolderFormat(
        "cod10k",
        "train",
        {
            "train": _alts(
                ("Train/Image", "Train/GT_Object"), ("COD10K-v3/Train/Image", "COD10K-v3/Train/GT_Object")
            ),
            "test": _alts(
                ("Test/Image", "Test/GT_Object"),
                ("COD10K-v3/Test/Image", "COD10K-v3/Test/GT_Object"),
                ("TestDataset/COD10K/Imgs", "TestDataset/COD10K/GT"),
                ("COD10K/Imgs", "COD10K/GT"),
            ),
        },
        drop=_cod10k_drop,
        notes="NonCAM images (COD10K-NonCAM-*) are left out unless --include-noncam",
    ),
    "camo": FolderFormat(
        "camo",
        "train",
        {
            "train": _alts(
                ("Images/Train", "GT", True),
                ("CAMO-V.1.0-CVIU2019/Images/Train", "CAMO-V.1.0-CVIU2019/GT", True),
            ),
            "test": _alts(
                ("Images/Test", "GT", True),
                ("CAMO-V.1.0-CVIU2019/Images/Test", "CAMO-V.1.0-CVIU2019/GT", True),
                ("TestDataset/CAMO/Imgs", "TestDataset/CAMO/GT"),
                ("CAMO/Imgs", "CAMO/GT"),
            ),
        },
    ),
    "nc4k": FolderFormat(
        "nc4k",
        "test",
        {"test": _alts(("NC4K/Imgs", "NC4K/GT"), ("TestDataset/NC4K/Imgs", "TestDataset/NC4K/GT"))},
    ),
    "duts": FolderFormat(
        "duts",
        "train",
        {
            "train": _alts(
                ("DUTS-TR/DUTS-TR-Image", "DUTS-TR/DUTS-TR-Mask"), ("DUTS-TR-Image", "DUTS-TR-Mask")
            ),
            "test": _alts(
                ("DUTS-TE/DUTS-TE-Image", "DUTS-TE/DUTS-TE-Mask"), ("DUTS-TE-Image", "DUTS-TE-Mask")
            ),
        },
    ),
    "dut-omron": FolderFormat(
        "dut-omron",
        "test",
        {
            "test": _alts(
                ("DUT-OMRON-image", "pixelwiseGT-new-PNG"),
                ("DUT-OMRON-image/DUT-OMRON-image", "pixelwiseGT-new-PNG"),
                ("DUT-OMRON/Imgs", "DUT-OMRON/GT"),
            )
        },
    ),
    "hku-is": FolderFormat("hku-is", "test", {"test": _alts(("HKU-IS/imgs", "HKU-IS/gt"))}),
    "ecssd": FolderFormat(
        "ecssd",
        "test",
        {"test": _alts(("images", "ground_truth_mask"), ("ECSSD/images", "ECSSD/ground_truth_mask"))},
    ),
    "dis5k": FolderFormat(
        "dis5k",
        "train",
        {
            "train": _alts(("DIS-TR/im", "DIS-TR/gt"), ("DIS5K/DIS-TR/im", "DIS5K/DIS-TR/gt")),
            "val": _alts(("DIS-VD/im", "DIS-VD/gt"), ("DIS5K/DIS-VD/im", "DIS5K/DIS-VD/gt")),
            **{
                f"te{k}": _alts(
                    (f"DIS-TE{k}/im", f"DIS-TE{k}/gt"), (f"DIS5K/DIS-TE{k}/im", f"DIS5K/DIS-TE{k}/gt")
                )
                for k in range(1, 5)
            },
            "test": (
                tuple(Layout(f"{t}/im", f"{t}/gt") for t in _DIS_TE),
                tuple(Layout(f"DIS5K/{t}/im", f"DIS5K/{t}/gt") for t in _DIS_TE),
            ),
        },
        notes="split test = DIS-TE1..4 together",
    ),
}


def find_dir(root: Path, rel: str) -> Path | None:
    """root/rel if it is a folder, matching each part of `rel` case-insensitively; None when absent."""
    node = root
    for part in Path(rel).parts:
        exact = node / part
        if exact.is_dir():
            node = exact
            continue
        matches = (
            sorted(p for p in node.iterdir() if p.is_dir() and p.name.lower() == part.lower())
            if node.is_dir()
            else []
        )
        if not matches:
            return None
        node = matches[0]
    return node


def resolve_layout(fmt: FolderFormat, src: Path, split: str) -> list[tuple[Path, Path, bool]]:
    """The (images dir, masks dir, shared_masks) folders of `split` under `src`; errors list what was tried."""
    if split not in fmt.splits:
        raise ImportError_(
            f"format {fmt.name} has no split {split!r}; choose --split from {sorted(fmt.splits)}"
        )
    tried = []
    for alt in (*fmt.splits[split], *GENERIC):
        found = [(find_dir(src, lay.images), find_dir(src, lay.masks), lay.shared_masks) for lay in alt]
        if all(i is not None and m is not None for i, m, _ in found):
            return found  # type: ignore[return-value]
        tried.append(" + ".join(f"{lay.images}|{lay.masks}" for lay in alt))
    raise ImportError_(
        f"{src} does not hold a {fmt.name} {split} split in a known layout; tried (images|masks): "
        + "; ".join(tried)
        + ". Point --src at the data set's root, or pass --format folder --images DIR --masks DIR"
    )


@dataclass
class FolderListing:
    items: list[ImportItem] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)


def _empty_mask(height: int, width: int) -> np.ndarray:
    return np.zeros((height, width), dtype=bool)


def _single(paths: list[Path], what: str, listing: FolderListing) -> Path | None:
    """The one file of a stem; several files with one stem are ambiguous and reported."""
    if len(paths) == 1:
        return paths[0]
    names = ", ".join(p.name for p in paths)
    for p in paths:
        listing.rejected.append(Rejected(str(p), f"duplicate stem: several {what} files share it ({names})"))
    return None


def list_pairs(
    fmt: FolderFormat,
    source: str,
    split: str,
    folders: list[tuple[Path, Path, bool]],
    include_dropped: bool = False,
) -> FolderListing:
    """Items for every image of `folders`, paired with its mask by stem, in sorted id order."""
    listing = FolderListing()
    instruction = instruction_for("foreground")
    seen: set[str] = set()
    for images_dir, masks_dir, shared in folders:
        images, masks = list_files(images_dir, IMAGE_EXTS), list_files(masks_dir, MASK_EXTS)
        for stem, paths in images.items():
            image = _single(paths, "image", listing)
            reason = fmt.drop(stem) if fmt.drop else None
            if reason and not include_dropped:
                listing.dropped[reason] = listing.dropped.get(reason, 0) + 1
                continue
            if image is None:
                continue
            mask = _single(masks[stem], "mask", listing) if stem in masks else None
            if stem in masks and mask is None:
                continue
            if mask is None and reason:  # an included NonCAM image without a mask holds no object
                mask = _empty_mask
            item_id = f"{source}/{split}/{stem}"
            if item_id in seen:
                listing.rejected.append(
                    Rejected(str(image), f"duplicate stem: id {item_id} already imported")
                )
                continue
            seen.add(item_id)
            listing.items.append(ImportItem(item_id, image, mask, instruction, "foreground", split, source))
        if not shared:
            for stem, paths in masks.items():
                if stem not in images:
                    for p in paths:
                        listing.rejected.append(
                            Rejected(str(p), "missing image: no image file with the mask's stem")
                        )
    listing.items.sort(key=lambda it: it.id)
    return listing
