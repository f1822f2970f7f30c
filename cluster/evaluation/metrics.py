"""Segmentation metrics of the evaluation protocol of the Seg-R1 paper (arXiv 2506.22624).

- Foreground sets (COD, SOD, DIS): S-measure, weighted F, mean / max / adaptive F, mean / max / adaptive E, MAE,
  computed by pysodmetrics (`py_sod_metrics`) on predictions at each image's ORIGINAL size; DIS5K sets add HCE
  (human correction effort, pysodmetrics' HumanCorrectionEffortMeasure). The reference's evaluator
  (eval/utils/evaluator.py + metrics.py) also reports mBA and max / mean boundary IoU, which pysodmetrics does not
  implement; they are not computed here.
- Referring / reasoning sets: cIoU = sum of intersections / sum of unions, gIoU = mean of per-sample IoU.

pysodmetrics is fed what it expects: the prediction as a uint8 map in 0..255 (grayscale allowed) and the ground
truth as uint8 0/255, so its own `gt > 128` keeps the object. A 0/1 mask must be scaled to 0/255 first, as here:
binarising a 0/1 mask with `> 128` empties it. That is the defect of the reference's TRAINING reward (its S-measure
term re-binarised the 0/1 ground truth with `> 128`); its evaluator reads 0/255 PNGs and is not affected.

A missing or unparseable prediction is an empty mask and is counted in `missing`; it is never replaced by
another image's prediction. `DatasetMeters` keeps one set of meters per data set of an evaluation run.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import cv2
import numpy as np

FOREGROUND_KEYS: tuple[str, ...] = (
    "s_measure",
    "weighted_f",
    "mean_f",
    "max_f",
    "adaptive_f",
    "mean_e",
    "max_e",
    "adaptive_e",
    "mae",
)
IOU_KEYS: tuple[str, ...] = ("ciou", "giou")
HCE_KEY = "hce"  # DIS5K sets only (`is_dis`)

# The paper's table columns (foreground): label and key.
PAPER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("S_α", "s_measure"),
    ("F^w_β", "weighted_f"),
    ("meanF", "mean_f"),
    ("maxF", "max_f"),
    ("adpF", "adaptive_f"),
    ("meanE", "mean_e"),
    ("maxE", "max_e"),
    ("adpE", "adaptive_e"),
    ("M", "mae"),
)
HCE_COLUMN = ("HCE_γ", HCE_KEY)


def is_dis(dataset: str) -> bool:
    """A DIS5K data set (`source/split` whose source starts with "dis", as the importer names it): scored with HCE
    too, as DIS5K is reported."""
    return dataset.split("/", 1)[0].lower().startswith("dis")


def binarize_gt(gt: np.ndarray) -> np.ndarray:
    """A ground-truth mask as bool (H, W): 0/1, bool and float [0, 1] masks use > 0.5; 0..255 masks use > 128,
    pysodmetrics' own rule, so a 0/255 file scores exactly as pysodmetrics scores it."""
    gt = np.asarray(gt)
    if gt.ndim == 3:
        gt = gt[..., 0]
    if gt.dtype == bool:
        return gt
    if gt.dtype.kind == "f" or gt.max(initial=0) <= 1:
        return gt > 0.5
    return gt > 128


def to_uint8_map(pred: np.ndarray) -> np.ndarray:
    """A prediction as a uint8 (H, W) map in 0..255: bool and 0/1 masks become 0/255, floats in [0,1] scale by 255,
    uint8 grayscale maps are kept."""
    pred = np.asarray(pred)
    if pred.ndim == 3:
        pred = pred[..., 0]
    if pred.dtype == bool:
        return pred.astype(np.uint8) * 255
    if pred.dtype.kind == "f":
        return np.clip(np.rint(np.nan_to_num(pred) * 255.0), 0, 255).astype(np.uint8)
    if pred.max(initial=0) <= 1:
        return (pred > 0).astype(np.uint8) * 255
    return np.clip(pred, 0, 255).astype(np.uint8)


