"""Rollout throughput: output tokens per second of the transformers engine and the vLLM engine.

    python bench/rollout_throughput.py --quick --out bench/results/rollout_throughput_cpu.json
    python bench/rollout_throughput.py --gpu --out bench/results/rollout_throughput_h100.json     # CUDA only

CPU (always): the same tiny Qwen2.5-VL (`cluster.dev.tiny_models.build_tiny_policy`, demo preset: vision tower,
hidden-128 language model, merge 4; byte-level tokenizer) in both engines, the same requests WITH images (one
--image-size noise image per request, fresh each round), G = 8 completions per request, temperature 1.0, fixed
seeds, vLLM's prefix caching on (the G samples of a request share the prompt). Each engine gets one warm-up call;
then per round and engine (interleaved hf, vllm, hf, ... so that load from other processes spreads over both) a
1-token call, whose wall time is the batch's time to first token (prefill of every prompt, image encoder
included, plus one sampled token), and the timed full call. Tokens are every generated token (stop tokens
included); completions stop at <|im_end|> at random (random weights), so both engines generate about, not
exactly, the same number of tokens. Besides wall clock the JSON has tokens per second of this process's CPU time
(`*_tokens_per_cpu_s`): on a shared machine the wall clock mostly measures the other jobs. vLLM runs in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), eager, with the project's plugin (actors/vllm_plugin.py). After each round
every engine loads the policy's weights again as a new version (`*_reload_cpu_s`: what a weight update costs the
rollout worker, once per training step; vLLM's in-place layer-wise reload vs the transformers engine's copy).
--compiled adds a third engine, vLLM compiled (enforce_eager=False: torch.compile, as on a GPU), with its start time.

GPU (`--gpu`, unverified on the CPU machines): the transformers engine with a random Qwen2.5-VL-3B-shaped model
(bf16, built in memory, the tiny byte-level tokenizer: ids the tokenizer lacks are suppressed) on 768x768 images,
same G; vLLM is not measured there (it needs the real tokenizer/processor files; run `segr1 generate --engine vllm`
on a real checkpoint instead).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu.models import qwen3b_config  # noqa: E402  (Qwen2.5-VL-3B-Instruct's published dimensions)

GROUP_SIZE = 8


def _requests(n: int, max_tokens: int, seed0: int = 1000):
    from protos import RolloutRequest, SamplingConfig

    return [
        RolloutRequest(
            request_id=f"bench-{i}",
            sample_id=f"bench-{i}",
            instruction=f"Identify and segment the object number {i} in the image.",
            group_size=GROUP_SIZE,
            sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=seed0 + i),
        )
        for i in range(n)
    ]


def _timed(engine, requests, images) -> dict:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    batch = engine.generate_batch(requests, images)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    tokens = sum(len(c.token_ids) for g in batch.completions for c in g)
    return {"tokens": tokens, "wall_s": wall, "cpu_s": cpu, "prompt_tokens": batch.prompt_tokens}


def _summary(runs: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in runs)
    wall = sum(r["wall_s"] for r in runs)
    cpu = sum(r["cpu_s"] for r in runs)
    return {
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "tokens_per_cpu_s": round(tokens / cpu, 1) if cpu > 0 else None,
        "runs": [
            {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "prompt_tokens"}
            for r in runs
        ],
    }


def _images(n: int, size: int, seed: int):
    """n noise images (fresh per round: no encoder or prefix cache hit across rounds)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _cpu_rounds(engines: dict, args, weights: list) -> tuple[dict, dict, dict]:
    """Per round, fresh images; per engine a 1-token call (time to first token of the batch), the timed full
    call, then a reload of `weights` as the next version (CPU s); engines interleaved so load from other
    processes spreads over all of them."""
    import torch

    runs: dict[str, list[dict]] = {name: [] for name in engines}
    ttft: dict[str, list[float]] = {name: [] for name in engines}
    reload: dict[str, list[float]] = {name: [] for name in engines}
    for k in range(args.rounds):
        images = _images(args.requests, args.image_size, seed=100 + k)
        first = _requests(args.requests, 1, seed0=5000 + 100 * k)
        requests = _requests(args.requests, args.max_tokens, seed0=1000 + 100 * k)
        for name, engine in engines.items():
            torch.set_num_threads(args.threads)
            ttft[name].append(_timed(engine, first, images)["wall_s"])
            runs[name].append(_timed(engine, requests, images))
            cpu0 = time.process_time()
            engine.load_weights(weights, k + 1)
            reload[name].append(time.process_time() - cpu0)
    return runs, ttft, reload


