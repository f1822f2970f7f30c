"""vLLM's Qwen2.5-VL with the learner's image-only processor (registered by actors/vllm_plugin.py on every install).

Imported by vLLM through the registration of `actors.vllm_plugin.register()`. The model itself (vision tower,
language model, weight loading) is vLLM's, unchanged; its processing info builds runtime.qwen_vl.SegR1Processor
with the engine's `mm_processor_kwargs` (`size`: min/max pixels), so vLLM's profile, its token counts and the pixels
it feeds the encoder all follow the same bounds.
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
def _processor(folder: str, shortest_edge: int | None, longest_edge: int | None) -> SegR1Processor:
    size = {"shortest_edge": shortest_edge, "longest_edge": longest_edge}
    return load_processor(folder, size={k: v for k, v in size.items() if v is not None} or None)


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
        """The engine's `mm_processor_kwargs` merged with a request's (flat or under images_kwargs; `size`,
        min_pixels, max_pixels) set the image processor's bounds; anything else is the folder's."""
        merged = self.ctx.get_merged_mm_kwargs(kwargs)
        scoped = merged.get("images_kwargs") or {}
        keys = ("size", "min_pixels", "max_pixels")
        size = self._get_vision_size({**{k: merged[k] for k in keys if k in merged}, **scoped})
        return _processor(self.ctx.model_config.model, size.get("shortest_edge"), size.get("longest_edge"))

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}


@MULTIMODAL_REGISTRY.register_processor(
    Qwen2_5_VLMultiModalProcessor,
    info=ImageOnlyProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class ImageOnlyQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL, registered with the image-only processing info above."""
