"""A pool of named Ray actors that never loses work.

`ActorPool` dispatches keyed work items to the least-loaded live actor (at most `max_inflight` per actor:
backpressure, the rest waits in a FIFO queue), and returns exactly one result per key. When an actor dies
(killed by name, OOM, node lost), its in-flight items go back to the front of the queue, a replacement with the
same name is started (and `on_start` runs on it before it serves: e.g. pushing the current weights), and the
items are answered by whichever actor takes them next. No item goes to an actor before it is up (placed and
constructed): one that is never placed holds no work. When the pool is given `capacity` (how many of its
actors the cluster can hold now: cluster/pools/capacity.py) and the cluster has no room left for the dead actor (its
node was drained or removed), the actor is dropped instead: its work goes to the others, it does not count
towards crash-loop detection, and the pool is grown again when capacity returns. An application error may be repaired by `on_error`
(e.g. a rollout worker with stale weights is resynced) and the item retried; other errors are returned as
`WorkFailed` for that key, never raised out of the pool, never lost.

The pool is driven from one thread (the driver loop). It only calls actor methods through the callables it is
given; creating actors (`spawn`) is cluster/pools/topology.py's job.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

logger = logging.getLogger(__name__)

Call = Callable[[Any], "ray.ObjectRef"]  # actor handle -> ObjectRef of the method's result
DEATH = (RayActorError, ActorDiedError, ActorUnavailableError)  # how Ray reports a dead actor's call


def lost_object(err: BaseException | None) -> bool:
    """The call failed because an object it was given is gone (the node that held its only copy died), not
    because of anything the actor did: what it was computing from has to be made again."""
    from ray.exceptions import ObjectLostError

    while isinstance(err, BaseException):
        if isinstance(err, ObjectLostError):
            return True
        cause = getattr(err, "cause", None)  # RayTaskError's; other errors may name a text `cause`
        err = cause if isinstance(cause, BaseException) else err.__cause__
    return False


@dataclass
class WorkFailed:
    """The result of a key whose call raised an application error that was not repaired."""

    key: Hashable
    error: BaseException
    attempts: int


@dataclass
class _Item:
    key: Hashable
    call: Call
    attempts: int = 0
    prefer: str | None = None  # the member to run it on when it has room (what it needs is cached there)


@dataclass
class _Member:
    name: str
    handle: Any
    inflight: dict = field(default_factory=dict)  # ObjectRef -> _Item
    ready_ref: Any = None  # the actor's start (placement, __init__, on_start): serves only once this resolves
    draining: bool = False
    deaths: int = 0  # consecutive deaths of this name without a completed item (crash-loop detection)
    first_death: float = 0.0  # time.monotonic() of the first of them
    dispatched: int = 0  # items ever sent: ties in load go to the actor that has had the least work


RESTART_BACKOFF_S = (
    0.0,
    0.5,
    1.0,
    2.0,
    4.0,
    8.0,
)  # before the 1st, 2nd, ... restart of a name in a row (8 s on)
CRASH_LOOP_S = 60.0  # a name that keeps dying this long without finishing anything is a crash loop
# Ray's words (ray/exceptions.py, ActorDiedError) for an actor killed, or whose node was lost, before it was
# placed: its code never ran, so its death is no sign of a crash loop (the only place Ray records it)
NEVER_RAN = "The actor never ran"


@dataclass
class _Restart:
    """A dead actor's replacement, started once `due` (time.monotonic()) has come."""

    due: float
    deaths: int
    first_death: float


class PoolError(RuntimeError):
    """The pool cannot make progress: an actor keeps dying before it finishes any work (crash loop)."""


@dataclass
class PoolStats:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    retries: int = 0
    restarts: int = 0
    dropped: int = 0  # actors that died with no capacity left for them, not restarted


