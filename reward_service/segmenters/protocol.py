"""The Segmenter protocol: encode an image once, then decode any number of prompts against it, batched.

Images are `(H, W, 3)` uint8 RGB arrays at the ground truth's resolution; prompts (protos.MaskPrompt) are in that
image's pixels; masks come back as `(N, H, W)` bool at that resolution, one per prompt, in prompt order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from protos import MaskPrompt


class SegmenterUnavailable(RuntimeError):
    """A segmenter whose package, weights or device is missing; the message says how to fix it."""


@dataclass
class ImageHandle:
    """What `encode` returns: the image size and the segmenter's own embedding (opaque to callers)."""

    height: int
    width: int
    payload: Any = field(repr=False, default=None)


@runtime_checkable
class Segmenter(Protocol):
    name: str
    encode_calls: int  # images encoded so far (counted by every implementation)
    decode_calls: int  # batched decoder invocations so far
    prompts_decoded: int  # prompts decoded so far

    def encode(self, image: np.ndarray) -> ImageHandle: ...

    def encode_batch(self, images: Sequence[np.ndarray]) -> list[ImageHandle]: ...

    def decode(self, handle: ImageHandle, prompts: Sequence[MaskPrompt]) -> np.ndarray: ...

    def decode_batch(self, items: Sequence[tuple[ImageHandle, Sequence[MaskPrompt]]]) -> list[np.ndarray]: ...


class BaseSegmenter:
    """Counters, input checks and the loop-based batch defaults; subclasses implement _encode/_decode."""

    name = "base"

    def __init__(self) -> None:
        self.encode_calls = 0
        self.decode_calls = 0
        self.prompts_decoded = 0

    # -- encode --------------------------------------------------------------------------------------------------
    def encode(self, image: np.ndarray) -> ImageHandle:
        return self.encode_batch([image])[0]

    def encode_batch(self, images: Sequence[np.ndarray]) -> list[ImageHandle]:
        for image in images:
            check_image(image)
        self.encode_calls += len(images)
        return self._encode_batch(list(images))

    def _encode_batch(self, images: list[np.ndarray]) -> list[ImageHandle]:
        raise NotImplementedError

    # -- decode --------------------------------------------------------------------------------------------------
    def decode(self, handle: ImageHandle, prompts: Sequence[MaskPrompt]) -> np.ndarray:
        return self.decode_batch([(handle, prompts)])[0]

    def decode_batch(self, items: Sequence[tuple[ImageHandle, Sequence[MaskPrompt]]]) -> list[np.ndarray]:
        """Masks `(N_i, H_i, W_i)` bool for each (handle, prompts) item; empty prompt lists give (0, H, W)."""
        items = [(h, list(p)) for h, p in items]
        self.prompts_decoded += sum(len(p) for _, p in items)
        if not any(p for _, p in items):
            return [np.zeros((0, h.height, h.width), dtype=bool) for h, _ in items]
        return self._decode_batch(items)

    def _decode_batch(self, items: list[tuple[ImageHandle, list[MaskPrompt]]]) -> list[np.ndarray]:
        raise NotImplementedError

    # -- convenience ---------------------------------------------------------------------------------------------
    def segment(self, image: np.ndarray, prompts: Sequence[MaskPrompt]) -> np.ndarray:
        """Encode + decode one image (the naive, per-completion path)."""
        return self.decode(self.encode(image), prompts)


def check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}"
        raise ValueError(f"a segmenter takes an (H, W, 3) uint8 RGB array, got {got}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"a segmenter takes a non-empty image, got shape {image.shape}")


def union_mask(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """OR of `(N, H, W)` masks -> `(H, W)` bool (all False for N = 0)."""
    if masks.shape[0] == 0:
        return np.zeros((height, width), dtype=bool)
    return np.logical_or.reduce(masks, axis=0)
