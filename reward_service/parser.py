"""Parse a policy completion (untrusted text) into segmenter prompts (the format and its tags: protos/answer.py).

Two answer formats (RewardConfig.answer_format):
- "full":   `<think> ... </think> <bbox>[x1,y1,x2,y2]</bbox>, <points>[[x,y],...]</points>, <labels>[1,0,...]</labels>`
            One or more `<bbox>` tags (several objects); exactly one `<points>` and one `<labels>`. Each box becomes
            one MaskPrompt with the points that lie inside it (bounds inclusive), as the reference does; points
            inside no box are not used.
- "points": the pre-RL format `<points>[[x,y],...]</points> <labels>[1,0,...]</labels>`: one MaskPrompt with
            every point, no box, no think.

A later turn of a refinement (`allow_stop`) may answer `<stop></stop>` instead (after `<think>...</think>` in the full
format): the mask shown is right; ParsedAnswer.stop, no prompts.

Hostile-input rules: the text is capped (max_completion_chars), tags are found with str.find (linear), the contents
are matched with anchored regexes without nested quantifiers, numbers are ASCII decimals of bounded length, the
number of boxes and points is capped, nothing is ever eval'ed, and `parse_answer` never raises.

Coordinates are absolute pixels of the image the policy saw: an NxN square when `policy_image_size=N`, else the
target image itself. Validity is checked there (a point must satisfy 0 <= x < N and 0 <= y < N; a box needs
x1 < x2, y1 < y2 and must overlap the image, and is then clamped to it), and the prompts are mapped linearly to the
target's W x H pixels (x * W / N, y * H / N), the resolution of the ground-truth mask and of the segmenter output.

Failure reasons (ParsedAnswer.failure) are listed in FAILURE_REASONS. `missing_think` and `empty_think` keep the
parsed prompts (ok=False, so the format reward is 0, but the masks can still be scored, as in the reference);
every other failure has no prompts.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from protos import MaskPrompt, ParsedAnswer
from protos.answer import BBOX_TAG, LABELS_TAG, POINTS_TAG, STOP_TAG, THINK_TAG

FAILURE_REASONS: dict[str, str] = {
    "not_text": "the completion is not a string",
    "too_long": "the completion is longer than reward.max_completion_chars",
    "missing_think": "no <think>...</think> (full format); prompts are kept",
    "empty_think": "<think></think> holds only whitespace (full format); prompts are kept",
    "missing_bbox": "no complete <bbox>...</bbox> (full format)",
    "missing_points": "no complete <points>...</points>",
    "missing_labels": "no complete <labels>...</labels>",
    "duplicate_tag": "more than one <think>, <points> or <labels>",
    "too_many_boxes": "more <bbox> tags than reward.max_boxes",
    "too_many_points": "more points than reward.max_points",
    "non_ascii_digit": "a bbox/points/labels tag holds a non-ASCII digit (e.g. '٣' or '３')",
    "malformed_bbox": "a <bbox> is not [x1,y1,x2,y2] with plain decimal numbers",
    "malformed_points": "<points> is not [[x,y],...] with plain decimal numbers",
    "malformed_labels": "<labels> is not [l,...] with plain decimal numbers",
    "bad_label": "a label is not 0 or 1",
    "empty_points": "<points> holds no point",
    "length_mismatch": "the number of labels differs from the number of points",
    "degenerate_box": "a box without x1 < x2 and y1 < y2",
    "box_outside_image": "a box that does not overlap the image",
    "point_outside_image": "a point outside the image (0 <= x < width, 0 <= y < height)",
    "bad_image_size": "the target image size is not positive (internal: a corrupt sample)",
    "stop_with_prompts": "a <stop></stop> beside <bbox>, <points> or <labels>: stop, or answer anew, not both",
    "parser_error": "an unexpected error inside the parser (a bug: reported, never raised)",
}

# A plain ASCII decimal: optional minus, up to 9 integer digits, optional fraction of up to 6 digits.
_NUM = r"-?[0-9]{1,9}(?:\.[0-9]{1,6})?"
_BBOX_RE = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")
_POINT_RE = re.compile(rf"\s*\[\s*({_NUM})\s*,\s*({_NUM})\s*\]\s*")
_ITEM_RE = re.compile(rf"\s*({_NUM})\s*")
_THINK_KEEP_CHARS = 4000  # ParsedAnswer.think keeps at most this much of the reasoning


class _Fail(Exception):
    """Internal: a parse failure with its machine-readable reason and a human-readable detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_answer(
    text: object,
    width: int,
    height: int,
    *,
    policy_image_size: int | None = None,
    answer_format: str = "full",
    max_boxes: int = 4,
    max_points: int = 32,
    max_completion_chars: int = 8192,
    allow_stop: bool = False,
) -> ParsedAnswer:
    """Parse one completion for a target image of `width` x `height` pixels. Never raises. `allow_stop`: a later
    turn of a refinement, where `<stop></stop>` (after the think, full format) says the mask shown is right;
    elsewhere a stop answer fails as an answer without prompts does."""
    try:
        if not isinstance(text, str):
            raise _Fail("not_text", f"completion is a {type(text).__name__}, not str")
        if len(text) > max_completion_chars:
            raise _Fail(
                "too_long", f"{len(text)} characters > reward.max_completion_chars={max_completion_chars}"
            )
        if width <= 0 or height <= 0:
            raise _Fail("bad_image_size", f"target image size {width}x{height}")
        view = (policy_image_size, policy_image_size) if policy_image_size else (width, height)
        if allow_stop and _tags(text, STOP_TAG, limit=1):
            return _parse_stop(text, answer_format)
        if answer_format == "points":
            return _parse_points_format(text, view, (width, height), max_points)
        return _parse_full_format(text, view, (width, height), max_boxes, max_points)
    except _Fail as fail:
        return ParsedAnswer(ok=False, failure=fail.reason, detail=fail.detail)
    except Exception as err:  # a bug here must not stop training: report it as a failed parse
        return ParsedAnswer(
            ok=False, failure="parser_error", detail=f"parser error {type(err).__name__}: {err}"
        )


