"""Metrics: eval-masks equals pysodmetrics run directly; cIoU / gIoU against hand-computed values; a missing
prediction is an empty mask and is counted; a 0/1 ground truth is not re-binarised into nothing; DIS5K sets get
pysodmetrics' HCE. Decoding as the reference evaluated: new tokens per task, the model's generation_config.json only
when eval.generation_config asks for it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from py_sod_metrics import MAE, Emeasure, Fmeasure, Smeasure, WeightedFmeasure

from cluster.cli import main
from cluster.evaluation.metrics import ForegroundMeter, IoUMeter, iou, markdown_table, s_measure

KEYS = [
    "s_measure",
    "weighted_f",
    "mean_f",
    "max_f",
    "adaptive_f",
    "mean_e",
    "max_e",
    "adaptive_e",
    "mae",
    "n",
    "missing",
]


def direct(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """pysodmetrics on (pred uint8 0..255, gt uint8 0/255) pairs, as its README does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Fmeasure's "moving to FmeasureV2" notice
        fm = Fmeasure()
    sm, wfm, em, mae = Smeasure(), WeightedFmeasure(), Emeasure(), MAE()
    for pred, gt in pairs:
        for m in (sm, wfm, fm, em, mae):
            m.step(pred=pred, gt=gt)
    f, e = fm.get_results()["fm"], em.get_results()["em"]
    return {
        "s_measure": sm.get_results()["sm"],
        "weighted_f": wfm.get_results()["wfm"],
        "mean_f": f["curve"].mean(),
        "max_f": f["curve"].max(),
        "adaptive_f": f["adp"],
        "mean_e": e["curve"].mean(),
        "max_e": e["curve"].max(),
        "adaptive_e": e["adp"],
        "mae": mae.get_results()["mae"],
    }


