"""`segr1 scale --rollout N [--reward M]`: resize the pools of a running training job (docs/scaling.md).

Connects to the job's Ray cluster (--address, default RAY_ADDRESS: its GCS address host:port, or `auto` on a
node of the cluster), finds the job's `driver` actor in its namespace and calls its `request_resize`; prints each
pool's size before and after. The driver applies the change between pipeline rounds, within 1..max_workers."""

from __future__ import annotations

import argparse
import os

from cluster.commands.common import CommandError

AUTH_HINT = (
    "Ray 2.60 clusters ask for a token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH to the cluster's token "
    "file (or RAY_AUTH_TOKEN to the token itself), then run segr1 scale again"
)


def register(sub) -> None:
    p = sub.add_parser(
        "scale", help="resize the rollout / reward pools of a running job, e.g. segr1 scale --rollout 4"
    )
    p.add_argument("--rollout", type=int, help="rollout workers wanted (1..rollout.max_workers)")
    p.add_argument("--reward", type=int, help="reward workers wanted (1..reward.max_workers)")
    p.add_argument("--address", help="Ray (GCS) address of the job's cluster; default RAY_ADDRESS")
    p.add_argument("--namespace", default="segr1", help="the job's placement.namespace (default segr1)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the driver's answer")
    p.set_defaults(func=run)


def _address(args: argparse.Namespace) -> str:
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise CommandError(
            "no cluster to talk to: set RAY_ADDRESS (or --address) to the job's Ray address", 2
        )
    if address.startswith(("http://", "https://")):
        raise CommandError(
            f"{address} is the dashboard's (job submission) address; segr1 scale talks to the cluster itself: "
            "pass its GCS address host:port (6379 by default) with --address, or `auto` on a node of the cluster",
            2,
        )
    return address


def connect_error(address: str, err: BaseException, env: dict[str, str]) -> CommandError:
    """The one message for a failed connection: without RAY_AUTH_MODE=token (what Ray 2.60 clusters ask for)
    it says what to set; otherwise Ray's own reason."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[-1]
    if env.get("RAY_AUTH_MODE") != "token":
        return CommandError(f"cannot connect to the Ray cluster at {address} ({text}): {AUTH_HINT}")
    return CommandError(f"cannot connect to the Ray cluster at {address}: {text}")


def _connect(ray, address: str, namespace: str) -> None:
    try:
        ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level="ERROR")
    except Exception as err:
        raise connect_error(address, err, dict(os.environ)) from None


def run(args: argparse.Namespace) -> int:
    if args.rollout is None and args.reward is None:
        raise CommandError("nothing to scale: give --rollout N and/or --reward M", 2)
    for key in ("rollout", "reward"):
        n = getattr(args, key)
        if n is not None and n < 1:
            raise CommandError(f"--{key} {n}: a pool keeps at least 1 worker", 2)
    address = _address(args)
    import ray

    _connect(ray, address, args.namespace)
    try:
        try:
            driver = ray.get_actor("driver", namespace=args.namespace)
        except ValueError:
            raise CommandError(
                f"no training job in namespace {args.namespace!r} of {address} (no actor `driver`); "
                "pass the job's placement.namespace with --namespace"
            ) from None
        try:
            ref = driver.request_resize.remote(rollout=args.rollout, reward=args.reward)
            answer = ray.get(ref, timeout=args.timeout)
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None) or err
            raise CommandError(str(cause).strip().splitlines()[-1]) from None
        except ray.exceptions.RayActorError:
            raise CommandError(
                "the job's driver stopped before answering (the job ended or failed)"
            ) from None
        except ray.exceptions.GetTimeoutError:
            raise CommandError(f"the driver did not answer within {args.timeout:.0f} s (--timeout)") from None
    finally:
        ray.shutdown()
    for pool in ("rollout", "reward"):
        print(f"{pool}: {answer['before'][pool]} -> {answer['after'][pool]} workers")
    if not answer.get("applied", True):
        print("(the driver has not applied it yet: the pools change between pipeline rounds)")
    return 0
