"""The prompt presets (the reference's texts verbatim, the compact ones), the canonical answer string and the
policy's image resize (pure, no torch)."""

from __future__ import annotations

import dataclasses
import io
import re

import numpy as np
import pytest
from PIL import Image

from protos import answer as P
from runtime import images as I

C = P.COMPACT
FG = P.FOREGROUND_INSTRUCTION

# The reference's texts, typed out here from geshang777/Seg-R1 (first commit of the fork chenqiu1024/Seg-R1) so a
# change to protos/answer.py's copies fails a test. RL: seg-r1/src/open_r1/grpo.py create_conversation().
REF_RL_SYSTEM = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process should enclosed within <think> </think> tags, and the bounding box, points and points labels should be "
    "enclosed within <bbox></bbox>, <points></points>, and <labels></labels>, respectively. i.e., "
    "<think> reasoning process here </think> <bbox>[x1,y1,x2,y2]</bbox>, <points>[[x1,y1],[x2,y2],...]</points>, "
    "<labels>[1,0,...]</labels>"
    "Where 1 indicates a foreground (object) point, and 0 indicates a background point. Only generate a moderate "
    "number of points, enough to clearly outline the object without overloading the system."
)
REF_RL_USER = (
    "\nIdentify and segment all the primary objects in the image.\n\nOutput the result using the exact format:\n"
    "<think> reasoning process here </think> <bbox>[x1,y1,x2,y2]</bbox>, <points>[[x3,y3],[x4,y4],...]</points>, "
    "<labels>[1,0,...]</labels>\n"
)
# Pre-RL: seg-r1/src/open_r1/grpo_prerl.py create_conversation(), no system message.
REF_PRERL_USER = (
    "\nYou are given an image. Your task is to generate a sparse set of point prompts to help segment the most "
    "salient object in the image.\n\nThe points should be informative: include both foreground points (on the "
    "object) and background points (off the object) to help define the object boundary.\n\nOnly generate a "
    "moderate number of points, enough to clearly outline the object without overloading the system.\n\n"
    "Output the result using the exact format:\n<points>[[x1,y1],[x2,y2],...]</points> <labels>[1,0,...]</labels>\n"
    "Where 1 indicates a foreground (object) point, and 0 indicates a background point.\n\n"
)
# Evaluation: eval/eval_foreground_segmentation.py (also the referring / reasoning scripts' system prompt).
REF_EVAL_SYSTEM = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process should enclosed within <think> </think> tags, and the bounding box, points and points labels should be "
    "enclosed within <bbox></bbox>, <points></points>, and <labels></labels>, respectively. i.e., "
    "<think> reasoning process here </think> <bbox>[x1,y1,x2,y2]</bbox>, <points>[[x3,y3],[x4,y4],...]</points>, "
    "<labels>[1,0,...]</labels>"
    "Where 1 indicates a foreground (object) point, and 0 indicates a background point."
)
REF_EVAL_USER = REF_RL_USER + "    "


def test_compact_full_prompt_names_every_tag_and_label_meaning():
    s = C.system_text("full")
    for tag in ("<think>", "</think>", "<bbox>", "<points>", "<labels>"):
        assert tag in s
    assert "1 marks a foreground point" in s and "0 a background point" in s
    user = C.user_text(FG, "foreground", "full", 768)
    assert "<think>" in user and "768x768" in user and "moderate number of points" in s


def test_compact_points_variant_asks_for_points_and_labels_only():
    s = C.system_text("points")
    assert "<points>" in s and "<labels>" in s
    assert "<think>" not in s and "<bbox>" not in s
    f = C.user_text("x", "foreground", "points", 112)
    assert "<bbox>" not in f and "<think>" not in f and "112x112" in f


def test_compact_texts_are_the_demo_ones():
    """compact renders exactly the texts the demo's tiny policy and tokenizer were built with."""
    assert C.user_text("Identify and segment the red circle.", "referring", "full", 56) == (
        "Identify and segment the red circle. Output format: <think> ... </think> <bbox>[x1,y1,x2,y2]</bbox>, "
        "<points>[[x,y],[x,y],...]</points>, <labels>[1,0,...]</labels>. Coordinates are absolute integer "
        "pixels of the 56x56 image."
    )
    assert P.preset_prompts("compact", "eval") == C


