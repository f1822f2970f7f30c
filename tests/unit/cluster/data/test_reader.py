"""Dataset reading: sharding, per-epoch shuffle, cursor save/restore, corrupt rows; image/mask codecs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.cli import main
from cluster.config import TrainConfig
from cluster.data.reader import DatasetError, DatasetReader, iter_samples, resolve_shards
from cluster.data.synth import generate_item, samples_to_table, write_synthetic
from protos.dataset import DATASET_SCHEMA
from runtime.images import (
    CorruptSampleError,
    decode_image,
    decode_mask,
    decode_sample_arrays,
    encode_png,
)

N = 30


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds")
    write_synthetic(out, n=N, seed=1, size=48, shard_size=7)  # 5 shards: 7+7+7+7+2 rows
    return out


@pytest.fixture(scope="module")
def all_ids(dataset) -> list[str]:
    return [s.id for s in iter_samples(dataset)]


def _ids(samples) -> list[str]:
    return [s.id for s in samples]


# ----------------------------------------------------------------------------------------------- order


def test_iter_samples_reads_every_row_once_in_order(dataset, all_ids):
    table = pa.concat_tables([pq.read_table(p) for p in sorted(dataset.glob("*.parquet"))])
    assert all_ids == table.column("id").to_pylist()
    assert len(resolve_shards(dataset)) == 5


@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_cover_every_row_exactly_once(dataset, all_ids, shuffle):
    seen = []
    for k in range(4):
        reader = DatasetReader(dataset, seed=9, shuffle=shuffle, shard_index=k, num_shards=4)
        assert reader.rows_per_epoch in (7, 8)
        seen += _ids(reader.next_batch(reader.rows_per_epoch))
        assert reader.epoch == 1 and reader.position == 0
    assert sorted(seen) == sorted(all_ids) and len(seen) == N


def test_shuffle_differs_per_epoch_and_is_reproducible(dataset, all_ids):
    a = DatasetReader(dataset, seed=5)
    epochs = [_ids(a.next_batch(N)) for _ in range(3)]
    assert all(sorted(e) == sorted(all_ids) for e in epochs), "each epoch is a permutation of the rows"
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != all_ids
    b = DatasetReader(dataset, seed=5)
    assert _ids(b.next_batch(3 * N)) == sum(epochs, [])
    c = DatasetReader(dataset, seed=6)
    assert _ids(c.next_batch(N)) != epochs[0]
    plain = DatasetReader(dataset, shuffle=False)
    assert _ids(plain.next_batch(N + 2)) == all_ids + all_ids[:2]


@pytest.mark.parametrize("split_at", [0, 1, 23, 29, 30, 31, 47])
def test_cursor_resume_never_repeats_or_skips(dataset, split_at):
    reference = _ids(DatasetReader(dataset, seed=2, shard_index=1, num_shards=2).next_batch(50))
    first = DatasetReader(dataset, seed=2, shard_index=1, num_shards=2)
    head = _ids(first.next_batch(split_at))
    saved = json.loads(json.dumps(first.state_dict()))  # what a checkpoint writes
    resumed = DatasetReader(dataset, seed=2, shard_index=1, num_shards=2)
    resumed.load_state_dict(saved)
    assert head + _ids(resumed.next_batch(50 - split_at)) == reference  # crosses epochs (15 rows per epoch)


def test_cursor_of_another_run_is_refused(dataset):
    saved = DatasetReader(dataset, seed=2).state_dict()
    other = DatasetReader(dataset, seed=3)
    with pytest.raises(DatasetError, match="seed: saved 2, now 3"):
        other.load_state_dict(saved)
    other.load_state_dict(saved, strict=False)  # explicit override keeps epoch/position
    bad = dict(saved, position=N)
    with pytest.raises(DatasetError, match="out of range"):
        DatasetReader(dataset, seed=2).load_state_dict(bad)


def test_reader_streams_row_groups_through_a_bounded_cache(dataset):
    reader = DatasetReader(dataset, seed=0, cache_bytes=0)
    reader.next_batch(N)
    assert len(reader._source.cache) == 1  # only the row group in use is held


def test_from_config(dataset, all_ids):
    cfg = TrainConfig.model_validate({"data": {"train": str(dataset), "eval": str(dataset)}, "seed": 4})
    train = DatasetReader.from_config(cfg)
    assert train.shuffle and train.seed == 4 and train.on_corrupt == "skip"
    assert _ids(DatasetReader.from_config(cfg, split="eval").next_batch(N)) == all_ids
    cfg2 = TrainConfig.model_validate({"data": {"train": str(dataset)}})
    with pytest.raises(DatasetError, match="data.eval is not set"):
        DatasetReader.from_config(cfg2, split="eval")


# ----------------------------------------------------------------------------------------------- errors


def test_missing_and_empty_paths_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match=f"{tmp_path / 'nope'} does not exist"):
        DatasetReader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no \*\.parquet shards in folder .*empty"):
        DatasetReader(tmp_path / "empty")
    pq.write_table(pa.table({"id": ["x"], "image": [b"y"]}), tmp_path / "foreign.parquet")
    with pytest.raises(
        DatasetError, match="foreign.parquet is not in the dataset schema.*missing column 'mask'"
    ):
        DatasetReader(tmp_path / "foreign.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match="junk.parquet is not a readable Parquet file"):
        DatasetReader(tmp_path / "junk.parquet")


def _corrupt_shard(path: Path) -> dict[int, str]:
    """A shard whose rows 1, 3, 4, 5, 6 are corrupt; returns row -> expected words in the report."""
    good = [generate_item(3, i, "salient", size=40).sample.to_row() for i in range(7)]
    rows = [dict(r) for r in good]
    rows[1]["image"] = b"\x89PNG\r\n\x1a\ngarbage"
    rows[3]["mask"] = encode_png(np.zeros((20, 40), dtype=bool))
    rows[4]["width"] = 41
    rows[5]["task"] = "segmentation"
    rows[6]["instruction"] = None
    nullable = pa.schema([f.with_nullable(True) for f in DATASET_SCHEMA])
    pq.write_table(pa.Table.from_pylist(rows, schema=nullable), path, row_group_size=3)
    return {
        1: "image",
        3: "mask is 40x20",
        4: "width=41",
        5: "'task' is invalid",
        6: "null value in field(s) instruction",
    }


def test_corrupt_rows_are_skipped_with_shard_and_row(tmp_path):
    expected = _corrupt_shard(tmp_path / "bad.parquet")
    reader = DatasetReader(tmp_path, shuffle=False, on_corrupt="skip")
    batch = reader.next_batch(3)  # rows 0, 2, then the epoch ends and row 0 again
    assert [s.id[-7:] for s in batch] == ["0000000", "0000002", "0000000"] and reader.epoch == 1
    assert reader.num_corrupt == 5 and [r.row for r in reader.corrupt_reports] == sorted(expected)
    for report in reader.corrupt_reports:
        assert report.shard.endswith("bad.parquet") and expected[report.row] in report.reason
        assert str(report).startswith(f"{report.shard} row {report.row}: ")
    reports = []
    assert len(list(iter_samples(tmp_path, reports=reports))) == 2 and len(reports) == 5


def test_corrupt_rows_raise_by_policy(tmp_path):
    _corrupt_shard(tmp_path / "bad.parquet")
    reader = DatasetReader(tmp_path, shuffle=False, on_corrupt="raise")
    with pytest.raises(CorruptSampleError, match=r"bad\.parquet row 1: .*image.*not a decodable"):
        reader.next_batch(2)


def test_all_corrupt_is_an_error_not_a_hang(tmp_path):
    row = generate_item(0, 0, "salient", size=40).sample.to_row()
    row["mask"] = b"nope"
    pq.write_table(pa.Table.from_pylist([row, row], schema=DATASET_SCHEMA), tmp_path / "x.parquet")
    with pytest.raises(DatasetError, match="every row this worker reads is corrupt"):
        DatasetReader(tmp_path).next_batch(1)


def test_cli_check_reports_corrupt_rows(tmp_path, dataset, capsys):
    _corrupt_shard(tmp_path / "bad.parquet")
    assert main(["data", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "2 valid rows, 5 corrupt" in out and "bad.parquet row 3: " in out
    assert main(["data", "check", str(dataset)]) == 0


# ----------------------------------------------------------------------------------------------- codecs


def test_png_round_trip_and_rgb_order():
    img = np.zeros((5, 6, 3), dtype=np.uint8)
    img[..., 0] = 200  # red
    assert np.array_equal(decode_image(encode_png(img)), img)
    bgr_file = cv2.imencode(".png", img[:, :, ::-1])[1].tobytes()  # an ordinary PNG written by OpenCV
    assert decode_image(bgr_file)[0, 0].tolist() == [200, 0, 0]
    grey = cv2.imencode(".png", np.full((4, 4), 77, np.uint8))[1].tobytes()
    assert decode_image(grey).shape == (4, 4, 3)
    mask = np.eye(5, dtype=bool)
    assert encode_png(mask) == encode_png(mask.copy()) and np.array_equal(decode_mask(encode_png(mask)), mask)


def test_mask_binarisation_rule():
    ones = np.array([[0, 1, 1]], np.uint8)
    assert decode_mask(encode_png(ones)).tolist() == [[False, True, True]]  # 0/1: > 0
    aa = np.array([[0, 127, 128, 255]], np.uint8)
    assert decode_mask(encode_png(aa)).tolist() == [[False, False, True, True]]  # 0/255 grey: >= 128
    rgb = cv2.imencode(".png", np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8))[1].tobytes()
    assert decode_mask(rgb).tolist() == [[False, True]]
    deep = cv2.imencode(".png", np.array([[0, 30000, 40000]], np.uint16))[1].tobytes()
    assert decode_mask(deep).tolist() == [[False, False, True]]


def test_codec_errors_say_what_is_wrong():
    with pytest.raises(CorruptSampleError, match="empty bytes"):
        decode_image(b"")
    with pytest.raises(CorruptSampleError, match=r"mask: 4 bytes starting b'abcd' are not a decodable"):
        decode_mask(b"abcd")
    img, mask = encode_png(np.zeros((4, 6, 3), np.uint8)), encode_png(np.zeros((4, 6), bool))
    decode_sample_arrays(img, mask, width=6, height=4)
    with pytest.raises(CorruptSampleError, match="image is 6x4 .* width=5, height=4"):
        decode_sample_arrays(img, mask, width=5, height=4)
    with pytest.raises(ValueError, match="expected uint8 or bool"):
        encode_png(np.zeros((2, 2), np.float32))


def test_table_schema_is_the_dataset_schema():
    table = samples_to_table([generate_item(0, 0, size=32).sample])
    assert table.schema.equals(DATASET_SCHEMA)
