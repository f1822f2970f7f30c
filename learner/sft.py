"""SFT warm-up: supervised training on (image, target answer) pairs derived from ground-truth masks.

The target answer of a sample is written in the policy's NxN pixel space (data.image_size), exactly in the format
the reward parser reads (protos.answer.format_answer):
- box: the mask's bounding box (x2, y2 exclusive edges, clamped to N);
- foreground points: the deepest mask pixel (distance transform maximum), then random mask pixels;
- background points: pixels inside the box but off the mask when there are any, else anywhere off the mask;
- think: a short templated sentence from the mask (where the object is, how large it is).
The pre-RL format (reward.answer_format=points) writes only points and labels.

It lets a tiny random policy learn the answer format in minutes, so the demo's RL stage has something to improve.
Loss: token-mean cross entropy over the answer tokens and the closing <|im_end|>, at temperature 1.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from learner.checkpoint import save_policy
from learner.config import LearnerConfig
from learner.learner import lr_multiplier
from learner.policy import Policy
from protos import Sample
from protos.answer import format_answer
from protos.config import PolicySpec
from runtime.images import decode_mask

_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "centre", "right")


@dataclass(frozen=True)
class SftTarget:
    """An answer derived from a mask, in the policy's NxN pixel space."""

    text: str
    box: tuple[int, int, int, int] | None
    points: list[tuple[int, int]]
    labels: list[int]


def mask_in_policy_space(sample: Sample, size: int) -> np.ndarray:
    """The sample's mask resized (nearest) to size x size, as the policy sees the image. # (N, N) bool"""
    mask = decode_mask(sample.mask, f"sample {sample.id!r}: mask")  # (H, W) bool
    return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0


def _think(mask: np.ndarray, box: tuple[int, int, int, int]) -> str:
    n = mask.shape[0]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    where = f"{_ROWS[min(2, int(3 * cy / n))]} {_COLS[min(2, int(3 * cx / n))]}"
    frac = mask.mean()
    size = "small" if frac < 0.05 else "medium" if frac < 0.2 else "large"
    return f"a {size} object at the {where}"


def _pick(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, k: int) -> list[tuple[int, int]]:
    if len(xs) == 0 or k <= 0:
        return []
    idx = rng.choice(len(xs), size=min(k, len(xs)), replace=False)
    return [(int(xs[i]), int(ys[i])) for i in idx]


def sft_target(
    sample: Sample, size: int, answer_format: str = "full", n_fg: int = 2, n_bg: int = 1, seed: int = 0
) -> SftTarget | None:
    """The answer a perfect policy would write for `sample`; None when the mask is empty."""
    mask = mask_in_policy_space(sample, size)  # (N, N)
    if not mask.any():
        return None
    rng = np.random.default_rng(
        int.from_bytes(hashlib.sha256(f"{seed}:{sample.id}".encode()).digest()[:8], "little")
    )
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), min(size, int(xs.max()) + 1), min(size, int(ys.max()) + 1))
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)  # (N, N) float32
    cy, cx = np.unravel_index(int(np.argmax(dist)), dist.shape)
    fg = [(int(cx), int(cy))]
    rest = (ys != cy) | (xs != cx)
    fg += _pick(rng, ys[rest], xs[rest], n_fg - 1)
    off = ~mask
    in_box = np.zeros_like(mask)
    in_box[box[1] : box[3], box[0] : box[2]] = True
    bys, bxs = np.nonzero(off & in_box)
    if len(bxs) == 0:
        bys, bxs = np.nonzero(off)
    bg = _pick(rng, bys, bxs, n_bg)
    points, labels = fg + bg, [1] * len(fg) + [0] * len(bg)
    if answer_format == "points":
        return SftTarget(format_answer([], points, labels, answer_format="points"), None, points, labels)
    return SftTarget(format_answer([box], points, labels, _think(mask, box)), box, points, labels)


@dataclass
class SftResult:
    steps: int
    first_loss: float
    last_loss: float
    seconds: float
    out_dir: str | None
    skipped_empty_masks: int


