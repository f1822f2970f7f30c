"""What every importer shares: the item to import, checking and encoding it, the report, and the shard writer.

An importer (one module per format family) only lists `ImportItem`s in a fixed order; `run_import` decodes each
image (a corrupt file is skipped and reported), builds its 0/1 mask (from a mask file, binarised once by
`runtime.images.decode_mask`, or rendered from polygons / RLE), checks sizes, and writes Parquet shards in
`protos.DATASET_SCHEMA` plus `import_report.json`. The same source always gives byte-identical shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protos.dataset import Sample
from runtime.images import CorruptSampleError, decode_image, decode_mask, encode_png

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".webp")
REPORT_NAME = "import_report.json"
SHARD_ROWS = 256

# Renders a mask for an image of (height, width): returns a (H, W) bool array, or raises SkipItem.
MaskRenderer = Callable[[int, int], np.ndarray]


class ImportError_(Exception):
    """A user-facing import failure (bad --src layout, strict-mode skip, untrusted pickle); the message says how
    to fix it. The command layer turns it into a CommandError."""


class SkipItem(Exception):
    """This item cannot be imported; the message is the reason written to import_report.json.

    `about_mask`: the problem is the mask / annotation, so the report names the mask (or annotation) path."""

    def __init__(self, reason: str, about_mask: bool = False):
        super().__init__(reason)
        self.about_mask = about_mask


@dataclass(frozen=True)
class ImportItem:
    """One row to import. `mask` is a mask file, a renderer (polygons, RLE), or None (missing: reported)."""

    id: str
    image_path: Path
    mask: Path | MaskRenderer | None
    instruction: str
    task: str
    split: str
    source: str
    # The path reported when this item is skipped for a mask problem (defaults to the mask file / the image).
    mask_ref: str | None = None
    # Size the annotation was made for (height, width); a decoded image of another size is a mismatch.
    annotated_size: tuple[int, int] | None = None


@dataclass
class ImportReport:
    format: str
    name: str  # the rows' `source`: names the shards `{name}-{split}-XXXXX-of-YYYYY.parquet`
    source: str  # where the files came from
    split: str
    out: str
    imported: int = 0
    skipped: list[dict] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    reencoded_png: int = 0
    shards: list[str] = field(default_factory=list)

    def skip(self, path: str | Path, reason: str) -> None:
        self.skipped.append({"path": str(path), "reason": reason})

    def to_json(self) -> str:
        body = {
            "format": self.format,
            "name": self.name,
            "source": self.source,
            "split": self.split,
            "out": self.out,
            "imported": self.imported,
            "skipped": sorted(self.skipped, key=lambda s: (s["path"], s["reason"])),
            "dropped": dict(sorted(self.dropped.items())),
            "reencoded_png": self.reencoded_png,
            "shards": self.shards,
        }
        return json.dumps(body, indent=2, ensure_ascii=False) + "\n"


@dataclass(frozen=True)
class Rejected:
    """An item (or a file that never became one) to list in the report: path and reason."""

    path: str
    reason: str


def _is_png_or_jpeg(data: bytes) -> bool:
    return data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff"


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise SkipItem(f"unreadable {what}: {err.strerror or err}") from None


def _mask_array(item: ImportItem, height: int, width: int) -> np.ndarray:
    if item.mask is None:
        raise SkipItem("missing mask: no mask file with the image's stem")
    try:
        if callable(item.mask):
            return item.mask(height, width)
        data = _read(item.mask, "mask")
        return decode_mask(data, item.mask.name)
    except CorruptSampleError as err:
        raise SkipItem(f"corrupt mask: {err}", about_mask=True) from None
    except SkipItem as err:
        raise SkipItem(str(err), about_mask=True) from None


def build_sample(item: ImportItem) -> tuple[Sample, bool]:
    """Decode-check the image, build the 0/1 mask; returns (sample, image was re-encoded as PNG).

    Raises SkipItem with the reason when the item cannot be imported."""
    data = _read(item.image_path, "image")
    try:
        rgb = decode_image(data, item.image_path.name)  # (H, W, 3) uint8
    except CorruptSampleError as err:
        raise SkipItem(f"corrupt image: {err}") from None
    height, width = rgb.shape[:2]
    if item.annotated_size is not None and item.annotated_size != (height, width):
        ah, aw = item.annotated_size
        raise SkipItem(f"size mismatch: annotation is for {aw}x{ah} (WxH), image is {width}x{height}")
    mask = _mask_array(item, height, width)  # (H, W) bool
    if mask.shape != (height, width):
        raise SkipItem(
            f"size mismatch: image is {width}x{height} (WxH), mask is {mask.shape[1]}x{mask.shape[0]}",
            about_mask=True,
        )
    reencoded = not _is_png_or_jpeg(data)
    image_bytes = encode_png(rgb) if reencoded else data  # bytes kept as they are (PNG / JPEG)
    sample = Sample(
        id=item.id,
        source=item.source,
        split=item.split,
        task=item.task,
        instruction=item.instruction,
        image=image_bytes,
        mask=encode_png(mask),
        width=width,
        height=height,
    )
    return sample, reencoded


def _skip_path(item: ImportItem, about_mask: bool) -> str:
    """The path a skipped item is reported under: the mask (or annotation) for mask problems, else the image."""
    if about_mask:
        if item.mask_ref:
            return item.mask_ref
        if isinstance(item.mask, Path):
            return str(item.mask)
    return str(item.image_path)


Built = tuple[Sample | None, bool, Rejected | None]  # (sample, image re-encoded, why it was skipped)


def _try_build(item: ImportItem) -> Built:
    try:
        sample, reencoded = build_sample(item)
        return sample, reencoded, None
    except SkipItem as err:
        return None, False, Rejected(_skip_path(item, err.about_mask), str(err))


def _build_all(items: list[ImportItem], workers: int) -> Iterator[Built]:
    """Build every item, in order; decoding runs on `workers` threads (OpenCV releases the GIL)."""
    if workers <= 1:
        yield from map(_try_build, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # map keeps the input order; chunks bound the number of decoded samples held in memory
        chunk = 4 * workers
        for start in range(0, len(items), chunk):
            yield from pool.map(_try_build, items[start : start + chunk])


class ShardWriter:
    """Writes samples to `{prefix}-XXXXX-of-YYYYY.parquet` shards (prefix `{source}-{split}`, so several data sets
    can share a folder) with fixed settings: the same rows give identical bytes on every run.

    Shards go to temporary names first; `finish()` removes the prefix's old shards and renames the new ones, so a
    failed import leaves an earlier import untouched."""

    def __init__(self, out: Path, prefix: str, shard_rows: int = SHARD_ROWS):
        self.out, self.prefix, self.shard_rows = out, prefix, shard_rows
        self._rows: list[Sample] = []
        self._tmp: list[Path] = []
        out.mkdir(parents=True, exist_ok=True)

    def add(self, sample: Sample) -> None:
        self._rows.append(sample)
        if len(self._rows) >= self.shard_rows:
            self._flush()

    def _flush(self) -> None:
        import pyarrow.parquet as pq

        from cluster.data.synth import samples_to_table

        if not self._rows:
            return
        path = self.out / f".importing-{self.prefix}-{len(self._tmp):05d}.parquet"
        table = samples_to_table(self._rows)
        pq.write_table(table, path, row_group_size=64, write_statistics=["id", "width", "height"])
        self._tmp.append(path)
        self._rows = []

    def finish(self) -> list[Path]:
        from cluster.data.synth import shard_name

        self._flush()
        for old in sorted(self.out.glob(f"{glob_escape(self.prefix)}-?????-of-?????.parquet")):
            old.unlink()
        final = []
        for i, tmp in enumerate(self._tmp):
            path = self.out / shard_name(self.prefix, i, len(self._tmp))
            os.replace(tmp, path)
            final.append(path)
        return final

    def abort(self) -> None:
        for tmp in self._tmp:
            tmp.unlink(missing_ok=True)


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in text)


def run_import(
    items: Iterable[ImportItem],
    rejected: Iterable[Rejected],
    report: ImportReport,
    out: Path,
    *,
    strict: bool = False,
    workers: int = 1,
    shard_rows: int = SHARD_ROWS,
    progress: bool = True,
) -> ImportReport:
    """Import `items` (in the given order) into `out`; list skipped items and `rejected` files in the report.

    strict: the first problem raises ImportError_ naming the path and reason, and nothing is written."""
    from tqdm import tqdm

    items = list(items)
    for rej in rejected:
        if strict:
            raise ImportError_(f"{rej.path}: {rej.reason} (--strict makes every skipped file fatal)")
        report.skip(rej.path, rej.reason)
    prefix = f"{report.name}-{report.split}"
    writer = ShardWriter(out, prefix, shard_rows)
    bar = tqdm(
        total=len(items), desc=f"import {report.format}/{report.split}", unit="img", disable=not progress
    )
    try:
        for sample, reencoded, rej in _build_all(items, workers):
            bar.update(1)
            if sample is None:
                if strict:
                    raise ImportError_(f"{rej.path}: {rej.reason} (--strict makes every skipped file fatal)")
                report.skip(rej.path, rej.reason)
                continue
            writer.add(sample)
            report.imported += 1
            report.reencoded_png += int(reencoded)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    if report.imported == 0:
        writer.abort()
        raise ImportError_(
            f"nothing to import from {report.source} (format {report.format}, split {report.split}): "
            f"{len(report.skipped)} file(s) skipped; check --src / --split against docs/evaluation.md"
        )
    report.shards = [p.name for p in writer.finish()]
    text = report.to_json()
    (out / REPORT_NAME).write_text(text)  # the latest import into `out`
    (out / f"_import_{prefix}.json").write_text(text)  # kept per data set when several share a folder
    return report


# ------------------------------------------------------------------------------------------------------------
# Listing files


def list_files(folder: Path, exts: tuple[str, ...]) -> dict[str, list[Path]]:
    """Files of `folder` (not recursive, dotfiles ignored) with one of `exts`, grouped by stem, sorted."""
    by_stem: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in exts:
            continue
        by_stem.setdefault(path.stem, []).append(path)
    return by_stem


def instruction_for(task: str, text: str = "") -> str:
    """The row's instruction (protos.answer.default_instruction: one wording for the whole project)."""
    from protos.answer import default_instruction

    return default_instruction(task, text)
