"""The predictor: parse completions, segment the image with their prompts, return each completion's mask.

Shared by the reward worker (reward_service/worker.py: predict masks, then compute the reward terms) and by
evaluation (cluster/evaluation/: in-process, or as Ray actors `eval-<i>` made by cluster/pools/topology.py).

One `segment(items)` call: encode each distinct image that has prompts to decode once, in one batch (image by
image when the batch fails); decode every prompt of every item in one batched call (item by item when it fails);
OR the masks of each answer's own prompts into its mask. A failing image costs only its own items (failure
"segmenter_error"); nothing raises for one bad image. A plain class: no Ray, no cluster imports.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from protos import MaskPrompt, ParsedAnswer, RolloutGroup, Sample
from protos.config import PolicySpec
from reward_service.config import RewardConfig
from reward_service.parser import parse_answer_for
from reward_service.segmenters import ImageHandle, build_segmenter_for
from runtime.quiet import quiet_libraries
from runtime.threads import limit_threads

logger = logging.getLogger(__name__)

BASELINES = ("whole_image", "centre")


@dataclass
class Item:
    """One image and the parsed answers to segment on it (one per completion); `Predictor.segment` fills the
    masks, the failure and the timings."""

    image: np.ndarray | None  # (H, W, 3) uint8 RGB; None: the sample did not decode (failure says why)
    key: bytes  # items with the same key share one encode (a digest of the encoded image)
    answers: list[ParsedAnswer]
    failure: str | None = None  # corrupt_sample | segmenter_error: no masks
    # per answer: (H, W) bool, the OR of its prompts' masks (numpy, or a torch tensor on the segmenter's
    # device when segmented on_device); None: the answer has no prompt, or the item failed
    masks: list = field(default_factory=list)
    encode_s: float = 0.0  # this item's share of the call's encode (split over the items of one image)
    decode_s: float = 0.0  # its share of the call's decode (by number of prompts)

    @property
    def prompts(self) -> list[MaskPrompt]:
        return [p for a in self.answers for p in a.prompts]

    @property
    def num_prompts(self) -> int:
        return sum(len(a.prompts) for a in self.answers)


@dataclass
class CompletionPrediction:
    """What the predictor made of one completion. `mask`: (H, W) bool at the original size, None when there is
    no usable prediction (parse failure without prompts, segmenter error, corrupt sample)."""

    parse_ok: bool
    failure: str | None
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # original pixels
    mask: np.ndarray | None = None
    points: list[tuple[float, float]] = field(default_factory=list)  # original pixels
    labels: list[int] = field(default_factory=list)  # 1 foreground, 0 background; one per point
    stop: bool = False  # a later turn's stop answer: no prompts, the mask shown stands (the caller keeps it)
    # an episode of several turns: the predictions of its turns before this one, the first first (empty: one turn)
    earlier: list[CompletionPrediction] = field(default_factory=list)

    @property
    def turns(self) -> int:
        return len(self.earlier) + 1

    @property
    def first(self) -> CompletionPrediction:
        """The prediction of the episode's first turn (this one for a single answer)."""
        return self.earlier[0] if self.earlier else self


