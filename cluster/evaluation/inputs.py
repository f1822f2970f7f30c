"""What an evaluation reads: the samples of a data set, and the policy folder a `--checkpoint` names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from protos import Sample

POLICY_DIR = "policy"  # the Hugging Face folder inside a step-* checkpoint (learner/checkpoint.py)


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
    step's policy/); raises FileNotFoundError naming the three layouts otherwise."""
    from learner.checkpoint import latest_checkpoint

    root = Path(checkpoint)
    given = root.resolve()
    name = given.parent.name if given.name == POLICY_DIR else given.name
    latest = latest_checkpoint(root)
    for folder in (root, root / POLICY_DIR, latest / POLICY_DIR if latest is not None else None):
        if folder is not None and (folder / "config.json").is_file():
            return PolicyCheckpoint(str(folder), name)
    raise FileNotFoundError(
        f"--checkpoint {root} is not a model folder (config.json), a checkpoint (policy/config.json) or a "
        "checkpoint root (step-*/policy/)"
    )
