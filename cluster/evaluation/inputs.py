"""What an evaluation reads: the samples of a data set, the policy folder a `--checkpoint` names, and (with
eval.generation_config) that folder's decoding settings."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from protos import Sample

POLICY_DIR = "policy"  # the Hugging Face folder inside a step-* checkpoint (learner/checkpoint.py)

logger = logging.getLogger(__name__)


def load_samples(
    path, limit: int | None = None, on_corrupt: str = "skip", reports: list | None = None
) -> list[Sample]:
    """Samples of a Parquet file or folder of shards (cluster.data.reader.iter_samples: shards sorted by name,
    rows in file order, each once). Corrupt rows are skipped and appended to `reports` (on_corrupt="skip") or
    raise (on_corrupt="raise"); a path that holds no data set raises cluster.data.reader.DatasetError."""
    from itertools import islice

    from cluster.data.reader import iter_samples

    return list(islice(iter_samples(path, on_corrupt=on_corrupt, reports=reports), limit))


@dataclass(frozen=True)
class PolicyCheckpoint:
    """The policy folder of a `--checkpoint` and the name its outputs take."""

    policy: str  # a Hugging Face folder (config.json) that transformers and vLLM load
    name: str  # the checkpoint folder's name (the step-* folder when given its policy/ subfolder)


def resolve_checkpoint(checkpoint) -> PolicyCheckpoint:
    """`checkpoint` is a Hugging Face folder, a `step-*` checkpoint (its policy/) or a checkpoint root (its latest
    step's policy/: the newest step-* folder with one, its optimiser state not needed); raises FileNotFoundError
    naming the three layouts otherwise."""
    from learner.checkpoint import step_dirs

    root = Path(checkpoint)
    given = root.resolve()
    name = given.parent.name if given.name == POLICY_DIR else given.name
    newest_first = [folder / POLICY_DIR for _, folder in reversed(step_dirs(root))]
    for folder in (root, root / POLICY_DIR, *newest_first):
        if (folder / "config.json").is_file():
            return PolicyCheckpoint(str(folder), name)
    raise FileNotFoundError(
        f"--checkpoint {root} is not a model folder (config.json), a checkpoint (policy/config.json) or a "
        "checkpoint root (step-*/policy/)"
    )


# transformers' GenerationConfig defaults, what model.generate uses for a key the file does not set.
_HF_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}


def generation_config_sampling(folder) -> dict:
    """SamplingConfig fields (temperature, top_p, top_k, repetition_penalty) that decode as `model.generate` does
    with `folder`'s generation_config.json, the way the reference evaluated (eval/*.py call model.generate with
    only max_new_tokens). do_sample false: greedy, the repetition penalty still applies. Keys the file lacks take
    transformers' defaults; a folder without the file decodes greedily (transformers' default), with a warning.
    Qwen2.5-VL-7B-Instruct's file (temperature 0.1, top_p 0.001, top_k 1, repetition_penalty 1.05) is greedy with
    a 1.05 repetition penalty in effect."""
    path = Path(folder) / "generation_config.json"
    found: dict = {}
    if path.is_file():
        found = json.loads(path.read_text(encoding="utf-8"))
    else:
        logger.warning(
            "eval.generation_config: %s does not exist; decoding greedily (transformers' default)", path
        )
    gc = {k: (found.get(k) if found.get(k) is not None else v) for k, v in _HF_DEFAULTS.items()}
    penalty = float(gc["repetition_penalty"])
    if not gc["do_sample"]:
        return {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": penalty}
    return {
        "temperature": float(gc["temperature"]),
        "top_p": float(gc["top_p"]),
        "top_k": int(gc["top_k"]),
        "repetition_penalty": penalty,
    }