class Predictor:
    """Parse + segment, returning masks. `segment(items)` is the core (the reward worker's path); `predict` and
    `baseline_masks` are evaluation's entry points (sample i belongs to group i; Ray resolves ObjectRefs passed as
    the varargs). `segmenter`: share an already loaded one; default: built from `reward`."""

    def __init__(
        self, policy: PolicySpec, reward: RewardConfig | None = None, name: str = "eval-0", segmenter=None
    ):
        self.policy, self.reward, self.name = policy, reward or RewardConfig(), name
        kind = self.reward.segmenter if segmenter is None else getattr(segmenter, "name", "")
        quiet_libraries()
        limit_threads(torch_threads=kind != "grabcut", opencv_threads=True)
        if segmenter is None:
            segmenter = build_segmenter_for(self.reward, dummy=policy.dummy_weights)
        self.segmenter = segmenter
        # reward.embedding_cache: image key -> its embedding, the most recently used last
        self._kept: OrderedDict[bytes, ImageHandle] = OrderedDict()
        self.embedding_hits = 0

    def ping(self) -> dict:
        return {
            "name": self.name,
            "segmenter": self.segmenter.name,
            "encode_calls": self.segmenter.encode_calls,
            "decode_calls": self.segmenter.decode_calls,
            "embedding_hits": self.embedding_hits,  # images scored again without an encode (embedding_cache)
            "pid": os.getpid(),
        }

    def parse(
        self, text: str, width: int, height: int, policy_image_size: int | None, allow_stop: bool = False
    ) -> ParsedAnswer:
        """One completion's prompts in the pixels of the (width x height) original image; `policy_image_size`:
        the side of the square image the policy saw (None: it saw the original pixels); `allow_stop`: a later
        turn of a refinement, where a stop answer is valid."""
        return parse_answer_for(self.reward, text, width, height, policy_image_size, allow_stop)

    # -- the core ------------------------------------------------------------------------------------------------
    def segment(self, items: Sequence[Item], on_device: bool = False) -> tuple[float, float]:
        """Fill each item's masks (one per answer); returns the call's (encode, decode) seconds. `on_device`:
        masks stay torch tensors on the segmenter's device when it offers them (no host copy)."""
        for item in items:
            item.masks = [None] * len(item.answers)
        encode_s, handles = self._encode(items)
        return encode_s, self._decode(items, handles, on_device)

    def _encode(self, items: Sequence[Item]) -> tuple[float, dict[bytes, ImageHandle | None]]:
        """Encode each distinct image that has prompts to decode, once, in one batch (an image whose embedding
        is kept, reward.embedding_cache, is not encoded again)."""
        images: dict[bytes, np.ndarray] = {}
        for item in _with_prompts(items):
            images.setdefault(item.key, item.image)
        kept = {k: self._kept[k] for k in images if k in self._kept}
        for k in kept:
            self._kept.move_to_end(k)
        self.embedding_hits += len(kept)
        keys = [k for k in images if k not in kept]
        if not keys:
            return 0.0, kept
        t0 = time.perf_counter()
        try:
            handles: list[ImageHandle | None] = self.segmenter.encode_batch([images[k] for k in keys])
        except Exception as err:
            logger.warning("%s: batched encode failed (%s); encoding one image at a time", self.name, err)
            handles = [self._encode_one(images[k]) for k in keys]
        elapsed = time.perf_counter() - t0
        by_key = dict(zip(keys, handles, strict=True))
        sharing = {k: sum(item.key == k for item in _with_prompts(items)) for k in keys}
        for item in _with_prompts(items):
            item.encode_s = elapsed / len(keys) / sharing[item.key] if item.key in by_key else 0.0
        self._keep(by_key)
        return elapsed, {**kept, **by_key}

    def _keep(self, handles: dict[bytes, ImageHandle | None]) -> None:
        limit = self.reward.embedding_cache
        for k, handle in handles.items():
            if limit and handle is not None:
                self._kept[k] = handle
        while len(self._kept) > limit:
            self._kept.popitem(last=False)

    def _encode_one(self, image: np.ndarray) -> ImageHandle | None:
        try:
            return self.segmenter.encode(image)
        except Exception as err:
            logger.warning("%s: encoding an image failed: %s", self.name, err)
            return None

    def _decode(
        self, items: Sequence[Item], handles: dict[bytes, ImageHandle | None], on_device: bool
    ) -> float:
        """Decode every prompt of every item in one batched call; OR each answer's masks."""
        active = _with_prompts(items)
        for item in active:
            if handles.get(item.key) is None:
                item.failure = "segmenter_error"
        active = [item for item in active if item.failure is None]
        if not active:
            return 0.0
        batch = [(handles[item.key], item.prompts) for item in active]
        t0 = time.perf_counter()
        try:
            results = self._decode_batch(batch, on_device)
        except Exception as err:
            logger.warning("%s: batched decode failed (%s); decoding one item at a time", self.name, err)
            results = [self._decode_one(entry, on_device) for entry in batch]
        elapsed = time.perf_counter() - t0
        total_prompts = sum(item.num_prompts for item in active)
        for item, masks in zip(active, results, strict=True):
            if masks is None:
                item.failure = "segmenter_error"
                continue
            item.decode_s = elapsed * item.num_prompts / total_prompts
            item.masks = answer_masks(item.answers, masks)
        return elapsed

    def _decode_batch(self, batch, on_device: bool) -> list:
        """(P_i, H_i, W_i) bool masks per entry: torch tensors on the segmenter's device when `on_device` and it
        offers them, else numpy."""
        tensors = getattr(self.segmenter, "decode_batch_tensors", None) if on_device else None
        return tensors(batch) if tensors is not None else self.segmenter.decode_batch(batch)

    def _decode_one(self, entry, on_device: bool):
        try:
            return self._decode_batch([entry], on_device)[0]
        except Exception as err:
            logger.warning("%s: decoding an item failed: %s", self.name, err)
            return None

    # -- evaluation ----------------------------------------------------------------------------------------------
    def predict(self, groups: Sequence[RolloutGroup], *samples: Sample) -> list[list[CompletionPrediction]]:
        """Per group (sample i belongs to group i), one CompletionPrediction per completion, masks on the host.

        Bad completions, corrupt samples and segmenter errors give predictions without a mask, never an exception.
        Identical completions of a group (greedy decoding) are parsed and segmented once. A completion of several
        turns (an episode) gets its last turn's prediction (after a stop: the mask it was shown), every earlier
        turn's in `earlier`; all its turns are segmented on one encode of the image."""
        if len(groups) != len(samples):
            raise ValueError(f"predict got {len(groups)} groups and {len(samples)} samples; pass one each")
        # unique episodes (their answers, turn by turn), in order
        episodes = [list(dict.fromkeys(tuple(c.texts) for c in g.completions)) for g in groups]
        per_sample = [self._turn_items(sample, eps) for sample, eps in zip(samples, episodes, strict=True)]
        self.segment([item for items in per_sample for item in items])
        out = []
        for group, eps, items in zip(groups, episodes, per_sample, strict=True):
            if items[0].image is None:
                out.append([CompletionPrediction(False, items[0].failure) for _ in group.completions])
                continue
            by_texts = {texts: episode_prediction(items, e) for e, texts in enumerate(eps)}
            out.append([by_texts[tuple(c.texts)] for c in group.completions])
        return out

    def predict_answers(self, texts: Sequence[str], *samples: Sample) -> list[CompletionPrediction]:
        """A later turn of a refinement: one answer per sample (text i answers sample i), where a stop answer is
        valid (CompletionPrediction.stop, no mask: the caller keeps the one shown). Masks on the host."""
        if len(texts) != len(samples):
            raise ValueError(
                f"predict_answers got {len(texts)} answers and {len(samples)} samples; pass one each"
            )
        items = [self._item(sample, [t], allow_stop=True) for t, sample in zip(texts, samples, strict=True)]
        self.segment(items)
        return [
            _prediction(item.answers[0], item.masks[0], item.failure)
            if item.image is not None
            else CompletionPrediction(False, item.failure)
            for item in items
        ]

    def _parsing(self, sample: Sample):
        """(the decoded image, its key, `parse(text, allow_stop)` in its pixels), or None when it does not decode."""
        image = _decode_image(sample)
        if image is None:
            return None
        h, w = image.shape[:2]
        size = self.policy.image_size
        return image, _image_key(sample), lambda text, allow_stop: self.parse(text, w, h, size, allow_stop)

    def _item(self, sample: Sample, texts: list[str], allow_stop: bool = False) -> Item:
        on = self._parsing(sample)
        if on is None:
            return Item(None, b"", [], failure="corrupt_sample")
        image, key, parse = on
        return Item(image, key, [parse(t, allow_stop) for t in texts])

    def _turn_items(self, sample: Sample, episodes: Sequence[Sequence[str]]) -> list[Item]:
        """`turn_items` of episodes' answers on `sample` (one item, failed, when the image does not decode)."""
        on = self._parsing(sample)
        if on is None:
            return [Item(None, b"", [], failure="corrupt_sample")]
        image, key, parse = on
        return turn_items(parse, episodes, image, key)

    def baseline_masks(self, kind: str, *samples: Sample) -> list[np.ndarray | None]:
        """Masks of a constant answer: the whole-image box, or the centre box (middle half of each side)."""
        if kind not in BASELINES:
            raise ValueError(f"baseline {kind!r} is not one of {BASELINES}")
        items = []
        for sample in samples:
            image = _decode_image(sample)
            if image is None:
                items.append(Item(None, b"", [], failure="corrupt_sample"))
                continue
            h, w = image.shape[:2]
            whole = (0.0, 0.0, float(w), float(h))
            box = whole if kind == "whole_image" else (w / 4, h / 4, 3 * w / 4, 3 * h / 4)
            answer = ParsedAnswer(ok=True, prompts=[MaskPrompt(box=box)])
            items.append(Item(image, _image_key(sample), [answer]))
        self.segment(items)
        return [item.masks[0] if item.failure is None else None for item in items]


