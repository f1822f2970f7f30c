"""vLLM plugin: Qwen2.5-VL on an install without torchvision (the CPU machines), images only.

Registered through vLLM's `vllm.general_plugins` entry point (pyproject.toml), so vLLM calls `register()` in
every process it starts (the engine, the model-inspection subprocess, spawned engine cores). Where torchvision is
installed (the GPU images) it does nothing: vLLM's own Qwen2.5-VL runs unchanged.

Without torchvision, vLLM 0.32's Qwen2.5-VL cannot load, for two reasons, and the plugin removes both:
1. `vllm/model_executor/models/qwen2_vl.py` imports `smart_resize` from transformers'
   `models/qwen2_vl/image_processing_qwen2_vl`, whose module imports torchvision. The plugin puts a stand-in
   module under that name holding the identical `smart_resize` of the PIL image processor's module
   (`image_processing_pil_qwen2_vl`); importing any other name from it fails saying torchvision is needed.
   Unnecessary once vLLM imports `smart_resize` from the backend-neutral module (or lazily, inside the function
   that calls it), an upstream change to qwen2_vl.py.
2. `Qwen2_5_VLProcessor.from_pretrained` always builds the video processor, which needs torchvision. The plugin
   registers under the architecture name `Qwen2_5_VLForConditionalGeneration` a subclass of vLLM's model
   (actors/vllm_vl_model.py) whose processing info builds the project's image-only processor
   (runtime.qwen_vl.SegR1Processor) and supports image inputs only: a video request is refused.
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


def install_smart_resize() -> None:
    """Blocker 1 (module docstring); idempotent, nothing where torchvision is installed."""
    if not torchvision_available() and _TV_MODULE not in sys.modules:
        sys.modules[_TV_MODULE] = _stand_in_module()


def register() -> None:
    """vLLM's general-plugin hook (may run several times per process; idempotent)."""
    if torchvision_available():
        return
    install_smart_resize()
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
