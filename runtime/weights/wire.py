"""The weight-sync group and its wire format: what the learner (rank 0) and the rollout workers (ranks 1..n)
exchange over a stand-alone torch.distributed process group (gloo on CPU, NCCL on GPU).

Every message starts with a header: its length (one int64 broadcast), then JSON bytes (one uint8 broadcast) with
`op` a `WireOp` value and the op's fields. One version travels as

    header (op, manifest)  ->  the op's payload (buckets, shared-memory chunks or CUDA IPC handles)
                           ->  ack (all-reduce MIN of the version every member staged; -1 from a failed one)

Group membership changes at a version boundary: the learner's `SenderGroup.prepare(members)` opens a fresh
rendezvous (TCPStore on a free port, generation g+1) and returns a `GroupInfo`; every member (old and new) joins it
with `join_group(info, rank)` while the learner calls `SenderGroup.connect()`, and the old group is dropped.
Groups are not the default process group, so they coexist with the learner's FSDP group.

A generation given up because a member is gone (runtime/weights/abandon.py) is aborted where the backend can
(`abort_group`): NCCL yes, gloo no (see ABORTABLE_BACKENDS).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import torch
import torch.distributed as dist

from runtime.weights.layout import WeightSyncError

logger = logging.getLogger(__name__)


class WireOp(StrEnum):
    """The `op` of a header: what follows it on the wire."""

    WEIGHTS = "weights"  # every bucket broadcast over the group (collective.py)
    WEIGHTS_SHM = "weights-shm"  # buckets in the learner's /dev/shm segments, chunk announcements (shm.py)
    WEIGHTS_IPC = "weights-ipc"  # CUDA IPC handles of the learner's GPU buckets (cuda_ipc.py)
    PER_PARAM = "per-param"  # benchmark baseline: one header and one broadcast per tensor (collective.py)
    PROBE = "probe"  # can every member map the learner's shared memory? (shm.py)
    CLOSE = "close"  # the stream ended: a member's receive() returns None


@dataclass(frozen=True)
class GroupInfo:
    """Everything a member needs to join one generation of the weight-sync group (plain data: travels over Ray)."""

    host: str
    port: int
    world_size: int
    generation: int
    backend: str
    ranks: dict[str, int] = field(default_factory=dict)  # member name -> rank (1..world_size-1)
    timeout_s: float = 1800.0
    shm_probe: bool = False  # right after connecting, test whether every member maps the learner's /dev/shm

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> GroupInfo:
        return cls(**dict(d))


def open_store(host: str, port: int, world_size: int, is_master: bool, timeout_s: float) -> dist.Store:
    return dist.TCPStore(
        host,
        port,
        world_size,
        is_master,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def make_group(store: dist.Store, info: GroupInfo, rank: int):
    """A stand-alone process group (not the default group) for one generation; blocks until all ranks joined
    (gloo; NCCL connects at its first collective). Handed to the `formed_groups` sink of this thread, if any."""
    prefixed = dist.PrefixStore(f"segr1-weights-{info.generation}", store)
    timeout = datetime.timedelta(seconds=info.timeout_s)
    if info.backend == "gloo":
        pg = dist.ProcessGroupGloo(prefixed, rank, info.world_size, timeout)
    elif info.backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(prefixed, rank, info.world_size, opts)
    else:
        raise WeightSyncError(
            f"weight_sync backend {info.backend!r} is not a process-group backend (gloo, nccl)"
        )
    sink = getattr(_forming, "sink", None)
    if sink is not None:
        sink(pg)
    return pg


# Backends whose abort() ends an operation in flight, as of torch 2.13 (torch/csrc/distributed/c10d/*.hpp):
# - ProcessGroupNCCL overrides Backend::abort(): ncclCommAbort on its communicators. A kernel waiting for a lost
#   peer exits, so the CUDA streams made to wait on it (`work.wait()` blocks a stream, not the CPU) run again, and
#   its watchdog stops instead of tearing the process down after timeout_s (TORCH_NCCL_ASYNC_ERROR_HANDLING).
# - ProcessGroupGloo inherits Backend::abort(), which does nothing (only its point-to-point send/recv works can be
#   aborted; the wire uses collectives): a blocked gloo call runs to its timeout in the thread it was left in. On
#   the CPU it holds that thread and the group's buffers, no device stream.
ABORTABLE_BACKENDS = frozenset({"nccl"})

_forming = threading.local()  # .sink: called with every group this thread makes (formed_groups)
_aborted: weakref.WeakSet = weakref.WeakSet()  # groups abort_group() aborted (aborting twice does nothing)


@contextlib.contextmanager
def formed_groups(sink: Callable[[Any], None]) -> Iterator[None]:
    """Within the block, every group this thread makes (make_group) is also handed to `sink(pg)`: how
    runtime/weights/abandon.py learns which communicators a generation's calls created, on either end."""
    previous = getattr(_forming, "sink", None)
    _forming.sink = sink
    try:
        yield
    finally:
        _forming.sink = previous


def can_abort(pg) -> bool:
    return pg is not None and pg.name() in ABORTABLE_BACKENDS


def abort_group(pg) -> bool:
    """End `pg`'s communicator now (one of its members is gone), without talking to the other members. True
    when it is aborted (every pending and later call on it fails), False when its backend cannot abort (gloo:
    a call blocked on it ends at the group's timeout)."""
    if not can_abort(pg):
        return False
    if pg in _aborted:
        return True
    try:
        pg.abort()
    except Exception as err:  # an abort that fails leaves the group to its timeout, as gloo's
        logger.warning("aborting the weight-sync group (%s) failed: %s", pg.name(), err)
        return False
    _aborted.add(pg)
    return True


