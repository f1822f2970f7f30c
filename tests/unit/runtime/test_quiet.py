"""runtime/quiet.py with the real logging and warnings modules: a named noisy library note is dropped, the same
library's other warnings, its errors and the project's own warnings still show."""

from __future__ import annotations

import logging
import warnings

import pytest

from runtime import quiet


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def quieted(monkeypatch):
    """quiet_libraries() applied, and everything it changes in this process put back afterwards."""
    for key in ("VLLM_LOGGING_LEVEL", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(key, raising=False)  # restored (or removed again) at teardown
    names = ["vllm", *(name for name, _ in quiet.NOISY_RECORDS)]
    saved = {name: (logging.getLogger(name).level, list(logging.getLogger(name).filters)) for name in names}
    bars = _hub_bars_enabled()
    with warnings.catch_warnings():
        quiet.quiet_libraries()
        yield
    for name, (level, filters) in saved.items():
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).filters[:] = filters
    if bars:
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()


def _hub_bars_enabled() -> bool:
    import sys

    if "huggingface_hub" not in sys.modules:
        return False
    from huggingface_hub.utils import are_progress_bars_disabled

    return not are_progress_bars_disabled()


def _emitted(name: str, level: int, *messages: str) -> list[str]:
    """What a handler on logger `name` receives of `messages` logged there at `level`."""
    logger, handler = logging.getLogger(name), Collect()
    logger.addHandler(handler)
    try:
        for message in messages:
            logger.log(level, message)
    finally:
        logger.removeHandler(handler)
    return handler.messages


def test_named_library_records_are_dropped_others_kept(quieted):
    noisy = (
        "`Qwen2VLImageProcessor` requires torchvision (not installed); falling back to `Qwen2VLImageProcessorPil` "
        "for backward compatibility."
    )
    other = "Some weights of the checkpoint were not used"
    assert _emitted("transformers.utils.import_utils", logging.WARNING, noisy, other) == [other]
    triton = "Triton is installed, but doesn't include CPU backend. Disabling Triton."
    failed = "Triton is installed, but `triton.backends` could not be imported. Disabling Triton."
    assert _emitted("vllm.triton_utils.importing", logging.WARNING, triton, failed) == [failed]


def test_vllm_info_is_dropped_its_warnings_and_errors_kept(quieted):
    name = "vllm.v1.engine.core"
    assert _emitted(name, logging.INFO, "init engine took 1.97 s") == []
    assert _emitted(name, logging.WARNING, "KV cache too small") == ["KV cache too small"]
    assert _emitted(name, logging.ERROR, "engine died") == ["engine died"]


def test_our_own_warnings_still_show(quieted):
    assert _emitted("cluster.driver.loop", logging.WARNING, "no informative group in 3 rounds") == [
        "no informative group in 3 rounds"
    ]


def test_the_named_python_warning_is_filtered_ours_is_not(quieted):
    message = "`torch.distributed.reduce_op` is deprecated, please use `torch.distributed.ReduceOp` instead"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.quiet_libraries()  # its filters go in front of "always"
        warnings.warn_explicit(
            message, FutureWarning, "dispatcher.py", 138, module="vllm.triton_utils.dispatcher"
        )
        warnings.warn_explicit(message, FutureWarning, "ours.py", 1, module="cluster.driver.loop")
        warnings.warn_explicit(
            "other", FutureWarning, "dispatcher.py", 140, module="vllm.triton_utils.dispatcher"
        )
        warnings.warn("our own warning", UserWarning, stacklevel=1)
    assert [(str(w.message), w.category) for w in seen] == [
        (message, FutureWarning),
        ("other", FutureWarning),
        ("our own warning", UserWarning),
    ]


def test_calling_it_again_adds_no_second_filter(quieted):
    quiet.quiet_libraries()
    for name, _ in quiet.NOISY_RECORDS:
        assert sum(isinstance(f, quiet.DropMessages) for f in logging.getLogger(name).filters) == 1


def test_the_environment_names_the_levels(quieted, monkeypatch):
    assert logging.getLogger("vllm").level == logging.WARNING
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    quiet.quiet_libraries()
    assert logging.getLogger("vllm").level == logging.DEBUG
    monkeypatch.delenv("TORCH_CPP_LOG_LEVEL", raising=False)
    assert quiet.native_quiet_env() == {"TORCH_CPP_LOG_LEVEL": "ERROR"}
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "WARNING")
    assert quiet.native_quiet_env() == {"TORCH_CPP_LOG_LEVEL": "WARNING"}
