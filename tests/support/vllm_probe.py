"""Functions the vLLM tests run inside a vLLM worker (LLM / AsyncLLM.collective_rpc): a digest of every parameter as
the engine holds it (after vLLM's post-processing, e.g. the CPU backend's re-packed linears), and vLLM's own
one-shot reload of a whole update, to compare a reload in pieces (actors/vllm_reload.py) against."""

from __future__ import annotations

import hashlib


def param_digests(worker) -> dict[str, str]:
    """sha256 of every parameter's bytes, by vLLM's parameter name."""
    import torch

    model = worker.model_runner.get_model()
    return {
        name: hashlib.sha256(
            p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        ).hexdigest()
        for name, p in model.named_parameters()
    }


def oneshot_reload(worker, specs, blob) -> None:
    """vLLM's own reload_weights on the whole update at once (the reference a pieced reload must equal)."""
    from actors.vllm_reload import unpack_piece

    worker.reload_weights(weights_iterator=iter(unpack_piece(specs, blob)))
