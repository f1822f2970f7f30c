"""The answer parser: hostile text never raises, valid answers round-trip, each failure has its reason."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.parser_speed import MAX_CHARS, PATHOLOGICAL
from protos import MaskPrompt, ParsedAnswer
from protos.answer import format_answer, format_stop
from reward_service.parser import FAILURE_REASONS, parse_answer

W, H = 160, 120
GOOD = "<think> a red disk </think> <bbox>[10,20,100,110]</bbox>, <points>[[50,60],[5,5],[90,100]]</points>, <labels>[1,0,0]</labels>"


def test_clean_answer_parses_and_assigns_points_to_their_box():
    r = parse_answer(GOOD, W, H)
    assert r.ok and r.failure is None and r.think == "a red disk"
    assert r.prompts == [MaskPrompt(box=(10, 20, 100, 110), points=[(50, 60), (90, 100)], labels=[1, 0])]


def test_several_boxes_each_get_the_points_inside_them():
    text = format_answer(
        [[0, 0, 50, 50], [40, 40, 150, 110]], [[10, 10], [45, 45], [120, 100]], [1, 1, 0], "two"
    )
    r = parse_answer(text, W, H)
    assert r.ok
    assert [p.points for p in r.prompts] == [[(10, 10), (45, 45)], [(45, 45), (120, 100)]]
    assert [p.labels for p in r.prompts] == [[1, 1], [1, 0]]


def test_coordinates_are_mapped_from_the_policy_square_to_the_target():
    text = format_answer([[64, 32, 128, 96]], [[96, 64]], [1], "x")
    r = parse_answer(text, 320, 240, policy_image_size=256)
    assert r.ok
    assert r.prompts[0].box == (80.0, 30.0, 160.0, 90.0)
    assert r.prompts[0].points == [(120.0, 60.0)]
    # validity is checked in the policy's 256x256 space, not the 320x240 target
    assert parse_answer(
        format_answer([[0, 0, 10, 10]], [[250, 250]], [1], "x"), 320, 240, policy_image_size=256
    ).ok
    r = parse_answer(format_answer([[0, 0, 10, 10]], [[256, 5]], [1], "x"), 320, 240, policy_image_size=256)
    assert r.failure == "point_outside_image"


def test_box_partly_outside_is_clamped_and_decimals_accepted():
    r = parse_answer(
        "<think>t</think><bbox>[-20, 10.5, 500, 60]</bbox><points>[[1.25,11]]</points><labels>[1]</labels>",
        W,
        H,
    )
    assert r.ok and r.prompts[0].box == (0.0, 10.5, float(W), 60.0) and r.prompts[0].points == [(1.25, 11.0)]


def test_points_format():
    r = parse_answer(
        "<points>[[1,2], [150, 100]]</points> <labels>[1, 0]</labels>", W, H, answer_format="points"
    )
    assert r.ok and r.prompts == [MaskPrompt(points=[(1, 2), (150, 100)], labels=[1, 0])]
    assert (
        parse_answer("<points>[]</points><labels>[]</labels>", W, H, answer_format="points").failure
        == "empty_points"
    )


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "missing_bbox"),
        ("<think>x</think><points>[[1,2]]</points><labels>[1]</labels>", "missing_bbox"),
        ("<think>x</think><bbox>[1,2,30,40]</bbox><labels>[1]</labels>", "missing_points"),
        ("<think>x</think><bbox>[1,2,30,40]</bbox><points>[[3,4]]</points>", "missing_labels"),
        ("<think>x</think><bbox>[1,2,30,40]</bbox><points>[[3,4]]</points><labels>[1]", "missing_labels"),
        ("<think>x</think><think>y</think><bbox>[1,2,30,40]</bbox>", "duplicate_tag"),
        (
            "<think>x</think><bbox>[1,2,30,40]</bbox><points>[[3,4]]</points><points>[[3,4]]</points>",
            "duplicate_tag",
        ),
        ("<think>x</think>" + "<bbox>[1,2,30,40]</bbox>" * 5, "too_many_boxes"),
        (
            "<think>x</think><bbox>[1,2,3]</bbox><points>[[3,4]]</points><labels>[1]</labels>",
            "malformed_bbox",
        ),
        (
            "<think>x</think><bbox>[1,2,3,4e5]</bbox><points>[[3,4]]</points><labels>[1]</labels>",
            "malformed_bbox",
        ),
        (
            "<think>x</think><bbox>[1,2,3,NaN]</bbox><points>[[3,4]]</points><labels>[1]</labels>",
            "malformed_bbox",
        ),
        (
            "<think>x</think><bbox>[1,2,30,40]</bbox><points>[[3,4][5,6]]</points><labels>[1,1]</labels>",
            "malformed_points",
        ),
        (
            "<think>x</think><bbox>[1,2,30,40]</bbox><points>[[3,4,5]]</points><labels>[1]</labels>",
            "malformed_points",
        ),
        (
            "<think>x</think><bbox>[1,2,30,40]</bbox><points>[[3,4],]</points><labels>[1]</labels>",
            "malformed_points",
        ),
        (
            "<think>x</think><bbox>[1,2,30,40]</bbox><points>[[3,__import__('os')]]</points><labels>[1]</labels>",
            "malformed_points",
        ),
        (
            "<think>x</think><bbox>[1,2,30,40]</bbox><points>[[3,4]]</points><labels>[yes]</labels>",
            "malformed_labels",
        ),
        ("<think>x</think><bbox>[1,2,30,40]</bbox><points>[[3,4]]</points><labels>[2]</labels>", "bad_label"),
        (
            "<think>x</think><bbox>[1,2,30,40]</bbox><points>[[3,4]]</points><labels>[1.0]</labels>",
            "bad_label",
        ),
        ("<think>x</think><bbox>[1,2,30,40]</bbox><points>[]</points><labels>[]</labels>", "empty_points"),
        (
            "<think>x</think><bbox>[1,2,30,40]</bbox><points>[[3,4],[5,6]]</points><labels>[1]</labels>",
            "length_mismatch",
        ),
        (
            "<think>x</think><bbox>[30,2,1,40]</bbox><points>[[3,4]]</points><labels>[1]</labels>",
            "degenerate_box",
        ),
        (
            "<think>x</think><bbox>[1,2,1,40]</bbox><points>[[3,4]]</points><labels>[1]</labels>",
            "degenerate_box",
        ),
        (
            "<think>x</think><bbox>[200,2,300,40]</bbox><points>[[3,4]]</points><labels>[1]</labels>",
            "box_outside_image",
        ),
        (
            "<think>x</think><bbox>[-50,-50,0,0]</bbox><points>[[3,4]]</points><labels>[1]</labels>",
            "box_outside_image",
        ),
        (
            "<think>x</think><bbox>[1,2,30,40]</bbox><points>[[3,-1]]</points><labels>[1]</labels>",
            "point_outside_image",
        ),
        (
            "<think>x</think><bbox>[1,2,30,40]</bbox><points>[[160,4]]</points><labels>[1]</labels>",
            "point_outside_image",
        ),
        (
            "<think>x</think><bbox>[1,2,30,40]</bbox><points>[[٣,4]]</points><labels>[1]</labels>",
            "non_ascii_digit",
        ),
        (
            "<think>x</think><bbox>[1,2,３0,40]</bbox><points>[[3,4]]</points><labels>[1]</labels>",
            "non_ascii_digit",
        ),
        (
            "<think>x</think><bbox>[1,2,30,40]</bbox><points>[[3,4]]</points><labels>[१]</labels>",
            "non_ascii_digit",
        ),
        ("x" * 9000, "too_long"),
    ],
)
def test_each_failure_has_its_reason(text, reason):
    r = parse_answer(text, W, H)
    assert not r.ok and r.failure == reason, (r.failure, r.detail)
    assert r.failure in FAILURE_REASONS and r.detail
    assert r.prompts == []


def test_think_failures_keep_the_prompts():
    for text, reason in [
        (GOOD.replace("<think> a red disk </think>", ""), "missing_think"),
        (GOOD.replace(" a red disk ", "  \n "), "empty_think"),
    ]:
        r = parse_answer(text, W, H)
        assert (r.ok, r.failure) == (False, reason)
        assert len(r.prompts) == 1  # the masks are still scored; only the format reward is lost


def test_a_later_turn_may_stop_and_turn_one_may_not():
    """`<stop></stop>` ends a refinement (allow_stop: a later turn) with no prompts; in turn 1, and beside prompts,
    it is a failure with its reason. The think rules hold for a stop as for an answer."""
    stop = format_stop("the mask covers the disk")
    r = parse_answer(stop, W, H, allow_stop=True)
    assert (r.ok, r.stop, r.prompts, r.think) == (True, True, [], "the mask covers the disk")
    assert parse_answer(stop, W, H).failure == "missing_bbox"  # turn 1: answering is the only way
    assert parse_answer(
        format_stop(answer_format="points"), W, H, answer_format="points", allow_stop=True
    ).stop
    both = parse_answer(GOOD + " <stop></stop>", W, H, allow_stop=True)
    assert (both.ok, both.failure, both.prompts) == (False, "stop_with_prompts", [])
    assert parse_answer("<stop></stop>", W, H, allow_stop=True).failure == "missing_think"
    assert parse_answer(stop + "<stop></stop>", W, H, allow_stop=True).failure == "duplicate_tag"
    assert parse_answer(GOOD, W, H, allow_stop=True) == parse_answer(
        GOOD, W, H
    )  # an answer parses as in turn 1


def test_caps_are_configurable():
    many = format_answer([[0, 0, 150, 110]], [[i, i] for i in range(10)], [1] * 10, "x")
    assert parse_answer(many, W, H, max_points=10).ok
    assert parse_answer(many, W, H, max_points=9).failure == "too_many_points"
    boxes = format_answer([[0, 0, 10, 10]] * 3, [[1, 1]], [1], "x")
    assert parse_answer(boxes, W, H, max_boxes=3).ok
    assert parse_answer(boxes, W, H, max_boxes=2).failure == "too_many_boxes"
    assert parse_answer(GOOD, W, H, max_completion_chars=len(GOOD)).ok
    assert parse_answer(GOOD, W, H, max_completion_chars=len(GOOD) - 1).failure == "too_long"


def test_non_strings_and_bad_sizes_do_not_raise():
    assert parse_answer(None, W, H).failure == "not_text"
    assert parse_answer(b"<think>", W, H).failure == "not_text"
    assert parse_answer(GOOD, 0, H).failure == "bad_image_size"


# The hostile inputs bench/parser_speed.py times (its figure: well under 0.25 s a parse). Here, what does not depend
# on the machine: each is refused by a rule, the same way every time, in both formats, and the refusal stays small.
REFUSED_BY = {  # input -> (full format, points format)
    "nested_open_points": ("missing_bbox", "malformed_points"),
    "open_bbox_tags": ("missing_bbox", "missing_points"),
    "blank_bbox": ("missing_points", "missing_points"),
    "huge_number": ("missing_bbox", "malformed_points"),  # more than 9 digits is not a number
    "unbalanced_points": ("malformed_points", "malformed_points"),
    "open_labels": ("missing_bbox", "malformed_labels"),
}


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_pathological_inputs_are_refused_by_rule(name):
    assert set(REFUSED_BY) == set(PATHOLOGICAL)
    text = PATHOLOGICAL[name][:MAX_CHARS]
    for fmt, reason in zip(("full", "points"), REFUSED_BY[name], strict=True):
        r = parse_answer(text, W, H, answer_format=fmt, max_points=1024, max_completion_chars=MAX_CHARS)
        assert (r.ok, r.failure, r.prompts) == (False, reason, []), (fmt, r.failure, r.detail)
        assert len(r.detail) < 200  # the reason quotes a bounded preview, never the input
    past_the_cap = PATHOLOGICAL[name].ljust(MAX_CHARS + 1)  # refused before anything is parsed
    assert parse_answer(past_the_cap, W, H, max_completion_chars=MAX_CHARS).failure == "too_long"


def test_counts_are_capped_while_scanning():
    """More points or labels than max_points are refused by that cap (reward_service/parser.py stops its scan
    there), inside the length cap: a list's size is bounded by a rule, not by how long a parse may take."""
    many, cap = 600, 512
    points = "<points>[" + ",".join(["[1,1]"] * many) + "]</points>"
    labels = "<labels>[" + ",".join(["1"] * many) + "]</labels>"
    assert len(points + labels) <= MAX_CHARS
    r = parse_answer(points + "<labels>[1]</labels>", W, H, answer_format="points", max_points=cap)
    assert r.failure == "too_many_points" and f"max_points={cap}" in r.detail
    r = parse_answer("<points>[[1,1]]</points>" + labels, W, H, answer_format="points", max_points=cap)
    assert r.failure == "length_mismatch" and f"max_points={cap}" in r.detail
    assert parse_answer(points + labels, W, H, answer_format="points", max_points=many).ok


