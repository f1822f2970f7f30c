"""The report of an evaluation run: metrics.json, metrics.md (the paper's table layout), predictions.parquet (one
row per sample) and grid.png (the best and worst predictions, cluster/evaluation/pictures.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from cluster.evaluation.metrics import markdown_table
from protos import Sample

if TYPE_CHECKING:
    from cluster.evaluation.loop import EvalRun, SampleResult

PAPER_REFERENCE = (
    ("COD10K-test", "S-measure", ".873"),
    ("RefCOCOg-test (zero-shot)", "cIoU", "71.4"),
    ("ReasonSeg-test (zero-shot)", "gIoU", "56.7"),
)


def markdown_report(summary: dict, title: str = "Seg-R1 evaluation") -> str:
    """The run as Markdown: the paper's foreground table, the cIoU / gIoU table, the overall figures."""
    sets = summary["datasets"]
    fg = [(name, m) for name, m in sets.items() if m["task"] == "foreground"]
    other = [(name, m) for name, m in sets.items() if m["task"] != "foreground"]
    parts = [f"# {title}\n"]
    if fg:
        parts += ["## Foreground segmentation (pysodmetrics, original resolution)\n", markdown_table(fg)]
    if other:
        parts += ["## Referring / reasoning segmentation\n", markdown_table(other, task="referring")]
    parts.append("## Overall\n")
    parts.append("| samples | parse rate | mean IoU | S-measure | box IoU | missing (empty mask) |")
    parts.append("|---:|---:|---:|---:|---:|---:|")
    parts.append(
        f"| {summary['n']} | {_fmt(summary['parse_rate'])} | {_fmt(summary['mean_iou'])} | "
        f"{_fmt(summary['s_measure'])} | {_fmt(summary['box_iou'])} | {summary['missing']} |\n"
    )
    if r := summary.get("refinement"):
        parts.append(
            f"Looking again (up to {r['turns']} turns): {r['turns_mean']:.2f} turns per sample, stop rate "
            f"{r['stop_rate']:.2f}, mean IoU at turn 1 {_fmt(r['turn1_mean_iou'])} -> last "
            f"{_fmt(summary['mean_iou'])}.\n"
        )
    if summary.get("constant_baseline"):
        parts.append("Constant answers through the same segmenter (mean IoU): " + ", ".join(
            f"{k.replace('_', ' ')} box {_fmt(v['mean_iou'])}" for k, v in summary["constant_baseline"].items()
        ) + ".\n")  # fmt: skip
    parts.append("Paper (Seg-R1-7B): " + "; ".join(f"{d} {m} {v}" for d, m, v in PAPER_REFERENCE) + ".\n")
    return "\n".join(parts)


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


EVAL_RESULTS_COLUMNS = (
    ("id", "string"),
    ("source", "string"),
    ("split", "string"),
    ("task", "string"),
    ("instruction", "string"),
    ("text", "string"),
    ("parse_ok", "bool_"),
    ("parse_failure", "string"),
    ("missing", "bool_"),
    ("iou", "float64"),
    ("s_measure", "float64"),
    ("box_iou", "float64"),
    ("num_tokens", "int32"),
    ("finish_reason", "string"),
    ("turns", "int32"),
    ("stop", "bool_"),
    ("iou_turn1", "float64"),
    ("mask_png", "binary"),
)


def results_table(results: Sequence[SampleResult]):
    """Per-sample results as a pyarrow Table (one row per sample, the run's order); boxes as list<list<double>>."""
    import pyarrow as pa

    fields = [pa.field(name, getattr(pa, kind)()) for name, kind in EVAL_RESULTS_COLUMNS]
    fields.insert(-1, pa.field("boxes", pa.list_(pa.list_(pa.float64()))))
    schema = pa.schema(fields)
    cols = {f.name: [getattr(r, f.name) for r in results] for f in schema}
    cols["boxes"] = [[list(b) for b in r.boxes] for r in results]
    return pa.Table.from_pydict(cols, schema=schema)


def write_outputs(
    run: EvalRun, samples: Sequence[Sample], out_dir, title: str = "Seg-R1 evaluation", extra=None
):
    """metrics.json, metrics.md, predictions.parquet and grid.png (best and worst predictions) in out_dir."""
    import json
    from pathlib import Path

    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body = {**run.summary, **(extra or {})}
    (out / "metrics.json").write_text(json.dumps(body, indent=2, default=_json_default) + "\n")
    (out / "metrics.md").write_text(markdown_report(run.summary, title))
    pq.write_table(results_table(run.results), out / "predictions.parquet", row_group_size=256)
    from cluster.evaluation.pictures import render_grid

    grid = render_grid(run.results, samples)
    if grid is not None:
        from runtime.images import encode_png

        (out / "grid.png").write_bytes(encode_png(grid))
    return out


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
