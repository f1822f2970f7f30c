"""The answer format, in one place: tags, the two formats, the prompts that ask for them, and `format_answer`.

The policy sees the image resized to NxN (aspect ratio not kept, as in the paper) and answers with absolute integer
pixel coordinates in that NxN image:

    <think> ... </think> <bbox>[x1,y1,x2,y2]</bbox>, <points>[[x,y],[x,y]]</points>, <labels>[1,0]</labels>

The pre-RL variant (answer_format="points") asks only for points and labels (no think, no box):

    <points>[[x,y],[x,y]]</points>, <labels>[1,0]</labels>

Prompts come in sets (`PromptSet`: system prompts and user-text templates per task and format) and presets:
`seg-r1`, the reference implementation's texts verbatim (training and evaluation differ, as there), and `compact`,
short texts for the tiny CPU models. The config's `prompt` section (protos/config.py `PromptConfig`) picks a preset
and overrides any text; the resolved set travels in `PolicySpec.prompt` to every worker that renders a prompt
(rollout engines, the learner and SFT, evaluation). The reward parser takes its tag names from here, and SFT
targets, tests and benchmarks write answers with `format_answer`. Pure Python: importing this module imports no
third-party package.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

AnswerFormat = Literal["full", "points"]
ANSWER_FORMATS: tuple[str, ...] = ("full", "points")
TaskKind = Literal["foreground", "referring", "reasoning"]
TASK_KINDS: tuple[str, ...] = ("foreground", "referring", "reasoning")

THINK_TAG, BBOX_TAG, POINTS_TAG, LABELS_TAG = "think", "bbox", "points", "labels"
STOP_TAG = "stop"  # a later turn's answer that the mask it was shown is right: `<stop></stop>`, no prompts

FOREGROUND_INSTRUCTION = "Identify and segment all the primary objects in the image."

# ----------------------------------------------------------------------------------------------------------------
# Prompt sets. A user turn is the image, then a template with two placeholders: {instruction} (the sample's
# instruction, Sample.instruction) and {size} (N of the NxN image the policy sees). Placeholders are replaced
# literally (no str.format), so any other brace in a template is kept as written.

PLACEHOLDERS: tuple[str, ...] = ("{instruction}", "{size}")
PromptPreset = Literal["seg-r1", "compact"]
PROMPT_PRESETS: tuple[str, ...] = ("seg-r1", "compact")
PromptPhase = Literal["train", "eval"]
DEFAULT_PRESET: PromptPreset = "seg-r1"

# `compact`: short texts written for the tiny CPU models (the demo, tests, benchmarks). Their byte-level
# tokenizer makes every character count, so these stay short on purpose.
SYSTEM_PROMPT_FULL = (
    "First think inside <think> </think>. Then give each object's bounding box in <bbox></bbox>, a moderate "
    "number of points in <points></points> and their labels in <labels></labels>: 1 marks a foreground "
    "point, 0 a background point."
)
SYSTEM_PROMPT_POINTS = (
    "Give a moderate number of points in <points></points> and their labels in <labels></labels>: "
    "1 marks a foreground point, 0 a background point."
)
_COMPACT_FULL = (
    "{instruction} Output format: <think> ... </think> <bbox>[x1,y1,x2,y2]</bbox>, "
    "<points>[[x,y],[x,y],...]</points>, <labels>[1,0,...]</labels>. Coordinates are absolute integer pixels "
    "of the {size}x{size} image."
)
_COMPACT_POINTS = (
    "{instruction} Output format: <points>[[x,y],[x,y],...]</points>, <labels>[1,0,...]</labels>. "
    "Coordinates are absolute integer pixels of the {size}x{size} image."
)

# `seg-r1`: the reference implementation's texts, verbatim (geshang777/Seg-R1, read at the first commit of its fork
# chenqiu1024/Seg-R1), typos and missing spaces included, because released checkpoints were trained and evaluated
# with exactly these strings.
# RL system prompt: seg-r1/src/open_r1/grpo.py, create_conversation().
SEG_R1_SYSTEM = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process should enclosed within <think> </think> tags, and the bounding box, points and points "
    "labels should be enclosed within <bbox></bbox>, <points></points>, and <labels></labels>, respectively. "
    "i.e., <think> reasoning process here </think> <bbox>[x1,y1,x2,y2]</bbox>, <points>[[x1,y1],[x2,y2],...]"
    "</points>, <labels>[1,0,...]</labels>Where 1 indicates a foreground (object) point, and 0 indicates a "
    "background point. Only generate a moderate number of points, enough to clearly outline the object without "
    "overloading the system."
)
_SEG_R1_FORMAT = (
    "<think> reasoning process here </think> <bbox>[x1,y1,x2,y2]</bbox>, <points>[[x3,y3],[x4,y4],...]</points>, "
    "<labels>[1,0,...]</labels>"
)
# RL user text: seg-r1/src/open_r1/grpo.py, create_conversation() (the instruction is the foreground one there).
SEG_R1_USER = "\n{instruction}\n\nOutput the result using the exact format:\n" + _SEG_R1_FORMAT + "\n"
# Pre-RL user text, no system message: seg-r1/src/open_r1/grpo_prerl.py, create_conversation(). It names no
# instruction (the salient object is implied). Without a system message Qwen2.5-VL's chat template inserts its
# default one, as it did for the reference.
SEG_R1_USER_POINTS = (
    "\nYou are given an image. Your task is to generate a sparse set of point prompts to help segment the most "
    "salient object in the image.\n\nThe points should be informative: include both foreground points (on the "
    "object) and background points (off the object) to help define the object boundary.\n\nOnly generate a "
    "moderate number of points, enough to clearly outline the object without overloading the system.\n\n"
    "Output the result using the exact format:\n<points>[[x1,y1],[x2,y2],...]</points> <labels>[1,0,...]</labels>"
    "\nWhere 1 indicates a foreground (object) point, and 0 indicates a background point.\n\n"
)
# Evaluation system prompt (the same in eval/eval_foreground_segmentation.py, eval_referring_segmentation.py and
# eval_reasoning_segmentation.py): the RL one without its last sentence, example points [[x3,y3],[x4,y4],...].
SEG_R1_EVAL_SYSTEM = (
    SEG_R1_SYSTEM[: SEG_R1_SYSTEM.index("<think> reasoning")]
    + _SEG_R1_FORMAT
    + ("Where 1 indicates a foreground (object) point, and 0 indicates a background point.")
)
# Foreground evaluation user text: eval/eval_foreground_segmentation.py (its indented literal ends in 4 spaces).
SEG_R1_EVAL_USER = SEG_R1_USER + "    "


# A later turn's user text, after the picture of the mask the policy's prompts made (runtime/overlay.py colours).
# The reference answers once and has none; both presets use this one.
REFINE_TEXT = (
    "This is the mask your answer made: tinted red, your box yellow, your points green (foreground) and magenta "
    "(background). Answer again in the same format to correct them, or answer <stop></stop> if the mask is right."
)


@dataclass(frozen=True)
class PromptSet:
    """The texts of one phase (training or evaluation), fully resolved: what the rollout engines, the learner,
    SFT and evaluation render. `system*`: the system prompt ('' sends no system message); the others: the user
    text after the image, per task for the full format and one for the points format. Placeholders: {instruction}
    and {size}."""

    system: str  # answer_format=full
    system_points: str  # answer_format=points
    foreground: str  # full format, task foreground
    referring: str  # full format, task referring
    reasoning: str  # full format, task reasoning
    points: str  # points format, every task
    refine: str = REFINE_TEXT  # a later turn, after the picture of the mask (multi-turn refinement)

    def check(self) -> None:
        """ValueError naming the field when a template is empty, uses an unknown placeholder, or (referring,
        reasoning) drops {instruction}, the only place the expression / question reaches the policy."""
        for name in ("system", "system_points", "foreground", "referring", "reasoning", "points", "refine"):
            text = getattr(self, name)
            unknown = sorted(set(re.findall(r"\{[A-Za-z_]*\}", text)) - set(PLACEHOLDERS))
            if unknown:
                raise ValueError(
                    f"prompt.{name} uses {', '.join(unknown)}; templates know only {' and '.join(PLACEHOLDERS)}"
                )
            if name not in ("system", "system_points") and not text.strip():
                raise ValueError(f"prompt.{name} is empty; the user turn needs text after the image")
        for name in ("referring", "reasoning"):
            if "{instruction}" not in getattr(self, name):
                raise ValueError(
                    f"prompt.{name} has no {{instruction}}: the expression / question would never reach the "
                    "policy; put {instruction} where the sample's instruction goes"
                )

    def system_text(self, answer_format: AnswerFormat = "full", image_size: int = 768) -> str:
        """The system prompt for `answer_format` ('' means: no system message)."""
        check_answer_format(answer_format)
        return _fill(self.system if answer_format == "full" else self.system_points, "", image_size)

    def user_text(
        self,
        instruction: str,
        task: str = "foreground",
        answer_format: AnswerFormat = "full",
        image_size: int = 768,
    ) -> str:
        """The text of the user turn after the image, for the sample's task and the answer format."""
        check_answer_format(answer_format)
        if task not in TASK_KINDS:
            raise ValueError(f"task={task!r} is not one of {TASK_KINDS}")
        template = self.points if answer_format == "points" else getattr(self, task)
        return _fill(template, instruction.strip(), image_size)

    def refine_text(self, image_size: int = 768) -> str:
        """The user text of a later turn, after the picture of the mask the previous answer made."""
        return _fill(self.refine, "", image_size)

    def messages(
        self,
        instruction: str,
        task: str = "foreground",
        answer_format: AnswerFormat = "full",
        image_size: int = 768,
        has_image: bool = True,
    ) -> list[dict]:
        """Chat messages for the Qwen2.5-VL chat template: [system,] user (ONE image placeholder, then the text).
        The image itself goes to the processor separately (`runtime.qwen_vl.encode_prompts`). has_image=False
        (text-only models): the same turns as plain strings, without the image placeholder."""
        system = self.system_text(answer_format, image_size)
        user = self.user_text(instruction, task, answer_format, image_size)
        if not has_image:
            head = [{"role": "system", "content": system}] if system else []
            return [*head, {"role": "user", "content": user}]
        head = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        return [*head, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]}]


