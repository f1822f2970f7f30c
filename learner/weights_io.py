"""The policy's weights as full tensors, one at a time: the export to the rollout workers, the checkpoint's HF
folder, and loading a saved folder back into a (possibly sharded) live model.

Under FSDP2 every full tensor is an all-gather: every rank walks the same tensors in the same order
(`iter_weights`), rank 0 uses them (the weight-sync sender packs one bucket at a time; the checkpoint writer keeps
one safetensors shard at a time), the other ranks drop each tensor once gathered. So no rank ever holds the whole
model in full. The order is `weight_specs`' order, which is also the order the weight-sync manifest visits
(runtime/weights/layout.py: StreamedWeights).

LoRA: the exported and saved tensors are the base weights with the adapters merged (W + scale * B @ A, computed
from the gathered full tensors; the live model stays unmerged); the adapters alone go to adapter.safetensors.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from learner.sharding import copy_full_into, full

SHARD_BYTES = 4 * 1024**3  # one safetensors file of the saved HF folder (transformers' default is 5 GB)


def _base(policy):
    return policy.hf_model()


def _export_params(policy) -> list[tuple[str, str, torch.nn.Parameter]]:
    """(checkpoint name, in-memory name, parameter) of the tensors a rollout engine loads, in export order."""
    out = []
    for name, p in _base(policy).named_parameters():
        if "lora_" in name:
            continue
        clean = name.replace(".base_layer", "")
        out.append((policy.checkpoint_name(clean), name, p))
    return out


def _out_dtype(t: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.is_floating_point else t


def weight_specs(policy, dtype: torch.dtype | None = None) -> list[tuple[str, torch.Tensor]]:
    """(checkpoint name, meta tensor of the full shape and exported dtype), in export order; no communication."""
    return [
        (ck, torch.empty(p.shape, dtype=_out_dtype(p.dtype, dtype), device="meta"))
        for ck, _, p in _export_params(policy)
    ]


@torch.no_grad()
def iter_weights(policy, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, full tensor in `dtype`), one at a time, in weight_specs' order. A COLLECTIVE under FSDP2:
    every rank must exhaust it. Without sharding and LoRA the tensors are the live parameters (no copy)."""
    lora = _lora_modules(policy) if policy.lora else {}
    for ck, name, p in _export_params(policy):
        t = full(p)
        owner = name.rsplit(".base_layer.", 1)[0] if ".base_layer." in name else None
        if owner in lora and name.endswith(".base_layer.weight"):
            t = t + _delta(lora[owner]).to(t.dtype)
        yield ck, t.to(_out_dtype(t.dtype, dtype))


def _lora_modules(policy) -> dict:
    """In-memory name (relative to the base model) -> peft LoRA layer, for every adapted linear."""
    return {
        n: m for n, m in _base(policy).named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")
    }


def _delta(layer) -> torch.Tensor:
    """scale * B @ A of a peft LoRA linear (active adapters), from the gathered full adapter weights."""
    out = 0
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        a, b = full(layer.lora_A[name].weight), full(layer.lora_B[name].weight)
        d = (b @ a) * layer.scaling[name]
        out = out + (d.T if getattr(layer, "fan_in_fan_out", False) else d)
    return out


class OneAtATime:
    """An iterator that two threads may share: each item is taken exactly once, in order (rank 0's weight stream,
    read by a send that may be abandoned mid-way and by the drain that finishes its gathers)."""

    def __init__(self, it: Iterator):
        self._it, self._lock = it, threading.Lock()

    def __iter__(self) -> OneAtATime:
        return self

    def __next__(self):
        with self._lock:
            return next(self._it)


def drain(it: Iterator) -> None:
    """Walk a collective iterator to its end (the ranks that only take part in the gathers)."""
    for _ in it:
        pass


# ------------------------------------------------------------------------------------------------------------
# The HF folder of a checkpoint


