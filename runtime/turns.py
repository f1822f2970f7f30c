"""The next turn of a conversation, in token ids: what a rollout engine feeds the policy when it shows it a new
picture after its answer (multi-turn mask refinement).

The next turn's prompt is built from the ids the engine saw and generated, never by rendering the conversation's
text again: detokenizing an answer and tokenizing it back need not give the same ids, and the learner scores ONE
sequence per episode (every turn's policy tokens after exactly the prefix the engine fed), so the earlier turns
must be a prefix of the next turn's prompt, token for token. Image placeholders go in collapsed (one
`<|image_pad|>` per image): the engine's multimodal processor expands every image of the prompt, the earlier
ones to exactly the runs they had, so the expanded prompt it reports starts with the earlier prompt + answer.

The text between the answer and the next generation (turn end, the user turn with its image, the assistant
header) is taken from the policy's own chat template, so another template's markup follows it.
"""

from __future__ import annotations

from collections.abc import Sequence

from protos import Completion

IMAGE_PAD = "<|image_pad|>"
TURN_END = "<|im_end|>"
_ANSWER = "\x00answer\x00"  # stands for the policy's answer while the template renders the turns after it


def collapse_images(ids: Sequence[int], image_pad: int) -> list[int]:
    """`ids` with every run of image placeholder tokens reduced to one (an engine's expanded prompt back to what
    its processor expands)."""
    out: list[int] = []
    for t in ids:
        if t == image_pad and out and out[-1] == image_pad:
            continue
        out.append(int(t))
    return out


def expand_images(ids: Sequence[int], image_pad: int, tokens_per_image: Sequence[int]) -> list[int]:
    """`ids` with image placeholders collapsed (one per image) expanded to each image's token count, in order:
    what an engine's multimodal processor does to a prompt of ids."""
    found = sum(1 for t in ids if t == image_pad)
    if found != len(tokens_per_image):
        raise ValueError(
            f"the prompt holds {found} image placeholders for {len(tokens_per_image)} images: give one collapsed "
            "placeholder per image (runtime.turns.next_turn_ids), and the images in the order they appear"
        )
    out: list[int] = []
    counts = iter(tokens_per_image)
    for t in ids:
        out += [int(t)] * next(counts) if t == image_pad else [int(t)]
    return out


def turn_suffix(tokenizer, user_text: str, with_image: bool = True) -> list[int]:
    """Token ids of what follows an answer's turn end in the chat template: the user turn (`user_text`, after one
    image placeholder when `with_image`) and the assistant header the next answer is generated after."""
    content = [{"type": "image"}] if with_image else []
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "x"}]},
        {"role": "assistant", "content": [{"type": "text", "text": _ANSWER}]},
        {"role": "user", "content": [*content, {"type": "text", "text": user_text}]},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    _, sep, tail = text.partition(_ANSWER + TURN_END)
    if not sep:
        raise ValueError(
            f"the chat template does not end an assistant turn with {TURN_END}: multi-turn prompts need a "
            "Qwen2.5-VL chat template"
        )
    return list(tokenizer(tail, add_special_tokens=False)["input_ids"])


def next_turn_ids(
    tokenizer, prompt_ids: Sequence[int], answer_ids: Sequence[int], user_text: str, with_image: bool = True
) -> list[int]:
    """The next turn's prompt: the turn's prompt (as the engine reported it, images expanded or not) + the answer's
    ids as generated (+ the turn end when the answer stopped without one) + `turn_suffix`, images collapsed."""
    vocab = tokenizer.get_vocab()
    pad, end = vocab[IMAGE_PAD], vocab[TURN_END]
    answer = [int(t) for t in answer_ids]
    if not answer or answer[-1] != end:
        answer.append(end)
    return collapse_images(prompt_ids, pad) + answer + turn_suffix(tokenizer, user_text, with_image)


def join_turns(
    turns: Sequence[tuple[Sequence[int], Completion]], pictures: Sequence[bytes] = ()
) -> Completion:
    """An episode as the learner scores it: ONE Completion after the first turn's prompt. `turns[k]` is turn k's
    prompt as the engine reported it (images expanded) and its answer; `pictures` the PNG of each picture shown
    after turn 1. The first answer may itself be an episode (its turns so far: it goes on). Each later prompt must
    start with everything before it (the earlier prompt and answers, token for token): what it adds (a turn end
    the answer lacked, the user turn, the picture's image tokens) goes in with policy_mask 0 and logprob 0, every
    answer's tokens with 1 and their own logprobs."""
    if not turns:
        raise ValueError("join_turns: an episode needs at least one turn")
    first = [int(t) for t in turns[0][0]]
    ids: list[int] = []
    logprobs: list[float] = []
    mask: list[int] = []
    texts: list[str] = []
    for k, (prompt, answer) in enumerate(turns):
        if k and answer.policy_mask is not None:
            raise ValueError(
                f"join_turns: turn {k + 1}'s answer is an episode; give one-turn answers after turn 1"
            )
        seen = first + ids
        if k and [int(t) for t in prompt[: len(seen)]] != seen:
            at = next(
                (i for i, (a, b) in enumerate(zip(prompt, seen, strict=False)) if int(a) != b), len(prompt)
            )
            raise ValueError(
                f"join_turns: turn {k + 1}'s prompt differs from the turns before it at token {at}: a next turn "
                "must be built from the ids the engine reported and generated (runtime.turns.next_turn_ids)"
            )
        shown = [int(t) for t in prompt[len(seen) :]] if k else []
        ids += shown + list(answer.token_ids)
        logprobs += [0.0] * len(shown) + list(answer.logprobs)
        mask += [0] * len(shown) + answer.loss_mask
        texts += answer.texts
    last = turns[-1][1]
    return Completion(
        text=last.text,
        token_ids=ids,
        logprobs=logprobs,
        finish_reason=last.finish_reason,
        policy_mask=mask,
        pictures=[*turns[0][1].pictures, *pictures],
        earlier_texts=texts[:-1],
    )


def last_answer(episode: Completion) -> int:
    """Where an episode's last answer starts in its token_ids (0 for a one-turn answer): after the last token
    the policy was shown."""
    mask = episode.loss_mask
    shown = [i for i, m in enumerate(mask) if not m]
    return shown[-1] + 1 if shown else 0
