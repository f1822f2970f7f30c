"""Bucket layout of one weight version: which bytes of which flat buffer hold which tensor.

Named parameters are packed into flat uint8 buckets of at most `bucket_mb` MiB, one dtype per bucket, every tensor
64-byte aligned, described by a `protos.WeightsManifest` (name, shape, dtype, bucket, byte offset). Every transport
packs with `pack_bucket` and unpacks with `bucket_views`; tensor names are the checkpoint names
(`checkpoint_names`): those of the saved model.safetensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from protos import TensorSpec, WeightsManifest

ALIGN = 64  # byte alignment of every tensor inside a bucket
NamedTensors = Sequence[tuple[str, torch.Tensor]]


class WeightSyncError(RuntimeError):
    """A weight update could not be delivered (a receiver failed, timed out or left the group)."""


class StreamedWeights(Mapping):
    """Weights produced one full tensor at a time, e.g. by a sharded learner whose every full tensor is an
    all-gather (all its ranks walk the same tensors in the same order): `specs` (name, tensor of the right shape
    and dtype, e.g. on the meta device) lay out the manifest; the tensors are then taken exactly once, in the
    manifest's order (the order pack_bucket / send_shm visit), so the sender holds one bucket at a time."""

    def __init__(self, specs: NamedTensors, tensors: Iterable[tuple[str, torch.Tensor]]):
        self.specs = list(specs)
        self._names = [n for n, _ in self.specs]
        self._it = iter(tensors)
        self._taken = 0
        self.device: torch.device | None = None  # of the tensors, known once the first one is taken

    def __getitem__(self, name: str) -> torch.Tensor:
        got, t = next(self._it, (None, None))
        want = self._names[self._taken] if self._taken < len(self._names) else None
        if got != name or got != want:
            raise WeightSyncError(
                f"streamed weights asked for {name!r} but the stream yields {got!r} (expected {want!r}): a "
                "sharded learner's tensors must be taken once each, in the manifest's order"
            )
        self._taken += 1
        self.device = t.device
        return t

    def __len__(self) -> int:
        return len(self.specs)

    def __iter__(self):
        return iter(self._names)


def layout_of(named: NamedTensors | StreamedWeights) -> NamedTensors:
    """What plan_manifest lays out: the specs of streamed weights, the tensors themselves otherwise."""
    return named.specs if isinstance(named, StreamedWeights) else named


def tensor_source(named: NamedTensors | StreamedWeights) -> Mapping[str, torch.Tensor]:
    """name -> tensor for pack_bucket / send_shm: streamed weights as they are (taken in order), else a dict."""
    return named if isinstance(named, StreamedWeights) else dict(named)


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise WeightSyncError(f"manifest dtype {name!r} is not a torch dtype (e.g. 'bfloat16', 'float32')")
    return dt


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def plan_manifest(
    named: Iterable[tuple[str, torch.Tensor]], version: int, bucket_mb: float
) -> WeightsManifest:
    """Lay tensors out in buckets of at most bucket_mb MiB, one dtype per bucket, order kept within a dtype.

    A tensor larger than a bucket gets a bucket of its own.
    """
    limit = max(1, int(bucket_mb * 1024 * 1024))
    by_dtype: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, t in named:
        by_dtype.setdefault(dtype_name(t.dtype), []).append((name, t))
    specs: list[TensorSpec] = []
    sizes: list[int] = []
    for dt, items in by_dtype.items():
        used = None  # bytes used in the current bucket of this dtype; None: no open bucket
        for name, t in items:
            nbytes = t.numel() * t.element_size()
            start = 0 if used is None else -(-used // ALIGN) * ALIGN
            if used is None or start + nbytes > limit:
                sizes.append(0)
                start = 0
            specs.append(
                TensorSpec(
                    name=name,
                    shape=tuple(t.shape),
                    dtype=dt,
                    bucket=len(sizes) - 1,
                    offset=start,
                    nbytes=nbytes,
                )
            )
            used = start + nbytes
            sizes[-1] = used
    return WeightsManifest(version=version, bucket_nbytes=sizes, tensors=specs)


def bucket_views(
    manifest: WeightsManifest, buffers: Sequence[torch.Tensor]
) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) views into flat uint8 buffers laid out by the manifest (no copy)."""
    if len(buffers) != len(manifest.bucket_nbytes):
        raise WeightSyncError(
            f"{len(buffers)} buffers for a manifest of {len(manifest.bucket_nbytes)} buckets"
        )
    out = []
    for spec in manifest.tensors:
        raw = buffers[spec.bucket][spec.offset : spec.offset + spec.nbytes]  # (nbytes,) uint8
        out.append((spec.name, raw.view(dtype_from_name(spec.dtype)).view(spec.shape)))
    return out


def pack_bucket(
    manifest: WeightsManifest,
    index: int,
    tensors: Mapping[str, torch.Tensor],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy the tensors of bucket `index` into a flat uint8 buffer (out, reused when large enough; else one on
    the device of the bucket's first tensor). Each tensor is looked up once, in manifest order."""
    nbytes = manifest.bucket_nbytes[index]
    buf = out[:nbytes] if out is not None and out.numel() >= nbytes else None  # (nbytes,)
    for spec in manifest.tensors:
        if spec.bucket != index:
            continue
        src = tensors[spec.name]
        if buf is None:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=src.device)
        buf[spec.offset : spec.offset + spec.nbytes].view(src.dtype).view(spec.shape).copy_(src.detach())
    return buf if buf is not None else torch.empty(0, dtype=torch.uint8)


def checkpoint_names(model) -> dict[str, str]:
    """In-memory parameter name -> the name `save_pretrained` writes to model.safetensors (transformers 5 renames
    e.g. Qwen2.5-VL's `model.language_model.layers.0...` to `model.layers.0...`). Weight updates carry the
    checkpoint names, the ones vLLM's load_weights and every on-disk loader expect; a transformers engine maps
    them back with the inverse of this dict. Identity when transformers has no conversion for the model."""
    params = {n: p for n, p in model.named_parameters()}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return {n: n for n in params}
    by_id = {id(p): n for n, p in params.items()}
    reverted = revert_weight_conversion(model, dict(params))
    out = {by_id[id(t)]: disk for disk, t in reverted.items() if id(t) in by_id}
    if len(out) != len(params):  # a non-renaming conversion (fused weights): keep the model's own names
        return {n: n for n in params}
    return out
