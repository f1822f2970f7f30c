"""vLLM plugin: Qwen2.5-VL served with the project's image-only processing, on every install.

Registered through vLLM's `vllm.general_plugins` entry point (pyproject.toml), so vLLM calls `register()` in
every process it starts (the engine, the model-inspection subprocess, spawned engine cores).

It registers, always, under the architecture name `Qwen2_5_VLForConditionalGeneration` a subclass of vLLM's model
(actors/vllm_vl_model.py) whose processing info builds the learner's processor (runtime.qwen_vl.SegR1Processor:
transformers' PIL image processor, no video processor), honours `mm_processor_kwargs` (the engine caps
max_pixels at data.image_size) and accepts images only (a video request is refused). Always, not only without
torchvision: where torchvision is installed (every GPU install) vLLM would otherwise preprocess with
transformers' torchvision image processor while the learner uses the PIL one, and the two resample a side that is
not a multiple of 28 (768 -> 756) differently: noise in every importance weight. One path on every machine also
means the CPU tests run the processing the GPUs run.

Without torchvision (the CPU machines) vLLM 0.32's Qwen2.5-VL cannot even load, for two reasons, both removed:
1. `vllm/model_executor/models/qwen2_vl.py` imports `smart_resize` from transformers'
   `models/qwen2_vl/image_processing_qwen2_vl`, whose module imports torchvision. `install_smart_resize` puts a
   stand-in module under that name holding the identical `smart_resize` of the PIL image processor's module
   (`image_processing_pil_qwen2_vl`); importing any other name from it fails saying torchvision is needed. Only
   without torchvision (with it, the real module imports). Unnecessary once vLLM imports `smart_resize` from the
   backend-neutral module (or lazily, inside the function that calls it), an upstream change to qwen2_vl.py.
2. `Qwen2_5_VLProcessor.from_pretrained` always builds the video processor, which needs torchvision: the
   registered model's processing info above builds the image-only processor instead.
"""

from __future__ import annotations

import importlib.util
import sys
import types

ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
MODEL_CLASS = "actors.vllm_vl_model:ImageOnlyQwen2_5_VL"
_TV_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def _stand_in_module() -> types.ModuleType:
    """`image_processing_qwen2_vl` with only `smart_resize` (the PIL module's; the two are the same function)."""
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

    module = types.ModuleType(_TV_MODULE, "segr1 stand-in: smart_resize without torchvision")
    module.smart_resize = pil.smart_resize

    def __getattr__(name: str):  # AttributeError: `hasattr` works, `from ... import name` says ImportError
        raise AttributeError(
            f"{_TV_MODULE}.{name} needs torchvision, which is not installed; segr1's vLLM plugin "
            "(actors/vllm_plugin.py) provides only smart_resize here"
        )

    module.__getattr__ = __getattr__
    return module


def install_smart_resize(torchvision: bool | None = None) -> None:
    """Blocker 1 (module docstring); idempotent, nothing where torchvision is installed (`torchvision`: whether it
    is; None looks)."""
    if torchvision is None:
        torchvision = torchvision_available()
    if not torchvision and _TV_MODULE not in sys.modules:
        sys.modules[_TV_MODULE] = _stand_in_module()


def register(torchvision: bool | None = None) -> None:
    """vLLM's general-plugin hook (may run several times per process; idempotent): the image-only Qwen2.5-VL,
    with or without torchvision (module docstring; `torchvision`: whether it is installed, None looks)."""
    install_smart_resize(torchvision)
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
