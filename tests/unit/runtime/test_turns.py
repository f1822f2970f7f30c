"""The next turn's prompt ids (runtime/turns.py) on the tiny policy's tokenizer and chat template."""

from __future__ import annotations

import pytest

from runtime.qwen_vl import load_processor
from runtime.turns import collapse_images, expand_images, join_turns, next_turn_ids, turn_suffix


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


def _answer(ids, lp=-0.5, text="a"):
    from protos import Completion

    return Completion(text=text, token_ids=list(ids), logprobs=[lp] * len(ids))


def test_join_turns_keeps_the_engine_sequence_and_masks_what_the_policy_was_shown():
    prompt1, answer1 = [1, 9, 9, 2], _answer([5, 6, 7], -0.25)
    prompt2 = [*prompt1, 5, 6, 7, 8, 9, 9, 9, 3]  # + answer 1, the user turn with the picture's image tokens
    answer2 = _answer([4, 7], -1.0, text="last")
    episode = join_turns([(prompt1, answer1), (prompt2, answer2)], [b"png"])
    assert prompt1 + episode.token_ids == prompt2 + [4, 7]
    assert episode.policy_mask == [1, 1, 1, 0, 0, 0, 0, 0, 1, 1] and episode.policy_tokens == 5
    assert episode.logprobs == [-0.25] * 3 + [0.0] * 5 + [-1.0] * 2
    assert episode.text == "last" and episode.pictures == [b"png"]


def test_join_turns_refuses_a_prompt_that_is_not_built_on_the_turns_before_it():
    prompt1, answer1 = [1, 9, 2], _answer([5, 6])
    retokenized = [1, 9, 2, 5, 66, 8, 9, 3]  # the answer's text tokenized again: not the ids generated
    with pytest.raises(ValueError, match="turn 2's prompt differs from the turns before it at token 4"):
        join_turns([(prompt1, answer1), (retokenized, _answer([4]))])


def test_an_episode_completion_needs_one_mask_entry_per_token():
    from protos import Completion

    with pytest.raises(ValueError, match="policy_mask has 2 entries for 3 token_ids"):
        Completion(text="", token_ids=[1, 2, 3], logprobs=[0.0] * 3, policy_mask=[1, 0])
    with pytest.raises(ValueError, match="give its policy_mask"):
        Completion(text="", token_ids=[1], logprobs=[0.0], pictures=[b"x"])
    assert _answer([1, 2]).loss_mask == [1, 1] and _answer([1, 2]).policy_tokens == 2
