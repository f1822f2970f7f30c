"""The throughput model of a GRPO step (docs/scaling.md, "Throughput model"): from a measured `Profile` of the
stages and the shape of a config, the seconds of one step, samples/s and the bottleneck, in sync and async mode.

    profile = Profile.load("preflight.json")         # or bench/plan_validation.py's profile on CPU
    p = predict(Shape.from_config(cfg), profile)    # p.samples_per_s, p.bottleneck, p.busy_s
    best_splits(shape, cfg, profile, gpus=8)        # rollout / reward / learner GPU splits, best first

Every stage cost is a line, seconds = fixed + per_unit x units: a generate call of c prompts (G completions each)
on one rollout worker, a score call of c prompts on one reward worker, an optimiser step of B prompts on the
learner (split over its ranks), a weight publish to n receivers, and the driver's share of a step (Ray's calls
and transfers) in each mode. Episodes of several turns (rollout.max_turns > 1) add, per chunk, a generate and a
score call for each later turn over the completions still going (`Shape.turns`: expected turns per episode), and
make the learner's rows longer (`Shape.episode_tokens`). On a CPU profile every process shares the machine's
`cores`: a phase in which k single-threaded workers run at once takes max(1, k / cores) times longer, and no step
is shorter than the CPU seconds it needs divided by the cores. A GPU profile has no such term: each pool owns its
GPUs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

STAGES = ("rollout", "reward", "learner", "weight_sync")


class ProfileError(ValueError):
    """A profile file that cannot be used: names the file, the field and the fix."""


@dataclass(frozen=True)
class Linear:
    """seconds = fixed + per_unit x units."""

    fixed: float
    per_unit: float

    def __call__(self, units: float) -> float:
        return self.fixed + self.per_unit * units

    @classmethod
    def fit(cls, points: list[tuple[float, float]]) -> Linear:
        """Least squares through (units, seconds); fixed and per_unit kept >= 0. One size measured: the line
        through the origin (the whole cost proportional to the work)."""
        if not points:
            raise ValueError("no measurement to fit")
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        if var == 0:
            return cls(0.0, my / mx if mx else 0.0)
        slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var)
        fixed = my - slope * mx
        if fixed < 0:  # never a negative cost: through the origin instead
            return cls(0.0, sum(x * y for x, y in points) / sum(x * x for x in xs))
        return cls(fixed, slope)


@dataclass(frozen=True)
class Profile:
    """Measured stage costs (see the module doc); `cores` set on a CPU profile, None on a GPU one."""

    rollout: Linear  # one generate call, units: prompts in the call
    reward: Linear  # one score call, units: prompts in the call
    learner: Linear  # one optimiser step on one rank, units: prompts per rank
    weight_sync: Linear  # one publish, units: receiving rollout workers
    overhead: dict[str, Linear]  # the driver's share of a step per mode (fitted constant: units ignored)
    cores: float | None = None
    source: str = ""
    measured: dict = field(default_factory=dict)  # what it was fitted from

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: str = "profile") -> Profile:
        def line(value, key: str) -> Linear:
            try:
                out = Linear(float(value["fixed"]), float(value["per_unit"]))
            except (TypeError, KeyError, ValueError):
                raise ProfileError(
                    f"{where}: {key} must be {{'fixed': seconds, 'per_unit': seconds}}, got {value!r}; "
                    "measure the profile again (`segr1 preflight` or bench/plan_validation.py)"
                ) from None
            if out.fixed < 0 or out.per_unit < 0:
                raise ProfileError(f"{where}: {key} has a negative cost {value!r}; measure the profile again")
            return out

        missing = [k for k in (*STAGES, "overhead") if k not in data]
        if missing:
            raise ProfileError(
                f"{where}: no {', '.join(missing)}: not a throughput profile; `segr1 preflight` writes one "
                "into preflight.json under 'profile'"
            )
        overhead = data["overhead"] if isinstance(data["overhead"], dict) else {}
        return cls(
            **{k: line(data[k], k) for k in STAGES},
            overhead={m: line(v, f"overhead.{m}") for m, v in overhead.items()},
            cores=None if data.get("cores") is None else float(data["cores"]),
            source=str(data.get("source", "")),
            measured=dict(data.get("measured", {})),
        )

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """A profile file, or a preflight.json holding one under 'profile'."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ProfileError(f"{path}: cannot read a profile ({err})") from None
        return cls.from_json(data.get("profile", data) if isinstance(data, dict) else {}, str(path))


