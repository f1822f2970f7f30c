"""Evaluation of a policy: rollout + segmenter, no learner, every sample exactly once, in a fixed order.

The core is `evaluate_samples(rollout, scorer, samples, ...)`: `rollout` is anything with
`generate(requests, *samples) -> list[RolloutGroup]` (an in-process actors.worker.RolloutWorker, or
`PoolRollout` over the Ray rollout pool) and `scorer` anything with `predict(groups, *samples)` and
`baseline_masks(kind, *samples)` (an in-process `EvalScorer`, or `PoolScorer` over Ray actors). The training
driver calls `evaluate(...) -> dict` for its before / after figures; `segr1 eval` writes `write_outputs(...)`.

Per sample, the prediction is completion 0 of its group (greedy decoding by default, so the group's completions
are identical; RolloutRequest needs G >= 2). A completion that does not parse into prompts, or whose group failed,
is scored as an EMPTY mask and counted in `missing`: never replaced by another sample's prediction. Predicted
masks are at each image's original size (the parser maps the policy's coordinates back to the original pixels and
the segmenter runs on the original image).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from protos import MaskPrompt, RolloutGroup, RolloutRequest, Sample, SamplingConfig
from reward_service.rewards import box_iou, enclosing_box, mask_bbox

logger = logging.getLogger(__name__)

BASELINES = ("whole_image", "centre")


# ------------------------------------------------------------------------------------------------------------
# The scorer: parse + segment, returning masks (the reward worker returns only rewards)


@dataclass
class CompletionPrediction:
    """What the scorer made of one completion. `mask`: (H, W) bool at the original size, None when there is no
    usable prediction (parse failure without prompts, segmenter error, corrupt sample)."""

    parse_ok: bool
    failure: str | None
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # original pixels
    mask: np.ndarray | None = None
    points: list[tuple[float, float]] = field(default_factory=list)  # original pixels
    labels: list[int] = field(default_factory=list)  # 1 foreground, 0 background; one per point


class EvalScorer:
    """Parses completions (reward_service.parser) and runs the segmenter with one image encode per sample.

    A plain class: used in-process, or as Ray actors `eval-<i>` (cluster/topology.py) on the reward resources.
    `segmenter`: share an already loaded one (e.g. `RewardWorker.segmenter`); default: built from cfg.reward."""

    def __init__(self, cfg, name: str = "eval-0", segmenter=None):
        from reward_service.segmenters import build_segmenter_for

        self.cfg = cfg
        self.name = name
        self.segmenter = segmenter if segmenter is not None else build_segmenter_for(cfg.reward)

    def ping(self) -> str:
        return self.name

    def predict(self, groups: Sequence[RolloutGroup], *samples: Sample) -> list[list[CompletionPrediction]]:
        """Per group (sample i belongs to group i), one CompletionPrediction per completion.

        Bad completions, corrupt samples and segmenter errors give predictions without a mask, never an exception.
        One batched encode for the call's images, one batched decode for all prompts; identical completions of a
        group (greedy decoding) are parsed and segmented once."""
        from reward_service.parser import parse_answer_for

        if len(groups) != len(samples):
            raise ValueError(f"predict got {len(groups)} groups and {len(samples)} samples; pass one each")
        images = [_decode_image(s) for s in samples]  # (H, W, 3) uint8 or None
        size = self.cfg.data.image_size
        texts = [list(dict.fromkeys(c.text for c in g.completions)) for g in groups]  # unique, in order
        parsed = [
            [parse_answer_for(self.cfg.reward, t, img.shape[1], img.shape[0], size) for t in ts]
            if img is not None
            else []
            for ts, img in zip(texts, images, strict=True)
        ]
        prompts = [[p for a in answers for p in a.prompts] for answers in parsed]
        masks = self._segment_batch(images, prompts)  # per group: (P, H, W) bool, or None
        return [
            self._assemble(g, ts, answers, img, m)
            for g, ts, answers, img, m in zip(groups, texts, parsed, images, masks, strict=True)
        ]

    def _assemble(self, group, texts, answers, image, masks) -> list[CompletionPrediction]:
        from reward_service.segmenters import union_mask

        if image is None:
            return [CompletionPrediction(False, "corrupt_sample") for _ in group.completions]
        h, w = image.shape[:2]
        by_text, offset = {}, 0
        for text, a in zip(texts, answers, strict=True):
            n = len(a.prompts)
            boxes = [p.box for p in a.prompts if p.box is not None]
            points = [pt for p in a.prompts for pt in p.points]
            labels = [lab for p in a.prompts for lab in p.labels]
            if n and masks is None:
                by_text[text] = CompletionPrediction(
                    a.ok, a.failure or "segmenter_error", boxes, None, points, labels
                )
            else:
                mask = union_mask(masks[offset : offset + n], h, w) if n else None
                by_text[text] = CompletionPrediction(a.ok, a.failure, boxes, mask, points, labels)
            offset += n
        return [by_text[c.text] for c in group.completions]

    def _segment_batch(self, images: list, prompts: list[list[MaskPrompt]]) -> list[np.ndarray | None]:
        """(P_i, H_i, W_i) masks per item with prompts (one encode per image, one batched decode); None on error."""
        todo = [k for k, (img, ps) in enumerate(zip(images, prompts, strict=True)) if img is not None and ps]
        out: list[np.ndarray | None] = [None] * len(images)
        if not todo:
            return out
        try:
            handles = self.segmenter.encode_batch([images[k] for k in todo])
            results = self.segmenter.decode_batch(
                [(h, prompts[k]) for h, k in zip(handles, todo, strict=True)]
            )
            for k, masks in zip(todo, results, strict=True):
                out[k] = masks
        except Exception as err:  # retry one by one, so one bad image costs only its own prediction
            logger.warning("%s: batched segmentation failed (%s); retrying image by image", self.name, err)
            for k in todo:
                out[k] = self._segment(images[k], prompts[k])
        return out

    def _segment(self, image: np.ndarray, prompts: list[MaskPrompt]) -> np.ndarray | None:
        try:
            handle = self.segmenter.encode(image)
            return self.segmenter.decode(handle, prompts)  # (P, H, W) bool
        except Exception as err:  # a segmenter failure is a missing prediction, reported, never a crash
            logger.warning("%s: segmenter failed: %s", self.name, err)
            return None

    def baseline_masks(self, kind: str, *samples: Sample) -> list[np.ndarray | None]:
        """Masks of a constant answer: the whole-image box, or the centre box (middle half of each side)."""
        if kind not in BASELINES:
            raise ValueError(f"baseline {kind!r} is not one of {BASELINES}")
        out = []
        for sample in samples:
            image = _decode_image(sample)
            if image is None:
                out.append(None)
                continue
            h, w = image.shape[:2]
            box = (
                (0.0, 0.0, float(w), float(h))
                if kind == "whole_image"
                else (w / 4, h / 4, 3 * w / 4, 3 * h / 4)
            )
            masks = self._segment(image, [MaskPrompt(box=box)])
            out.append(None if masks is None else masks[0])
        return out


def _decode_image(sample: Sample) -> np.ndarray | None:
    from runtime.images import decode_image

    try:
        return decode_image(sample.image, f"sample {sample.id!r}")  # (H, W, 3) uint8 RGB
    except Exception as err:
        logger.warning("eval: %s", err)
        return None


# ------------------------------------------------------------------------------------------------------------
# Per-sample results


@dataclass
class SampleResult:
    id: str
    source: str
    split: str
    task: str
    instruction: str
    text: str
    parse_ok: bool
    parse_failure: str | None
    missing: bool  # no usable prediction: scored as an empty mask
    iou: float
    s_measure: float
    box_iou: float | None
    boxes: list[tuple[float, float, float, float]]  # predicted boxes, original pixels
    num_tokens: int
    finish_reason: str
    # the predicted 0/1 mask as PNG; None when missing
    mask_png: bytes | None = field(default=None, repr=False)


def score_sample(
    sample: Sample,
    group: RolloutGroup | None,
    pred: CompletionPrediction | None,
    answer_format: str,
    gt: np.ndarray,
) -> SampleResult:
    """One sample's result from completion 0 of its group (None: the group or its scoring failed)."""
    from cluster.evaluation import iou, s_measure
    from runtime.images import encode_png

    completion = group.completions[0] if group is not None else None
    mask = pred.mask if pred is not None else None
    true_box = mask_bbox(gt)
    b_iou = None
    if true_box is not None and answer_format == "full":
        pbox = enclosing_box(pred.boxes) if pred is not None else None
        b_iou = box_iou(pbox, true_box) if pbox is not None else 0.0
    return SampleResult(
        id=sample.id,
        source=sample.source,
        split=sample.split,
        task=sample.task,
        instruction=sample.instruction,
        text=completion.text if completion is not None else "",
        parse_ok=bool(pred is not None and pred.parse_ok),
        parse_failure=(pred.failure if pred is not None else "generation_failed"),
        missing=mask is None,
        iou=iou(mask, gt),
        s_measure=s_measure(mask, gt),
        box_iou=b_iou,
        boxes=list(pred.boxes) if pred is not None else [],
        num_tokens=len(completion.token_ids) if completion is not None else 0,
        finish_reason=completion.finish_reason if completion is not None else "abort",
        mask_png=None if mask is None else encode_png(mask),
    )


