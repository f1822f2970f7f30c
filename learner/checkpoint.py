"""Checkpoints: the policy as a plain Hugging Face folder, optimiser state, and a JSON of the run state.

Layout of `<checkpoint.dir>/step-000050/`:
    policy/              config.json + model.safetensors (or model-0000i-of-0000n.safetensors + index) +
                         tokenizer/processor files: transformers and vLLM load it as is
                         (`from_pretrained(".../policy")`); full tensors, whatever the learner's world size
    optimizer/           the optimiser state as a torch.distributed.checkpoint (DCP) folder: fully qualified
                         parameter names, each rank's shards (.distcp) + .metadata; it loads into a learner of
                         any world size (DCP reshards), 1 included (DCP needs no process group)
    state.json           step, policy_version, data cursor, RNG states (python, numpy, torch, cuda) of rank 0
                         ("rng") and of every rank ("rng_ranks"), extra
    adapter.safetensors  (LoRA only) the adapters, full tensors under their live names

Checkpoints written before the sharded learner (optimizer.safetensors + optimizer.json, by parameter index) are
still read, by a 1-rank learner.

`<checkpoint.dir>/best.json` (checkpoint.keep_best) names the checkpoint with the best validation metric so far
({"step", "path", "metric", "value"}); pruning never deletes it, nor the steps a save is told to `protect` (those
whose validation is still running). Resuming from a step before the newest one moves the later step-* folders to
`superseded/`, so the continued run's checkpoints are the newest again.

Written atomically: everything goes to a hidden temporary folder that rank 0 syncs to disk (fsync, files and
folders) and renames into place last, after every rank wrote its part, so a `step-*` folder is always complete: a
killed process or a crashed machine leaves only a `.tmp-*` folder, removed by the next save. A write that fails
(disk full, quota, permissions) raises CheckpointError naming the checkpoint, the cause and the newest complete
checkpoint, which is untouched. Resuming takes the newest COMPLETE checkpoint (`checkpoint_problems`): a step-*
folder copied in part or damaged by hand is skipped with a warning, and named with what it lacks when asked for. Nothing is unpickled but DCP's own .metadata file, which DCP writes and reads
itself; tensors are safetensors or DCP shards, everything else JSON.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import logging
import os
import random
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from learner.sharding import barrier, broadcast_object, gather_objects, together

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Files of a source model folder that are weights (never copied next to freshly saved weights).
_WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.safetensors\.index\.json|\.bin\.index\.json)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the path and what to do."""