def _fill(template: str, instruction: str, image_size: int) -> str:
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive int (the policy sees NxN images)")
    return template.replace("{instruction}", instruction).replace("{size}", str(image_size))


COMPACT = PromptSet(
    SYSTEM_PROMPT_FULL, SYSTEM_PROMPT_POINTS, _COMPACT_FULL, _COMPACT_FULL, _COMPACT_FULL, _COMPACT_POINTS
)
# The reference has referring / reasoning prompts only for evaluation (its RL data is foreground): "{instruction}"
# alone, no format sentence (eval_referring_segmentation.py: "Identify and segment " + expression; the reasoning
# question comes with its own "Identify and segment it.", eval/datasets/ReasonSeg_Dataset.py). Training on such
# data with this preset uses the same user text after the RL system prompt.
SEG_R1_TRAIN = PromptSet(SEG_R1_SYSTEM, "", SEG_R1_USER, "{instruction}", "{instruction}", SEG_R1_USER_POINTS)
# Evaluation of a points-format (pre-RL) policy: the reference has none; its pre-RL training texts are used.
SEG_R1_EVAL = PromptSet(
    SEG_R1_EVAL_SYSTEM, "", SEG_R1_EVAL_USER, "{instruction}", "{instruction}", SEG_R1_USER_POINTS
)
_PRESETS: dict[tuple[str, str], PromptSet] = {
    ("compact", "train"): COMPACT,
    ("compact", "eval"): COMPACT,
    ("seg-r1", "train"): SEG_R1_TRAIN,
    ("seg-r1", "eval"): SEG_R1_EVAL,
}


