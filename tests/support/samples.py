"""A Sample for tests of the messages and the bookkeeping: valid, with placeholder image and mask bytes that
nothing decodes."""

from __future__ import annotations

from protos import Sample


def placeholder_sample(sid: str = "s0", **fields) -> Sample:
    values = dict(
        id=sid,
        source="synthetic",
        split="train",
        task="foreground",
        instruction="segment it",
        image=b"\x89PNG...",
        mask=b"\x89PNG...",
        width=64,
        height=48,
    )
    return Sample(**{**values, **fields})
