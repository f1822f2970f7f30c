"""`segr1 scale`'s argument and connection errors, and which way it reaches the cluster: through the
dashboard's job server for an http(s):// address, with `ray.init` otherwise (the command against a running
job: tests/e2e/test_job_submit.py with the GCS address, tests/e2e/test_scale_remote.py with the
dashboard's)."""

from __future__ import annotations

import os
import shlex
import socket

import pytest

from cluster.cli import build_parser, main
from cluster.commands.scale import command_output, connect_error, remote_entrypoint, uses_job_server


def test_a_client_without_the_token_is_told_what_to_set():
    # what Ray 2.60 raises after its retries when the token is missing
    err = ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379")
    msg = str(connect_error("10.0.0.5:6379", err, {}))
    assert "RAY_AUTH_MODE=token" in msg and "RAY_AUTH_TOKEN_PATH" in msg and "10.0.0.5:6379" in msg
    msg = str(connect_error("10.0.0.5:6379", err, {"RAY_AUTH_MODE": "token"}))
    assert "RAY_AUTH_MODE" not in msg and "Failed to connect" in msg  # token set: Ray's own reason


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["scale"], {"RAY_ADDRESS": "h:6379"}, "give --rollout N and/or --reward M"),
        (["scale", "--rollout", "0"], {"RAY_ADDRESS": "http://h:8265"}, "at least 1 worker"),
        (["scale", "--rollout", "2"], {}, "set RAY_ADDRESS"),
    ],
)
def test_argument_errors_name_what_to_fix(argv, env, expected, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(argv) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(
    ("address", "job_server"),
    [
        ("http://127.0.0.1:8265", True),
        ("https://ray.example.com", True),
        ("10.0.0.5:6379", False),
        ("auto", False),
        ("ray://10.0.0.5:10001", False),  # Ray Client: ray.init connects through it
    ],
)
def test_the_address_picks_the_way_to_the_cluster(address, job_server):
    assert uses_job_server(address) is job_server


@pytest.mark.parametrize(
    "argv", [["--rollout", "3"], ["--reward", "2", "--namespace", "my ns", "--timeout", "9"]]
)
def test_the_scale_job_runs_the_same_command_on_the_head(argv):
    """The job's entrypoint parses back to the same request, with no --address: on the head it uses the
    address Ray's job supervisor sets (the GCS), never the dashboard's again."""
    ours = build_parser().parse_args(["scale", "--address", "http://h:8265", *argv])
    words = shlex.split(remote_entrypoint(ours))
    assert words[:4] == ["python", "-m", "cluster.cli", "scale"]
    theirs = build_parser().parse_args(words[3:])
    assert theirs.address is None
    for key in ("rollout", "reward", "namespace", "timeout"):
        assert getattr(theirs, key) == getattr(ours, key), key


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dashboard_address_goes_to_the_job_server(monkeypatch, capsys):
    """--address http://... is reached with Ray's job-submission client (its error names the dashboard
    address), and wins over RAY_ADDRESS (a GCS address that ray.init would wait on). Nothing listens on the
    port."""
    port = _closed_port()
    monkeypatch.setenv("RAY_ADDRESS", "10.255.255.1:6379")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert main(["scale", "--rollout", "2", "--address", f"http://127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert f"cannot connect to the Ray cluster at http://127.0.0.1:{port}" in err, err
    # the job client's own words
    assert f"Failed to connect to Ray at address: http://127.0.0.1:{port}" in err, err
    assert "RAY_AUTH_MODE=token" in err, err
    assert os.environ["RAY_ADDRESS"] == "10.255.255.1:6379"  # restored after the client was made


def test_the_scale_job_output_is_the_commands_alone():
    """Ray writes its own lines into every job's log; what is printed back is the command's (a job log of
    Ray 2.60, as read by the e2e test)."""
    log = (
        "Running entrypoint for job segr1-scale-1a2b3c4d: python -m cluster.cli scale --rollout 2\n"
        "2026-12-06 04:26:02,392\tINFO job_manager.py:581 -- Runtime env is setting up.\n"
        "rollout: 1 -> 2 workers\n"
        "reward: 1 -> 1 workers\n"
        "2026-12-06 04:26:03,001\tERROR job_manager.py:600 -- kept: not one of Ray's INFO lines\n"
    )
    assert command_output(log).splitlines() == [
        "rollout: 1 -> 2 workers",
        "reward: 1 -> 1 workers",
        "2026-12-06 04:26:03,001\tERROR job_manager.py:600 -- kept: not one of Ray's INFO lines",
    ]