def _weights(folder: Path) -> list:
    """(name, tensor) of every tensor in the policy folder: what a weight update carries."""
    from safetensors.torch import load_file

    return [item for f in sorted(folder.glob("*.safetensors")) for item in load_file(str(f)).items()]


def _vllm(folder: Path, args, enforce_eager: bool | None = None):
    from actors.vllm_engine import VLLMEngine
    from protos.answer import COMPACT

    t0 = time.perf_counter()
    engine = VLLMEngine(
        folder,
        max_model_len=2048,
        seed=0,
        prompts=COMPACT,
        image_size=args.image_size,
        enable_prefix_caching=True,
        enforce_eager=enforce_eager,
    )
    return engine, time.perf_counter() - t0


def bench_cpu(args) -> dict:
    import torch

    from actors.hf_engine import HFEngine
    from cluster.dev.tiny_models import build_tiny_policy
    from protos.answer import COMPACT  # the tiny models' short prompts, as every CPU figure here

    torch.set_num_threads(args.threads)
    folder = build_tiny_policy(
        Path(tempfile.mkdtemp(prefix="segr1-bench-")) / "policy", seed=0, preset="demo"
    )
    engines = {"hf": HFEngine(folder, device="cpu", prompts=COMPACT, image_size=args.image_size)}
    engines["vllm"], vllm_init_s = _vllm(folder, args)
    extra = {}
    if args.compiled:
        engines["vllm_compiled"], init_s = _vllm(folder, args, enforce_eager=False)
        extra["vllm_compiled_init_s"] = round(init_s, 2)
    warm = _requests(1, 8)
    for engine in engines.values():
        engine.generate_batch(warm, _images(1, args.image_size, seed=99))
    runs, ttft, reload = _cpu_rounds(engines, args, _weights(folder))
    for name, engine in engines.items():
        if name != "hf":  # the vLLM engines
            engine.close()
    hf_s, vllm_s = _summary(runs["hf"]), _summary(runs["vllm"])
    extra |= {f"{name}_reload_cpu_s": round(sum(v) / len(v), 4) for name, v in reload.items()}
    if args.compiled:
        extra |= {
            "vllm_compiled_tokens_per_cpu_s": _summary(runs["vllm_compiled"])["tokens_per_cpu_s"],
            "vllm_compiled": _summary(runs["vllm_compiled"]),
        }
    return {
        "device": "cpu",
        "model": "tiny Qwen2.5-VL (demo preset: vision tower + hidden 128 LM, merge 4), random weights, float32",
        "batch": {
            "requests": args.requests,
            "group_size": GROUP_SIZE,
            "rows": args.requests * GROUP_SIZE,
            "max_tokens": args.max_tokens,
            "image_size": args.image_size,
            "prompt_tokens": runs["vllm"][0]["prompt_tokens"],
            "temperature": 1.0,
            "prefix_caching": True,
        },
        "threads": args.threads,
        "rounds": args.rounds,
        "hf_tokens_per_s": hf_s["tokens_per_s"],
        "vllm_tokens_per_s": vllm_s["tokens_per_s"],
        "hf_tokens_per_cpu_s": hf_s["tokens_per_cpu_s"],
        "vllm_tokens_per_cpu_s": vllm_s["tokens_per_cpu_s"],
        "hf_ttft_s": round(min(ttft["hf"]), 3),
        "vllm_ttft_s": round(min(ttft["vllm"]), 3),
        "ttft_runs_s": {name: [round(x, 3) for x in v] for name, v in ttft.items()},
        "vllm_init_s": round(vllm_init_s, 2),
        "hf": hf_s,
        "vllm": vllm_s,
        **extra,
    }


