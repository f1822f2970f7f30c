"""vLLM engines on a policy with the real Qwen2 tokenizer and the release's vocab_size 151,936 (271 padded rows
past the tokenizer: cluster/dev/qwen_vocab.py), where the tiny byte-level models hide the difference.

One LLM() for the module. Checks: every SamplingParams the engines build, as vLLM's front end hands it to the
engine core, passes Model Runner V2's per-request checks (the GPU runner; tests/support/v2_limits.py); the
suppressed ids are exactly the learner's and are never sampled even where the policy puts nearly all its mass on
them, and the behaviour logprobs equal the learner's log-softmax over the remaining ids.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("vllm")

from actors.vllm_engine import VLLMEngine  # noqa: E402
from cluster.dev.qwen_vocab import RELEASE_VOCAB_SIZE, TOKENIZER_SIZE  # noqa: E402
from learner.grpo import masked_logprobs_from_logits  # noqa: E402
from protos.answer import COMPACT  # noqa: E402
from runtime.qwen_vl import load_policy, suppress_token_ids  # noqa: E402
from tests.integration.test_vllm_engine import _req  # noqa: E402
from tests.support.engine_state import restore, weights_of  # noqa: E402
from tests.support.v2_limits import v2_refusals  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engine(qwen_vocab_policy_dir):
    v = VLLMEngine(qwen_vocab_policy_dir, max_model_len=1024, seed=0, prompts=COMPACT, image_size=112)
    yield v
    v.close()


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8))


def _front_end(v: VLLMEngine, prompt, params):
    """The SamplingParams vLLM's front end hands the engine core for this request (verified, bad words
    tokenized): what a V2 worker's add_request receives."""
    core = v.llm.llm_engine
    request = core.input_processor.process_inputs(
        uuid.uuid4().hex, prompt, params, supported_tasks=core.get_supported_tasks()
    )
    return request.sampling_params


def test_every_request_passes_the_v2_per_request_checks(engine):
    v = engine
    assert (
        len(v.tokenizer) == TOKENIZER_SIZE
        and v.llm.llm_engine.model_config.get_vocab_size() == RELEASE_VOCAB_SIZE
    )
    suppressed = suppress_token_ids(v.tokenizer, RELEASE_VOCAB_SIZE)
    assert (
        len(suppressed) == 5 + RELEASE_VOCAB_SIZE - TOKENIZER_SIZE
    )  # 276: what the learner's softmax leaves out
    samplings = [
        dict(temperature=0.0),
        dict(temperature=1.0, seed=1),
        dict(temperature=0.7, top_p=0.9, seed=2),
        dict(temperature=1.0, top_k=5, repetition_penalty=1.05),
    ]
    for i, sampling in enumerate(samplings):
        for image in (None, _image()):
            req = _req(i, g=4, max_tokens=4, **sampling)
            params = _front_end(v, v._prompt(req, image), v._params(req))
            assert v2_refusals(params) == [], (sampling, image is not None)
            assert sorted(params.logit_bias) == suppressed
            assert all(b == float("-inf") for b in params.logit_bias.values())


def test_suppressed_ids_are_never_sampled_and_logprobs_are_the_learners(engine):
    """The suppressed rows of lm_head scaled 1000x, so without suppression nearly every draw would be one of them;
    temperature 1: the behaviour logprob of each token is the learner's log-softmax over the other ids."""
    v = engine
    model = load_policy(v.model_path)
    original = weights_of(model)
    suppressed = torch.tensor(suppress_token_ids(v.tokenizer, RELEASE_VOCAB_SIZE))
    with torch.no_grad():
        model.lm_head.weight[suppressed] *= 1000.0
        raw = model(torch.tensor([[1, 2, 3]])).logits[0, -1]  # (V,)
    assert torch.softmax(raw, -1)[suppressed].sum() > 0.99  # what suppression has to remove
    try:
        v.load_weights(weights_of(model), 1)
        reqs = [_req(i, g=4, max_tokens=6, temperature=1.0, seed=i) for i in range(2)]
        groups = v.generate(reqs, [None, None])
        for req, group in zip(reqs, groups, strict=True):
            prompt = v._prompt(req, None)["prompt_token_ids"]
            for comp in group:
                assert not set(comp.token_ids) & set(suppressed.tolist()), comp.token_ids
                ids = torch.tensor([prompt + comp.token_ids])
                with torch.no_grad():
                    logits = model(ids).logits[:, len(prompt) - 1 : -1]  # (1, N, V)
                tokens = ids[:, len(prompt) :]
                want = masked_logprobs_from_logits(logits, tokens, 1.0, suppressed)[0]
                assert torch.allclose(torch.tensor(comp.logprobs), want, atol=2e-3), (comp.logprobs, want)
    finally:
        restore(v, original)
