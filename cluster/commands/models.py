"""`segr1 models tiny --out DIR`: tiny random-init policy and segmenter folders, built offline."""

from __future__ import annotations

from cluster.commands.common import not_built


def register(sub) -> None:
    p = sub.add_parser("models", help="build models offline")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    t = msub.add_parser("tiny", help="tiny random Qwen2.5-VL policy + tiny SAM2, as Hugging Face folders")
    t.set_defaults(func=not_built("segr1 models tiny", "the foundation issue"))
