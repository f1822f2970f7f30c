"""Reloading a vLLM engine's weights in place, in pieces: what runs inside vLLM's workers (through collective_rpc)
and what the engines (actors/vllm_engine.py) send them.

vLLM's own reload (gpu_worker.reload_weights -> model_runner.reload_weights -> model_loader/reload/inplace.py) is
three steps: `initialize_layerwise_reload(model)` puts every layer back on the meta device and keeps its kernel
tensors; `model.load_weights(iterator)` materialises a layer, loads it, post-processes it (the CPU backend re-packs
its linears) and copies it back into its kernel tensors as soon as ALL its weights arrived, holding the weights of
a layer still incomplete until then; `finalize_layerwise_reload` gives layers never loaded their old tensors back
and processes the rest. Calling reload_weights once per piece would therefore finalize a layer split between two
pieces (q_proj in one, k_proj / v_proj in the next: one fused qkv_proj) with half its weights. A session here is
the same three steps as separate calls: `begin_reload`, `load_piece` any number of times, `end_reload` (vLLM's
weight-transfer engines, vllm/distributed/weight_transfer/, do the same with start / update /
finish_weight_update), then the runner's cache resets reload_weights does. The result is the one full reload's.

- engine core and its single worker in this process: one call, `load_iterator`, on a lazy iterator (zero copy: the
  weight receiver's bucket views go straight into model.load_weights);
- workers in other processes (VLLM_ENABLE_V1_MULTIPROCESSING=1, tensor parallelism > 1): pieces of at most
  `WEIGHT_PIECE_BYTES`, each packed into ONE host buffer only while it is sent (`send_in_pieces`): vLLM's msgpack
  encoder refuses a bytes object over 2**32 - 1 (the 7B policy is 16.6 GB in bf16), and no host copy of the whole
  policy is ever made.

A session that breaks off (the stream failed or was abandoned) is finalized on the way out, and `begin_reload`
finalizes one left open, so the next complete load starts clean; the engine refuses to generate meanwhile.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator

WEIGHT_PIECE_BYTES = 512 << 20  # the default cap of one piece sent to a vLLM worker in another process
MSGPACK_MAX_BYTES = 2**32 - 1  # vllm/v1/serial_utils.py (msgspec): the largest bytes object it encodes
ALIGN = 64  # byte alignment of every tensor inside a piece
_OPEN = "_segr1_reload_open"  # set on the worker while a session is open

PieceSpec = tuple[str, str, tuple[int, ...], int, int]  # name, dtype, shape, byte offset, nbytes


# ----------------------------------------------------------------------------------------------------------------
# Inside vLLM's workers (collective_rpc runs these with the worker as first argument)


def begin_reload(worker) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    with set_current_vllm_config(worker.vllm_config):
        if getattr(worker, _OPEN, False):  # a session that broke off: restore and process what it left
            _finalize(worker)
        initialize_layerwise_reload(worker.model_runner.get_model())
    setattr(worker, _OPEN, True)


def load_piece(worker, specs: list[PieceSpec], blob) -> int:
    """Load one piece (tensors packed by `pack_piece`); returns how many tensors it held."""
    from vllm.config import set_current_vllm_config

    tensors = unpack_piece(specs, blob)
    with set_current_vllm_config(worker.vllm_config):
        worker.model_runner.get_model().load_weights(iter(tensors))
    return len(tensors)


def end_reload(worker) -> None:
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config):
        _finalize(worker)
    runner = worker.model_runner  # what GPUModelRunner.reload_weights resets after vLLM's own reload
    runner.reset_lora_state()
    runner.reset_encoder_cache()
    runner.reset_mm_cache()


def load_iterator(worker, weights: Iterator) -> None:
    """The whole update in one session from one lazy iterator (the engine core runs in the caller's process)."""
    begin_reload(worker)
    try:
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(worker.vllm_config):
            worker.model_runner.get_model().load_weights(weights)
    except BaseException:
        with contextlib.suppress(Exception):
            end_reload(worker)
        raise
    end_reload(worker)


def _finalize(worker) -> None:
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    finalize_layerwise_reload(worker.model_runner.get_model(), worker.vllm_config.model_config)
    setattr(worker, _OPEN, False)


# ----------------------------------------------------------------------------------------------------------------
# The engine's side: pieces


def pieces(named: Iterable, cap: int) -> Iterator[list]:
    """(name, tensor) pairs grouped into pieces of at most `cap` bytes (a larger tensor alone), taken lazily: a
    stream's next bucket is received only when the piece being built needs it."""
    piece: list = []
    used = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        start = -(-used // ALIGN) * ALIGN
        if piece and start + nbytes > cap:
            yield piece
            piece, start = [], 0
        piece.append((name, t))
        used = start + nbytes
    if piece:
        yield piece


def pack_piece(
    piece: list, alloc: Callable[[int], bytearray] = bytearray
) -> tuple[list[PieceSpec], bytearray]:
    """One host buffer holding the piece's tensors (64-byte aligned) and their specs; `alloc` makes the buffer."""
    import torch

    from runtime.weights.layout import dtype_name

    specs: list[PieceSpec] = []
    used = 0
    for name, t in piece:
        start = -(-used // ALIGN) * ALIGN
        nbytes = t.numel() * t.element_size()
        specs.append((name, dtype_name(t.dtype), tuple(t.shape), start, nbytes))
        used = start + nbytes
    if used > MSGPACK_MAX_BYTES:
        raise ValueError(
            f"weight piece of {used:,} bytes ({specs[0][0]!r}...) is over the {MSGPACK_MAX_BYTES:,} bytes vLLM's "
            "msgpack encoder takes; one tensor that large cannot reach a vLLM worker in another process"
        )
    blob = alloc(used)
    flat = torch.frombuffer(blob, dtype=torch.uint8) if used else torch.empty(0, dtype=torch.uint8)  # (used,)
    for (_, t), (_, _, shape, start, nbytes) in zip(piece, specs, strict=True):
        flat[start : start + nbytes].view(t.dtype).view(shape).copy_(t.detach())
    del flat
    return specs, blob


def unpack_piece(specs: list[PieceSpec], blob) -> list:
    """(name, tensor) views into a received piece (no copy)."""
    import torch

    from runtime.weights.layout import dtype_from_name

    if not len(blob):
        flat = torch.empty(0, dtype=torch.uint8)
    else:
        with warnings.catch_warnings():  # a received piece is read-only bytes: loading only reads it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(blob, dtype=torch.uint8)  # (nbytes,)
    return [
        (name, flat[start : start + nbytes].view(dtype_from_name(dtype)).view(tuple(shape)))
        for name, dtype, shape, start, nbytes in specs
    ]


def send_in_pieces(named: Iterable, cap: int, send: Callable, alloc=bytearray) -> int:
    """send(specs, blob) for every piece; one piece is packed on the host at a time. Returns the number of pieces."""
    count = 0
    for piece in pieces(named, cap):
        specs, blob = pack_piece(piece, alloc)
        send(specs, blob)
        del specs, blob
        count += 1
    return count


def reload_in_pieces(rpc: Callable, named: Iterable, cap: int) -> int:
    """One session through `rpc` (LLM.collective_rpc); returns the number of pieces."""
    rpc(begin_reload)
    try:
        count = send_in_pieces(named, cap, lambda specs, blob: rpc(load_piece, args=(specs, blob)))
    except BaseException:
        with contextlib.suppress(Exception):
            rpc(end_reload)
        raise
    rpc(end_reload)
    return count
