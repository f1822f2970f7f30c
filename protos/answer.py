"""The answer format, in one place: tags, the two formats, the prompts that ask for them, and `format_answer`.

The policy sees the image resized to NxN (aspect ratio not kept, as in the paper) and answers with absolute integer
pixel coordinates in that NxN image:

    <think> ... </think> <bbox>[x1,y1,x2,y2]</bbox>, <points>[[x,y],[x,y]]</points>, <labels>[1,0]</labels>

The pre-RL variant (answer_format="points") asks only for points and labels (no think, no box):

    <points>[[x,y],[x,y]]</points>, <labels>[1,0]</labels>

Rollout renders its prompts from here, the reward parser takes its tag names from here, and SFT targets, tests and
benchmarks write answers with `format_answer`. Pure Python: importing this module imports no third-party package.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

AnswerFormat = Literal["full", "points"]
ANSWER_FORMATS: tuple[str, ...] = ("full", "points")
TaskKind = Literal["foreground", "referring", "reasoning"]
TASK_KINDS: tuple[str, ...] = ("foreground", "referring", "reasoning")

THINK_TAG, BBOX_TAG, POINTS_TAG, LABELS_TAG = "think", "bbox", "points", "labels"

FOREGROUND_INSTRUCTION = "Identify and segment all the primary objects in the image."

# Kept short on purpose: the tiny CPU models use a byte-level tokenizer, so every character is a token.
SYSTEM_PROMPT_FULL = (
    "First think inside <think> </think>. Then give each object's bounding box in <bbox></bbox>, a moderate "
    "number of points in <points></points> and their labels in <labels></labels>: 1 marks a foreground "
    "point, 0 a background point."
)

SYSTEM_PROMPT_POINTS = (
    "Give a moderate number of points in <points></points> and their labels in <labels></labels>: "
    "1 marks a foreground point, 0 a background point."
)

_FORMAT_FULL = (
    "Output format: <think> ... </think> <bbox>[x1,y1,x2,y2]</bbox>, <points>[[x,y],[x,y],...]</points>, "
    "<labels>[1,0,...]</labels>. Coordinates are absolute integer pixels of the {n}x{n} image."
)
_FORMAT_POINTS = (
    "Output format: <points>[[x,y],[x,y],...]</points>, <labels>[1,0,...]</labels>. "
    "Coordinates are absolute integer pixels of the {n}x{n} image."
)


def check_answer_format(answer_format: str) -> None:
    """Raise a ValueError naming the accepted formats unless `answer_format` is one of them."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(
            f"answer_format={answer_format!r} is not one of {ANSWER_FORMATS}; use 'full' "
            "(think + bbox + points + labels) or 'points' (the pre-RL points-and-labels format)"
        )


def system_prompt(answer_format: AnswerFormat = "full") -> str:
    """The system prompt for `answer_format` ("full" or "points")."""
    check_answer_format(answer_format)
    return SYSTEM_PROMPT_FULL if answer_format == "full" else SYSTEM_PROMPT_POINTS


def format_sentence(answer_format: AnswerFormat = "full", image_size: int = 768) -> str:
    """The exact output-format sentence appended to the user turn (names the NxN image size)."""
    check_answer_format(answer_format)
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive int (the policy sees NxN images)")
    template = _FORMAT_FULL if answer_format == "full" else _FORMAT_POINTS
    return template.format(n=image_size)


def default_instruction(task: str, text: str = "") -> str:
    """The instruction of a sample: foreground (text ignored), referring ("Identify and segment <expression>"),
    reasoning ("<question> Identify and segment it.")."""
    text = (text or "").strip()
    if task == "foreground":
        return FOREGROUND_INSTRUCTION
    if task == "referring":
        if not text:
            raise ValueError("task='referring' needs the referring expression as text, got an empty string")
        expression = text.rstrip(".")
        return f"Identify and segment {expression}."
    if task == "reasoning":
        if not text:
            raise ValueError("task='reasoning' needs the question as text, got an empty string")
        return f"{text} Identify and segment it."
    raise ValueError(f"task={task!r} is not one of {TASK_KINDS}")


def user_text(instruction: str, answer_format: AnswerFormat = "full", image_size: int = 768) -> str:
    """The text of the user turn after the image: the instruction, then the exact output format."""
    instruction = instruction.strip()
    sentence = format_sentence(answer_format, image_size)
    return f"{instruction} {sentence}" if instruction else sentence


def build_messages(
    instruction: str, answer_format: AnswerFormat = "full", image_size: int = 768
) -> list[dict]:
    """Chat messages (system, user with ONE image placeholder then text) for the Qwen2.5-VL chat template.

    The image itself is passed separately to the processor (`runtime.qwen_vl.encode_prompts`)."""
    return [
        {"role": "system", "content": [{"type": "text", "text": system_prompt(answer_format)}]},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": user_text(instruction, answer_format, image_size)},
            ],
        },
    ]


def _ints(values: Sequence, what: str, width: int) -> list[int]:
    out = [int(round(float(v))) for v in values]
    if len(out) != width:
        raise ValueError(f"{what} needs {width} numbers, got {len(out)}: {list(values)!r}")
    return out


def _list(values: list[int]) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


def format_answer(
    boxes: Sequence[Sequence[float]],
    points: Sequence[Sequence[float]],
    labels: Sequence[int],
    think: str = "",
    answer_format: AnswerFormat = "full",
) -> str:
    """The canonical answer string (coordinates rounded to integer pixels), the inverse of the reward parser.

    format_answer([[1,2,30,40]], [[10,12]], [1], "a cat") ==
    "<think> a cat </think> <bbox>[1,2,30,40]</bbox>, <points>[[10,12]]</points>, <labels>[1]</labels>"
    format_answer([], [[10,12]], [1], answer_format="points") == "<points>[[10,12]]</points>, <labels>[1]</labels>"
    """
    check_answer_format(answer_format)
    if len(points) != len(labels):
        raise ValueError(f"{len(points)} points but {len(labels)} labels; give one label (1 or 0) per point")
    bad = [lab for lab in labels if int(lab) not in (0, 1)]
    if bad:
        raise ValueError(f"labels must be 1 (foreground) or 0 (background), got {bad!r}")
    pts = "[" + ",".join(_list(_ints(p, "a point", 2)) for p in points) + "]"
    tail = f"<{POINTS_TAG}>{pts}</{POINTS_TAG}>, <{LABELS_TAG}>{_list([int(lab) for lab in labels])}</{LABELS_TAG}>"
    if answer_format == "points":
        return tail
    parts = [f"<{BBOX_TAG}>{_list(_ints(b, 'a box', 4))}</{BBOX_TAG}>" for b in boxes]
    return f"<{THINK_TAG}> {think.strip()} </{THINK_TAG}> " + ", ".join([*parts, tail])
