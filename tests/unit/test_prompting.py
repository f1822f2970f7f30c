"""The Seg-R1 prompts, the canonical answer string and the policy's image resize (pure, no torch)."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from protos import answer as P
from runtime import images as I


def test_full_system_prompt_names_every_tag_and_label_meaning():
    s = P.system_prompt("full")
    for tag in ("<think>", "</think>", "<bbox>", "<points>", "<labels>"):
        assert tag in s
    assert "1 marks a foreground point" in s and "0 a background point" in s
    assert "<think>" in P.format_sentence("full", 768) and "768x768" in P.format_sentence("full", 768)
    assert "moderate number of points" in s


def test_points_variant_asks_for_points_and_labels_only():
    s = P.system_prompt("points")
    assert "<points>" in s and "<labels>" in s
    assert "<think>" not in s and "<bbox>" not in s
    f = P.format_sentence("points", 112)
    assert "<bbox>" not in f and "<think>" not in f


def test_unknown_answer_format_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="full"):
        P.system_prompt("boxes")


@pytest.mark.parametrize(
    "task,text,expected",
    [
        ("foreground", "", "Identify and segment all the primary objects in the image."),
        ("foreground", "ignored", "Identify and segment all the primary objects in the image."),
        ("referring", "the man on the left", "Identify and segment the man on the left."),
        ("referring", "the red ball.", "Identify and segment the red ball."),
        (
            "reasoning",
            "What keeps the rain off the people?",
            "What keeps the rain off the people? Identify and segment it.",
        ),
    ],
)
def test_default_instruction(task, text, expected):
    assert P.default_instruction(task, text) == expected


def test_default_instruction_errors():
    with pytest.raises(ValueError, match="referring"):
        P.default_instruction("referring", "  ")
    with pytest.raises(ValueError, match="task="):
        P.default_instruction("panoptic", "x")


def test_build_messages_has_system_then_user_with_one_image_then_format():
    msgs = P.build_messages("Identify and segment the cat.", "full", image_size=112)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"][0]["text"] == P.SYSTEM_PROMPT_FULL
    user = msgs[1]["content"]
    assert [c["type"] for c in user] == ["image", "text"]
    text = user[1]["text"]
    assert text.startswith("Identify and segment the cat. ")
    assert "absolute integer pixels of the 112x112 image" in text
    assert "<think> ... </think> <bbox>[x1,y1,x2,y2]</bbox>, <points>[[x,y],[x,y],...]</points>" in text


def test_format_answer_full_and_points_only():
    full = P.format_answer([[1, 2, 30.4, 40]], [[10, 12], [3, 4]], [1, 0], " a cat ")
    assert full == (
        "<think> a cat </think> <bbox>[1,2,30,40]</bbox>, <points>[[10,12],[3,4]]</points>, <labels>[1,0]</labels>"
    )
    two = P.format_answer([[0, 0, 5, 5], [6, 6, 9, 9]], [[1, 1], [7, 7]], [1, 1], "two")
    assert two.count("<bbox>") == 2
    pts = P.format_answer([], [[5, 6]], [1], answer_format="points")
    assert pts == "<points>[[5,6]]</points>, <labels>[1]</labels>"


def test_format_answer_follows_the_format_sentence_pattern():
    ans = P.format_answer([[3, 4, 50, 60]], [[10, 20], [70, 80]], [1, 0], "look")
    pattern = (
        r"<think> .+ </think> (<bbox>\[\d+,\d+,\d+,\d+\]</bbox>, )+"
        r"<points>\[(\[\d+,\d+\],?)+\]</points>, <labels>\[([01],?)+\]</labels>"
    )
    assert re.fullmatch(pattern, ans)


def test_format_answer_rejects_bad_input():
    with pytest.raises(ValueError, match="labels"):
        P.format_answer([], [[1, 2]], [1, 0], "t")
    with pytest.raises(ValueError, match="1 \\(foreground\\) or 0"):
        P.format_answer([], [[1, 2]], [2], "t")
    with pytest.raises(ValueError, match="4 numbers"):
        P.format_answer([[1, 2, 3]], [], [], "t")


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "mode,fmt", [("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"), ("P", "PNG"), ("RGB", "JPEG"), ("L", "JPEG")]
)
def test_resize_for_policy_gives_square_rgb(mode, fmt):
    img = Image.new(mode, (80, 50))
    out = I.resize_for_policy(_encoded(img, fmt), 112)
    assert out.mode == "RGB" and out.size == (112, 112)


def test_resize_for_policy_does_not_keep_aspect_and_accepts_arrays():
    arr = np.zeros((20, 100, 3), dtype=np.uint8)
    arr[:, :50] = 255  # left half white
    out = I.resize_for_policy(arr, 64)
    a = np.asarray(out)
    assert a.shape == (64, 64, 3)
    assert a[:, :28].min() > 200 and a[:, 36:].max() < 50  # stretched, not padded or cropped
    pil = Image.fromarray(arr)
    assert I.resize_for_policy(pil, 64).size == (64, 64)


def test_resize_for_policy_errors_name_the_problem():
    with pytest.raises(ValueError, match="cannot decode image bytes"):
        I.resize_for_policy(b"not an image", 32)
    with pytest.raises(ValueError, match="size"):
        I.resize_for_policy(Image.new("RGB", (4, 4)), 0)