def parse_answer_for(
    cfg, text: object, width: int, height: int, policy_image_size: int | None, allow_stop: bool = False
) -> ParsedAnswer:
    """parse_answer with the limits and format of a RewardConfig."""
    return parse_answer(
        text,
        width,
        height,
        policy_image_size=policy_image_size,
        answer_format=cfg.answer_format,
        max_boxes=cfg.max_boxes,
        max_points=cfg.max_points,
        max_completion_chars=cfg.max_completion_chars,
        allow_stop=allow_stop,
    )


# ------------------------------------------------------------------------------------------------------------------
# Formats


def _parse_full_format(
    text: str, view: tuple[int, int], target: tuple[int, int], max_boxes: int, max_points: int
) -> ParsedAnswer:
    think = _tags(text, THINK_TAG, limit=1)
    bbox_contents = _tags(text, BBOX_TAG, limit=max_boxes)
    if not bbox_contents:
        raise _Fail("missing_bbox", "no complete <bbox>[x1,y1,x2,y2]</bbox> found")
    points, labels = _points_and_labels(text, max_points)
    boxes = [_parse_box(c) for c in bbox_contents]
    _check_points(points, view)
    prompts = []
    for box in boxes:
        clamped = _check_box(box, view)
        inside = [
            i
            for i, (x, y) in enumerate(points)
            if clamped[0] <= x <= clamped[2] and clamped[1] <= y <= clamped[3]
        ]
        prompts.append(
            MaskPrompt(
                box=_map_box(clamped, view, target),
                points=[_map_point(points[i], view, target) for i in inside],
                labels=[labels[i] for i in inside],
            )
        )
    if not think:
        return ParsedAnswer(
            ok=False, prompts=prompts, failure="missing_think", detail="no <think>...</think> found"
        )
    if not think[0].strip():
        return ParsedAnswer(
            ok=False, prompts=prompts, failure="empty_think", detail="<think></think> is empty"
        )
    return ParsedAnswer(ok=True, prompts=prompts, think=think[0].strip()[:_THINK_KEEP_CHARS])


