"""Weights in pieces to a vLLM engine whose workers are other processes (actors/vllm_reload.py): every piece is under
the cap (a larger tensor alone), the tensors are taken from the source only as the piece being built needs them,
never more than one piece is packed on the host at a time, and unpacking gives the exact tensors back."""

from __future__ import annotations

import weakref

import pytest
import torch

from actors.vllm_reload import pack_piece, send_in_pieces, unpack_piece


class _Blob(bytearray):
    """A piece's host buffer that the test can watch (bytearray takes no weak reference; a subclass does)."""


def _weights() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = [(f"layers.{i}.w", torch.randn(16, 8, generator=g).to(torch.bfloat16)) for i in range(6)]
    out += [("big", torch.randn(64, 16, generator=g)), ("norm", torch.randn(8, generator=g))]
    out += [("count", torch.arange(3, dtype=torch.int64)), ("scalar", torch.tensor(2.5))]
    return out


def test_pieces_are_capped_taken_lazily_packed_one_at_a_time_and_exact():
    weights = _weights()
    cap = 600  # bytes: 256-byte bf16 tensors two to a piece, the 4 KiB one alone
    taken = 0

    def source():
        nonlocal taken
        for item in weights:
            taken += 1
            yield item

    live: list[weakref.ref] = []
    most_alive = 0

    def alloc(n: int) -> _Blob:
        nonlocal most_alive
        blob = _Blob(n)
        live.append(weakref.ref(blob))
        most_alive = max(most_alive, sum(r() is not None for r in live))
        return blob

    got: dict[str, torch.Tensor] = {}
    sent_tensors = 0

    def send(specs, blob) -> None:
        nonlocal sent_tensors
        assert len(blob) <= cap or len(specs) == 1, (len(blob), specs)
        sent_tensors += len(specs)
        assert (
            taken <= sent_tensors + 1
        )  # at most one tensor of the next piece taken (to know this one is full)
        got.update((n, t.clone()) for n, t in unpack_piece(specs, bytes(blob)))

    pieces = send_in_pieces(source(), cap, send, alloc=alloc)
    assert pieces >= 5 and most_alive == 1  # several pieces, never two packed at once
    assert list(got) == [n for n, _ in weights]
    for name, t in weights:
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name


def test_a_piece_larger_than_msgpack_takes_is_refused_by_name(monkeypatch):
    import actors.vllm_reload as reload

    monkeypatch.setattr(reload, "MSGPACK_MAX_BYTES", 100)
    with pytest.raises(ValueError, match="'big'.*msgpack"):
        pack_piece([("big", torch.zeros(64))])
