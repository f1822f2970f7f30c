"""vLLM's Qwen2.5-VL with the image-only processor (loaded by actors/vllm_plugin.py where torchvision is absent).

Imported by vLLM through the registration of `actors.vllm_plugin.register()`. The model itself (vision tower, language model, weight loading) is vLLM's, unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from actors.vllm_plugin import install_smart_resize
from runtime.qwen_vl import SegR1Processor, load_processor

install_smart_resize()  # before vLLM's qwen2_vl module imports smart_resize (this module may be imported first)

from vllm.model_executor.models.qwen2_5_vl import (  # noqa: E402
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import Qwen2VLMultiModalDataParser  # noqa: E402
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402


@functools.lru_cache(maxsize=4)
def _processor(folder: str) -> SegR1Processor:
    return load_processor(folder)


def _empty(value) -> bool:
    """None or an empty list: what vLLM's dummy-input builder passes for a modality it wants 0 items of."""
    return value is None or (isinstance(value, (list, tuple)) and len(value) == 0)


class ImageOnlyDataParser(Qwen2VLMultiModalDataParser):
    """Refuses any modality but images before vLLM's own parsers see it."""

    def parse_mm_data(self, mm_data):
        others = sorted(k for k, v in mm_data.items() if k != "image" and not _empty(v))
        if others:
            raise ValueError(
                f"multi_modal_data {others} refused: Qwen2.5-VL is served here for images only (segr1's vLLM "
                "plugin, actors/vllm_plugin.py, on an install without torchvision); send "
                "multi_modal_data={'image': ...}, or install torchvision for vLLM's video support"
            )
        return super().parse_mm_data({k: v for k, v in mm_data.items() if k == "image"})


class ImageOnlyProcessingInfo(Qwen2_5_VLProcessingInfo):
    """Builds SegR1Processor (PIL image processor, no video processor) and accepts images only."""

    def get_data_parser(self):
        return ImageOnlyDataParser(
            self.get_hf_config().vision_config.spatial_merge_size,
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
        )

    def get_hf_processor(self, **kwargs: object) -> SegR1Processor:
        return _processor(self.ctx.model_config.model)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}


@MULTIMODAL_REGISTRY.register_processor(
    Qwen2_5_VLMultiModalProcessor,
    info=ImageOnlyProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class ImageOnlyQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL, registered with the image-only processing info above."""