@dataclass(frozen=True)
class Shape:
    """What the model reads of a config."""

    mode: str
    batch_size: int  # prompts per step (B)
    group_size: int  # completions per prompt (G)
    rollout_workers: int
    reward_workers: int
    learner_ranks: int
    max_batch_groups: int  # prompts one generate call may batch
    max_staleness: int = 1
    rollout_threads: int = 1  # on CPU: the threads of one worker of each pool (OMP_NUM_THREADS)
    reward_threads: int = 1
    learner_threads: int = 1
    max_turns: int = 1  # rollout.max_turns
    turns: float = 1.0  # expected turns per episode, 1 .. max_turns
    later_turn_tokens: float = 0.0  # the tokens a later turn adds to a row, over a one-turn row's

    @classmethod
    def from_config(cls, cfg, turns: float | None = None, model_shapes: str | None = None) -> Shape:
        """`turns`: the expected turns per episode; None: rollout.max_turns (every episode takes every turn,
        the most work). With max_turns > 1 the policy's shapes are read (the token counts of a later turn:
        cluster/plan/memory.py `estimate_sequence`)."""

        def threads(res) -> int:
            return max(1, int(res.num_cpus))

        max_turns = cfg.rollout.max_turns
        expected = float(max_turns if turns is None else turns)
        if not 1 <= expected <= max_turns:
            raise ValueError(
                f"expected turns per episode {expected:g} is outside 1 .. rollout.max_turns={max_turns}"
            )
        return cls(
            mode=cfg.grpo.mode,
            batch_size=cfg.grpo.batch_size,
            group_size=cfg.grpo.group_size,
            rollout_workers=cfg.rollout.num_workers,
            reward_workers=cfg.reward.num_workers,
            learner_ranks=cfg.learner.ranks,
            max_batch_groups=cfg.rollout.max_batch_groups,
            max_staleness=cfg.grpo.max_staleness,
            rollout_threads=threads(cfg.rollout.resources),
            reward_threads=threads(cfg.reward.resources),
            learner_threads=threads(cfg.learner.resources),
            max_turns=max_turns,
            turns=expected,
            later_turn_tokens=later_turn_tokens(cfg, model_shapes) if max_turns > 1 else 0.0,
        )

    @property
    def chunk(self) -> int:
        """Prompts per generate call: the driver splits a step's B over the rollout workers (loop.py)."""
        return max(1, min(self.max_batch_groups, math.ceil(self.batch_size / self.rollout_workers)))

    @property
    def calls(self) -> int:
        return math.ceil(self.batch_size / self.chunk)

    @property
    def episode_tokens(self) -> float:
        """The learner's row width over a one-turn row's: its rows are padded to the longest of the batch, taken
        as an episode of max_turns turns once any episode goes on (an upper bound; exact for max_turns 2)."""
        return 1.0 + (self.max_turns - 1) * self.later_turn_tokens if self.turns > 1.0 else 1.0

    def at_measured_turns(self, turns: float) -> Shape:
        """This shape at the turns per episode a run measured (its `episode_turns_mean`), within 1..max_turns."""
        if self.max_turns <= 1:
            return self
        return replace(self, turns=min(float(self.max_turns), max(1.0, turns)))

    def episode(self, line: Linear, units: float) -> float:
        """Seconds of a call of `units` prompts with every later turn: one more call per turn while any
        episode goes on, over the (turns - 1) x units prompts' completions still going in all."""
        if self.turns <= 1.0:
            return line(units)
        return line(units) + (self.max_turns - 1) * line.fixed + line.per_unit * units * (self.turns - 1.0)


