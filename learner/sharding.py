"""The sharded learner (FSDP2): one process per rank in the default torch.distributed group (gloo on CPU, NCCL on
CUDA), the policy wrapped with `torch.distributed.fsdp.fully_shard`.

What is sharded (each rank keeps 1/world_size of every tensor, Shard(0) of a 1-D mesh over the group):
- every decoder layer, every vision block, the vision tower itself (its patch embedding and merger), then the
  root (embeddings, final norm, lm_head). The vision features are computed inside the root forward, once per
  row (Policy.share_vision off): a unit may not run forward before the root does. Gradients and AdamW states follow the parameters (the optimiser is built on the DTensors).
- the frozen reference (grpo.beta > 0) the same way, without an optimiser: it is only run forward, and sharding it
  costs one all-gather per layer per forward instead of a full copy on every rank.
- under LoRA the same units (each decoder layer holds its frozen base weights and its trainable adapters).

Precision: parameters are stored in float32 (the master weights AdamW updates); on CUDA a MixedPrecisionPolicy
gathers them as bf16 for compute and reduce-scatters the gradients in float32. float32 masters because an update
of lr x grad ~ 1e-6 relative to a weight of ~1e-2 is below bf16's resolution (8 bits of mantissa): bf16 masters
would drop most small updates; the cost is 4 + 4 bytes (param + grad) + 8 (AdamW) per parameter, sharded.

world_size 1 never comes here: the plain model, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor is all-gathered (a collective: every rank must call it, in the same order)."""
    t = t.detach()
    return t.full_tensor() if sharded(t) else t


def join_group(device: torch.device, rank: int, world_size: int, init_method: str | None) -> None:
    """Join the default process group (gloo on CPU, nccl on CUDA) unless this process already did."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if not init_method:
        raise ValueError(
            f"Learner(world_size={world_size}) needs init_method='tcp://<rank 0 host>:<port>' to form its "
            "process group; the learner group (cluster/) passes it to every rank"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)


def shard_model(model, device: torch.device, world_size: int, mixed_precision: bool) -> None:
    """fully_shard the decoder layers, vision blocks, vision tower and root of a Qwen2.5-VL model (or of a peft
    model around one)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    kw: dict = {"mesh": mesh}
    if mixed_precision:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    inner = _hf(model).model
    for unit in [*inner.language_model.layers, *inner.visual.blocks, inner.visual]:
        fully_shard(unit, **kw)
    fully_shard(model, **kw)


def _hf(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sum_over_ranks(values: Sequence[float], device: torch.device, world_size: int) -> list[float]:
    """Element-wise sums over the ranks (float64); the values themselves when world_size is 1."""
    if world_size <= 1:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def max_over_ranks(value: float, device: torch.device, world_size: int) -> float:
    if world_size <= 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0])


def broadcast_object(obj, world_size: int):
    """Rank 0's `obj` on every rank."""
    if world_size <= 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, world_size: int) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if world_size <= 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


@torch.no_grad()
def copy_full_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set a (possibly sharded) parameter from its full value, each rank keeping its own shard (no
    communication: every rank holds `value`)."""
    if sharded(param):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(
            value.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None
        )
    param.copy_(value)


def together(fn, world_size: int, what: str):
    """fn() on every rank; when it failed on any rank, raise on every rank, so that none is left waiting in the
    next collective: the failing rank its own error, the others one that quotes it (whichever rank's answer the
    caller reads says what went wrong). fn must complete its own collectives even when its local part fails
    (HFWriter does)."""
    err, out = None, None
    try:
        out = fn()
    except Exception as e:  # re-raised below, once the other ranks heard of it
        err = e
    errors = gather_objects(None if err is None else f"{type(err).__name__}: {err}", world_size)
    if err is not None:
        raise err
    failed = [(rank, msg) for rank, msg in enumerate(errors) if msg is not None]
    if failed:
        rank, msg = failed[0]
        raise RuntimeError(f"{what} failed on learner rank {rank}: {msg}")
    return out