def random_pair(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros((h, w), np.uint8)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    gt[y : y + h // 3, x : x + w // 3] = 255
    noise = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (7, 7), 0)
    pred = np.clip(0.6 * (gt / 255.0) + 0.8 * (noise - noise.mean()) + 0.2, 0, 1)
    return np.rint(pred * 255).astype(np.uint8), gt


def test_eval_masks_equals_pysodmetrics(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    pairs = [random_pair(rng, 40 + 3 * k, 56 - 2 * k) for k in range(5)]
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    for k, (pred, gt) in enumerate(pairs):
        cv2.imwrite(str(tmp_path / f"pred/img{k}.png"), pred)
        # the GT folder mixes 0/255 and 0/1 files: both mean the same mask
        cv2.imwrite(str(tmp_path / f"gt/img{k}.png"), gt if k % 2 else (gt > 0).astype(np.uint8))
    assert main(["eval-masks", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert list(got) == KEYS and got["n"] == 5 and got["missing"] == 0
    want = direct(pairs)
    for key, value in want.items():
        assert got[key] == pytest.approx(float(value), abs=1e-12), key


def test_missing_prediction_is_an_empty_mask_and_counted(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(1)
    pairs = [random_pair(rng, 32, 32) for _ in range(3)]
    for d in ("pred", "gt"):
        (tmp_path / d).mkdir()
    for k, (pred, gt) in enumerate(pairs):
        cv2.imwrite(str(tmp_path / f"gt/{k}.png"), gt)
        if k != 1:
            cv2.imwrite(str(tmp_path / f"pred/{k}.png"), pred)
    main(["eval-masks", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--json"])
    captured = capsys.readouterr()
    got = json.loads(captured.out)
    assert got["missing"] == 1 and got["n"] == 3 and "scored as empty: 1" in captured.err
    # the same as an explicit all-zero prediction for image 1, never image 0's prediction reused
    want = direct([pairs[0], (np.zeros_like(pairs[1][0]), pairs[1][1]), pairs[2]])
    assert got["s_measure"] == pytest.approx(float(want["s_measure"]), abs=1e-12)
    assert got["mae"] == pytest.approx(float(want["mae"]), abs=1e-12)
    reused = direct([pairs[0], (pairs[0][0], pairs[1][1]), pairs[2]])
    assert got["mae"] != pytest.approx(float(reused["mae"]))


def test_prediction_resized_to_the_original_size() -> None:
    gt = np.zeros((60, 80), np.uint8)
    gt[10:40, 20:60] = 1  # a 0/1 ground truth
    small = cv2.resize(gt * 255, (40, 30), interpolation=cv2.INTER_NEAREST)  # prediction at half size
    meter = ForegroundMeter()
    meter.add(small, gt)
    res = meter.results()
    assert res["s_measure"] > 0.95 and res["mae"] < 0.02


def test_zero_one_ground_truth_is_not_rebinarised_to_nothing() -> None:
    gt = np.zeros((32, 32), np.uint8)
    gt[8:24, 8:24] = 1
    assert s_measure(gt.astype(bool), gt) == pytest.approx(1.0)
    assert (
        s_measure(np.zeros_like(gt), gt) < 0.5
    )  # predicting nothing is not rewarded (the reference's defect)


def test_ciou_giou_hand_computed() -> None:
    gt1 = np.zeros((4, 4), bool)
    gt1[:2, :2] = True  # 4 px
    pred1 = np.zeros((4, 4), bool)
    pred1[:2, :1] = True  # 2 px inside: I=2, U=4, IoU .5
    gt2 = np.zeros((4, 4), bool)
    gt2[:, :] = True  # 16 px
    pred2 = np.zeros((4, 4), bool)
    pred2[:1, :] = True  # I=4, U=16, IoU .25
    gt3 = np.zeros((4, 4), bool)
    gt3[3, 3] = True  # missing prediction: I=0, U=1, IoU 0
    meter = IoUMeter()
    assert meter.add(pred1, gt1) == pytest.approx(0.5)
    assert meter.add(pred2, gt2) == pytest.approx(0.25)
    assert meter.add(None, gt3, key="s3") == 0.0
    res = meter.results()
    assert res["ciou"] == pytest.approx((2 + 4 + 0) / (4 + 16 + 1))
    assert res["giou"] == pytest.approx((0.5 + 0.25 + 0.0) / 3)
    assert res["n"] == 3 and res["missing"] == 1 and meter.missing == ["s3"]
    assert iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0


def test_markdown_table_paper_layout() -> None:
    row = {"s_measure": 0.8731, "weighted_f": 0.8, "mean_f": 0.81, "max_f": 0.82, "adaptive_f": 0.79,
           "mean_e": 0.9, "max_e": 0.91, "adaptive_e": 0.92, "mae": 0.031, "n": 10, "missing": 1}  # fmt: skip
    table = markdown_table([("COD10K-test", row)])
    assert table.splitlines()[0].startswith("| Dataset | S_α | F^w_β |")
    assert "| COD10K-test | .873 | .800 |" in table and "| .031 | 10 | 1 |" in table
    ref = markdown_table(
        [("RefCOCOg-test", {"ciou": 0.714, "giou": 0.7, "n": 2, "missing": 0})], task="referring"
    )
    assert "| RefCOCOg-test | 71.4 | 70.0 | 2 | 0 |" in ref


# ------------------------------------------------------------------------------------------------------------
# DIS5K: HCE (pysodmetrics' HumanCorrectionEffortMeasure), as DIS5K is reported


def test_hce_equals_pysodmetrics_and_only_dis_sets_get_it(tmp_path: Path, capsys) -> None:
    from py_sod_metrics import HumanCorrectionEffortMeasure

    from cluster.evaluation.metrics import DatasetMeters, is_dis

    pairs = []
    for k in range(3):  # a shifted box plus a stray blob: both need corrections
        gt = np.zeros((160, 160), np.uint8)
        gt[40:110, 30:120] = 255
        pred = np.zeros_like(gt)
        pred[45 + 5 * k : 115 + 5 * k, 40:130] = 255
        pred[5:15, 5 + 20 * k : 15 + 20 * k] = 255
        pairs.append((pred, gt))
    hce = HumanCorrectionEffortMeasure()
    for pred, gt in pairs:
        hce.step(pred=pred, gt=gt)
    want = float(hce.get_results()["hce"])
    assert want > 0  # the comparisons below could fail
    meters = DatasetMeters()
    for k, (pred, gt) in enumerate(pairs):
        meters.add("dis5k/te1", "foreground", f"d{k}", pred, gt)
        meters.add("cod10k/test", "foreground", f"c{k}", pred, gt)
    res = meters.results()
    assert res["dis5k/te1"]["hce"] == pytest.approx(want, abs=1e-9) and "hce" not in res["cod10k/test"]
    assert is_dis("dis5k/test") and is_dis("DIS-TE1/x") and not is_dis("duts/test")
    table = markdown_table(sorted(res.items()))
    assert "| HCE_γ |" in table.splitlines()[0] and f"| {want:.0f} |" in table
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    for k, (pred, gt) in enumerate(pairs):
        cv2.imwrite(str(tmp_path / f"p/{k}.png"), pred)
        cv2.imwrite(str(tmp_path / f"g/{k}.png"), gt)
    assert (
        main(["eval-masks", "--pred", str(tmp_path / "p"), "--gt", str(tmp_path / "g"), "--hce", "--json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["hce"] == pytest.approx(want, abs=1e-9)


# ------------------------------------------------------------------------------------------------------------
# Decoding as the reference evaluated: new tokens per task, the model's generation_config.json on request


def _sample(task: str, i: int):
    from protos import Sample

    png = b"\x89PNG\r\n\x1a\n"
    return Sample(id=f"s{i}", source="t", split="test", task=task, instruction="Identify and segment it.",
                  image=png, mask=png, width=8, height=8)  # fmt: skip


def test_each_task_gets_its_own_token_limit_and_prompt_task() -> None:
    from cluster.config import load_config
    from cluster.evaluation.loop import make_requests, settings_from_config

    cfg = load_config(None, ["eval.max_tokens.referring=300"])
    s = settings_from_config(cfg)
    assert s["max_tokens"] == {
        "foreground": 1024,
        "referring": 300,
        "reasoning": 512,
    }  # the reference's, one changed
    assert s["sampling"].temperature == 0.0 and s["group_size"] == 2
    samples = [_sample(t, i) for i, t in enumerate(("foreground", "referring", "reasoning"))]
    reqs = make_requests(samples, 10, 2, s["sampling"], seed=5, max_tokens=s["max_tokens"])
    assert [r.sampling.max_tokens for r in reqs] == [1024, 300, 512]
    assert [r.task for r in reqs] == ["foreground", "referring", "reasoning"]
    assert [r.sampling.seed for r in reqs] == [15, 16, 17] and reqs[0].request_id == "eval-10"


@pytest.mark.parametrize(
    ("file", "expected"),
    [
        # Qwen2.5-VL-7B-Instruct's generation_config.json: top_k 1, i.e. greedy, with the repetition penalty
        (
            {"do_sample": True, "temperature": 0.1, "top_p": 0.001, "top_k": 1, "repetition_penalty": 1.05},
            {"temperature": 0.1, "top_p": 0.001, "top_k": 1, "repetition_penalty": 1.05},
        ),
        (
            {"repetition_penalty": 1.2},
            {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.2},
        ),
        ({"do_sample": True}, {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}),
        (None, {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}),  # no file: greedy
    ],
)
def test_generation_config_is_honoured_only_when_asked(tmp_path: Path, file, expected) -> None:
    from cluster.config import load_config
    from cluster.evaluation.loop import settings_from_config

    if file is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, **file}))
    on = load_config(None, [f"model.policy={tmp_path}", "eval.generation_config=true"])
    got = settings_from_config(on)["sampling"]
    assert {k: getattr(got, k) for k in expected} == pytest.approx(expected)
    off = settings_from_config(load_config(None, [f"model.policy={tmp_path}"]))["sampling"]
    assert (off.temperature, off.top_k, off.repetition_penalty) == (0.0, 0, 1.0)  # default: greedy, plain
    with pytest.raises(ValueError, match="drop --sample"):
        settings_from_config(on, greedy=False)
