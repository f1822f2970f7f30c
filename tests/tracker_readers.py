"""Read back what each tracker stored, through the tracker's own reading API (tests only)."""

from __future__ import annotations

import struct
import time
from pathlib import Path

# The .wandb file of an offline run is a LevelDB-style log of wandb's own Record protobufs (wandb.proto). wandb
# 0.31 ships no Python reader of it any more (its datastore module went with the Go core), so this walks the
# framing and decodes each record with wandb's protobuf classes.
_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """Yield the wandb_internal_pb2.Record messages of one .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:_HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a .wandb run file"
    pos, buf = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        pos += _HEADER
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left - _HEADER
            continue
        chunk, pos = data[pos : pos + length], pos + length
        buf = chunk if kind in (_FULL, _FIRST) else buf + chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def wandb_history(path: Path, deadline_s: float = 60.0) -> tuple[str, list[dict]]:
    """(run id, history rows as {key: JSON text}) of one offline run's .wandb file. wandb-core finishes writing
    the file after run.finish() returns: this waits (at most deadline_s) for the run's closing `exit` record."""
    deadline = time.monotonic() + deadline_s
    records = list(wandb_records(path))
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, f"{path} has no exit record after {deadline_s:.0f} s"
        time.sleep(0.2)  # polling interval of the readiness check
        records = list(wandb_records(path))
    run_id, rows = "", []
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            rows.append({it.key or "/".join(it.nested_key): it.value_json for it in record.history.item})
    return run_id, rows


def tensorboard_events(logdir: Path):
    """An EventAccumulator over logdir with every scalar, image and tensor kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(
        str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0, "histograms": 0}
    )
    acc.Reload()
    return acc


def tensorboard_hparams(acc) -> dict:
    """The hyper-parameters of the HParams plugin's session-start record."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    out = {}
    for key, value in data.session_start_info.hparams.items():
        out[key] = getattr(value, value.WhichOneof("kind"))
    return out
