"""End-to-end throughput: samples/s of the demo's GRPO stage, synchronous and asynchronous on local Ray, against
a plain single-process loop, measured in the same run.

    python bench/e2e.py --quick --out bench/results/e2e_cpu.json
    python bench/e2e.py --out bench/results/e2e_cpu_full.json [--policy runs/demo/sft-policy]

What is compared (same policy, data, reward, B, G, sampling and seeds in all three):
- single_process: one Python process runs generate -> score -> update -> load the new weights, step after step,
  with the plain classes (actors.worker.RolloutWorker, reward_service.worker.RewardWorker, learner.learner.Learner)
  and torch using every core (torch.set_num_threads(os.cpu_count())), GrabCut on a thread per core.
- sync / async: `cluster.launch.run_training` with cluster/configs/demo.yaml (two rollout workers, two reward
  workers, the learner, the driver actor; gloo weight broadcast), grpo.mode=sync / async (max_staleness 1).
- sync_hf / async_hf (not in the default --modes): sync / async with the transformers rollout engine
  (rollout.engine=hf) instead of vLLM, to compare the shipped engine with the fallback in the same run.
- sync_compiled / async_compiled (not in the default --modes): sync / async with vLLM compiled
  (rollout.enforce_eager=false: torch.compile of the model, as on a GPU) instead of eager, the CPU default.
- sync_val / async_val (not in the default --modes): the same with validation during training, eval.every=10 on
  eval.samples=32 held-out samples (cluster/driver/validation.py), to show what validating costs the training throughput
  (`--modes async,async_val`); their figures add the validations' val/seconds.
- sync_2turn / async_2turn (not in the default --modes): the same with episodes of two turns (rollout.max_turns=2:
  each completion whose answer made a mask sees it and answers again); the JSON's `<mode>_2turn_step_vs_two_steps`
  is a 2-turn step's time over two 1-turn steps' (below 1: the second turn costs less than a whole step: the
  reward actor keeps the image's embedding, the rollout's prompt is a prefix-cache hit). With a 2-turn mode the
  SFT teaches the refine turn too (segr1 sft --turns 2), for every mode of the run.
A sample is one prompt (image) trained on; completions/s is samples/s x G. Throughput is steady state: the first
`warmup` steps (engine start, first weight sync, pipeline fill) are excluded; for the Ray modes the time is the sum
of metrics.jsonl `step_s` after the warm-up (in async mode step_s is the time between two learner steps).
The modes are measured `--rounds` times, interleaved (single, sync, async, single, ...); each mode's figure is its
best round, the one least disturbed by other jobs on the shared machine; every round is in the JSON.
The JSON also has the mean seconds per step of each stage (generate, score, learner, weight sync) to show where the
time goes, each Ray mode's throughput profile fitted from its steps (`segr1 plan --throughput --profile`; one batch
size, so proportional lines), and the load average, since every process shares the machine's cores with whatever
else runs.

Policy: by default a tiny policy built offline and taught the answer format by a short SFT (so that completions
parse and GrabCut runs, as in the demo): --quick uses the 0.2M-parameter test preset, 56-px images and the
points-only answer format (SFT ~1 min); without --quick the demo preset and the demo's full answer format
(SFT of --sft-steps, several minutes), or --policy DIR (e.g. the demo's runs/demo/sft-policy).
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
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEMO_CONFIG = REPO / "cluster" / "configs" / "demo.yaml"
MODES = (
    "single_process",
    "sync",
    "async",
    "sync_hf",
    "async_hf",
    "sync_compiled",
    "async_compiled",
    "sync_val",
    "async_val",
    "sync_2turn",
    "async_2turn",
)

QUICK = dict(
    preset="test",
    image_px=64,
    image_size=56,
    answer_format="points",
    max_tokens=48,
    sft_steps=100,
    sft_lr=1e-2,
    steps=14,
    warmup=2,
    n_train=256,
)
FULL = dict(
    preset="demo",
    image_px=128,
    image_size=112,
    answer_format="full",
    max_tokens=128,
    sft_steps=300,
    sft_lr=3e-3,
    steps=20,
    warmup=3,
    n_train=1024,
)


def build_policy(work: Path, s: dict, policy: str | None, turns: int = 1) -> tuple[Path, Path]:
    """(policy folder, training data folder): the tiny model, synthetic data and a short SFT (`turns` 2: the
    refine turn too), cached in work."""
    from cluster.data.synth import write_synthetic
    from cluster.dev.tiny_models import build_tiny_policy

    data = work / "data" / "train"
    if not any(data.glob("*.parquet")):
        write_synthetic(data, n=s["n_train"], seed=0, size=s["image_px"], split="train")
    held_out = work / "data" / "eval"  # for the *_val modes
    if not any(held_out.glob("*.parquet")):
        write_synthetic(held_out, n=64, seed=1, size=s["image_px"], split="eval")
    if policy:
        return Path(policy), data
    sft = work / "models" / ("sft-policy" if turns == 1 else "sft-policy-2turn")
    if (sft / "config.json").is_file():
        return sft, data
    import torch

    from cluster.data.reader import DatasetReader
    from learner.sft import run_sft

    base = build_tiny_policy(work / "models" / "policy", seed=0, preset=s["preset"])
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = bench_config(Path(base), data, work / "sft", s, [])
    t0 = time.perf_counter()
    r = run_sft(
        cfg.policy_spec(),
        cfg.learner,
        DatasetReader.from_config(cfg).next_batch,
        s["sft_steps"],
        sft,
        lr=s["sft_lr"],
        batch_size=16,
        warmup_steps=5,
        n_fg=1,
        n_bg=1,
        turns=turns,
    )
    print(
        f"SFT: {r.steps} steps in {time.perf_counter() - t0:.0f} s, loss {r.first_loss:.2f} -> {r.last_loss:.2f}"
    )
    return sft, data


def bench_config(policy: Path, data: Path, run_dir: Path, s: dict, overrides: list[str]):
    from cluster.config import load_config

    base = [
        f"model.policy={policy}",
        f"data.train={data}",
        "data.eval=null",
        "eval.every=0",  # no held-out set: no validation (demo.yaml validates every 10 steps)
        f"data.image_size={s['image_size']}",
        f"reward.answer_format={s['answer_format']}",
        f"rollout.sampling.max_tokens={s['max_tokens']}",
        f"grpo.steps={s['steps']}",
        "metrics.port=0",
        f"metrics.run_dir={run_dir}",
        f"checkpoint.dir={run_dir / 'checkpoints'}",
        "checkpoint.every=0",
    ]
    if s["answer_format"] == "points":  # no box to reward
        base.append("reward.weights.box_l1=0")
    return load_config(DEMO_CONFIG, [*base, *overrides])


# -- the plain single-process loop ----------------------------------------------------------------------------------
def single_process(cfg, warmup: int) -> dict:
    """generate -> score -> update -> load weights, in this process, with the same seeds as the driver."""
    import torch

    from actors.worker import RolloutWorker
    from cluster.data.reader import DatasetReader
    from learner.learner import Learner
    from protos import ScoredGroup
    from reward_service.worker import RewardWorker

    torch.set_num_threads(os.cpu_count() or 1)
    reader = DatasetReader.from_config(cfg)
    rollout, reward, learner = (
        RolloutWorker(cfg.policy_spec(), cfg.rollout, "rollout-0"),
        RewardWorker(cfg.policy_spec(), cfg.reward, "reward-0"),
        Learner(cfg.learner_spec()),
    )
    times = {"generate_s": [], "score_s": [], "learner_s": [], "weight_sync_s": [], "step_s": []}
    rewards, cpu_at = [], []
    for step in range(cfg.grpo.steps):
        cpu_at.append(time.process_time())
        t0 = time.perf_counter()
        samples = reader.next_batch(cfg.grpo.batch_size)
        groups = rollout.generate(_requests(cfg, step, samples), *samples)
        t1 = time.perf_counter()
        scored = [ScoredGroup.join(g, s) for g, s in zip(groups, reward.score(groups, *samples), strict=True)]
        t2 = time.perf_counter()
        stats = learner.step(scored, *samples)
        t3 = time.perf_counter()
        rollout.load_weights(learner.named_weights(), stats.policy_version)
        t4 = time.perf_counter()
        for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
            times[key].append(value)
        rewards.append(sum(t for sg in scored for t in sg.totals) / (len(scored) * cfg.grpo.group_size))
    out = _figures(cfg, times, [cfg.grpo.batch_size] * cfg.grpo.steps, warmup, rewards)
    cpu = time.process_time() - cpu_at[warmup]
    out["cpu_s_per_step"] = {"bench process": round(cpu / out["timed_steps"], 3)}
    out["cpu_utilisation"] = round(cpu / out["timed_s"], 2)
    return out


def _requests(cfg, step: int, samples: list) -> list:
    """The requests the sync driver sends at `step` (one chunk per step here; seeds spaced G apart)."""
    from cluster.driver.state import request_seed
    from protos import RolloutRequest

    g = cfg.grpo
    return [
        RolloutRequest.for_sample(
            x,
            g.group_size,
            cfg.rollout.sampling,
            request_id=f"c{step}-{i}",
            seed=request_seed(cfg.seed, step, i, g.group_size),
        )
        for i, x in enumerate(samples)
    ]


# -- where the CPU goes -----------------------------------------------------------------------------------------------
class CpuSampler:
    """Samples, every `every` s, the CPU seconds (utime + stime from /proc) and the bytes read and written
    through system calls (/proc/PID/io rchar, wchar: sockets and files, not shared memory) of this process and
    all its descendants: a local Ray's gcs_server, raylet and worker processes (ray::Learner, ...).
    `between(t0, t1)` gives the CPU seconds each kind of process used in that wall-clock window, `io_between`
    the bytes."""

    def __init__(self, every: float = 0.25):
        import threading

        self.every = every
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")
        self._kinds: dict[int, str] = {}  # kept once known: an exiting process's cmdline reads empty

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self._snapshot()))
            self._stop.wait(self.every)

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        stats = {}
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                    stats[int(proc.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / self._tick)
                except (OSError, IndexError, ValueError):
                    continue
        mine, frontier = {os.getpid()}, [os.getpid()]
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        while frontier:
            for child in children.get(frontier.pop(), []):
                if child not in mine:
                    mine.add(child)
                    frontier.append(child)
        for pid in mine:
            known = self._kinds.get(pid, "")
            if not known.startswith("ray::") or known == "ray::IDLE":
                self._kinds[pid] = _kind(pid)
        return {pid: (self._kinds[pid], stats[pid][1], *_io(pid)) for pid in mine if pid in stats}

    def between(self, t0: float, t1: float, field: int = 1) -> dict[str, float]:
        """Per kind of process, the growth of snapshot field `field` (1: CPU s, 2: bytes read, 3: written)."""
        before = min(self.samples, key=lambda s: abs(s[0] - t0), default=None)
        after = min(self.samples, key=lambda s: abs(s[0] - t1), default=None)
        if before is None or after is None or after[0] <= before[0]:
            return {}
        used: dict[str, float] = {}
        for pid, now in after[1].items():
            start = before[1].get(pid, (now[0], 0.0, 0, 0))[field]
            used[now[0]] = used.get(now[0], 0.0) + max(0.0, now[field] - start)
        return {k: round(v, 3) for k, v in sorted(used.items(), key=lambda kv: -kv[1])}

    def io_between(self, t0: float, t1: float) -> dict[str, dict[str, float]]:
        read, written = self.between(t0, t1, 2), self.between(t0, t1, 3)
        return {k: {"read": read[k], "written": written.get(k, 0.0)} for k in read}


def _io(pid: int) -> tuple[int, int]:
    """(rchar, wchar) of the process: bytes it read and wrote through system calls."""
    try:
        fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        return int(fields["rchar"]), int(fields["wchar"])
    except (OSError, KeyError, ValueError):
        return 0, 0


def _kind(pid: int) -> str:
    """ray::Learner / ray::RolloutWorker / ray::RewardWorker / ray::TrainDriver / raylet / gcs_server / ..."""
    if pid == os.getpid():
        return "bench process"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = argv[0].decode(errors="replace")
    if first.startswith("ray::"):  # ray::Learner.step, ray::reward-1:RewardWorker.score -> the class
        return "ray::" + first.split()[0].split(".")[0].removeprefix("ray::").rsplit(":", 1)[-1]
    for arg in argv[:4]:
        name = Path(arg.decode(errors="replace")).name
        if name and not name.startswith(("python", "-")):
            return name.removesuffix(".py")
    return "other"


# -- the Ray modes ---------------------------------------------------------------------------------------------------
def ray_mode(cfg, warmup: int) -> dict:
    from cluster.launch import run_training

    t0 = time.perf_counter()
    with CpuSampler() as cpu:
        summary = run_training(cfg)
    wall = time.perf_counter() - t0
    from cluster.driver.validation import is_validation_line

    lines = [
        json.loads(x) for x in (Path(cfg.metrics.run_dir) / "metrics.jsonl").read_text().splitlines() if x
    ]
    rows = [r for r in lines if not is_validation_line(r)]
    val = [r for r in lines if is_validation_line(r)]
    keys = ("generate_s", "score_s", "learner_s", "weight_sync_s", "step_s")
    times = {k: [r[k] for r in rows] for k in keys}
    out = _figures(cfg, times, [r["groups"] for r in rows], warmup, [r["reward_total"] for r in rows])
    if len(rows) > warmup:
        t_from, t_to = (
            rows[warmup - 1]["time"] if warmup else rows[0]["time"] - rows[0]["step_s"],
            rows[-1]["time"],
        )
        used = cpu.between(t_from, t_to)
        out["cpu_s_per_step"] = {k: round(v / out["timed_steps"], 3) for k, v in used.items()}
        io = cpu.io_between(t_from, t_to)
        out["io_bytes_per_step"] = {
            k: {d: round(b / out["timed_steps"]) for d, b in v.items()}
            for k, v in io.items()
            if "Driver" in k
        }
        out["cpu_utilisation"] = round(
            sum(used.values()) / (t_to - t_from), 2
        )  # cores busy, of os.cpu_count()
    out["staleness_max"] = max((r["staleness_max"] for r in rows), default=0)
    out["episode_turns_mean"] = _mean([r["episode_turns_mean"] for r in rows[warmup:]])
    out["generated_tokens_per_step"] = _mean([r["num_tokens"] for r in rows[warmup:]])
    if len(rows) > warmup:  # the stage costs `segr1 preflight` records (`segr1 plan --throughput --profile`)
        from cluster.plan.profile import fit_profile
        from cluster.plan.throughput import Shape

        shape = Shape.from_config(cfg)
        out["profile"] = fit_profile([(shape, rows[warmup:])], os.cpu_count(), "bench/e2e.py").to_json()
    out["groups_lost"] = summary["groups_lost"]
    out["groups_dropped_stale"] = summary["groups_dropped_stale"]
    out["job_wall_s"] = wall  # Ray actors' start included
    if val:
        out["validations"] = [
            {k: r[k] for k in ("step", "val/seconds", "val/mean_iou", "val/samples")} for r in val
        ]
    return out


def _figures(cfg, times: dict, groups: list[int], warmup: int, rewards: list[float]) -> dict:
    timed = slice(warmup, None)
    seconds = sum(times["step_s"][timed])
    samples = sum(groups[timed])
    return {
        "samples_per_s": samples / seconds if seconds > 0 else 0.0,
        "completions_per_s": samples * cfg.grpo.group_size / seconds if seconds > 0 else 0.0,
        "timed_steps": len(times["step_s"][timed]),
        "timed_s": seconds,
        "mean_s": {k: _mean(v[timed]) for k, v in times.items()},
        "reward_total_first_last": [rewards[0], rewards[-1]] if rewards else None,
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="test-preset policy, 56-px images, 14 steps, 2 rounds (~4 min)"
    )
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--policy", default=None, help="an SFT'd policy folder to use instead of building one")
    p.add_argument("--work", default=None, help="folder for models, data and runs (default: a temp dir)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--rounds", type=int, default=2, help="measure every mode this many times, interleaved")
    p.add_argument("--modes", default="single_process,sync,async", help=f"comma-separated, of {MODES}")
    args = p.parse_args(argv)
    s = dict(QUICK if args.quick else FULL)
    if args.steps:
        s["steps"] = args.steps
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="segr1-bench-e2e-"))
    modes = [m for m in MODES if m in args.modes.split(",")]
    policy, data = build_policy(work, s, args.policy, 2 if any(m.endswith("_2turn") for m in modes) else 1)
    result: dict = {"config": _describe(s, policy, work), "load_avg_start": os.getloadavg(), "rounds": []}
    for r in range(args.rounds):
        figures = {m: measure(m, policy, data, work / f"round{r}" / m, s) for m in modes}
        result["rounds"].append(figures)
        print(f"round {r}:", {m: round(f["samples_per_s"], 2) for m, f in figures.items()}, flush=True)
    for m in modes:  # the best round of each mode: the one least disturbed by other jobs on the machine
        result[m] = max((rnd[m] for rnd in result["rounds"]), key=lambda f: f["samples_per_s"])
    result["load_avg_end"] = os.getloadavg()
    base = result.get("single_process", {}).get("samples_per_s")
    if base:
        result["speedup_vs_single_process"] = {
            m: result[m]["samples_per_s"] / base for m in MODES[1:] if m in result
        }
    for m in ("sync", "async"):  # what validating every 10 steps costs, measured in the same run
        if m in result and f"{m}_val" in result:
            result[f"{m}_val_vs_{m}"] = result[f"{m}_val"]["samples_per_s"] / result[m]["samples_per_s"]
        if m in result and f"{m}_2turn" in result:  # step time of 2 turns / (2 x step time of 1 turn)
            result[f"{m}_2turn_step_vs_two_steps"] = (
                result[m]["samples_per_s"] / result[f"{m}_2turn"]["samples_per_s"] / 2
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(
        json.dumps({m: result[m]["samples_per_s"] for m in modes}),
        json.dumps(result.get("speedup_vs_single_process")),
    )
    return 0


def measure(mode: str, policy: Path, data: Path, run_dir: Path, s: dict) -> dict:
    if mode == "single_process":
        return single_process(bench_config(policy, data, run_dir, s, []), s["warmup"])
    overrides = [f"grpo.mode={mode.split('_')[0]}"]
    if mode.endswith("_hf"):
        overrides.append("rollout.engine=hf")
    if mode.endswith("_compiled"):
        overrides.append("rollout.enforce_eager=false")
    if mode.endswith("_val"):
        overrides += [f"data.eval={data.parent / 'eval'}", "eval.every=10", "eval.samples=32"]
    if mode.endswith("_2turn"):
        overrides.append("rollout.max_turns=2")
    cfg = bench_config(policy, data, run_dir, s, overrides)
    _init_ray(cfg)
    return ray_mode(cfg, s["warmup"])


def _init_ray(cfg) -> None:
    from cluster.pools.topology import init_ray

    init_ray(cfg)


def _describe(s: dict, policy: Path, work: Path) -> dict:
    from cluster.config import load_config

    demo = load_config(DEMO_CONFIG)
    return {
        **s,
        "policy": str(policy),
        "work": str(work),
        "config": str(DEMO_CONFIG.relative_to(REPO)),
        "batch_size": demo.grpo.batch_size,
        "group_size": demo.grpo.group_size,
        "rollout_workers": demo.rollout.num_workers,
        "reward_workers": demo.reward.num_workers,
        "segmenter": demo.reward.segmenter,
        "max_staleness": demo.grpo.max_staleness,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


if __name__ == "__main__":
    sys.exit(main())
