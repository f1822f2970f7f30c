"""`segr1 scale --rollout N [--reward M]`: resize the pools of a running training job (docs/scaling.md).

Where it talks to the cluster depends on the address (--address, default RAY_ADDRESS):

- the dashboard's http(s)://HEAD:8265 (what `ray job submit` uses; works from a laptop, e.g. through
  `kubectl port-forward ... 8265:8265`): it submits a small job over Ray's job-submission API whose
  entrypoint is this same command, run on the head (`python -m cluster.cli scale ...`, against the head's own
  Ray address), waits for it and prints its output. Only the dashboard's port has to be reachable; the head's
  python needs segr1 installed (the KubeRay image has it).
- a GCS address host:port, `auto` on a node of the cluster, or a Ray Client ray://HEAD:10001: it connects with
  `ray.init`, finds the job's `driver` actor in its namespace and calls its `request_resize`.

Either way it prints each pool's size before and after. The driver applies the change between pipeline rounds,
within 1..max_workers."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time
import uuid

from cluster.commands.common import CommandError

AUTH_HINT = (
    "Ray 2.60 clusters ask for a token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH to the cluster's "
    "token file (or RAY_AUTH_TOKEN to the token itself), then run segr1 scale again"
)
# Seconds the cluster may take to start the scale job (its supervisor actor, python, ray.init on the head), on
# top of --timeout for the driver's answer.
JOB_START_S = 60.0
JOB_POLL_S = 0.5
# The scale job's entrypoint, run by the head's python.
HEAD_COMMAND = ("python", "-m", "cluster.cli", "scale")
# Lines Ray's job manager and supervisor write into every job's log ("Runtime env is setting up.", "Running
# entrypoint for job ..."): not the command's output.
_RAY_JOB_LINE = re.compile(
    r"^(Running entrypoint for job |[\d-]+ [\d:,]+\tINFO job_(manager|supervisor)\.py:\d+ -- )"
)


def register(sub) -> None:
    p = sub.add_parser(
        "scale", help="resize the rollout / reward pools of a running job, e.g. segr1 scale --rollout 4"
    )
    p.add_argument("--rollout", type=int, help="rollout workers wanted (1..rollout.max_workers)")
    p.add_argument("--reward", type=int, help="reward workers wanted (1..reward.max_workers)")
    p.add_argument(
        "--address",
        help="the cluster: its dashboard http://HEAD:8265 (from anywhere), GCS HEAD:6379 / auto (on a "
        "node) or ray://HEAD:10001; default RAY_ADDRESS",
    )
    p.add_argument("--namespace", default="segr1", help="the job's placement.namespace (default segr1)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the driver's answer")
    p.set_defaults(func=run)


def _address(args: argparse.Namespace) -> str:
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise CommandError(
            "no cluster to talk to: set RAY_ADDRESS (or --address) to the job's cluster, e.g. its dashboard "
            "http://HEAD:8265",
            2,
        )
    return address


def uses_job_server(address: str) -> bool:
    """True for the dashboard's address (http:// or https://): the command then runs as a job on the head."""
    return address.startswith(("http://", "https://"))