# ------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class EvalRun:
    summary: dict
    results: list[SampleResult]


def check_unique_ids(samples: Sequence[Sample]) -> None:
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise ValueError(
                f"sample id {s.id!r} appears twice; evaluation covers every sample once, so ids must be unique "
                "(re-import the data set, or evaluate its shards separately)"
            )
        seen.add(s.id)


def make_requests(chunk: Sequence[Sample], start: int, group_size: int, sampling: SamplingConfig, seed: int):
    """One request per sample; sample k of the run gets the sampling seed `seed + k` (reproducible sampling)."""
    return [
        RolloutRequest(
            request_id=f"eval-{start + k}",
            sample_id=s.id,
            instruction=s.instruction,
            group_size=group_size,
            sampling=sampling.model_copy(update={"seed": seed + start + k}),
        )
        for k, s in enumerate(chunk)
    ]


def _generate(rollout, requests, chunk) -> list[RolloutGroup | None]:
    """The chunk's groups, in order; a failed call or a group for the wrong sample becomes None (missing)."""
    try:
        groups = list(rollout.generate(requests, *chunk))
    except Exception as err:
        logger.warning("eval: generate failed for %d samples (%s); they count as missing", len(chunk), err)
        return [None] * len(chunk)
    if len(groups) != len(chunk):
        logger.warning(
            "eval: generate returned %d groups for %d samples; all count as missing", len(groups), len(chunk)
        )
        return [None] * len(chunk)
    return [g if g is not None and g.sample_id == s.id else None for g, s in zip(groups, chunk, strict=True)]