# ------------------------------------------------------------------------------------------------------------
# RNG states as JSON


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """Python, numpy (global), torch and CUDA generator states, JSON-safe."""
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def rank_rng(state: dict, rank: int) -> dict:
    """The RNG states `rank` saved (rank 0's for a rank the saving group did not have)."""
    ranks = state.get("rng_ranks") or []
    return ranks[rank] if rank < len(ranks) else state["rng"]


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# ------------------------------------------------------------------------------------------------------------
# Optimiser state as safetensors + JSON


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}/{key}"] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    meta = {"param_groups": sd["param_groups"], "scalars": scalars, "class": type(optimizer).__name__}
    (folder / "optimizer.json").write_text(json.dumps(meta, indent=1))


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    meta = json.loads((folder / "optimizer.json").read_text())
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointError(
            f"{folder}/optimizer.json holds {meta.get('class')} state but the learner uses "
            f"{type(optimizer).__name__}; resume with the same optimiser or start fresh"
        )
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(load_file(str(folder / "optimizer.safetensors")).items()) + list(
        meta["scalars"].items()
    ):
        pid, key = flat.split("/", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


OPTIMIZER_DIR = "optimizer"


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it assumes a single process when there is no process group: that is the 1-rank learner."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def save_optimizer_state(model, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The optimiser state under fully qualified parameter names, every rank its shards (DCP). COLLECTIVE."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save({"optimizer": sd}, checkpoint_id=str(folder / OPTIMIZER_DIR))


def load_optimizer_state(model, optimizer: torch.optim.Optimizer, folder: Path, world_size: int = 1) -> None:
    """Load a DCP optimiser state written by a learner of any world size into this one's shards (COLLECTIVE),
    or an optimizer.safetensors + .json written before the sharded learner (1 rank only)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    if not (folder / OPTIMIZER_DIR).is_dir():
        if (folder / "optimizer.json").is_file() and world_size == 1:
            load_optimizer(optimizer, folder)
            return
        raise CheckpointError(
            f"{folder} has no {OPTIMIZER_DIR}/ (DCP) optimiser state"
            + (
                " (its optimizer.json is by parameter index: resume it with learner.world_size=1)"
                if world_size > 1
                else ""
            )
        )
    sd = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # allocates the state when it is empty
    with _single_process_quiet():
        dcp.load(sd, checkpoint_id=str(folder / OPTIMIZER_DIR))
    set_optimizer_state_dict(model, optimizer, sd["optimizer"])


# ------------------------------------------------------------------------------------------------------------
# The policy folder


def save_policy(model, folder: Path, source: str | None = None, processor=None) -> None:
    """model.save_pretrained (safetensors) + the tokenizer/processor files of the source folder (copied as is,
    so the saved folder loads exactly like the one training started from), else processor.save_pretrained."""
    from transformers.utils import logging as hf_logging

    folder.mkdir(parents=True, exist_ok=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(folder))  # safetensors
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    src = Path(source) if source else None
    if src is not None and src.is_dir():
        for f in src.iterdir():
            if f.is_file() and not _WEIGHT_FILE.search(f.name) and not (folder / f.name).exists():
                shutil.copy2(f, folder / f.name)
    elif processor is not None:
        processor.save_pretrained(str(folder))


# ------------------------------------------------------------------------------------------------------------
# Whole checkpoints


def step_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under root. A newer step-* folder that is not complete (copied in part,
    damaged by hand: this module's saves never leave one) is skipped with a warning that says what it lacks."""
    for _, folder in reversed(step_dirs(root)):
        problems = checkpoint_problems(folder)
        if not problems:
            return folder
        logger.warning("skipping %s, not a complete checkpoint: %s", folder, "; ".join(problems))
    return None


def checkpoint_problems(folder: str | Path) -> list[str]:
    """What `folder` lacks to be resumed from; empty when it is a complete checkpoint of this format."""
    folder = Path(folder)
    problems = []
    try:
        state = json.loads((folder / "state.json").read_text())
        if state.get("format_version") != FORMAT_VERSION:
            problems.append(
                f"state.json is format {state.get('format_version')}, not {FORMAT_VERSION} (written by another "
                "version of this project; start from its policy/ folder instead: model.policy=.../policy)"
            )
    except (OSError, ValueError) as err:
        problems.append(f"no readable state.json ({type(err).__name__}: {err})")
    policy = folder / "policy"
    if not (policy / "config.json").is_file():
        problems.append("no policy/config.json")
    if not any(policy.glob("*.safetensors")):
        problems.append("no policy/*.safetensors")
    if not ((folder / OPTIMIZER_DIR / ".metadata").is_file() or (folder / "optimizer.json").is_file()):
        problems.append(f"no optimiser state ({OPTIMIZER_DIR}/.metadata)")
    return problems


BEST_FILE = "best.json"


def _write_json_atomic(path: Path, body: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(body, indent=1))
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def read_best(root: str | Path) -> dict | None:
    """The best.json record under root ({"step", "path", "metric", "value"}), None when there is none."""
    p = Path(root) / BEST_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def mark_best(root: str | Path, step: int, metric: str, value: float) -> Path:
    """Record step-<step> (which must exist) as the best checkpoint; it survives pruning from now on."""
    folder = Path(root) / f"step-{step:06d}"
    if not (folder / "state.json").is_file():
        raise CheckpointError(
            f"{folder} does not exist, so it cannot be kept as the best checkpoint; the driver saves one at "
            "every validated step when checkpoint.keep_best is set"
        )
    _write_json_atomic(
        Path(root) / BEST_FILE, {"step": step, "path": folder.name, "metric": metric, "value": value}
    )
    return folder


def best_checkpoint(root: str | Path) -> Path | None:
    """The folder best.json names, None when there is no best.json (or its folder is gone)."""
    best = read_best(root)
    folder = Path(root) / best["path"] if best else None
    return folder if folder is not None and folder.is_dir() else None


def supersede_after(root: str | Path, step: int) -> list[Path]:
    """Move the step-* folders after `step` to <root>/superseded/ (resuming from an earlier checkpoint): the
    resumed run's saves are the newest again and nothing is deleted. Returns their new paths."""
    moved = []
    for s, folder in step_dirs(root):
        if s > step:
            dest = Path(root) / "superseded" / f"{folder.name}-{uuid.uuid4().hex[:8]}"
            dest.parent.mkdir(exist_ok=True)
            os.rename(folder, dest)
            moved.append(dest)
    return moved


def prune(root: str | Path, keep: int, protect: frozenset[int] | set[int] = frozenset()) -> None:
    """Delete all but the newest `keep` complete checkpoints, sparing the best one and the `protect`ed steps (a
    step-* folder that is not complete is not counted, nor deleted: it is not this run's)."""
    best = read_best(root)
    spared = set(protect) | ({int(best["step"])} if best else set())
    complete = [(s, p) for s, p in step_dirs(root) if not checkpoint_problems(p)]
    for s, old in complete[:-keep] if keep > 0 else []:
        if s not in spared:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    root: str | Path,
    step: int,
    state: dict,
    write_policy,
    write_optimizer=None,
    keep: int = 2,
    protect: frozenset[int] | set[int] = frozenset(),
    rank: int = 0,
    world_size: int = 1,
) -> Path:
    """Write `<root>/step-<step>` atomically and keep the newest `keep` checkpoints (plus the best and the
    `protect`ed steps, see `prune`). COLLECTIVE when world_size > 1: every rank calls it; rank 0 owns the folder.

    state: JSON-safe dict (step, policy_version, data_cursor, ...); the RNG states are added here.
    write_policy(folder): writes the HF policy folder (e.g. `lambda f: save_policy(model, f, source)`).
    write_optimizer(folder): writes the optimiser state into the checkpoint folder (save_optimizer_state).
    """
    root, final = Path(root), Path(root) / f"step-{step:06d}"
    tmp = None
    try:
        tmp = together(
            lambda: _make_tmp(root, step) if rank == 0 else None, world_size, "creating the folder"
        )
        tmp = broadcast_object(tmp, world_size)
        together(lambda: write_policy(tmp / "policy"), world_size, "writing the policy folder")
        if write_optimizer is not None:
            together(lambda: write_optimizer(tmp), world_size, "writing the optimiser state")
        rngs = gather_objects(rng_state(), world_size)
        full = {"format_version": FORMAT_VERSION, **state, "step": step, "rng": rngs[0], "rng_ranks": rngs}

        def publish() -> None:  # rank 0, once every rank's part is written
            if rank == 0:
                (tmp / "state.json").write_text(json.dumps(full, indent=1))
                _sync_tree(tmp)
                _replace(root, tmp, final)

        together(publish, world_size, "publishing the checkpoint")
    except BaseException as err:
        if rank == 0 and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception) and not isinstance(err, CheckpointError):
            raise CheckpointError(_write_failed(root, final, keep, err)) from err
        raise
    if rank == 0:
        prune(root, keep, protect)
    barrier(world_size)  # no rank returns a path that is not there yet
    return final