def _qwen3b_engine():
    """HFEngine around a random Qwen2.5-VL-3B-shaped model in bf16 on CUDA, with the tiny tokenizer/processor."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from actors.hf_engine import HFEngine
    from cluster.dev.tiny_models import build_tiny_policy
    from protos.answer import COMPACT
    from runtime.qwen_vl import load_processor

    tiny = build_tiny_policy(Path(tempfile.mkdtemp(prefix="segr1-bench-")) / "policy", seed=0)
    config = qwen3b_config()  # bench/gpu/models.py: the 3B's dimensions, the tiny tokenizer's special ids
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    processor = load_processor(tiny)
    return HFEngine.from_model(
        model, processor.tokenizer, processor, image_size=768, name="qwen2.5-vl-3b-shaped", prompts=COMPACT
    )


def bench_gpu(args) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    engine = _qwen3b_engine()
    requests = _requests(args.requests, args.max_tokens)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (768, 768, 3), dtype=np.uint8)) for _ in requests]
    engine.generate_batch(_requests(1, 8), images[:1])
    torch.cuda.synchronize()
    runs = []
    for _ in range(args.rounds):
        runs.append(_timed(engine, requests, images))
        torch.cuda.synchronize()
    s = _summary(runs)
    return {
        "device": torch.cuda.get_device_name(0),
        "model": "Qwen2.5-VL-3B-shaped, random weights, bf16, sdpa",
        "batch": {"requests": len(requests), "group_size": GROUP_SIZE, "rows": len(requests) * GROUP_SIZE,
                  "max_tokens": args.max_tokens, "image_size": 768, "prompt_tokens": runs[0]["prompt_tokens"]},
        "hf_tokens_per_s": s["tokens_per_s"],
        "hf": s,
        "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="8 requests x G=8, 128 tokens, 2 rounds (under a minute)"
    )
    p.add_argument("--gpu", action="store_true", help="also the Qwen2.5-VL-3B-shaped HF run on CUDA")
    p.add_argument("--requests", type=int, default=None, help="requests per call (default 8 quick, 16 full)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per completion (128 quick, 256 full)")
    p.add_argument("--rounds", type=int, default=None, help="timed calls per engine (2 quick, 3 full)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument(
        "--image-size", type=int, default=112, help="CPU run: NxN images (default 112: 4 image tokens)"
    )
    p.add_argument("--compiled", action="store_true", help="also vLLM compiled (enforce_eager=False)")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    args.requests = args.requests or (8 if args.quick else 16)
    args.max_tokens = args.max_tokens or (128 if args.quick else 256)
    args.rounds = args.rounds or (2 if args.quick else 3)
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    result: dict = {"cpu": bench_cpu(args)}
    if args.gpu:
        result["gpu"] = bench_gpu(args)
    result["host"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    result["command"] = "python bench/rollout_throughput.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    result["total_s"] = round(time.perf_counter() - t0, 1)
    # The headline keys at the top level (docs/benchmarks.md's table reads these).
    result["hf_tokens_per_s"] = result["cpu"]["hf_tokens_per_s"]
    result["vllm_tokens_per_s"] = result["cpu"]["vllm_tokens_per_s"]
    result["hf_ttft_s"] = result["cpu"]["hf_ttft_s"]
    result["vllm_ttft_s"] = result["cpu"]["vllm_ttft_s"]
    result["batch"] = result["cpu"]["batch"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    c = result["cpu"]
    print(
        f"cpu: hf {c['hf_tokens_per_s']} tok/s ({c['hf_tokens_per_cpu_s']} per cpu-s), "
        f"vllm {c['vllm_tokens_per_s']} tok/s ({c['vllm_tokens_per_cpu_s']} per cpu-s); "
        f"time to first token hf {c['hf_ttft_s']} s, vllm {c['vllm_ttft_s']} s; reload CPU s hf "
        f"{c['hf_reload_cpu_s']}, vllm {c['vllm_reload_cpu_s']}; "
        f"batch {c['batch']['requests']}x{GROUP_SIZE}, {c['batch']['max_tokens']} tokens -> {out}"
    )
    if "gpu" in result:
        print(f"gpu: {result['gpu']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