def connect_error(address: str, err: BaseException, env: dict[str, str]) -> CommandError:
    """The one message for a failed connection: without RAY_AUTH_MODE=token (what Ray 2.60 clusters ask for)
    it says what to set; otherwise Ray's own reason."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[-1]
    if env.get("RAY_AUTH_MODE") != "token":
        return CommandError(f"cannot connect to the Ray cluster at {address} ({text}): {AUTH_HINT}")
    return CommandError(f"cannot connect to the Ray cluster at {address}: {text}")


def run(args: argparse.Namespace) -> int:
    if args.rollout is None and args.reward is None:
        raise CommandError("nothing to scale: give --rollout N and/or --reward M", 2)
    for key in ("rollout", "reward"):
        n = getattr(args, key)
        if n is not None and n < 1:
            raise CommandError(f"--{key} {n}: a pool keeps at least 1 worker", 2)
    address = _address(args)
    if uses_job_server(address):
        return _scale_through_job_server(address, args)
    return _scale_directly(address, args)


# -- through the dashboard: a job on the head runs the command -----------------------------------------------
def remote_entrypoint(args: argparse.Namespace) -> str:
    """The shell command of the scale job: this command on the head, against the address Ray's job supervisor
    gives its entrypoints (RAY_ADDRESS = the head's GCS address)."""
    cmd = [*HEAD_COMMAND, "--namespace", args.namespace, "--timeout", str(args.timeout)]
    for key in ("rollout", "reward"):
        if getattr(args, key) is not None:
            cmd += [f"--{key}", str(getattr(args, key))]
    return shlex.join(cmd)


def _job_client(address: str):
    """Ray's JobSubmissionClient for `address`. Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the
    address it is given; --address wins here, so both are hidden while the client is made."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    hidden = {
        key: os.environ.pop(key) for key in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if key in os.environ
    }
    try:
        return JobSubmissionClient(address)
    except (OSError, RuntimeError, AuthenticationError) as err:  # OSError: requests' errors too
        raise connect_error(address, err, dict(os.environ)) from None
    finally:
        os.environ.update(hidden)


def _wait_for_job(client, job: str, timeout: float):
    """The job's JobDetails once it ended; after `timeout` s it is stopped and the command fails."""
    deadline = time.monotonic() + timeout
    while True:
        info = client.get_job_info(job)
        if info.status.is_terminal():
            return info
        if time.monotonic() > deadline:
            client.stop_job(job)
            raise CommandError(
                f"the scale job {job} did not end within {timeout:.0f} s (status {info.status}: "
                f"{info.message}); it was stopped. Raise --timeout if the cluster is busy"
            )
        time.sleep(JOB_POLL_S)


def command_output(job_log: str) -> str:
    """What the command on the head printed: its job's log less the lines Ray itself writes there."""
    lines = job_log.splitlines(keepends=True)
    return "".join(line for line in lines if not _RAY_JOB_LINE.match(line))


def _scale_through_job_server(address: str, args: argparse.Namespace) -> int:
    from ray.exceptions import AuthenticationError

    client = _job_client(address)
    job = f"segr1-scale-{uuid.uuid4().hex[:8]}"
    try:
        client.submit_job(entrypoint=remote_entrypoint(args), submission_id=job, metadata={"segr1": "scale"})
        info = _wait_for_job(client, job, args.timeout + JOB_START_S)
        output = command_output(client.get_job_logs(job))
    except (OSError, RuntimeError, AuthenticationError) as err:
        raise CommandError(f"the job server at {address} failed: {str(err).strip()}") from None
    if info.status == "SUCCEEDED":
        print(output, end="")
        return 0
    sys.stderr.write(output)
    if "No module named 'cluster'" in output:
        raise CommandError(
            f"the scale job {job} found no segr1 on the head: install the project in the head's python "
            "(the KubeRay image has it)"
        )
    if info.status == "STOPPED" or not output.strip():  # stopped, or failed before the command ran
        raise CommandError(f"the scale job {job} ended {info.status}: {info.message}")
    return info.driver_exit_code or 1  # the command's own error is in its output, printed above


# -- directly: ray.init to the cluster, then the driver actor ------------------------------------------------
def _connect(ray, address: str, namespace: str) -> None:
    try:
        ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level="ERROR")
    except Exception as err:
        raise connect_error(address, err, dict(os.environ)) from None


def _request_resize(ray, args: argparse.Namespace, address: str) -> dict:
    try:
        driver = ray.get_actor("driver", namespace=args.namespace)
    except ValueError:
        raise CommandError(
            f"no training job in namespace {args.namespace!r} of {address} (no actor `driver`); "
            "pass the job's placement.namespace with --namespace"
        ) from None
    try:
        ref = driver.request_resize.remote(rollout=args.rollout, reward=args.reward)
        return ray.get(ref, timeout=args.timeout)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None) or err
        raise CommandError(str(cause).strip().splitlines()[-1]) from None
    except ray.exceptions.RayActorError:
        raise CommandError("the job's driver stopped before answering (the job ended or failed)") from None
    except ray.exceptions.GetTimeoutError:
        raise CommandError(f"the driver did not answer within {args.timeout:.0f} s (--timeout)") from None


def _scale_directly(address: str, args: argparse.Namespace) -> int:
    import ray

    _connect(ray, address, args.namespace)
    try:
        answer = _request_resize(ray, args, address)
    finally:
        ray.shutdown()
    for pool in ("rollout", "reward"):
        print(f"{pool}: {answer['before'][pool]} -> {answer['after'][pool]} workers")
    if not answer.get("applied", True):
        print("(the driver has not applied it yet: the pools change between pipeline rounds)")
    return 0