def answer_masks(answers: Sequence[ParsedAnswer], masks) -> list:
    """(P, H, W) masks of all the answers' prompts, in order (numpy or torch) -> per answer the (H, W) OR of its
    own prompts' masks (None: the answer has no prompt)."""
    out, offset = [], 0
    for answer in answers:
        n = len(answer.prompts)
        if n == 0:
            out.append(None)
        elif isinstance(masks, np.ndarray):
            out.append(np.logical_or.reduce(masks[offset : offset + n], axis=0))
        else:
            out.append(masks[offset : offset + n].any(dim=0))
        offset += n
    return out


def _with_prompts(items: Sequence[Item]) -> list[Item]:
    return [item for item in items if item.failure is None and item.num_prompts]


def _prediction(answer: ParsedAnswer, mask, failure: str | None) -> CompletionPrediction:
    """One completion's prediction; `failure`: its item's (segmenter_error) or None."""
    boxes = [p.box for p in answer.prompts if p.box is not None]
    points = [pt for p in answer.prompts for pt in p.points]
    labels = [lab for p in answer.prompts for lab in p.labels]
    if answer.prompts and failure is not None:
        return CompletionPrediction(answer.ok, answer.failure or failure, boxes, None, points, labels)
    return CompletionPrediction(answer.ok, answer.failure, boxes, mask, points, labels, stop=answer.stop)


