"""`segr1 data synth|import`: write data sets as Parquet shards in protos.DATASET_SCHEMA."""

from __future__ import annotations

from cluster.commands.common import not_built


def register(sub) -> None:
    p = sub.add_parser("data", help="make or import data sets (Parquet shards)")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    s = dsub.add_parser("synth", help="synthetic images with exact masks")
    s.set_defaults(func=not_built("segr1 data synth", "the foundation issue"))
    i = dsub.add_parser("import", help="import COD10K, CAMO, DUTS, RefCOCO, ... from a local folder")
    i.set_defaults(func=not_built("segr1 data import", "the datasets-and-evaluation issue"))
