"""Answer-parser speed on hostile completions: the time of one `parse_answer` call on each pathological input
(tests/unit/reward_service/test_parser.py checks that each is refused, and by which rule; how fast is this script's figure), in
both answer formats, next to a clean answer.

    .venv/bin/python bench/parser_speed.py --out bench/results/parser_speed_cpu.json

Every input is cut to reward.max_completion_chars (8192, the parser's default cap: a longer completion is refused
as too_long before anything is parsed), as the reward service sees it. Prints one JSON object: per input and
format, its length, the failure reason and the median and worst milliseconds over --repeats parses. The parser's
aim (reward_service/parser.py: linear scans, anchored regexes without nested quantifiers): every parse well under
0.25 s, the bound the unit test used to assert.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MAX_CHARS = 8192  # reward.max_completion_chars' default
W, H = 160, 120

# Inputs shaped to make a careless parser backtrack, rescan or allocate: name -> text (before the cap).
PATHOLOGICAL = {
    "nested_open_points": "<points>[" + "[1," * 2000 + "</points><labels>[1]</labels>",
    "open_bbox_tags": "<think>" + "<bbox>" * 1500 + "</think>",
    "blank_bbox": "<bbox>[" + " " * 8000 + "</bbox>",
    "huge_number": "<points>[[" + "1" * 8000 + ",1]]</points><labels>[1]</labels>",
    "unbalanced_points": "<think>x</think><bbox>[1,2,30,40]</bbox><points>"
    + "[1,1]," * 1300
    + "[1,1]]</points><labels>[1]</labels>",
    "open_labels": "<labels>[" + "1," * 4000 + "</labels><points>[[1,1]]</points>",
}
CLEAN = (
    "<think> a red disk </think> <bbox>[10,20,100,110]</bbox>, <points>[[50,60],[5,5],[90,100]]</points>, "
    "<labels>[1,0,0]</labels>"
)


def measure(text: str, answer_format: str, repeats: int) -> dict:
    """Median and worst milliseconds of one parse of `text` (cut to MAX_CHARS), and its failure reason."""
    from reward_service.parser import parse_answer

    text = text[:MAX_CHARS]
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = parse_answer(text, W, H, answer_format=answer_format, max_points=1024)
        times.append(time.perf_counter() - t0)
    return {
        "chars": len(text),
        "failure": result.failure,
        "median_ms": round(statistics.median(times) * 1e3, 3),
        "max_ms": round(max(times) * 1e3, 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=50, help="parses per input and format")
    p.add_argument("--out", default="", help="JSON file to write (default: print only)")
    args = p.parse_args(argv)
    inputs = {"clean": CLEAN, **PATHOLOGICAL}
    load_before = os.getloadavg()[0]
    results = {
        name: {fmt: measure(text, fmt, args.repeats) for fmt in ("full", "points")}
        for name, text in inputs.items()
    }
    worst = max(r["max_ms"] for per_format in results.values() for r in per_format.values())
    out = {
        "repeats": args.repeats,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
        "worst_parse_ms": worst,
        "inputs": results,
    }
    text = json.dumps(out, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