# a turn the episode did not take (it ended before): parsed as nothing, segmented as nothing
NO_TURN = ParsedAnswer(ok=False, failure="no_turn")


def turn_items(parse, episodes: Sequence[Sequence[str]], image, key: bytes) -> list[Item]:
    """One item per turn index of episodes of answers (`episodes[c]`: completion c's answers, turn by turn): item k
    holds every episode's k-th answer (NO_TURN where it ended earlier). `parse(text, allow_stop)` parses one
    answer in the original image's pixels; a stop is a valid answer after the first turn."""
    turns = max(len(t) for t in episodes)
    return [
        Item(image, key, [parse(t[k], k > 0) if k < len(t) else NO_TURN for t in episodes])
        for k in range(turns)
    ]


def kept_on_stop(shown: CompletionPrediction, stop: CompletionPrediction) -> CompletionPrediction:
    """A later turn that answered stop: the mask and prompts it was shown stand, marked stop, with the stop
    answer's own parse result."""
    return replace(shown, stop=True, parse_ok=stop.parse_ok, failure=stop.failure)


def episode_prediction(items: Sequence[Item], c: int) -> CompletionPrediction:
    """Episode c's prediction from its `turn_items`, segmented: its last turn's (a stop: the mask and prompts it
    was shown, marked stop) with the turns before it in `earlier`."""
    turns: list[CompletionPrediction] = []
    for item in items:
        answer = item.answers[c]
        if answer is NO_TURN:
            break
        pred = _prediction(answer, item.masks[c], item.failure)
        turns.append(kept_on_stop(turns[-1], pred) if answer.stop and turns else pred)
    return replace(turns[-1], earlier=turns[:-1]) if len(turns) > 1 else turns[0]


def _image_key(sample: Sample) -> bytes:
    return hashlib.blake2b(sample.image, digest_size=16).digest()


def _decode_image(sample: Sample) -> np.ndarray | None:
    from runtime.images import decode_image

    try:
        return decode_image(sample.image, f"sample {sample.id!r}")  # (H, W, 3) uint8 RGB
    except Exception as err:
        logger.warning("predictor: %s", err)
        return None
