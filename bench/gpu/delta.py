"""The `weight_sync_delta` part: weight_sync.delta against full versions with the learner's weights on the GPU, the
deployment `weight_sync.delta: auto` turns delta on for (bench/weight_sync_delta.py's harness).

The Qwen2.5-0.5B layer shapes at --quick size (238 MB in bf16) take real AdamW steps on the GPU at lr 1e-6 and
1e-5; each version goes to 2 receiving processes four ways, interleaved: full and delta, over gloo TCP and through
/dev/shm. The changes are found on the GPU, the payloads cross the host. On the CPU the part is skipped: there
delta is off by default (finding the changes costs more than sending everything; docs/benchmarks.md), and
tests/unit/runtime/test_weight_delta.py covers the code.
"""

from __future__ import annotations

from bench.gpu.common import Context, Skip

VERSIONS = 6
BUCKET_MB = 64


def run(ctx: Context) -> dict:
    if not ctx.cuda:
        raise Skip("delta is measured with the learner's weights on a GPU; on the CPU it is off by default")
    from bench.weight_sync import QUICK, model_shapes
    from bench.weight_sync_delta import LRS, run_lr

    by_lr = [run_lr(model_shapes(QUICK), lr, VERSIONS, BUCKET_MB, "cuda") for lr in LRS]
    figures = {}
    for r in by_lr:
        tag = f"lr{r['lr']:g}"
        for transport in ("tcp", "shm"):
            figures[f"{tag}_{transport}_bytes_ratio"] = round(
                r[f"{transport}_bytes_ratio_full_over_delta"], 3
            )
            figures[f"{tag}_{transport}_seconds_ratio"] = round(
                r[f"{transport}_seconds_ratio_full_over_delta"], 3
            )
        if not r["bit_identical"]:
            raise RuntimeError(
                f"delta at lr {r['lr']:g}: the receivers' last version differs from the learner's"
            )
    return {"figures": figures, "detail": {"by_lr": [{k: v for k, v in r.items()} for r in by_lr]}}
