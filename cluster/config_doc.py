"""The configuration reference as a Markdown table, generated from the pydantic models (docs/configuration.md
embeds it; tests/unit/cluster/test_config.py checks it is current). `python -m cluster.config_doc` prints it."""

from __future__ import annotations

from pydantic import BaseModel

from cluster.config import TrainConfig


def _bounds(info) -> str:
    parts = []
    for m in info.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            v = getattr(m, attr, None)
            if v is not None:
                parts.append(f"{sym} {v}")
    return ", ".join(parts)


def _rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(_rows(ann, key + "."))
            continue
        default = info.get_default(call_default_factory=True)
        typ = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
        desc = (info.description or "").replace("|", "/")
        rows.append(f"| `{key}` | `{default!r}` | {typ.replace('|', '/')} | {_bounds(info)} | {desc} |")
    return rows


def config_table() -> str:
    head = ["| key | default | type | bounds | meaning |", "|---|---|---|---|---|"]
    return "\n".join(head + _rows(TrainConfig)) + "\n"


if __name__ == "__main__":
    print(config_table(), end="")