def preset_prompts(preset: str = DEFAULT_PRESET, phase: str = "train") -> PromptSet:
    """The texts of `preset` (seg-r1 | compact) for `phase` (train | eval)."""
    if (preset, phase) not in _PRESETS:
        raise ValueError(
            f"prompt preset {preset!r} / phase {phase!r} unknown; presets: {PROMPT_PRESETS}, phases: train, eval"
        )
    return _PRESETS[(preset, phase)]


def check_answer_format(answer_format: str) -> None:
    """Raise a ValueError naming the accepted formats unless `answer_format` is one of them."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(
            f"answer_format={answer_format!r} is not one of {ANSWER_FORMATS}; use 'full' "
            "(think + bbox + points + labels) or 'points' (the pre-RL points-and-labels format)"
        )


def default_instruction(task: str, text: str = "") -> str:
    """The instruction of a sample, the reference's wording: foreground "Identify and segment all the primary
    objects in the image." (grpo.py), referring "Identify and segment " + the expression as written
    (eval_referring_segmentation.py), reasoning "<question> Identify and segment it." (ReasonSeg_Dataset.py)."""
    text = (text or "").strip()
    if task == "foreground":
        return FOREGROUND_INSTRUCTION
    if task == "referring":
        if not text:
            raise ValueError("task='referring' needs the referring expression as text, got an empty string")
        return f"Identify and segment {text}"
    if task == "reasoning":
        if not text:
            raise ValueError("task='reasoning' needs the question as text, got an empty string")
        return f"{text} Identify and segment it."
    raise ValueError(f"task={task!r} is not one of {TASK_KINDS}")


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


def format_stop(think: str = "", answer_format: AnswerFormat = "full") -> str:
    """The answer that ends a refinement: the mask shown is right (`<stop></stop>`, after the think in the full
    format). format_stop("done") == "<think> done </think> <stop></stop>"."""
    check_answer_format(answer_format)
    stop = f"<{STOP_TAG}></{STOP_TAG}>"
    return stop if answer_format == "points" else f"<{THINK_TAG}> {think.strip()} </{THINK_TAG}> {stop}"
