"""A weight-sync member in its own process, driven over a pipe: what a rollout worker does with the weight-sync
group (actors/worker.py: weight_sync_join / weight_sync_receive run through its `Abandonable`, weight_sync_abort
abandons a generation from another thread and starts the next one with a fresh receiver), without an engine.

Commands (tuples sent by the test): ("join", GroupInfo dict), ("receive", None), ("abandon", generation),
("stop", None). Every join / receive runs in its own thread, so an abandon arrives while one is blocked. Replies:
("joined", rank) | ("received", version, {name: sha256}) | ("abandoned", {"aborted", "unabortable"}) |
("failed", exception class name, message).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import threading
from typing import Any

import torch


def digests(named) -> dict[str, str]:
    return {
        n: hashlib.sha256(
            t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        ).hexdigest()
        for n, t in named
    }


def member_main(name: str, conn: Any, cuda_device: int | None = None) -> None:
    """The member's loop (a multiprocessing target): until ("stop", None) or the pipe closes. cuda_device: the
    GPU an NCCL member receives on."""
    from runtime.weights.abandon import Abandonable
    from runtime.weights.collective import DistributedWeightReceiver

    torch.set_num_threads(1)
    if cuda_device is not None:
        torch.cuda.set_device(cuda_device)
    sync = Abandonable()
    state: dict[str, Any] = {"receiver": None}
    lock = threading.Lock()

    def reply(*msg: Any) -> None:
        with lock:
            conn.send(msg)

    def join(info: dict) -> None:
        receiver = state["receiver"] = DistributedWeightReceiver(name)  # a fresh one per generation
        reply("joined", sync.run(info["generation"], lambda: receiver.join(info), "joining"))

    def receive(_: Any) -> None:
        receiver = state["receiver"]
        version, named = sync.run(receiver.info.generation, receiver.receive, "receiving")
        reply("received", version, digests(named))

    def guarded(fn, arg) -> None:
        try:
            fn(arg)
        except Exception as err:
            reply("failed", type(err).__name__, str(err))

    while True:
        try:
            cmd, arg = conn.recv()
        except EOFError:
            return
        if cmd == "stop":
            return
        if cmd == "abandon":
            sync.abandon(arg)
            reply("abandoned", {"aborted": sync.aborted, "unabortable": sync.unabortable})
            continue
        fn = {"join": join, "receive": receive}[cmd]
        threading.Thread(target=guarded, args=(fn, arg), name=f"member-{cmd}", daemon=True).start()


def spawn_member(name: str, cuda_device: int | None = None) -> tuple[Any, Any]:
    """(the member's process, the test's end of its pipe)."""
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=member_main, args=(name, theirs, cuda_device), name=name, daemon=True)
    proc.start()
    return proc, ours


def replies(conn: Any, n: int, timeout: float = 120.0) -> dict[str, tuple]:
    """The member's next n replies, by tag (their order between two threads of the member is not fixed)."""
    out: dict[str, tuple] = {}
    for _ in range(n):
        if not conn.poll(timeout):
            raise AssertionError(f"the member did not reply within {timeout:.0f} s (got {out})")
        msg = conn.recv()
        out[msg[0]] = msg
    return out
