"""Stand-ins for the three worker classes that only log when they start (tests/e2e/test_start_order.py): each
constructor records "<actor> start" first and "<actor> up" last with the `StartLog` actor, and waits for each
record to be taken, so the log's order is the order in which the actors really started and finished starting.
Same constructors and the methods the driver's start uses as RolloutWorker, RewardWorker and Learner."""

from __future__ import annotations

from typing import Any

import ray

LOG_NAME, LOG_NAMESPACE = "segr1-start-log", "segr1-start-log"


class StartLog:
    def __init__(self):
        self.events: list[str] = []

    def record(self, event: str) -> int:
        self.events.append(event)
        return len(self.events)

    def read(self) -> list[str]:
        return list(self.events)


def start_log() -> Any:
    return ray.remote(StartLog).options(name=LOG_NAME, namespace=LOG_NAMESPACE, num_cpus=0).remote()


def _record(event: str) -> None:
    log = ray.get_actor(LOG_NAME, namespace=LOG_NAMESPACE)
    ray.get(log.record.remote(event))


class LoggedRollout:
    def __init__(self, policy, rollout, name: str, engine=None):
        _record(f"{name} start")
        self.name = name
        _record(f"{name} up")

    def ping(self) -> dict:
        return {"name": self.name}


class LoggedReward:
    def __init__(self, policy, reward, name: str):
        _record(f"{name} start")
        _record(f"{name} up")


class LoggedLearner:
    def __init__(self, spec, rank: int, world_size: int, init_method: str | None):
        _record(f"learner-{rank} start")
        _record(f"learner-{rank} up")

    def weight_sync_backend(self) -> str:
        return "object-store"  # no weight-sync group to form at the start

    def close(self) -> None:
        pass
