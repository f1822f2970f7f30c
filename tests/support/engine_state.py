"""Put a rollout engine or RolloutWorker that several tests share back to the state it was built in (policy
version 0 and its initial weights) after each test, so that no test sees another's weight update, whatever the
order they run in. Restoring goes through the production path a learner restart takes: `rewind(0)`, then a full
`load_weights(..., 0)`."""

from __future__ import annotations

import torch


def weights_of(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A copy of every parameter, as (name, tensor): what load_weights takes."""
    return [(n, p.detach().clone()) for n, p in module.named_parameters()]


def restore(target, weights: list[tuple[str, torch.Tensor]], model: torch.nn.Module | None = None) -> None:
    """Rewind `target` (an engine or a RolloutWorker) to version 0 and load `weights`; with `model` (the
    target's own torch module, where it has one) check that every parameter is back."""
    target.rewind(0)
    target.load_weights(weights, 0)
    assert target.policy_version == 0, f"{target!r} still at version {target.policy_version} after a restore"
    if model is not None:
        params = dict(model.named_parameters())
        changed = [n for n, t in weights if not torch.equal(params[n], t)]
        assert not changed, f"parameters not restored: {changed[:5]}"


def lend(target, weights: list[tuple[str, torch.Tensor]], model: torch.nn.Module | None = None):
    """A function-scoped fixture's body around a shared `target`: `yield from lend(...)` hands it to the test,
    then restores it."""
    yield target
    restore(target, weights, model)


def lend_engines(vllm_engine, hf_engine, weights: list[tuple[str, torch.Tensor]]):
    """The vLLM tests' fixture body: hand out (vLLM engine, transformers engine), both loaded from one folder whose
    weights are `weights`, then restore both."""
    yield vllm_engine, hf_engine
    restore(hf_engine, weights, hf_engine.model)
    restore(vllm_engine, weights)
