"""What `make demo` prints: one line per phase and a short summary at the end (cluster/dev/demo.py runs them).

    [1/6] tiny models and synthetic data ...        a line once built (or found in the cache)
    [2/6] SFT warm-up  ... 300/300 ... loss=0.43     tqdm bars: one line each, redrawn in place
    [3/6] eval before RL ... 128/128
    [4/6] RL (GRPO sync) ... 60/60 ... reward=..., val IoU=...   read from metrics.jsonl while the job runs
    [5/6] eval after RL ... 128/128
    [6/6] pictures ...
    <summary_lines(): mean IoU before / after RL against the best constant box, parse rate, where the outputs are>

The figures themselves stay in files (eval.json, summary.json, metrics.jsonl); nothing here computes them.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

PHASES = 6


def phase(k: int, text: str) -> str:
    """`[k/6] text`: the label of a phase's line (a bar's description, or the whole line)."""
    return f"[{k}/{PHASES}] {text}"


def beats_constant_box(result: dict) -> bool:
    """The demo's bar (README): mean IoU after RL above the best constant box's (whole image or centre)."""
    after = result["after_rl"].get("mean_iou") or 0.0
    return after > result["constant_baseline"]["mean_iou"]


def summary_lines(result: dict, out: Path) -> list[str]:
    """The lines a person reads at the end: figures from run_demo's result, paths under `out`."""
    before, after, base = result["before_rl"], result["after_rl"], result["constant_baseline"]
    b, a = before.get("mean_iou") or 0.0, after.get("mean_iou") or 0.0
    best = max(
        (k for k in base if isinstance(base[k], dict)),
        key=lambda k: base[k].get("mean_iou") or 0.0,
        default=None,
    )
    box = f"best constant box ({best.replace('_', ' ')})" if best else "best constant box"
    verdict = "above" if beats_constant_box(result) else "NOT above"
    train = result["train_summary"]
    lines = [
        f"Seg-R1 demo (seed {result['seed']}) finished in {result['wall_s'] / 60:.1f} min",
        f"  mean IoU on {after.get('n', before.get('n'))} held-out images: {b:.3f} before RL -> {a:.3f} after "
        f"({a - b:+.3f})",
        f"  {box}: {base['mean_iou']:.3f}, the demo's bar: after RL is {verdict} it",
        f"  parse rate: {_rate(before)} before, {_rate(after)} after; GRPO: {train['steps']} steps, "
        f"{train['groups_trained']} of {train['groups_generated']} groups trained, {train['groups_lost']} lost",
        *_looking_again(before, after),
        f"  pictures:    {out / 'grid_before_rl.png'}, grid_after_rl.png, reward_curve.png",
        f"  metrics:     {out / 'metrics.jsonl'} (per step), eval.json (these figures), summary.json (the job)",
        f"  TensorBoard: tensorboard --logdir {out}",
    ]
    return lines


def _looking_again(before: dict, after: dict) -> list[str]:
    """With rollout.max_turns > 1: the first turn's IoU against the last's, before and after RL."""
    if "refinement" not in after:
        return []
    b, a = before.get("refinement", {}), after["refinement"]
    first = lambda r, last: f"{r.get('turn1_mean_iou') or 0.0:.3f} -> {last or 0.0:.3f}"  # noqa: E731
    return [
        f"  turn 1 -> last (up to {a['turns']} turns): {first(b, before.get('mean_iou'))} before RL, "
        f"{first(a, after.get('mean_iou'))} after; {a['turns_mean']:.2f} turns a sample, {a['stop_rate']:.2f} stop"
    ]


def _rate(figures: dict) -> str:
    rate = figures.get("parse_rate")
    return "n/a" if rate is None else f"{rate:.2f}"


class StepProgress:
    """The RL phase's line: a tqdm bar of the GRPO steps in `metrics_jsonl` (its step lines; validation lines give
    the latest val IoU), polled every `every_s` while the job runs. A context manager: the bar closes at exit."""

    def __init__(self, metrics_jsonl: Path, steps: int, desc: str, every_s: float = 1.0):
        from tqdm import tqdm

        self.path, self.every_s = Path(metrics_jsonl), every_s
        self.bar = tqdm(total=steps, desc=desc, unit="step")
        self._offset, self._partial = 0, ""
        self._postfix: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="demo-progress", daemon=True)

    def __enter__(self) -> StepProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        self.bar.close()

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            self.poll()

    def poll(self) -> None:
        """Read the lines appended since the last poll and move the bar to the latest step."""
        from cluster.driver.validation import is_validation_line

        for row in self._new_rows():
            if is_validation_line(row):
                if row.get("val/mean_iou") is not None:
                    self._postfix["val IoU"] = f"{row['val/mean_iou']:.3f}"
            elif "step" in row:
                self.bar.n = min(int(row["step"]), self.bar.total)
                if row.get("reward_total") is not None:
                    self._postfix["reward"] = f"{row['reward_total']:.2f}"
        self.bar.set_postfix(self._postfix, refresh=False)
        self.bar.refresh()

    def _new_rows(self) -> list[dict]:
        try:
            with self.path.open() as f:
                f.seek(self._offset)
                text = self._partial + f.read()
                self._offset = f.tell()
        except FileNotFoundError:
            return []
        *complete, self._partial = text.split("\n")
        return [json.loads(line) for line in complete if line.strip()]