def _make_tmp(root: Path, step: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".tmp-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = root / f".tmp-step-{step:06d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _replace(root: Path, tmp: Path, final: Path) -> None:
    if final.exists():  # re-saving the same step: move the old one aside, then replace it
        old = root / f".tmp-step-old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(tmp, final)
    _fsync(root)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`: once it is renamed into place, a machine that crashes (not
    only a killed process) still finds it whole. Rank 0 syncs what every rank wrote: one page cache on one node;
    across nodes the shared filesystem has each writer's data once it closed its files (close-to-open)."""
    for dirpath, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def _errno(err: BaseException) -> int | None:
    """The OS error number behind `err`: an OSError in its chain, or one quoted in its message (safetensors
    raises SafetensorError "I/O error: No space left on device (os error 28)"; another rank's error comes as
    text, learner.sharding.together)."""
    for e in (err, err.__cause__, err.__context__):
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
    m = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(err))
    return int(m.group(1) or m.group(2)) if m else None


def _write_failed(root: Path, final: Path, keep: int, err: Exception) -> str:
    """The message of a failed save: which checkpoint, why, what is still there and what to do."""
    code = _errno(err)
    if code in _NO_SPACE:
        fix = (
            f"free space under {root}, or point checkpoint.dir at a larger volume (checkpoint.keep={keep} "
            "checkpoints are kept, plus the best one)"
        )
    elif code in _NOT_WRITABLE:
        fix = f"make {root} writable by the learner"
    else:
        fix = "fix the cause above"
    previous = latest_checkpoint(root)
    kept = (
        f"the newest complete checkpoint is still {previous}"
        if previous
        else "there is no earlier checkpoint"
    )
    return (
        f"checkpoint {final} was not written: {type(err).__name__}: {err}. Nothing of it was kept and {kept}; "
        f"{fix}, then continue the run with --resume"
    )


def read_state(path: str | Path) -> dict:
    """state.json of a checkpoint folder (step, policy_version, data_cursor, rng, ...)."""
    problems = checkpoint_problems(path)
    if problems:
        raise CheckpointError(
            f"{path} is not a complete checkpoint: {'; '.join(problems)}; pass a complete step-* folder under "
            "checkpoint.dir, or resume from the latest complete one (--resume)"
        )
    return json.loads((Path(path) / "state.json").read_text())