_FRAGMENTS = st.sampled_from(
    ["<think>", "</think>", "<bbox>", "</bbox>", "<points>", "</points>", "<labels>", "</labels>", "[", "]", ",",
     "[[", "]]", "-", ".", " ", "0", "1", "7", "99", "1e9", "٣", "\n", "nan", "<stop>", "</stop>"]
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(st.text(max_size=300), st.lists(_FRAGMENTS, max_size=60).map("".join)),
    st.sampled_from(["full", "points"]),
    st.booleans(),
)
def test_arbitrary_text_never_raises(text, fmt, allow_stop):
    r = parse_answer(text, W, H, answer_format=fmt, policy_image_size=64, allow_stop=allow_stop)
    assert isinstance(r, ParsedAnswer) and (allow_stop or not r.stop)
    assert r.ok == (r.failure is None)
    assert r.failure is None or r.failure in FAILURE_REASONS
    for p in r.prompts:  # anything that parsed is inside the target image
        assert all(0 <= x < W and 0 <= y < H for x, y in p.points)
        if p.box is not None:
            assert 0 <= p.box[0] < p.box[2] <= W and 0 <= p.box[1] < p.box[3] <= H


@st.composite
def _valid_answers(draw):
    side = draw(st.integers(16, 1024))
    n_boxes = draw(st.integers(1, 4))
    boxes = []
    for _ in range(n_boxes):
        x1, y1 = draw(st.integers(0, side - 2)), draw(st.integers(0, side - 2))
        boxes.append([x1, y1, draw(st.integers(x1 + 1, side)), draw(st.integers(y1 + 1, side))])
    n = draw(st.integers(1, 32))
    points = [[draw(st.integers(0, side - 1)), draw(st.integers(0, side - 1))] for _ in range(n)]
    labels = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    think = draw(
        st.text(alphabet=st.characters(blacklist_characters="<>"), min_size=1, max_size=40).filter(str.strip)
    )
    return side, boxes, points, labels, think


@settings(max_examples=150, deadline=None)
@given(_valid_answers(), st.integers(20, 2000), st.integers(20, 2000))
def test_valid_answers_round_trip(answer, width, height):
    side, boxes, points, labels, think = answer
    r = parse_answer(format_answer(boxes, points, labels, think), width, height, policy_image_size=side)
    assert r.ok, (r.failure, r.detail)
    assert r.think == think.strip()
    sx, sy = width / side, height / side
    assert len(r.prompts) == len(boxes)
    for box, prompt in zip(boxes, r.prompts, strict=True):
        inside = [i for i, (x, y) in enumerate(points) if box[0] <= x <= box[2] and box[1] <= y <= box[3]]
        assert prompt.box == pytest.approx((box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))
        assert [c for pt in prompt.points for c in pt] == pytest.approx(
            [c for i in inside for c in (points[i][0] * sx, points[i][1] * sy)]
        )
        assert prompt.labels == [labels[i] for i in inside]
    pts_only = parse_answer(
        format_answer([], points, labels, answer_format="points"), side, side, answer_format="points"
    )
    assert pts_only.ok and pts_only.prompts[0].points == [tuple(map(float, p)) for p in points]
