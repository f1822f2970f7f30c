"""The Seg-R1 prompts: system prompt, user-turn instruction with the exact output format, image resizing, and the
canonical answer string (SFT targets and tests).

The policy sees the image resized to NxN (aspect ratio not kept, as in the paper) and answers with absolute integer
pixel coordinates in that NxN image:

    <think> ... </think> <bbox>[x1,y1,x2,y2]</bbox>, <points>[[x,y],[x,y]]</points>, <labels>[1,0]</labels>

The pre-RL variant (answer_format="points") asks only for points and labels (no think, no box).
Pure Python + Pillow: importing this module imports no torch or transformers.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Literal

from PIL import Image

AnswerFormat = Literal["full", "points"]
ANSWER_FORMATS: tuple[str, ...] = ("full", "points")
TASK_KINDS: tuple[str, ...] = ("foreground", "referring", "reasoning")

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


def _check_format(answer_format: str) -> None:
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(
            f"answer_format={answer_format!r} is not one of {ANSWER_FORMATS}; use 'full' "
            "(think + bbox + points + labels) or 'points' (the pre-RL points-and-labels format)"
        )


def system_prompt(answer_format: AnswerFormat = "full") -> str:
    """The system prompt for `answer_format` ("full" or "points")."""
    _check_format(answer_format)
    return SYSTEM_PROMPT_FULL if answer_format == "full" else SYSTEM_PROMPT_POINTS


def format_sentence(answer_format: AnswerFormat = "full", image_size: int = 768) -> str:
    """The exact output-format sentence appended to the user turn (names the NxN image size)."""
    _check_format(answer_format)
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

    The image itself is passed separately to the processor (`actors.processor.encode_prompts`)."""
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


ImageLike = bytes | bytearray | memoryview | Image.Image


def load_image(image: ImageLike) -> Image.Image:
    """Decode encoded bytes (PNG/JPEG/...) or take a PIL image; returns an RGB PIL image."""
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, bytes | bytearray | memoryview):
        try:
            img = Image.open(io.BytesIO(bytes(image)))
            img.load()
        except Exception as err:  # PIL raises several types for bad data
            raise ValueError(f"cannot decode image bytes ({len(image)} bytes): {err}") from err
    else:
        try:  # numpy arrays (H, W, 3) uint8 without importing numpy here
            img = Image.fromarray(image)
        except Exception as err:
            raise TypeError(
                f"expected encoded image bytes, a PIL image or an (H, W, 3) uint8 array, got {type(image).__name__}"
            ) from err
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_for_policy(image: ImageLike, size: int) -> Image.Image:
    """The image the policy sees: RGB, size x size, aspect ratio not kept (bicubic), as in the paper."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size={size!r} must be a positive int")
    img = load_image(image)
    if img.size == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.BICUBIC)


def _ints(values: Sequence, what: str, width: int | None) -> list[int]:
    out = [int(round(float(v))) for v in values]
    if width is not None and len(out) != width:
        raise ValueError(f"{what} needs {width} numbers, got {len(out)}: {list(values)!r}")
    return out


def _list(values: list[int]) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


def format_answer(
    think: str | None,
    boxes: Sequence[Sequence[float]],
    points: Sequence[Sequence[float]],
    labels: Sequence[int],
) -> str:
    """The canonical answer string. `think=None` and no boxes gives the pre-RL points-only format.

    format_answer("a cat", [[1,2,30,40]], [[10,12]], [1]) ==
    "<think> a cat </think> <bbox>[1,2,30,40]</bbox>, <points>[[10,12]]</points>, <labels>[1]</labels>"
    """
    if len(points) != len(labels):
        raise ValueError(f"{len(points)} points but {len(labels)} labels; give one label (1 or 0) per point")
    bad = [lab for lab in labels if int(lab) not in (0, 1)]
    if bad:
        raise ValueError(f"labels must be 1 (foreground) or 0 (background), got {bad!r}")
    parts = [f"<bbox>{_list(_ints(b, 'a box', 4))}</bbox>" for b in boxes]
    pts = "[" + ",".join(_list(_ints(p, "a point", 2)) for p in points) + "]"
    parts.append(f"<points>{pts}</points>")
    parts.append(f"<labels>{_list([int(lab) for lab in labels])}</labels>")
    body = ", ".join(parts)
    if think is None:
        return body
    return f"<think> {think.strip()} </think> {body}"