def later_turn_tokens(cfg, model_shapes: str | None = None) -> float:
    """What a later turn adds to a row (its picture, the refine turn's text, one more answer) over a one-turn
    row's prompt and answer, from the memory plan's token counts of cfg."""
    from cluster.plan.memory import estimate_sequence
    from cluster.plan.model_shapes import load_policy_shapes

    seq = estimate_sequence(cfg, load_policy_shapes(cfg.model.policy, model_shapes)[0])
    return (seq.image_tokens + seq.refine_tokens + seq.completion) / (seq.prompt + seq.completion)


@dataclass
class Prediction:
    step_s: float
    samples_per_s: float
    completions_per_s: float
    bottleneck: str  # the pool whose workers wait least: rollout | reward | learner
    limit: str  # what sets the step's time: a pool, `stages` (sync: they run in turn) or `cpu` (shared cores)
    busy_s: dict[str, float]  # per step: seconds one worker of each pool works (learner: with the publish)
    shape: Shape

    def to_json(self) -> dict:
        return {**asdict(self), "shape": asdict(self.shape)}


def _slow(workers: float, threads: int, cores: float | None) -> float:
    """How much longer a phase takes when `workers` of `threads` threads each run at once on `cores`."""
    return 1.0 if cores is None else max(1.0, workers * threads / cores)


def predict(shape: Shape, profile: Profile) -> Prediction:
    """Seconds of one step and samples/s of `shape` under `profile` (docs/scaling.md, "Throughput model")."""
    s, cores = shape, profile.cores
    gen, score = s.episode(profile.rollout, s.chunk), s.episode(profile.reward, s.chunk)
    learn = profile.learner(s.batch_size / s.learner_ranks * s.episode_tokens)
    publish = profile.weight_sync(s.rollout_workers)
    busy = {  # the work of one worker of each pool per step (the learner's with its publish)
        "rollout": s.calls * gen / s.rollout_workers,
        "reward": s.calls * score / s.reward_workers,
        "learner": learn + publish,
    }
    overhead = profile.overhead.get(s.mode, Linear(0.0, 0.0))(s.batch_size)
    # a step's chain: generate (rounds of R calls), score the last round's calls, learn, publish, in turn (with
    # later turns each chunk alternates generate and score: all its turns' scoring is on the chain)
    at_once = min(s.rollout_workers, s.calls)
    rounds = math.ceil(s.calls / s.rollout_workers)
    gen_s = rounds * gen * _slow(at_once, s.rollout_threads, cores)
    scoring = min(at_once, s.reward_workers)
    tail_s = math.ceil(at_once / s.reward_workers) * score * _slow(scoring, s.reward_threads, cores)
    chain = gen_s + tail_s + learn + publish
    if s.mode == "sync":  # one step's chain after the other
        step, limit = chain + overhead, "stages"
    else:  # pipelined: max_staleness + 1 steps' chains overlap, the busiest pool sets the pace, and on CPU
        # every pool shares the cores at once
        # (a rollout worker also loads each publish)
        bounds = {**busy, "rollout": busy["rollout"] + publish, "stages": chain / (s.max_staleness + 1)}
        if cores is not None:
            bounds["cpu"] = (
                s.calls * (gen * s.rollout_threads + score * s.reward_threads)
                + learn * s.learner_threads * s.learner_ranks
                + publish * (s.rollout_workers + 1)
            ) / cores
        limit = max(bounds, key=bounds.__getitem__)
        step = bounds[limit] + overhead
    return Prediction(
        step_s=step,
        samples_per_s=s.batch_size / step,
        completions_per_s=s.batch_size * s.group_size / step,
        bottleneck=max(busy, key=busy.__getitem__),
        limit=limit,
        busy_s={k: round(v, 4) for k, v in busy.items()},
        shape=shape,
    )


def with_split(shape: Shape, rollout: int, reward: int, learner: int) -> Shape:
    return replace(shape, rollout_workers=rollout, reward_workers=reward, learner_ranks=learner)