def shard_files(specs: list[tuple[str, torch.Tensor]], limit: int = SHARD_BYTES) -> list[str]:
    """The file each tensor goes to: model.safetensors when everything fits one file, else
    model-0000i-of-0000n.safetensors (transformers' sharded layout, with model.safetensors.index.json)."""
    parts, part, used = [], 0, 0
    for _, t in specs:
        nbytes = t.numel() * t.element_size()
        if used > 0 and used + nbytes > limit:
            part, used = part + 1, 0
        parts.append(part)
        used += nbytes
    if part == 0:
        return ["model.safetensors"] * len(parts)
    return [f"model-{i + 1:05d}-of-{part + 1:05d}.safetensors" for i in parts]


class HFWriter:
    """save_policy()'s model: config + the full (merged) float32 weights, one safetensors file at a time. Every
    rank calls save_pretrained (the gathers are collectives); only `write` (rank 0) touches the folder."""

    def __init__(self, policy, write: bool):
        self.policy, self.write = policy, write

    def save_pretrained(self, folder: str, **_k) -> None:
        """Rank 0's write errors are raised only after the last gather (the other ranks are still in them)."""
        specs = weight_specs(self.policy)
        files = shard_files(specs)
        error = self._try(self._write_config, folder)
        pending: dict[str, torch.Tensor] = {}
        for k, (name, t) in enumerate(iter_weights(self.policy)):
            if not self.write or error is not None:
                continue
            pending[name] = t.detach().to("cpu").contiguous()
            if k + 1 == len(files) or files[k + 1] != files[k]:
                error = self._try(_save_shard, pending, Path(folder) / files[k])
                pending = {}
        if error is not None:
            raise error
        if self.write and len(set(files)) > 1:
            total = sum(t.numel() * t.element_size() for _, t in specs)
            body = {
                "metadata": {"total_size": total},
                "weight_map": {n: f for (n, _), f in zip(specs, files, strict=True)},
            }
            (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(body, indent=1))

    def _write_config(self, folder: str) -> None:
        base = _base(self.policy)
        base.config.save_pretrained(folder)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(folder)

    def _try(self, fn, *args) -> Exception | None:
        if not self.write:
            return None
        try:
            fn(*args)
        except Exception as err:  # raised by save_pretrained once the gathers are done
            return err
        return None


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _saved_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [folder / "model.safetensors"]


@torch.no_grad()
def load_hf_weights(policy, folder: Path) -> None:
    """Copy a saved HF folder's weights into the live model, tensor by tensor (each rank keeps its shard; the
    optimiser keeps its parameter objects). Under LoRA the folder's merged weights are not loaded (the adapter
    is: load_adapter)."""
    from safetensors import safe_open

    own = {ck: p for ck, _, p in _export_params(policy)}
    for path in _saved_files(folder):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {folder} is not a complete policy folder")
        try:
            opened = safe_open(str(path), "pt")
        except Exception as err:  # safetensors' message does not name the file
            raise RuntimeError(
                f"{path} is not a readable safetensors file ({err}): this checkpoint is damaged; resume from "
                "an earlier one (checkpoint.resume_from=<its step-* folder>)"
            ) from None
        with opened as f:
            for name in f.keys():
                if name not in own:
                    raise RuntimeError(
                        f"{folder}: parameter {name!r} is not in the live policy; wrong checkpoint?"
                    )
                copy_full_into(own[name], f.get_tensor(name))


# ------------------------------------------------------------------------------------------------------------
# LoRA adapters


def save_adapter(policy, path: Path, write: bool) -> None:
    """The trainable adapter weights (full, under their live names) to adapter.safetensors; every rank gathers."""
    from safetensors.torch import save_file

    tensors = {n: full(p).cpu().contiguous() for n, p in policy.model.named_parameters() if "lora_" in n}
    if write:
        save_file(tensors, str(Path(path) / "adapter.safetensors"))


@torch.no_grad()
def load_adapter(policy, folder: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(folder / "adapter.safetensors"))
    own = dict(policy.model.named_parameters())
    if not set(saved) <= set(own):  # written by peft.get_peft_model_state_dict (before the sharded learner)
        import peft

        peft.set_peft_model_state_dict(policy.model, saved)
        return
    for name, value in saved.items():
        copy_full_into(own[name], value)