def _parse_stop(text: str, answer_format: str) -> ParsedAnswer:
    if any(f"<{tag}>" in text for tag in (BBOX_TAG, POINTS_TAG, LABELS_TAG)):
        raise _Fail("stop_with_prompts", "<stop></stop> beside segmenter prompts")
    if answer_format == "points":
        return ParsedAnswer(ok=True, stop=True)
    think = _tags(text, THINK_TAG, limit=1)
    if not think:
        return ParsedAnswer(
            ok=False, stop=True, failure="missing_think", detail="no <think>...</think> found"
        )
    if not think[0].strip():
        return ParsedAnswer(ok=False, stop=True, failure="empty_think", detail="<think></think> is empty")
    return ParsedAnswer(ok=True, stop=True, think=think[0].strip()[:_THINK_KEEP_CHARS])


def _parse_points_format(
    text: str, view: tuple[int, int], target: tuple[int, int], max_points: int
) -> ParsedAnswer:
    points, labels = _points_and_labels(text, max_points)
    _check_points(points, view)
    prompt = MaskPrompt(points=[_map_point(p, view, target) for p in points], labels=labels)
    return ParsedAnswer(ok=True, prompts=[prompt])


def _points_and_labels(text: str, max_points: int) -> tuple[list[tuple[float, float]], list[int]]:
    points_tags = _tags(text, POINTS_TAG, limit=1)
    if not points_tags:
        raise _Fail("missing_points", "no complete <points>[[x,y],...]</points> found")
    labels_tags = _tags(text, LABELS_TAG, limit=1)
    if not labels_tags:
        raise _Fail("missing_labels", "no complete <labels>[1,0,...]</labels> found")
    points = _parse_points(points_tags[0], max_points)
    labels = _parse_labels(labels_tags[0], max_points)
    if not points:
        raise _Fail("empty_points", "<points> holds no point")
    if len(points) != len(labels):
        raise _Fail("length_mismatch", f"{len(points)} points but {len(labels)} labels")
    return points, labels


# ------------------------------------------------------------------------------------------------------------------
# Tags and numbers


def _tags(text: str, name: str, limit: int) -> list[str]:
    """Contents of the complete `<name>...</name>` tags, in order (linear scan; an unclosed tag ends the scan).

    More than `limit` tags fails: too_many_boxes for bbox, duplicate_tag for the others.
    """
    open_tag, close_tag = f"<{name}>", f"</{name}>"
    out: list[str] = []
    pos = 0
    while True:
        start = text.find(open_tag, pos)
        if start < 0:
            return out
        end = text.find(close_tag, start + len(open_tag))
        if end < 0:
            return out
        out.append(text[start + len(open_tag) : end])
        if len(out) > limit:
            if name == BBOX_TAG:
                raise _Fail("too_many_boxes", f"more than reward.max_boxes={limit} <bbox> tags")
            raise _Fail("duplicate_tag", f"more than one <{name}> tag")
        pos = end + len(close_tag)


def _check_ascii_digits(content: str, tag: str) -> None:
    for ch in content:
        if not ch.isascii() and (ch.isdigit() or unicodedata.category(ch) == "Nd"):
            raise _Fail("non_ascii_digit", f"<{tag}> holds the non-ASCII digit {ch!r} (U+{ord(ch):04X})")


def _parse_box(content: str) -> tuple[float, float, float, float]:
    _check_ascii_digits(content, "bbox")
    m = _BBOX_RE.fullmatch(content.strip())
    if m is None:
        raise _Fail("malformed_bbox", f"<bbox>{_preview(content)}</bbox> is not [x1,y1,x2,y2]")
    x1, y1, x2, y2 = (float(g) for g in m.groups())
    return x1, y1, x2, y2


