"""The next turn's prompt ids (runtime/turns.py) on the tiny policy's tokenizer and chat template."""

from __future__ import annotations

import pytest

from runtime.qwen_vl import load_processor
from runtime.turns import collapse_images, expand_images, next_turn_ids, turn_suffix


@pytest.fixture(scope="module")
def tokenizer(tiny_policy_dir):
    return load_processor(tiny_policy_dir).tokenizer


def _id(tokenizer, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


def test_collapse_keeps_one_placeholder_per_image_run():
    assert collapse_images([1, 9, 9, 9, 2, 5, 9, 9, 3, 9], image_pad=9) == [1, 9, 2, 5, 9, 3, 9]
    assert collapse_images([], image_pad=9) == []


def test_expand_gives_each_image_its_token_count_and_inverts_collapse():
    expanded = expand_images([1, 9, 2, 9, 3], image_pad=9, tokens_per_image=[3, 1])
    assert expanded == [1, 9, 9, 9, 2, 9, 3] and collapse_images(expanded, image_pad=9) == [1, 9, 2, 9, 3]
    with pytest.raises(ValueError, match="2 image placeholders for 1 images"):
        expand_images([9, 9], image_pad=9, tokens_per_image=[4])


def test_the_suffix_is_the_templates_user_turn_and_assistant_header(tokenizer):
    text = tokenizer.decode(turn_suffix(tokenizer, "Refine."))
    assert (
        text
        == "\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Refine.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(turn_suffix(tokenizer, "Go on.", with_image=False)).startswith(
        "\n<|im_start|>user\nGo on."
    )


def test_next_turn_keeps_the_answer_ids_and_ends_a_cut_answer(tokenizer):
    pad, end = _id(tokenizer, "<|image_pad|>"), _id(tokenizer, "<|im_end|>")
    start = _id(tokenizer, "<|vision_start|>")
    prompt = [5, start, pad, pad, pad, pad, _id(tokenizer, "<|vision_end|>"), 6]  # an expanded image
    answer = [40, 41, 42]  # cut by max_tokens: no turn end of its own
    suffix = turn_suffix(tokenizer, "Refine.")
    ids = next_turn_ids(tokenizer, prompt, answer, "Refine.")
    assert ids == [5, start, pad, prompt[-2], 6, 40, 41, 42, end, *suffix]
    assert next_turn_ids(tokenizer, prompt, [*answer, end], "Refine.") == ids  # its own turn end, not twice
