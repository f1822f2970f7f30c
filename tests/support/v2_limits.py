"""What vLLM's Model Runner V2 (the GPU runner of vLLM 0.32/0.33 wherever Triton is present) refuses in one
request's SamplingParams: the checks its per-request sampling states make when a request is added
(`LogitBiasState.add_request`, `BadWordsState.add_request`, `LogprobTokenIdsState.add_request` under
vllm/v1/worker/gpu/sample/), with the limits read from those modules and vllm.envs, never copied. The classes
themselves cannot be built on a CPU-only torch (they allocate pinned host buffers), so the checks are restated
here; tests pass the SamplingParams as vLLM's front end hands them to the engine core."""

from __future__ import annotations


def v2_refusals(params) -> list[str]:
    """The V2 checks `params` fails, as messages (empty: V2 accepts the request)."""
    from vllm import envs
    from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS
    from vllm.v1.worker.gpu.sample import logit_bias as lb

    out = []
    allowed = len(params.allowed_token_ids or [])
    if allowed > lb.MAX_NUM_ALLOWED_TOKEN_IDS:
        out.append(f"{allowed} allowed_token_ids > MAX_NUM_ALLOWED_TOKEN_IDS {lb.MAX_NUM_ALLOWED_TOKEN_IDS}")
    bias = len(params.logit_bias or {})
    if bias > lb.MAX_NUM_LOGIT_BIAS_TOKENS:
        out.append(f"{bias} logit_bias ids > MAX_NUM_LOGIT_BIAS_TOKENS {lb.MAX_NUM_LOGIT_BIAS_TOKENS}")
    stops = len(params.all_stop_token_ids)
    if params.min_tokens > 0 and stops > lb.MAX_NUM_STOP_TOKEN_IDS:
        out.append(f"{stops} stop ids with min_tokens > MAX_NUM_STOP_TOKEN_IDS {lb.MAX_NUM_STOP_TOKEN_IDS}")
    words = params.bad_words_token_ids or []
    if len(words) > envs.VLLM_MAX_NUM_BAD_WORDS:
        out.append(f"{len(words)} bad words > VLLM_MAX_NUM_BAD_WORDS {envs.VLLM_MAX_NUM_BAD_WORDS}")
    total = sum(len(w) for w in words)
    if total > envs.VLLM_MAX_BAD_WORDS_TOTAL_TOKENS:
        out.append(
            f"{total} bad-word tokens > VLLM_MAX_BAD_WORDS_TOTAL_TOKENS {envs.VLLM_MAX_BAD_WORDS_TOTAL_TOKENS}"
        )
    ids = len(params.logprob_token_ids or [])
    if ids > MAX_LOGPROB_TOKEN_IDS:
        out.append(f"{ids} logprob_token_ids > MAX_LOGPROB_TOKEN_IDS {MAX_LOGPROB_TOKEN_IDS}")
    return out