class SftTrainer:
    """Cross-entropy on mask-derived answers; the policy is the same wrapper the GRPO learner uses."""

    def __init__(
        self,
        spec: PolicySpec,
        learner: LearnerConfig | None = None,
        lr: float = 3e-3,
        batch_size: int = 16,
        micro_batch_size: int | None = None,
        warmup_steps: int = 10,
        total_steps: int = 100,
        n_fg: int = 2,
        n_bg: int = 1,
        turns: int = 1,
        refine_share: float = 0.5,
    ):
        """`turns` 2: `refine_share` of the examples are two-turn ones (learner/sft_turns.py), the others as
        with 1."""
        learner = learner or LearnerConfig()
        if turns not in (1, 2) or not 0.0 <= refine_share <= 1.0:
            raise ValueError(
                f"SFT turns={turns}, refine_share={refine_share}: turns is 1 or 2, the share in [0, 1]"
            )
        self.turns, self.refine_share = turns, refine_share
        torch.manual_seed(spec.seed)
        self.spec, self.learner, self.lr, self.batch_size = spec, learner, lr, batch_size
        self.micro = micro_batch_size or learner.micro_batch_size
        self.warmup, self.total_steps, self.n_fg, self.n_bg = warmup_steps, total_steps, n_fg, n_bg
        self.policy = Policy(spec, learner)
        tok = self.policy.processor.tokenizer
        self.end_id = int(tok.convert_tokens_to_ids("<|im_end|>"))
        self.optimizer = torch.optim.AdamW(
            self.policy.trainable_parameters(), lr=lr, weight_decay=learner.weight_decay
        )
        self.step_count, self.skipped = 0, 0

    def targets(self, samples: list[Sample]) -> tuple[list[Sample], list[SftTarget]]:
        """The samples with a target answer (an empty mask has none: counted in `skipped`) and their targets."""
        keep, out = [], []
        for s in samples:
            size, fmt = self.spec.image_size, self.spec.answer_format
            t = sft_target(s, size, fmt, self.n_fg, self.n_bg, self.spec.seed)
            if t is None:
                self.skipped += 1
                continue
            keep.append(s)
            out.append(t)
        return keep, out

    def _ids(self, text: str) -> list[int]:
        """An answer's token ids and the turn end it closes with (both in the loss)."""
        return self.policy.processor.tokenizer.encode(text, add_special_tokens=False) + [self.end_id]

    def _two_turn_prompts(
        self, samples: list[Sample], targets: list[SftTarget]
    ) -> tuple[dict, list[list[int]]]:
        """Prompt rows and answer ids where `refine_share` of the examples are two-turn (learner/sft_turns.py):
        their prompt is the first turn's, its shifted answer and the refine turn with the picture, built as a
        rollout engine builds a next turn (runtime.turns.next_turn_ids); their answer is the second one."""
        from learner.sft_turns import example_rng, refine_example
        from runtime.images import resize_for_policy
        from runtime.qwen_vl import encode_prompt_ids
        from runtime.turns import collapse_images, next_turn_ids

        processor, size, seed = self.policy.processor, self.spec.image_size, self.spec.seed
        refine = self.spec.prompt.refine_text(size)
        images, prompts, answers = [], [], []
        for s, t, first in zip(samples, targets, self.policy.prompt_ids(samples), strict=True):
            image = resize_for_policy(s.image, size)
            if example_rng(seed, s.id, "turns").random() < self.refine_share:
                ex = refine_example(s, t, size, self.spec.answer_format, seed)
                prompts.append(next_turn_ids(processor.tokenizer, first, self._ids(ex.first), refine))
                images.append([image, ex.picture])
                answers.append(self._ids(ex.second))
            else:
                prompts.append(collapse_images(first, processor.image_token_id))
                images.append([image])
                answers.append(self._ids(t.text))
        return encode_prompt_ids(processor, images, prompts, collapsed=True), answers

    def step(self, samples: list[Sample]) -> float:
        """One optimiser step on a batch; returns the token-mean cross entropy."""
        samples, targets = self.targets(samples)
        if not samples:
            return float("nan")
        if self.turns == 1:
            prompts, ids = self.policy.encode(samples), [self._ids(t.text) for t in targets]
        else:
            prompts, ids = self._two_turn_prompts(samples, targets)
        n_tok = sum(len(i) for i in ids)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for start in range(0, len(samples), self.micro):
            rows = list(range(start, min(start + self.micro, len(samples))))
            batch = self.policy.batch(prompts, [ids[r] for r in rows], rows)
            logp, mask = self.policy.logprobs(batch)  # (n, T), (n, T) at temperature 1: plain cross entropy
            loss = -(logp * mask).sum() / n_tok
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.policy.trainable_parameters(), self.learner.grad_clip)
        lr = self.lr * lr_multiplier(self.step_count, self.warmup, "cosine", self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.step_count += 1
        return total

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        save_policy(self.policy.hf_model(), out, self.spec.path, self.policy.processor)
        return out


def run_sft(
    spec: PolicySpec,
    learner: LearnerConfig,
    next_batch: Callable[[int], list[Sample]],
    steps: int,
    out_dir: str | Path | None,
    lr: float = 3e-3,
    batch_size: int = 16,
    progress: Callable[[int, float], None] | None = None,
    time_limit_s: float | None = None,
    **kw,
) -> SftResult:
    """SFT for `steps` optimiser steps on batches from `next_batch(batch_size)` (the job's dataset reader;
    stops early at time_limit_s), then saves the policy as an HF folder in out_dir (when given)."""
    t0 = time.perf_counter()
    trainer = SftTrainer(spec, learner, lr=lr, batch_size=batch_size, total_steps=steps, **kw)
    first = last = math.nan
    for i in range(steps):
        last = trainer.step(next_batch(batch_size))
        first = last if i == 0 else first
        if progress is not None:
            progress(i + 1, last)
        if time_limit_s is not None and time.perf_counter() - t0 > time_limit_s:
            break
    saved = str(trainer.save(out_dir)) if out_dir is not None else None
    return SftResult(trainer.step_count, first, last, time.perf_counter() - t0, saved, trainer.skipped)


@torch.no_grad()
def greedy_answers(policy: Policy, samples: list[Sample], max_new_tokens: int = 128) -> list[str]:
    """Greedy completions of the policy for the samples (a quick look at what SFT taught; tests)."""
    from runtime.qwen_vl import model_inputs, stop_token_ids, suppress_token_ids

    tok = policy.processor.tokenizer
    model = policy.hf_model()
    batch = policy.encode(samples)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            **model_inputs(batch, policy.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_token_ids(tok),
            pad_token_id=policy.pad_token_id,
            suppress_tokens=suppress_token_ids(tok, model.config.get_text_config().vocab_size),
            use_cache=True,
        )
    finally:
        model.train(was_training)
    new = out[:, batch["input_ids"].shape[1] :]  # (B, new)
    return [tok.decode(row, skip_special_tokens=True) for row in new]