def test_seg_r1_training_texts_are_the_references_verbatim():
    train = P.preset_prompts("seg-r1", "train")
    assert train.system_text("full") == REF_RL_SYSTEM
    assert train.user_text(FG, "foreground", "full", 768) == REF_RL_USER
    assert train.system_text("points") == ""  # pre-RL: no system message
    assert train.user_text(FG, "foreground", "points", 768) == REF_PRERL_USER
    msgs = train.messages(FG, "foreground", "points", 768)
    assert [m["role"] for m in msgs] == ["user"]


def test_seg_r1_evaluation_texts_are_the_references_verbatim():
    ev = P.preset_prompts("seg-r1", "eval")
    assert ev.system_text("full") == REF_EVAL_SYSTEM
    assert ev.user_text(FG, "foreground", "full", 768) == REF_EVAL_USER
    # eval_referring_segmentation.py: "Identify and segment " + expression; reasoning: the question's own text.
    referring = P.default_instruction("referring", "the man on the left")
    assert ev.user_text(referring, "referring", "full", 1024) == "Identify and segment the man on the left"
    reasoning = P.default_instruction("reasoning", "What keeps the rain off?")
    assert (
        ev.user_text(reasoning, "reasoning", "full", 1024)
        == "What keeps the rain off? Identify and segment it."
    )


def test_unknown_answer_format_and_task_are_rejected_with_the_choices():
    with pytest.raises(ValueError, match="full"):
        C.system_text("boxes")
    with pytest.raises(ValueError, match="foreground"):
        C.user_text("x", "panoptic", "full", 64)
    with pytest.raises(ValueError, match="presets"):
        P.preset_prompts("lisa", "train")


def test_prompt_set_check_names_the_field():
    good = P.preset_prompts("seg-r1", "train")
    with pytest.raises(ValueError, match=r"prompt\.referring has no \{instruction\}"):
        dataclasses.replace(good, referring="Segment it.").check()
    with pytest.raises(ValueError, match=r"prompt\.foreground uses \{instructions\}"):
        dataclasses.replace(good, foreground="{instructions}").check()
    with pytest.raises(ValueError, match=r"prompt\.points is empty"):
        dataclasses.replace(good, points=" ").check()
    dataclasses.replace(
        good, system="", foreground="[{size}] {instruction} {x,y}"
    ).check()  # braces kept as written
    assert dataclasses.replace(good, foreground="[{size}] {instruction} {x,y}").user_text(
        "go", "foreground"
    ) == ("[768] go {x,y}")


@pytest.mark.parametrize(
    "task,text,expected",
    [
        ("foreground", "", "Identify and segment all the primary objects in the image."),
        ("foreground", "ignored", "Identify and segment all the primary objects in the image."),
        ("referring", "the man on the left", "Identify and segment the man on the left"),
        ("referring", " the red ball. ", "Identify and segment the red ball."),
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


def test_messages_have_system_then_user_with_one_image_then_text():
    msgs = C.messages("Identify and segment the cat.", "referring", "full", image_size=112)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"][0]["text"] == P.SYSTEM_PROMPT_FULL
    user = msgs[1]["content"]
    assert [c["type"] for c in user] == ["image", "text"]
    text = user[1]["text"]
    assert text.startswith("Identify and segment the cat. ")
    assert "absolute integer pixels of the 112x112 image" in text
    assert "<think> ... </think> <bbox>[x1,y1,x2,y2]</bbox>, <points>[[x,y],[x,y],...]</points>" in text
    plain = C.messages("x", "foreground", "full", 112, has_image=False)
    assert plain == [
        {"role": "system", "content": P.SYSTEM_PROMPT_FULL},
        {"role": "user", "content": C.user_text("x", "foreground", "full", 112)},
    ]


def test_prompt_config_overrides_the_preset_per_phase():
    from protos.config import PromptConfig

    cfg = PromptConfig(preset="seg-r1", system="S {size}", eval={"referring": "R: {instruction}"})
    train, ev = cfg.resolve("train"), cfg.resolve("eval")
    assert train.system_text("full", 64) == "S 64" and ev.system_text("full", 64) == "S 64"
    assert train.referring == "{instruction}" and ev.referring == "R: {instruction}"
    assert train.foreground == P.SEG_R1_USER and ev.foreground == P.SEG_R1_EVAL_USER
    with pytest.raises(ValueError, match=r"prompt\.reasoning has no \{instruction\}.*eval prompts"):
        PromptConfig(eval={"reasoning": "why?"})
    with pytest.raises(ValueError, match="preset"):
        PromptConfig(preset="lisa")


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