def _predict(scorer, groups, chunk) -> list[CompletionPrediction | None]:
    idx = [k for k, g in enumerate(groups) if g is not None]
    out: list[CompletionPrediction | None] = [None] * len(chunk)
    if not idx:
        return out
    try:
        preds = scorer.predict([groups[k] for k in idx], *[chunk[k] for k in idx])
    except Exception as err:
        logger.warning("eval: scoring failed for %d samples (%s); they count as missing", len(idx), err)
        return out
    for k, per_group in zip(idx, preds, strict=True):
        out[k] = per_group[0] if per_group else None
    return out


def _chunks(items: Sequence, size: int) -> Iterable[tuple[int, Sequence]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def evaluate_samples(
    rollout,
    scorer,
    samples: Sequence[Sample],
    *,
    sampling: SamplingConfig | None = None,
    group_size: int = 2,
    batch_size: int = 8,
    seed: int = 0,
    answer_format: str = "full",
    baselines: bool = True,
    progress: bool = False,
) -> EvalRun:
    """Every sample once, in the given order; see the module docstring."""
    from tqdm import tqdm

    from runtime.images import decode_mask

    check_unique_ids(samples)
    sampling = sampling or SamplingConfig(temperature=0.0, max_tokens=400)
    results: list[SampleResult] = []
    meters = DatasetMeters()
    bar = tqdm(total=len(samples), desc="eval", unit="sample", disable=not progress)
    for start, chunk in _chunks(samples, batch_size):
        groups = _generate(rollout, make_requests(chunk, start, group_size, sampling, seed), chunk)
        preds = _predict(scorer, groups, chunk)
        for sample, group, pred in zip(chunk, groups, preds, strict=True):
            gt = decode_mask(sample.mask, f"sample {sample.id!r}: mask")  # (H, W) bool
            results.append(score_sample(sample, group, pred, answer_format, gt))
            meters.add(results[-1], None if pred is None else pred.mask, gt)
        bar.update(len(chunk))
    bar.close()
    base = constant_baselines(scorer, samples, batch_size) if baselines else {}
    return EvalRun(summarize(results, base, meters), results)


def constant_baselines(scorer, samples: Sequence[Sample], batch_size: int = 8) -> dict:
    """{kind: {"mean_iou", "missing"}} of the whole-image and centre boxes given to the same segmenter."""
    from cluster.evaluation import IoUMeter
    from runtime.images import decode_mask

    out = {}
    for kind in BASELINES:
        meter = IoUMeter()
        for _, chunk in _chunks(samples, batch_size):
            try:
                masks = scorer.baseline_masks(kind, *chunk)
            except Exception as err:
                logger.warning("eval: baseline %s failed (%s)", kind, err)
                masks = [None] * len(chunk)
            for s, m in zip(chunk, masks, strict=True):
                meter.add(m, decode_mask(s.mask), key=s.id)
        res = meter.results()
        out[kind] = {"mean_iou": res["giou"], "missing": res["missing"]}
    return out


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


class DatasetMeters:
    """Per data set (`source/split`, split by task when a set mixes tasks, as the synthetic one does), streaming:
    cIoU / gIoU for every task, the pysodmetrics set for foreground (a large set is scored without keeping its
    masks)."""

    def __init__(self) -> None:
        self._sets: dict[tuple[str, str], tuple[object, object]] = {}

    def add(self, result: SampleResult, mask: np.ndarray | None, gt: np.ndarray) -> None:
        from cluster.evaluation import ForegroundMeter, IoUMeter

        key = (f"{result.source}/{result.split}", result.task)
        if key not in self._sets:
            self._sets[key] = (IoUMeter(), ForegroundMeter() if result.task == "foreground" else None)
        ious, fg = self._sets[key]
        ious.add(mask, gt, key=result.id)
        if fg is not None:
            fg.add(mask, gt, key=result.id)

    def results(self) -> dict[str, dict]:
        tasks: dict[str, int] = {}
        for name, _ in self._sets:
            tasks[name] = tasks.get(name, 0) + 1
        out = {}
        for (name, task), (ious, fg) in sorted(self._sets.items()):
            row = {"task": task, **ious.results()}
            if fg is not None:
                row.update({k: v for k, v in fg.results().items() if k not in ("n", "missing")})
            out[name if tasks[name] == 1 else f"{name}:{task}"] = row
        return out


def summarize(results: Sequence[SampleResult], baselines: dict, meters: DatasetMeters) -> dict:
    """The figures of a run: overall (mean_iou, s_measure, parse_rate, box_iou, ...) and per data set."""
    n = len(results)
    summary = {
        "n": n,
        "parse_rate": sum(r.parse_ok for r in results) / n if n else math.nan,
        "missing": sum(r.missing for r in results),
        "mean_iou": _mean(r.iou for r in results),
        "s_measure": _mean(r.s_measure for r in results),
        "box_iou": _mean(r.box_iou for r in results),
        "constant_baseline": baselines,
    }
    summary["datasets"] = meters.results()
    return summary


def evaluate(rollout, scorer, samples: Sequence[Sample], **kwargs) -> dict:
    """The figures of `evaluate_samples` (mean_iou, s_measure, parse_rate, box_iou, constant_baseline, missing,
    datasets); what the training driver logs before and after training."""
    return evaluate_samples(rollout, scorer, samples, **kwargs).summary


def settings_from_config(cfg, greedy: bool = True) -> dict:
    """evaluate_samples keyword arguments from a TrainConfig: greedy (or the configured sampling), G=2 (the
    smallest group a RolloutRequest allows), the rollout batch, the reward's answer format and the job seed."""
    sampling = cfg.rollout.sampling
    return {
        "sampling": SamplingConfig(
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            max_tokens=sampling.max_tokens,
        ),
        "group_size": 2 if greedy else cfg.grpo.group_size,
        "batch_size": cfg.rollout.max_batch_groups * cfg.rollout.num_workers,
        "seed": cfg.seed,
        "answer_format": cfg.reward.answer_format,
    }


# ------------------------------------------------------------------------------------------------------------
# Outputs: metrics.json, metrics.md, predictions.parquet, grid.png

PAPER_REFERENCE = (
    ("COD10K-test", "S-measure", ".873"),
    ("RefCOCOg-test (zero-shot)", "cIoU", "71.4"),
    ("ReasonSeg-test (zero-shot)", "gIoU", "56.7"),
)


def markdown_report(summary: dict, title: str = "Seg-R1 evaluation") -> str:
    """The run as Markdown: the paper's foreground table, the cIoU / gIoU table, the overall figures."""
    from cluster.evaluation import markdown_table

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
    grid = render_grid(run.results, samples)
    if grid is not None:
        from runtime.images import encode_png

        (out / "grid.png").write_bytes(encode_png(grid))
    return out


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ------------------------------------------------------------------------------------------------------------
# Pictures

PRED_RGB = (230, 40, 40)
GT_RGB = (40, 220, 60)
POINT_RGB = {1: (40, 220, 60), 0: (230, 40, 200)}
BOX_RGB = (255, 200, 0)


def overlay(
    image: np.ndarray,
    mask: np.ndarray | None,
    boxes: Sequence[Sequence[float]] = (),
    points: Sequence[Sequence[float]] = (),
    labels: Sequence[int] = (),
    gt: np.ndarray | None = None,
) -> np.ndarray:
    """(H, W, 3) uint8 RGB: the predicted mask tinted red, the GT outline green, boxes yellow, foreground points
    green and background points magenta (all in the image's own pixels)."""
    import cv2

    out = image.astype(np.float32).copy()  # (H, W, 3)
    if mask is not None:
        out[mask] = 0.5 * out[mask] + 0.5 * np.asarray(PRED_RGB, np.float32)
    out = np.clip(out, 0, 255).astype(np.uint8)
    thick = max(1, round(max(image.shape[:2]) / 300))
    if gt is not None:
        contours, _ = cv2.findContours(gt.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, GT_RGB, thick)
    for x1, y1, x2, y2 in boxes:
        cv2.rectangle(out, (int(x1), int(y1)), (int(x2) - 1, int(y2) - 1), BOX_RGB, thick)
    for (x, y), lab in zip(points, labels, strict=False):
        cv2.circle(out, (int(x), int(y)), 2 * thick + 1, POINT_RGB.get(int(lab), BOX_RGB), -1)
        cv2.circle(out, (int(x), int(y)), 2 * thick + 1, (0, 0, 0), 1)
    return out


def _tile(result: SampleResult, sample: Sample, size: int) -> np.ndarray:
    import cv2

    from runtime.images import decode_image, decode_mask

    image = decode_image(sample.image)
    gt = decode_mask(sample.mask)
    mask = decode_mask(result.mask_png) if result.mask_png is not None else None
    img = overlay(image, mask, result.boxes, gt=gt)
    h, w = img.shape[:2]
    scale = size / max(h, w)
    img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    tile = np.full((size + 18, size, 3), 255, np.uint8)
    tile[: img.shape[0], : img.shape[1]] = img
    caption = f"IoU {result.iou:.2f} {result.id.rsplit('/', 1)[-1][-16:]}"
    cv2.putText(tile, caption, (2, size + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return tile


def render_grid(
    results: Sequence[SampleResult], samples: Sequence[Sample], k: int = 6, size: int = 192
) -> np.ndarray | None:
    """Two rows: the k best and the k worst predictions by IoU (ties by id). None for an empty run."""
    if not results:
        return None
    by_id = {s.id: s for s in samples}
    ranked = sorted(results, key=lambda r: (-r.iou, r.id))
    k = min(k, len(ranked))
    rows = []
    for chosen in (ranked[:k], ranked[::-1][:k]):
        tiles = [_tile(r, by_id[r.id], size) for r in chosen]
        tiles += [np.full_like(tiles[0], 255)] * (k - len(tiles))
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


# ------------------------------------------------------------------------------------------------------------
# Data and checkpoints


def load_samples(
    path, limit: int | None = None, on_corrupt: str = "skip", reports: list | None = None
) -> list[Sample]:
    """Samples of a Parquet file or folder of shards (cluster.data.reader.iter_samples: shards sorted by name,
    rows in file order, each once). Corrupt rows are skipped and appended to `reports` (on_corrupt="skip") or
    raise (on_corrupt="raise"); a path that holds no data set raises cluster.data.reader.DatasetError."""
    from itertools import islice

    from cluster.data.reader import iter_samples

    return list(islice(iter_samples(path, on_corrupt=on_corrupt, reports=reports), limit))


def resolve_policy(checkpoint) -> str:
    """The policy folder of --checkpoint: a Hugging Face folder, a `step-*` checkpoint (its policy/), or a
    checkpoint root (its latest step's policy/)."""
    import re
    from pathlib import Path

    root = Path(checkpoint)
    if (root / "config.json").is_file():
        return str(root)
    if (root / "policy" / "config.json").is_file():
        return str(root / "policy")
    steps = sorted(
        (int(m.group(1)), p)
        for p in root.glob("step-*")
        if (m := re.fullmatch(r"step-(\d+)", p.name)) and p.is_dir()
    )
    if steps and (steps[-1][1] / "policy" / "config.json").is_file():
        return str(steps[-1][1] / "policy")
    raise FileNotFoundError(
        f"--checkpoint {root} is not a model folder (config.json), a checkpoint (policy/config.json) or a "
        "checkpoint root (step-*/policy/)"
    )


# ------------------------------------------------------------------------------------------------------------
# The Ray path: adapters over the rollout pool and a pool of EvalScorer actors (cluster/topology.py)


class SampleRefs:
    """Each sample goes into the object store once, shared by both pools."""

    def __init__(self) -> None:
        self._refs: dict[str, object] = {}

    def __call__(self, samples: Sequence[Sample]) -> list:
        import ray

        for s in samples:
            if s.id not in self._refs:
                self._refs[s.id] = ray.put(s)
        return [self._refs[s.id] for s in samples]


def _pool_call(
    pool,
    method: str,
    chunk: int,
    args_per_item: Sequence,
    samples: Sequence[Sample],
    refs: SampleRefs,
    lead=(),
):
    """Split items into chunks, run `handle.<method>.remote(*lead, items, *sample_refs)` on the pool, return the
    flattened results in order (None for each item of a failed chunk)."""
    from cluster.pool import WorkFailed

    sample_refs = refs(samples)
    calls = []
    for k, start in enumerate(range(0, len(samples), chunk)):
        items = list(args_per_item[start : start + chunk]) if args_per_item is not None else None
        srefs = sample_refs[start : start + chunk]
        head = (*lead, items) if items is not None else tuple(lead)

        def call(h, head=head, srefs=srefs):
            return getattr(h, method).remote(*head, *srefs)

        calls.append((k, call, len(srefs)))
    results = pool.map([(k, c) for k, c, _ in calls])
    out: list = []
    for k, _, n in calls:
        res = results[k]
        if isinstance(res, WorkFailed):
            logger.warning("eval: %s failed on %d samples: %s", method, n, res.error)
            out += [None] * n
        else:
            out += list(res)
    return out


class PoolRollout:
    """`generate(requests, *samples)` over the Ray rollout pool, max_batch_groups groups per actor call."""

    def __init__(self, pool, refs: SampleRefs, chunk: int):
        self.pool, self.refs, self.chunk = pool, refs, chunk

    def generate(self, requests, *samples):
        return _pool_call(self.pool, "generate", self.chunk, requests, samples, self.refs)


class PoolScorer:
    """`predict` / `baseline_masks` over a pool of EvalScorer actors."""

    def __init__(self, pool, refs: SampleRefs, chunk: int):
        self.pool, self.refs, self.chunk = pool, refs, chunk

    def predict(self, groups, *samples):
        out = _pool_call(self.pool, "predict", self.chunk, groups, samples, self.refs)
        return [p if p is not None else [] for p in out]

    def baseline_masks(self, kind: str, *samples):
        return _pool_call(self.pool, "baseline_masks", self.chunk, None, samples, self.refs, lead=(kind,))


def evaluate_on_ray(
    cfg, samples: Sequence[Sample], settings: dict, baselines: bool = True, progress: bool = True
):
    """evaluate_samples with the rollout pool and EvalScorer actors of cluster/topology.py (local Ray or
    RAY_ADDRESS)."""
    from actors.worker import RolloutWorker
    from cluster import topology

    topology.init_ray(cfg)
    rollout_pool = topology.make_rollout_pool(cfg, RolloutWorker)
    scorer_pool = topology.make_eval_scorer_pool(cfg, EvalScorer)
    refs = SampleRefs()
    try:
        rollout = PoolRollout(rollout_pool, refs, cfg.rollout.max_batch_groups)
        scorer = PoolScorer(scorer_pool, refs, cfg.rollout.max_batch_groups)
        return evaluate_samples(rollout, scorer, samples, **settings, baselines=baselines, progress=progress)
    finally:
        rollout_pool.shutdown()
        scorer_pool.shutdown()