def join_group(info: GroupInfo, rank: int) -> tuple[dist.Store, Any]:
    """Member side of the rendezvous: (store, process group) of generation info.generation, as `rank`."""
    store = open_store(info.host, info.port, info.world_size, False, info.timeout_s)
    return store, make_group(store, info, rank)


def group_device(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def broadcast(pg, tensor: torch.Tensor, src: int = 0):
    """Start a broadcast from rank src; returns the Work handle (call .wait())."""
    opts = dist.BroadcastOptions()
    opts.rootRank = src
    opts.rootTensor = 0
    return pg.broadcast([tensor], opts)


def send_header(pg, device: torch.device, header: Mapping[str, Any]) -> None:
    """Broadcast one JSON message: its length, then its bytes."""
    payload = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8).to(device)  # (n,)
    broadcast(pg, torch.tensor([payload.numel()], dtype=torch.int64, device=device)).wait()
    broadcast(pg, payload).wait()


def recv_header(pg, device: torch.device) -> dict:
    n = torch.zeros(1, dtype=torch.int64, device=device)
    broadcast(pg, n).wait()
    payload = torch.empty(int(n.item()), dtype=torch.uint8, device=device)  # (n,)
    broadcast(pg, payload).wait()
    return json.loads(bytes(payload.cpu().numpy()).decode())


def send_op(pg, device: torch.device, op: WireOp, **fields: Any) -> None:
    """A header announcing `op` with its fields (JSON-safe values)."""
    send_header(pg, device, {"op": op.value, **fields})


def recv_op(pg, device: torch.device) -> tuple[WireOp, dict]:
    """The next header: its op and the whole header."""
    header = recv_header(pg, device)
    try:
        return WireOp(header.get("op")), header
    except ValueError:
        raise WeightSyncError(
            f"unknown weight-sync op {header.get('op')!r} from the learner (protocol mismatch?)"
        ) from None


def all_min(pg, device: torch.device, value: int) -> int:
    """All-reduce MIN of one integer: the ack that every member holds a version (-1 from a failed member)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MIN
    pg.allreduce([t], opts).wait()
    return int(t.item())


def check_ack(pg, device: torch.device, version: int, what: str) -> None:
    """Learner side of the ack: raises when a member did not `what` (e.g. "stage weights") `version`."""
    acked = all_min(pg, device, version)
    if acked != version:
        raise WeightSyncError(f"a rollout worker failed to {what} version {version} (ack {acked})")


class SenderGroup:
    """The learner's side (rank 0) of the weight-sync group: one generation at a time."""

    def __init__(self, backend: str, host: str, timeout_s: float):
        self.backend, self.host, self.timeout_s = backend, host, timeout_s
        self.generation = 0
        self.info: GroupInfo | None = None
        self.pg = None  # the connected process group; None before connect() and after close()
        self._store = None
        self._pending: tuple[dist.Store, GroupInfo] | None = None

    @property
    def device(self) -> torch.device:
        return group_device(self.backend)

    def prepare(self, members: Sequence[str], shm_probe: bool = False) -> GroupInfo:
        """Open the rendezvous of a new generation for `members` (ranks 1..n in that order); non-blocking."""
        if len(set(members)) != len(members) or not members:
            raise WeightSyncError(f"weight-sync members must be distinct and non-empty, got {list(members)}")
        self.generation += 1
        store = open_store(self.host, 0, len(members) + 1, True, self.timeout_s)
        ranks = {m: i + 1 for i, m in enumerate(members)}
        info = GroupInfo(
            self.host,
            store.port,
            len(members) + 1,
            self.generation,
            self.backend,
            ranks,
            self.timeout_s,
            shm_probe,
        )
        self._pending = (store, info)
        return info

    def connect(self):
        """Blocks until every member of the prepared generation joined; returns the new process group."""
        if self._pending is None:
            raise WeightSyncError("connect() before prepare(members): open a generation first")
        pending = self._pending
        store, info = pending
        pg = make_group(store, info, 0)
        if self._pending is not pending:  # abandon() (or a newer prepare) happened while this one formed
            abort_group(pg)
            raise WeightSyncError(f"weight-sync generation {info.generation} was abandoned while forming")
        self._store, self.pg, self.info, self._pending = store, pg, info, None
        return pg

    def abandon(self) -> bool:
        """Drop the generation being formed or used without talking to its members (one of them is gone), and
        abort its communicator where the backend can (abort_group): a call blocked on it then fails at once.
        Returns whether it was aborted (False for gloo, or before the group exists: a call still blocked on it
        keeps only its own reference). The generation count goes on."""
        pg, self.pg, self._store, self._pending = self.pg, None, None, None
        return abort_group(pg)

    def require(self):
        if self.pg is None:
            raise WeightSyncError("weight-sync group not connected: call prepare(members), then connect()")
        return self.pg

    def close(self, notify: bool = False) -> None:
        """Drop the group. notify=True first tells every member the stream ended (their blocked receive()
        returns None); it blocks until each member is in receive()."""
        if self.pg is not None:
            try:
                if notify:
                    send_op(self.pg, self.device, WireOp.CLOSE)
            finally:
                self.pg = None
                self._store = None