class ActorPool:
    def __init__(
        self,
        prefix: str,
        spawn: Callable[[str], Any],
        size: int,
        *,
        max_inflight: int = 2,
        on_start: Callable[[Any], list] | None = None,
        on_error: Callable[[Any, BaseException], bool] | None = None,
        max_attempts: int = 5,
        max_consecutive_deaths: int = 3,
        crash_loop_s: float = CRASH_LOOP_S,
        capacity: Callable[[], int | None] | None = None,
    ):
        if size < 1:
            raise ValueError(f"{prefix} pool size must be >= 1, got {size}")
        self.prefix = prefix
        self._spawn = spawn
        self._on_start = on_start
        self._on_error = on_error
        self._capacity = capacity
        self.max_inflight = max_inflight
        self.max_attempts = max_attempts
        self.max_consecutive_deaths, self.crash_loop_s = max_consecutive_deaths, crash_loop_s
        self._restarts: dict[str, _Restart] = {}  # dead actors waiting out their backoff
        self.stats = PoolStats()
        self._queue: deque[_Item] = deque()
        self._members: dict[str, _Member] = {}
        self._done: deque[tuple[Hashable, Any]] = deque()
        self._next_index = 0
        for _ in range(size):
            self._add_member()

    # -- public API --------------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Actors that take new work (draining ones excluded; restarting ones included)."""
        return sum(not m.draining for m in self._members.values()) + len(self._restarts)

    @property
    def names(self) -> list[str]:
        return sorted([*(n for n, m in self._members.items() if not m.draining), *self._restarts])

    @property
    def pending(self) -> int:
        """Items submitted and not yet returned (queued + in flight + finished but not collected)."""
        inflight = sum(len(m.inflight) for m in self._members.values())
        return len(self._queue) + inflight + len(self._done)

    def waitables(self) -> list:
        """ObjectRefs the pool waits on (calls in flight, actors starting): `ray.wait` them together with other
        pools' to block until any of them has news, then `poll(timeout=0)` each."""
        return self._all_refs()

    def handles(self) -> dict[str, Any]:
        return {n: m.handle for n, m in self._members.items() if not m.draining}

    def serving(self) -> dict[str, Any]:
        """Actors taking work whose start (on_start) has finished: not one still waiting for a node or its
        weights (a weight-sync group formed with such an actor would wait for it)."""
        return {n: m.handle for n, m in self._members.items() if not m.draining and _started(m)}

    def wait_started(self, timeout: float | None = None) -> bool:
        """Block until every actor's start (placement, __init__, on_start) has finished or failed (a failure is
        the pool's to handle, as always: the actor is restarted when its work is dispatched). False when some
        were still starting after `timeout` seconds."""
        refs = [m.ready_ref for m in self._members.values() if not m.draining]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        return not pending

    def submit(self, key: Hashable, call: Call, prefer: str | None = None) -> None:
        """Queue `call(handle)` under `key`; `prefer`: the member to run it on when that one has room (e.g. the
        reward actor that holds an episode's image embedding), else the least loaded, as any other call."""
        self._queue.append(_Item(key, call, prefer=prefer))
        self.stats.submitted += 1
        self._dispatch()

    def poll(self, timeout: float | None = 0.0) -> list[tuple[Hashable, Any]]:
        """Results that are ready within `timeout` seconds (None: wait for at least one)."""
        self._dispatch()
        if not self._done:
            refs = self._all_refs()
            if refs:
                ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
                if ready:  # collect everything already finished, not just the first
                    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                    self._collect(ready)
            elif self._restarts and timeout != 0:  # nothing runs: wait for the next restart's turn
                due = min(r.due for r in self._restarts.values()) - time.monotonic()
                time.sleep(max(0.0, min(due, 1.0 if timeout is None else timeout)))
        out = list(self._done)
        self._done.clear()
        self._dispatch()
        return out

    def map(
        self, items: Iterable[tuple[Hashable, Call]], timeout: float | None = None
    ) -> dict[Hashable, Any]:
        """Submit every item and wait for all of them; results keyed as submitted."""
        keys = []
        for key, call in items:
            self.submit(key, call)
            keys.append(key)
        wanted = set(keys)
        results: dict[Hashable, Any] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while wanted - results.keys():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.prefix} pool: {len(wanted - results.keys())} items unanswered")
            for key, value in self.poll(timeout=1.0):
                results[key] = value
        return results

    def resize(self, n: int) -> None:
        """Grow to n actors (new ones run on_start before serving) or shrink by draining first the actors still
        starting (e.g. waiting for a node that is gone), then the newest ones."""
        if n < 1:
            raise ValueError(f"{self.prefix} pool cannot shrink below 1 actor (asked {n})")
        while self.size > n and self._restarts:  # the restarts waiting out their backoff go first
            self._restarts.pop(max(self._restarts, key=_index))
        while self.size < n:
            self._add_member()
        active = sorted(
            (m for m in self._members.values() if not m.draining),
            key=lambda m: (not _started(m), _index(m.name)),
        )
        for member in active[n:]:
            member.draining = True
            logger.info("%s: draining %s", self.prefix, member.name)
        self._reap_drained()
        self._dispatch()

    def broadcast(self, call: Call) -> dict[str, Any]:
        """Run `call` on every actor and wait (e.g. a weight update); a dead actor is restarted instead. With
        on_start, actors still starting are left out: their on_start brings them up to date before they serve;
        without, the call waits for them to start (Ray runs it once the actor is up)."""
        refs = {
            name: call(m.handle) for name, m in self._members.items() if self._on_start is None or _started(m)
        }
        out = {}
        for name, ref in refs.items():
            try:
                out[name] = ray.get(ref)
            except DEATH as err:
                self._replace(name, err)
        return out

    def discard_queued(self, which: Callable[[Hashable], bool]) -> list[Hashable]:
        """Drop the queued items (not yet sent to an actor) whose key `which` picks: their results are no longer
        wanted. Their keys, in queue order."""
        dropped = [item.key for item in self._queue if which(item.key)]
        self._queue = deque(item for item in self._queue if not which(item.key))
        return dropped

    def report_death(self, name: str, cause: BaseException) -> None:
        """The actor `name` was seen dead by a call outside the pool (e.g. the weight sync): replace it now."""
        if name in self._members:
            self._replace(name, cause)

    def shutdown(self) -> None:
        for m in self._members.values():
            ray.kill(m.handle, no_restart=True)
        self._members.clear()
        self._restarts.clear()

    # -- internals ---------------------------------------------------------------------------------------------
    def _add_member(self, name: str | None = None) -> None:
        if name is None:
            name = f"{self.prefix}-{self._next_index}"
            self._next_index += 1
        handle = self._spawn(name)
        member = _Member(name, handle)
        # Nothing is dispatched to an actor before it is up: an actor that is never placed (its node gone, no
        # room left) would otherwise hold its items forever. on_start's last ref, else Ray's own readiness call.
        refs = self._on_start(handle) if self._on_start is not None else []
        member.ready_ref = refs[-1] if refs else handle.__ray_ready__.remote()
        self._members[name] = member

    def _replace(self, name: str, cause: BaseException | None = None) -> None:
        """The actor `name` died: requeue its work first (order kept), then start a replacement."""
        member = self._members.pop(name)
        if not member.draining and self._no_room():
            self._requeue(member)
            self._kill(member)
            self.stats.dropped += 1
            logger.warning(
                "%s: actor %s died and the cluster has no capacity left for it (node drained or removed); "
                "dropped, its %d items re-issued to the other %d",
                self.prefix,
                name,
                len(member.inflight),
                self.size,
            )
            return
        now = time.monotonic()
        # an actor killed while it waited for its node never ran its code: its death is not its crash
        counted = cause is None or NEVER_RAN not in str(cause)
        deaths = member.deaths + counted
        first = member.first_death if member.deaths else now
        if counted and deaths >= self.max_consecutive_deaths and now - first >= self.crash_loop_s:
            raise PoolError(
                f"{self.prefix} pool: actor {name} died {deaths} times in a row in {now - first:.0f} s without "
                f"finishing any work; giving up. Last error: {cause}"
            ) from cause
        self._requeue(member)
        self._kill(member)
        self.stats.restarts += 1
        if member.draining:
            return
        # A restart that dies at once backs off: the node it was placed on may be lost and not yet known to be
        # (Ray sees a lost node within ~5-30 s); a crash loop is only called one after crash_loop_s.
        wait = RESTART_BACKOFF_S[min(deaths, len(RESTART_BACKOFF_S)) - 1] if deaths else 0.0
        logger.warning(
            "%s: actor %s died; restarting it%s and re-issuing %d items",
            self.prefix,
            name,
            f" in {wait:.1f} s" if wait else "",
            len(member.inflight),
        )
        self._restarts[name] = _Restart(now + wait, deaths, first)
        self._start_due()

    def _start_due(self) -> None:
        """Start the restarts whose backoff is over."""
        now = time.monotonic()
        for name in [n for n, r in self._restarts.items() if r.due <= now]:
            restart = self._restarts.pop(name)
            self._add_member(name)
            self._members[name].deaths, self._members[name].first_death = restart.deaths, restart.first_death

    def _no_room(self) -> bool:
        """The others (at least one) already fill what the cluster can hold of this pool."""
        others = self.size
        if self._capacity is None or others < 1:
            return False
        room = self._capacity()
        return room is not None and room <= others

    def _requeue(self, member: _Member) -> None:
        for item in reversed(list(member.inflight.values())):
            item.attempts += 1
            self.stats.retries += 1
            self._queue.appendleft(item)

    @staticmethod
    def _kill(member: _Member) -> None:
        try:
            ray.kill(member.handle, no_restart=True)
        except Exception:  # already gone
            pass

    def _all_refs(self) -> list:
        refs = []
        for m in self._members.values():
            refs.extend(m.inflight)
            if m.ready_ref is not None:
                refs.append(m.ready_ref)
        return refs

    def _dispatch(self) -> None:
        self._start_due()
        while self._queue:
            member = self._preferred(self._queue[0].prefer) or self._least_loaded()
            if member is None:
                return
            item = self._queue.popleft()
            member.inflight[item.call(member.handle)] = item
            member.dispatched += 1

    def _preferred(self, name: str | None) -> _Member | None:
        m = self._members.get(name) if name else None
        return m if m is not None and self._has_room(m) else None

    def _has_room(self, m: _Member) -> bool:
        if m.draining or len(m.inflight) >= self.max_inflight:
            return False
        return m.ready_ref is None or _resolved(m.ready_ref)

    def _least_loaded(self) -> _Member | None:
        best = None
        for m in self._members.values():
            if not self._has_room(m):
                continue
            if best is None or (len(m.inflight), m.dispatched) < (len(best.inflight), best.dispatched):
                best = m
        return best

    def _collect(self, ready: list) -> None:
        for ref in ready:
            owner = next((m for m in self._members.values() if ref in m.inflight or ref is m.ready_ref), None)
            if owner is None:
                continue
            if ref is owner.ready_ref:
                self._finish_start(owner)
                continue
            item = owner.inflight.pop(ref)
            try:
                value = ray.get(ref)
            except DEATH as err:
                owner.inflight[ref] = item  # requeued with the rest of the dead actor's work
                self._replace(owner.name, err)
                continue
            except Exception as err:  # application error inside the actor
                self._handle_error(owner, item, err)
                continue
            self.stats.completed += 1
            owner.deaths = 0
            self._done.append((item.key, value))
        self._reap_drained()

    def _finish_start(self, member: _Member) -> None:
        try:
            ray.get(member.ready_ref)
            member.ready_ref = None
        except DEATH as err:
            self._replace(member.name, err)

    def _handle_error(self, member: _Member, item: _Item, err: BaseException) -> None:
        item.attempts += 1
        try:
            repaired = self._on_error is not None and self._on_error(member.handle, err)
        except (
            BaseException
        ):  # on_error's own error (the learner it repairs from died): the item stays pending
            self._queue.appendleft(item)
            raise
        if repaired and item.attempts < self.max_attempts:
            self.stats.retries += 1
            self._queue.appendleft(item)
            return
        self.stats.failed += 1
        self._done.append((item.key, WorkFailed(item.key, err, item.attempts)))

    def _reap_drained(self) -> None:
        for name in [n for n, m in self._members.items() if m.draining and not m.inflight]:
            member = self._members.pop(name)
            ray.kill(member.handle, no_restart=True)
            logger.info("%s: removed %s", self.prefix, name)


def wait_any(pools: Iterable[ActorPool], timeout: float, also: Iterable = ()) -> None:
    """Block until a call of any of `pools` (or one of `also`) finishes, at most `timeout` s: one ray.wait over all
    of them, no busy loop. With nothing to wait on (every actor waiting out a restart's backoff), a short sleep."""
    refs = [*(ref for pool in pools for ref in pool.waitables()), *also]
    if refs:
        ray.wait(refs, num_returns=1, timeout=timeout)
    else:
        time.sleep(min(timeout, 0.05))


def _started(member: _Member) -> bool:
    """The actor is up and on_start (if any) has finished: it may serve."""
    return member.ready_ref is None or _resolved(member.ready_ref)


def _resolved(ref) -> bool:
    ready, _ = ray.wait([ref], timeout=0)
    return bool(ready)


def _index(name: str) -> int:
    return int(name.rsplit("-", 1)[1])
