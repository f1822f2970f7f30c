"""Continuous batching across threads for an engine stepped in this process (`VLLMEngine`).

`vllm.LLM.generate` runs the engine until every unfinished request is done, so two threads calling it would either
serialise (a lock) or step each other's requests. `SharedSteps` lets concurrent callers share one engine loop
instead: each call adds its requests, one caller at a time (the leader) steps the engine, finished outputs go to
their callers as they finish, and a caller whose requests are all done returns at once while the others go on; the
next caller with requests left takes over the stepping. So the requests of an async GRPO worker's two in-flight
calls run in the same engine steps, as vLLM's AsyncLLM would run them, without its engine-core process.

`ReadWriteGate` keeps weight updates out of generation: calls enter as readers, an update as the writer, which waits
for the calls in flight and holds new ones back (writer preference), so no request ever spans two versions.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any


class ReadWriteGate:
    """Readers run together; a writer runs alone, and once it waits no new reader enters."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class _Call:
    def __init__(self, prompts: Sequence[Any], params: Sequence[Any]):
        self.ids = [uuid.uuid4().hex for _ in prompts]
        self.prompts, self.params = prompts, params
        self.error: BaseException | None = None


class SharedSteps:
    """`run(prompts, params)` -> the finished output of each prompt, in order; callable from many threads.

    add(request_id, prompt, params) puts one request into the engine, abort(request_ids) takes requests out, and
    step() advances every request in the engine by one step and returns outputs (`.request_id`, `.finished`).
    Only the leader calls them; the lock is held only to hand work and outputs over, never during a step."""

    def __init__(
        self,
        add: Callable[[str, Any, Any], None],
        abort: Callable[[list[str]], None],
        step: Callable[[], list[Any]],
    ):
        self._add, self._abort, self._step = add, abort, step
        self._cond = threading.Condition()
        self._incoming: list[_Call] = []  # calls whose requests are not in the engine yet
        self._pending: list[_Call] = []  # calls waiting for outputs (a step's error goes to each)
        self._finished: dict[str, Any] = {}
        self._stepping = False
        self._running = 0  # requests in the engine (changed by the leader only)
        self.max_running = 0  # most requests in the engine at once (how many calls' requests shared steps)

    def run(self, prompts: Sequence[Any], params: Sequence[Any]) -> list[Any]:
        call = _Call(prompts, params)
        with self._cond:
            self._incoming.append(call)
            self._pending.append(call)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._done(call) or not self._stepping)
            lead = not self._done(call)
            if lead:
                self._stepping = True
        try:
            if lead:
                self._lead(call)
        finally:
            with self._cond:
                if lead:
                    self._stepping = False
                    self._cond.notify_all()
                self._pending.remove(call)
                outputs = [self._finished.pop(i, None) for i in call.ids]
        if call.error is not None:
            raise call.error
        return outputs

    def _done(self, call: _Call) -> bool:
        return call.error is not None or all(i in self._finished for i in call.ids)

    def _lead(self, call: _Call) -> None:
        """Step the engine until `call` is done (its outputs or its error)."""
        while True:
            with self._cond:
                if self._done(call):
                    return
                admitted, self._incoming = self._incoming, []
            self._running += sum(self._admit(c) for c in admitted)
            if call.error is not None:
                return
            try:
                outputs = self._step()
            except BaseException as error:  # the engine broke: every caller waiting on it learns why
                with self._cond:
                    for c in self._pending:
                        c.error = c.error or error
                    self._cond.notify_all()
                raise
            self.max_running = max(self.max_running, self._running)
            with self._cond:
                for out in outputs:
                    if out.finished:
                        self._finished[out.request_id] = out
                        self._running -= 1
                self._cond.notify_all()

    def _admit(self, call: _Call) -> int:
        """Add `call`'s requests; on a bad one, abort those added and give the call the error. Returns how many
        are in the engine."""
        added: list[str] = []
        try:
            for request_id, prompt, params in zip(call.ids, call.prompts, call.params, strict=True):
                self._add(request_id, prompt, params)
                added.append(request_id)
        except Exception as error:
            if added:
                self._abort(added)
            with self._cond:
                call.error = error
                self._cond.notify_all()
            return 0
        return len(added)
