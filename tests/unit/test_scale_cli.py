"""`segr1 scale`'s argument and connection errors (the command against a running job: tests/e2e/test_job_submit.py)."""

from __future__ import annotations

import pytest

from cluster.cli import main
from cluster.commands.scale import connect_error


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
        (["scale", "--rollout", "0"], {"RAY_ADDRESS": "h:6379"}, "at least 1 worker"),
        (["scale", "--rollout", "2"], {}, "set RAY_ADDRESS"),
        (["scale", "--reward", "2"], {"RAY_ADDRESS": "http://h:8265"}, "GCS address"),
    ],
)
def test_argument_errors_name_what_to_fix(argv, env, expected, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(argv) == 2
    assert expected in capsys.readouterr().err
