"""Importers: real data sets from a local folder -> Parquet shards in protos.DATASET_SCHEMA + import_report.json.

`import_dataset(ImportOptions(...))` is what `segr1 data import` runs. One module per format family:
folders.py (folder, cod10k, camo, nc4k, duts, dut-omron, hku-is, ecssd, dis5k), refcoco.py (refcoco, refcoco+,
refcocog), reasonseg.py (reasonseg). Layouts, splits and the rules each importer follows are in
docs/evaluation.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cluster.data.importers.common import REPORT_NAME, ImportError_, ImportReport, run_import
from cluster.data.importers.folders import FORMATS as FOLDER_FORMATS

REFER_FORMATS = ("refcoco", "refcoco+", "refcocog")
ALL_FORMATS: tuple[str, ...] = (*FOLDER_FORMATS, *REFER_FORMATS, "reasonseg")

__all__ = ["ALL_FORMATS", "REPORT_NAME", "ImportError_", "ImportOptions", "ImportReport", "import_dataset"]


@dataclass(frozen=True)
class ImportOptions:
    format: str
    out: Path
    src: Path | None = None
    split: str | None = None
    images: Path | None = None  # folder: the images; refcoco*: the COCO train2014 folder; others: override
    masks: Path | None = None  # folder: the masks; others: override (with images)
    strict: bool = False
    trust_pickle: bool = False
    include_noncam: bool = False  # cod10k: keep COD10K-NonCAM-* images (empty masks when they have none)
    all_texts: bool = False  # reasonseg: one row per question instead of the first only
    source: str | None = None  # the rows' `source` (and id prefix); default: the format name
    workers: int = 1
    shard_rows: int = 256
    progress: bool = True


def _need_dir(path: Path | None, flag: str, fmt: str) -> Path:
    if path is None:
        raise ImportError_(f"--format {fmt} needs {flag} DIR")
    if not path.is_dir():
        raise ImportError_(f"{flag} {path} is not a folder")
    return path


def _folder_listing(opts: ImportOptions):
    from cluster.data.importers.folders import list_pairs, resolve_layout

    fmt = FOLDER_FORMATS[opts.format]
    split = opts.split or fmt.default_split
    if opts.images is not None or opts.masks is not None or opts.format == "folder":
        images = _need_dir(opts.images, "--images", opts.format)
        masks = _need_dir(opts.masks, "--masks", opts.format)
        folders = [(images, masks, False)]
    else:
        src = _need_dir(opts.src, "--src", opts.format)
        folders = resolve_layout(fmt, src, split)
    source = opts.source or opts.format
    listing = list_pairs(fmt, source, split, folders, include_dropped=opts.include_noncam)
    where = " + ".join(f"{i}|{m}" for i, m, _ in folders)
    return listing.items, listing.rejected, listing.dropped, split, where


def import_dataset(opts: ImportOptions) -> ImportReport:
    """Import one split of one data set (see module docstring); raises ImportError_ with a fix on bad input."""
    if opts.format not in ALL_FORMATS:
        raise ImportError_(f"unknown --format {opts.format!r}; choose from {', '.join(ALL_FORMATS)}")
    dropped: dict[str, int] = {}
    if opts.format in FOLDER_FORMATS:
        items, rejected, dropped, split, where = _folder_listing(opts)
    elif opts.format in REFER_FORMATS:
        from cluster.data.importers.refcoco import list_refs

        src = _need_dir(opts.src, "--src", opts.format)
        listing, split = list_refs(src, opts.format, opts.split, opts.images, opts.trust_pickle)
        items, rejected, where = listing.items, listing.rejected, str(src)
    else:
        from cluster.data.importers.reasonseg import list_reasonseg

        src = _need_dir(opts.src, "--src", opts.format)
        listing, split = list_reasonseg(src, opts.split, opts.all_texts)
        items, rejected, where = listing.items, listing.rejected, str(src)
    if opts.source and opts.format not in FOLDER_FORMATS:
        items = [_with_source(it, opts.source) for it in items]
    name = items[0].source if items else (opts.source or opts.format)
    report = ImportReport(opts.format, name, where, split, str(opts.out), dropped=dropped)
    return run_import(
        items,
        rejected,
        report,
        opts.out,
        strict=opts.strict,
        workers=opts.workers,
        shard_rows=opts.shard_rows,
        progress=opts.progress,
    )


def _with_source(item, source: str):
    from dataclasses import replace

    _, rest = item.id.split("/", 1)
    return replace(item, source=source, id=f"{source}/{rest}")