def _parse_points(content: str, max_points: int) -> list[tuple[float, float]]:
    """`[[x,y], [x,y], ...]` -> list of (x, y). Sequential anchored matches: linear in the content length."""
    _check_ascii_digits(content, "points")
    body = content.strip()
    if len(body) < 2 or body[0] != "[" or body[-1] != "]":
        raise _Fail("malformed_points", f"<points>{_preview(content)}</points> is not [[x,y],...]")
    inner = body[1:-1]
    if not inner.strip():
        return []
    points = []
    for groups in _list_items(inner, _POINT_RE, "points", max_points, "too_many_points"):
        points.append((float(groups[0]), float(groups[1])))
    return points


def _parse_labels(content: str, max_points: int) -> list[int]:
    _check_ascii_digits(content, "labels")
    body = content.strip()
    if len(body) < 2 or body[0] != "[" or body[-1] != "]":
        raise _Fail("malformed_labels", f"<labels>{_preview(content)}</labels> is not [l,...]")
    inner = body[1:-1]
    if not inner.strip():
        return []
    labels = []
    for (item,) in _list_items(inner, _ITEM_RE, "labels", max_points, "length_mismatch"):
        if item not in ("0", "1"):
            raise _Fail("bad_label", f"label {item!r} is not 0 or 1")
        labels.append(int(item))
    return labels


def _list_items(
    inner: str, item_re: re.Pattern, tag: str, cap: int, cap_reason: str
) -> list[tuple[str, ...]]:
    """Comma-separated `item_re` matches covering all of `inner`; more than `cap` items fails with cap_reason."""
    items: list[tuple[str, ...]] = []
    pos = 0
    while True:
        m = item_re.match(inner, pos)
        if m is None:
            raise _Fail(f"malformed_{tag}", f"<{tag}> item {len(items) + 1} near {_preview(inner[pos:])!r}")
        items.append(m.groups())
        if len(items) > cap:
            raise _Fail(cap_reason, f"<{tag}> holds more than reward.max_points={cap} items")
        pos = m.end()
        if pos == len(inner):
            return items
        if inner[pos] != ",":
            raise _Fail(f"malformed_{tag}", f"<{tag}> expected ',' near {_preview(inner[pos:])!r}")
        pos += 1


def _preview(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[:n] + "..."


# ------------------------------------------------------------------------------------------------------------------
# Geometry


def _check_points(points: Sequence[tuple[float, float]], view: tuple[int, int]) -> None:
    w, h = view
    for x, y in points:
        if not (0 <= x < w and 0 <= y < h):
            raise _Fail("point_outside_image", f"point [{x:g},{y:g}] is outside the {w}x{h} image")


def _check_box(
    box: tuple[float, float, float, float], view: tuple[int, int]
) -> tuple[float, float, float, float]:
    """Validate a box in the policy's pixel space and clamp it to the image."""
    x1, y1, x2, y2 = box
    w, h = view
    if not (x1 < x2 and y1 < y2):
        raise _Fail("degenerate_box", f"box [{x1:g},{y1:g},{x2:g},{y2:g}] needs x1 < x2 and y1 < y2")
    if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
        raise _Fail(
            "box_outside_image", f"box [{x1:g},{y1:g},{x2:g},{y2:g}] does not overlap the {w}x{h} image"
        )
    return max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))


def _map_point(p: tuple[float, float], view: tuple[int, int], target: tuple[int, int]) -> tuple[float, float]:
    if view == target:
        return float(p[0]), float(p[1])
    return p[0] * target[0] / view[0], p[1] * target[1] / view[1]


def _map_box(
    box: tuple[float, float, float, float], view: tuple[int, int], target: tuple[int, int]
) -> tuple[float, float, float, float]:
    if view == target:
        return box
    sx, sy = target[0] / view[0], target[1] / view[1]
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