def resize_to(pred: np.ndarray, height: int, width: int) -> np.ndarray:
    """A uint8 (h, w) map resized to (height, width), bilinear (as the reference resizes its masks back)."""
    if pred.shape == (height, width):
        return pred
    return cv2.resize(pred, (width, height), interpolation=cv2.INTER_LINEAR)


def prepare_pair(pred: np.ndarray | None, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """(pred uint8 0..255 at the GT's size, gt uint8 0/255, missing). A None prediction is an empty map."""
    gt_bool = binarize_gt(gt)  # (H, W)
    h, w = gt_bool.shape
    missing = pred is None
    pred_u8 = np.zeros((h, w), np.uint8) if pred is None else resize_to(to_uint8_map(pred), h, w)
    return pred_u8, gt_bool.astype(np.uint8) * 255, missing


def intersection_union(pred: np.ndarray | None, gt: np.ndarray) -> tuple[int, int]:
    """Pixels of intersection and union of a prediction (binarised at 128 after resizing) and the GT."""
    pred_u8, gt_u8, _ = prepare_pair(pred, gt)
    p, g = pred_u8 >= 128, gt_u8 > 128
    return int(np.count_nonzero(p & g)), int(np.count_nonzero(p | g))


def iou(pred: np.ndarray | None, gt: np.ndarray) -> float:
    """IoU of one prediction; two empty masks agree perfectly (1.0)."""
    inter, union = intersection_union(pred, gt)
    return 1.0 if union == 0 else inter / union


def s_measure(pred: np.ndarray | None, gt: np.ndarray) -> float:
    """S-measure (alpha 0.5) of one prediction, by pysodmetrics."""
    from py_sod_metrics import Smeasure

    pred_u8, gt_u8, _ = prepare_pair(pred, gt)
    m = Smeasure()
    m.step(pred=pred_u8, gt=gt_u8)
    return float(m.get_results()["sm"])


class ForegroundMeter:
    """Accumulates the pysodmetrics foreground metrics over a data set, one `add` per sample."""

    def __init__(self, hce: bool = False) -> None:
        from py_sod_metrics import MAE, Emeasure, HumanCorrectionEffortMeasure, Smeasure, WeightedFmeasure

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Fmeasure warns it will move to FmeasureV2; same numbers
            from py_sod_metrics import Fmeasure

            self._fm = Fmeasure()
        self._sm, self._wfm, self._em, self._mae = Smeasure(), WeightedFmeasure(), Emeasure(), MAE()
        self._hce = HumanCorrectionEffortMeasure() if hce else None
        self.n = 0
        self.missing: list[str] = []

    def add(self, pred: np.ndarray | None, gt: np.ndarray, key: str = "") -> None:
        """Score one prediction (None: missing, scored as an empty mask and listed under `missing`)."""
        pred_u8, gt_u8, missing = prepare_pair(pred, gt)
        for metric in (self._sm, self._wfm, self._fm, self._em, self._mae, self._hce):
            if metric is not None:
                metric.step(pred=pred_u8, gt=gt_u8)
        self.n += 1
        if missing:
            self.missing.append(key or str(self.n - 1))

    def results(self) -> dict:
        """{s_measure, weighted_f, mean_f, max_f, adaptive_f, mean_e, max_e, adaptive_e, mae, [hce,] n, missing}."""
        keys = FOREGROUND_KEYS + ((HCE_KEY,) if self._hce is not None else ())
        if self.n == 0:
            return {**{k: float("nan") for k in keys}, "n": 0, "missing": 0}
        fm = self._fm.get_results()["fm"]
        em = self._em.get_results()["em"]
        out = {
            "s_measure": float(self._sm.get_results()["sm"]),
            "weighted_f": float(self._wfm.get_results()["wfm"]),
            "mean_f": float(np.mean(fm["curve"])),
            "max_f": float(np.max(fm["curve"])),
            "adaptive_f": float(fm["adp"]),
            "mean_e": float(np.mean(em["curve"])),
            "max_e": float(np.max(em["curve"])),
            "adaptive_e": float(em["adp"]),
            "mae": float(self._mae.get_results()["mae"]),
        }
        if self._hce is not None:
            out[HCE_KEY] = float(self._hce.get_results()["hce"])
        return {**out, "n": self.n, "missing": len(self.missing)}


@dataclass
class IoUMeter:
    """cIoU (sum I / sum U) and gIoU (mean per-sample IoU) over a data set."""

    inter: int = 0
    union: int = 0
    iou_sum: float = 0.0
    n: int = 0
    missing: list[str] = field(default_factory=list)

    def add(self, pred: np.ndarray | None, gt: np.ndarray, key: str = "") -> float:
        """Score one prediction; returns its IoU (None: missing, an empty mask, listed under `missing`)."""
        i, u = intersection_union(pred, gt)
        value = 1.0 if u == 0 else i / u
        self.inter += i
        self.union += u
        self.iou_sum += value
        self.n += 1
        if pred is None:
            self.missing.append(key or str(self.n - 1))
        return value

    def results(self) -> dict:
        if self.n == 0:
            return {"ciou": float("nan"), "giou": float("nan"), "n": 0, "missing": 0}
        ciou = self.inter / self.union if self.union else 1.0
        return {"ciou": float(ciou), "giou": self.iou_sum / self.n, "n": self.n, "missing": len(self.missing)}


class DatasetMeters:
    """Per data set (`source/split`, split by task when a set mixes tasks, as the synthetic one does), streaming:
    cIoU / gIoU for every task, the pysodmetrics set for foreground (a large set is scored without keeping its
    masks)."""

    def __init__(self) -> None:
        self._sets: dict[tuple[str, str], tuple[IoUMeter, ForegroundMeter | None]] = {}

    def add(self, dataset: str, task: str, key: str, mask: np.ndarray | None, gt: np.ndarray) -> None:
        """Score one sample of `dataset` (`source/split`); `key`: its id, listed under `missing` for a None mask."""
        if (dataset, task) not in self._sets:
            fg = ForegroundMeter(hce=is_dis(dataset)) if task == "foreground" else None
            self._sets[(dataset, task)] = (IoUMeter(), fg)
        ious, fg = self._sets[(dataset, task)]
        ious.add(mask, gt, key=key)
        if fg is not None:
            fg.add(mask, gt, key=key)

    def results(self) -> dict[str, dict]:
        """{dataset (or dataset:task when the set mixes tasks): {task, ciou, giou, n, missing, foreground...}}."""
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


def format_value(key: str, value: float) -> str:
    """Paper style: three decimals without the leading zero for 0..1 scores (.873), cIoU/gIoU in percent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in IOU_KEYS:
        return f"{100.0 * value:.1f}"
    if key == HCE_KEY:  # a count of corrections, shown rounded as the reference does
        return f"{value:.0f}"
    if isinstance(value, int):
        return str(value)
    text = f"{value:.3f}"
    return text[1:] if text.startswith("0.") else text


def markdown_table(rows: list[tuple[str, dict]], task: str = "foreground") -> str:
    """A Markdown table in the paper's layout: one row per data set. `task`: foreground | referring | reasoning."""
    if task == "foreground":
        cols = list(PAPER_COLUMNS) + ([HCE_COLUMN] if any(HCE_KEY in m for _, m in rows) else [])
    else:
        cols = [("cIoU", "ciou"), ("gIoU", "giou")]
    head = "| Dataset | " + " | ".join(label for label, _ in cols) + " | n | missing |"
    sep = "|---|" + "---:|" * (len(cols) + 2)
    lines = [head, sep]
    for name, m in rows:
        vals = " | ".join(format_value(k, m.get(k, float("nan"))) for _, k in cols)
        lines.append(f"| {name} | {vals} | {m.get('n', 0)} | {m.get('missing', 0)} |")
    return "\n".join(lines) + "\n"


def text_table(metrics: dict) -> str:
    """A two-column plain-text table of one metrics dict (what eval-masks prints)."""
    width = max(len(k) for k in metrics)
    lines = []
    for k, v in metrics.items():
        shown = f"{v:.4f}" if isinstance(v, float) else str(v)
        lines.append(f"{k.ljust(width)}  {shown}")
    return "\n".join(lines) + "\n"
