"""`segr1 score`: a clean answer, garbage (exit 0, scored 0), unreadable files (non-zero, a message)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cluster.cli import main
from protos import REWARD_TERMS
from protos.answer import format_answer
from runtime.images import decode_image, decode_mask, encode_png
from tests.support.paths import REPO


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("score")
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(100, 10, (120, 160, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:120, 0:160]
    gt = (yy - 60) ** 2 + (xx - 80) ** 2 < 30**2
    image[gt] = (220, 40, 40)
    (d / "img.png").write_bytes(encode_png(image))
    (d / "gt.png").write_bytes(encode_png(gt))
    (d / "small.png").write_bytes(encode_png(np.zeros((10, 10), bool)))
    (d / "junk.png").write_bytes(b"not an image at all")
    return d


def _score(files, text, *extra, capsys):
    code = main(
        [
            "score",
            "--image",
            str(files / "img.png"),
            "--gt",
            str(files / "gt.png"),
            "--completion",
            text,
            "--json",
            *extra,
        ]
    )
    captured = capsys.readouterr()
    return code, captured


def test_clean_answer(files, capsys, tmp_path):
    text = format_answer([[45, 25, 115, 95]], [[80, 60], [3, 3]], [1, 0], "a red disk")
    mask_out, overlay = tmp_path / "pred.png", tmp_path / "overlay.png"
    code, cap = _score(files, text, "--mask-out", str(mask_out), "--overlay", str(overlay), capsys=capsys)
    assert code == 0, cap.err
    out = json.loads(cap.out)
    assert out["parsed"]["ok"] and out["parsed"]["prompts"][0]["box"] == [45, 25, 115, 95]
    r = out["rewards"]
    assert set(r) == set(REWARD_TERMS)
    assert r["format"] == 1.0 and r["iou"] > 0.9 and r["total"] > 1.8
    pred = decode_mask(mask_out.read_bytes())
    assert pred.shape == (120, 160) and pred.sum() == out["mask_pixels"] > 0
    assert decode_image(overlay.read_bytes()).shape == (120, 160, 3)


def test_resize_maps_policy_coordinates(files, capsys):
    text = format_answer([[36, 27, 92, 101]], [[64, 51]], [1], "x")  # the same box in a 128x128 view
    code, cap = _score(files, text, "--resize", "128", capsys=capsys)
    assert code == 0
    out = json.loads(cap.out)
    assert out["parsed"]["prompts"][0]["box"] == pytest.approx([45, 25.3125, 115, 94.6875])
    assert out["rewards"]["iou"] > 0.85


@pytest.mark.parametrize(
    "text", ["", "garbage <bbox>[1,2", "<think>x</think><bbox>[1,2,3,4]</bbox>" * 50, "\x00\uffff"]
)
def test_garbage_exits_zero_and_scores_zero(files, capsys, text):
    code, cap = _score(files, text, capsys=capsys)
    assert code == 0, cap.err
    out = json.loads(cap.out)
    assert not out["parsed"]["ok"] and out["parsed"]["failure"]
    assert out["rewards"]["total"] == 0.0


def test_human_output(files, capsys):
    code = main(
        ["score", "--image", str(files / "img.png"), "--gt", str(files / "gt.png"), "--completion", "nope"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "parse: failed: missing_bbox" in out and "total=0.0000" in out


@pytest.mark.parametrize(
    "image, gt, message",
    [
        ("missing.png", "gt.png", "does not exist"),
        ("junk.png", "gt.png", "not a decodable"),
        ("img.png", "junk.png", "not a decodable"),
        ("img.png", "small.png", "must have the image's size"),
    ],
)
def test_unreadable_files_exit_nonzero_with_a_message(files, capsys, image, gt, message):
    code = main(["score", "--image", str(files / image), "--gt", str(files / gt), "--completion", "x"])
    assert code != 0
    assert message in capsys.readouterr().err


def test_unavailable_segmenter_is_a_message(files, capsys):
    text = format_answer([[45, 25, 115, 95]], [[80, 60]], [1], "x")
    code = main(["score", "--image", str(files / "img.png"), "--gt", str(files / "gt.png"), "--completion", text,
                 "--segmenter", "hf-sam2", "--segmenter-path", str(files)])  # fmt: skip
    assert code == 2 and "no config.json" in capsys.readouterr().err


def test_entry_point_on_garbage(files):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "cluster.cli", "score", "--image", str(files / "img.png"), "--gt", str(files / "gt.png"),
           "--completion", "-", "--json"]  # fmt: skip
    proc = subprocess.run(
        cmd, input="<<<<bbox>>>>]]]", capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rewards"]["total"] == 0.0
